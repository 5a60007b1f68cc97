"""Engine outputs from a replica to the ingress: one frame per engine step, not one Ray
object per token.

Serve's streaming handles move each streamed item as its own Ray object: at 32 requests in
flight that cost the engine replica ~1.5 ms of CPU per token (on the cores the model runs
on) and the ingress as much again. Here the request itself still goes through Serve (its
router, autoscaling, health checks and cancellation), as a unary call; the outputs come back
over one TCP connection per (replica, ingress) pair, all of a step's outputs for that
ingress in one pickled frame. The ingress listens on its node's address and gives each
request a key; a sender proves it may write by sending the ingress's secret token first.

Frames: 4-byte big-endian length, then pickle of [(key, RequestOutput), ...].
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 30


@dataclass(frozen=True)
class ChannelAddress:
    """Where an ingress receives outputs, and the token a sender must present."""

    host: str
    port: int
    token: str


class OutputReceiver:
    """Ingress side: a TCP server; `open(key)` gives the queue a request's outputs land in."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.token = secrets.token_hex(16)
        self.queues: Dict[int, asyncio.Queue] = {}
        self._keys = itertools.count()
        self._server: Optional[asyncio.base_events.Server] = None
        self._starting: Optional[asyncio.Future] = None

    async def address(self) -> ChannelAddress:
        """Start listening (once, on the running loop) and say where."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(asyncio.start_server(self._serve, self.host, 0))
        self._server = await asyncio.shield(self._starting)
        port = self._server.sockets[0].getsockname()[1]
        return ChannelAddress(self.host, port, self.token)

    def open(self) -> Tuple[int, asyncio.Queue]:
        key = next(self._keys)
        queue = self.queues[key] = asyncio.Queue()
        return key, queue

    def close(self, key: int) -> None:
        self.queues.pop(key, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = (await reader.readline()).strip().decode("ascii", "replace")
            if not hmac.compare_digest(token, self.token):
                logger.warning("output channel: a connection with a wrong token was refused")
                return
            while True:
                (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                if size > MAX_FRAME:
                    raise ValueError(f"output frame of {size} bytes")
                for key, item in pickle.loads(await reader.readexactly(size)):
                    queue = self.queues.get(key)
                    if queue is not None:  # else: the request was closed; its outputs are moot
                        queue.put_nowait(item)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the replica went away; its requests learn it from their Serve calls
        finally:
            writer.close()

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()


class _Connection:
    """One replica -> ingress connection; `send` buffers, a callback soon after flushes."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.buffer: List[Tuple[int, object]] = []

    def send(self, key: int, item) -> None:
        if not self.buffer:
            # the engine flushes after each step; this catches anything sent outside a step
            asyncio.get_running_loop().call_soon(self.flush)
        self.buffer.append((key, item))

    def flush(self) -> None:
        if not self.buffer or self.writer.is_closing():
            return
        payload = pickle.dumps(self.buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.buffer = []
        self.writer.write(_LEN.pack(len(payload)) + payload)

    async def drain(self) -> None:
        """Flush now and wait until the kernel has the bytes (or the connection broke)."""
        self.flush()
        if self.writer.is_closing():
            raise ConnectionError("the output channel to the ingress is closed")
        await self.writer.drain()


class OutputSender:
    """Replica side: one connection per ingress address, opened on first use."""

    def __init__(self) -> None:
        self._conns: Dict[ChannelAddress, asyncio.Future] = {}

    async def connection(self, address: ChannelAddress) -> _Connection:
        """The open connection to `address`; a broken one (that ingress restarted or went
        away) is dropped, here and for every other address, and a new one opened."""
        for addr in [a for a, f in self._conns.items() if _broken(f)]:
            del self._conns[addr]
        fut = self._conns.get(address)
        if fut is None:
            fut = self._conns[address] = asyncio.ensure_future(self._open(address))
        return await asyncio.shield(fut)

    @staticmethod
    async def _open(address: ChannelAddress) -> _Connection:
        _, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(address.token.encode("ascii") + b"\n")
        return _Connection(writer)

    def _open_connections(self) -> List[_Connection]:
        return [f.result() for f in self._conns.values() if f.done() and not _broken(f)]

    def flush(self) -> None:
        """Send what every connection buffered (the engine calls this after each step)."""
        for conn in self._open_connections():
            conn.flush()

    def close(self) -> None:
        for conn in self._open_connections():
            conn.writer.close()
        self._conns.clear()


def _broken(fut: asyncio.Future) -> bool:
    """A connection attempt that failed, or a connection since closed (pending: not broken)."""
    return fut.done() and (fut.cancelled() or fut.exception() is not None
                           or fut.result().writer.is_closing())
