"""Cores shared by the CPU engines of one app on one node (issue 17).

Two single-threaded engines on two cores serve more than one two-threaded engine under load
(no OpenMP barrier waits on a thread the rest of the app took off its core), but alone, one
of them prefills at half speed. So each engine owns its reservation (Ray's CPUs for its
replica) and, while it is the only busy one, also runs on the idle engines' cores: before
each step it marks itself busy in a small table in shared memory, counts the busy engines,
and sets its OpenMP threads to its share of the cores they reserve together.

The table is a file under /dev/shm, one slot per DP rank: (pid, cores reserved, busy). A
slot whose process is gone counts as idle. A change in the others is seen at the next step,
so for at most one step a newly busy engine shares its cores with a wider one. The last
engine out removes the file; the tables of engines that were killed (`ray stop --force`
sends SIGKILL) are removed by the next engine that opens a table in the same folder.
"""
from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from typing import List, Optional

SLOTS = 64
_SLOT = struct.Struct("<iii")  # pid, cores reserved, busy
PREFIX = "raylm-cores-"
STALE_AFTER_S = 60.0  # a younger table may belong to an engine still writing its first slot


def table_path(node_id: str, app: str) -> str:
    """The table of one app's engines on one node (Ray's node id is new every session)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"{PREFIX}{node_id[:16]}-{app}")


def remove_stale_tables(folder: str, older_than_s: float = STALE_AFTER_S) -> List[str]:
    """Remove the tables in `folder` that no live process holds a slot in and that were last
    modified over `older_than_s` ago; returns their paths."""
    removed = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            if not name.startswith(PREFIX) or time.time() - os.stat(path).st_mtime < older_than_s:
                continue
            with open(path, "rb") as f:
                data = f.read(SLOTS * _SLOT.size)
            if not _held(data[:len(data) - len(data) % _SLOT.size]):
                os.unlink(path)
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return removed


def _held(table) -> bool:
    """Whether a live process holds a slot of `table` (the bytes of whole slots)."""
    return any(pid and _alive(pid) for pid, _, _ in _SLOT.iter_unpack(table))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class NodeCpuShare:
    """One engine's slot in its node's table; `before_step` sets the step thread's OpenMP
    threads (it must run on the thread that steps the engine: the setting is per thread)."""

    def __init__(self, path: str, rank: int, cores: int) -> None:
        if not 0 <= rank < SLOTS:
            raise ValueError(f"cpu sharing holds DP ranks 0..{SLOTS - 1} (got {rank})")
        if cores < 1:
            raise ValueError(f"an engine reserves at least one core (got {cores})")
        self.path, self.rank, self.cores = path, rank, cores
        remove_stale_tables(os.path.dirname(path) or ".")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * _SLOT.size:
                os.ftruncate(fd, SLOTS * _SLOT.size)
            self.table = mmap.mmap(fd, SLOTS * _SLOT.size)
        finally:
            os.close(fd)
        self.threads: Optional[int] = None  # what the step thread was last set to
        self._write(busy=False)

    def _write(self, busy: bool) -> None:
        _SLOT.pack_into(self.table, self.rank * _SLOT.size, os.getpid(), self.cores, int(busy))

    def share(self) -> int:
        """Threads for this engine, busy now: the cores every live engine reserves, split
        among the busy ones (the first ranks take the remainder), at least its own."""
        pool, busy_ranks = 0, []
        for rank, (pid, cores, busy) in enumerate(_SLOT.iter_unpack(self.table)):
            if pid and (rank == self.rank or _alive(pid)):
                pool += cores
                if busy or rank == self.rank:
                    busy_ranks.append(rank)
        base, extra = divmod(pool, len(busy_ranks))
        return max(self.cores, base + (busy_ranks.index(self.rank) < extra))

    def before_step(self, busy: bool) -> None:
        """Mark this engine busy (a step is next) or idle (it waits for work); when busy, set
        the calling thread's OpenMP threads to `share()`."""
        self._write(busy)
        if not busy:
            return
        threads = self.share()
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            self.threads = threads

    def close(self) -> None:
        """Leave the table (this engine's cores count for nobody); the last live engine out
        removes the file. (An engine starting at that moment may keep an unlinked table and
        the next one a new file: both then count only themselves until they restart.)"""
        if self.table.closed:
            return
        _SLOT.pack_into(self.table, self.rank * _SLOT.size, 0, 0, 0)
        others = _held(self.table)
        self.table.close()
        if not others:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
