"""The replica -> ingress output channel: a step's outputs in one frame, to the right
requests, and only from a sender that knows the ingress's token."""
import asyncio
import pickle

import pytest

from raylm.outputs import CompletionOutput, RequestOutput
from raylm.serve import output_channel
from raylm.serve.output_channel import ChannelAddress, OutputReceiver, OutputSender


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, None, [1, 2],
                         [CompletionOutput(0, f"t{token}", [token], None, None)],
                         finished=finished)


async def _get(queue: asyncio.Queue):
    return await asyncio.wait_for(queue.get(), 10)


def test_outputs_reach_their_requests_one_frame_per_flush(monkeypatch):
    frames = []
    dumps = pickle.dumps
    monkeypatch.setattr(output_channel.pickle, "dumps",
                        lambda obj, **kw: frames.append(obj) or dumps(obj, **kw))

    async def main():
        receiver = OutputReceiver("127.0.0.1")
        address = await receiver.address()
        (ka, qa), (kb, qb) = receiver.open(), receiver.open()
        sender = OutputSender()
        conn = await sender.connection(address)
        assert await sender.connection(address) is conn  # one connection per ingress
        conn.send(ka, _out("a", 7))
        conn.send(kb, _out("b", 8))
        sender.flush()  # what the engine does after a step
        a, b = await _get(qa), await _get(qb)
        conn.send(ka, _out("a", 9, finished=True))
        await conn.drain()
        last = await _get(qa)
        sender.close()
        receiver.shutdown()
        return a, b, last, qb.empty()

    a, b, last, b_empty = asyncio.run(main())
    assert (a.request_id, a.outputs[0].token_ids) == ("a", [7])
    assert (b.request_id, b.outputs[0].token_ids) == ("b", [8])
    assert last.finished and last.outputs[0].text == "t9" and b_empty
    # both requests' outputs of the first step in one frame
    assert [len(f) for f in frames] == [2, 1]


def test_a_sender_without_the_token_is_refused_and_delivers_nothing():
    async def main():
        receiver = OutputReceiver("127.0.0.1")
        address = await receiver.address()
        key, queue = receiver.open()
        sender = OutputSender()
        conn = await sender.connection(ChannelAddress(address.host, address.port, "0" * 32))
        conn.send(key, _out("a", 1))
        conn.flush()
        reader_gone = await asyncio.wait_for(_closed_by_peer(conn), 10)
        await asyncio.sleep(0)  # let any (wrongly) received frame reach the queue
        receiver.shutdown()
        return reader_gone, queue.empty()

    assert asyncio.run(main()) == (True, True)


async def _closed_by_peer(conn) -> bool:
    """Write until the peer's close shows up as an error (a poll with the caller's deadline)."""
    while not conn.writer.is_closing():
        try:
            conn.writer.write(b"\0" * 4)
            await conn.writer.drain()
        except ConnectionError:
            return True
        await asyncio.sleep(0.01)
    return True


def test_outputs_of_a_closed_request_are_dropped():
    async def main():
        receiver = OutputReceiver("127.0.0.1")
        address = await receiver.address()
        (k_gone, q_gone), (k_live, q_live) = receiver.open(), receiver.open()
        receiver.close(k_gone)
        conn = await OutputSender().connection(address)
        conn.send(k_gone, _out("gone", 1))
        conn.send(k_live, _out("live", 2))
        await conn.drain()
        live = await _get(q_live)
        receiver.shutdown()
        return live.request_id, q_gone.empty(), k_gone in receiver.queues

    assert asyncio.run(main()) == ("live", True, False)


def test_a_broken_connection_is_replaced_on_next_use():
    async def main():
        receiver = OutputReceiver("127.0.0.1")
        address = await receiver.address()
        gone = OutputReceiver("127.0.0.1")  # another ingress, which then goes away
        sender = OutputSender()
        (await sender.connection(await gone.address())).writer.close()
        first = await sender.connection(address)
        first.writer.close()
        second = await sender.connection(address)
        assert list(sender._conns) == [address]  # the broken one to `gone` was dropped too
        gone.shutdown()
        key, queue = receiver.open()
        second.send(key, _out("a", 3))
        await second.drain()
        got = await _get(queue)
        receiver.shutdown()
        return first is not second, got.outputs[0].token_ids

    assert asyncio.run(main()) == (True, [3])


def test_drain_on_a_closed_connection_raises():
    async def main():
        receiver = OutputReceiver("127.0.0.1")
        conn = await OutputSender().connection(await receiver.address())
        conn.writer.close()
        receiver.shutdown()
        with pytest.raises(ConnectionError):
            await conn.drain()

    asyncio.run(main())
