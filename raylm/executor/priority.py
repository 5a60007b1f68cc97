"""Engine and ingress processes run at normal CPU priority.

Ray starts its worker processes niced (15 by default, Ray's `worker_niceness`), so an
engine replica or worker actor ran below the HTTP proxy, the ingress, the GCS and the load
generator sharing its cores, and waited behind their per-token work under load. The engine
(and the ingress, whose per-token work would otherwise wait behind the engine: the HTTP
proxy is Ray's and keeps its niceness) sets every thread of its process back to nice 0 when
it starts (Linux niceness is per
thread; threads made later, torch's OpenMP pool included, inherit it from the thread that
makes them). Raising priority needs root or CAP_SYS_NICE: without them the engine keeps
Ray's niceness and says how to change it (`RAY_worker_niceness=0` before `ray start`).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

NORMAL = 0


def threads() -> list:
    """This process's thread ids (Linux); [0] (this thread) where /proc is missing."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def run_at_normal_priority() -> Optional[int]:
    """Set this process's threads to nice 0 if they run below it; returns the niceness it
    found (None where niceness does not exist)."""
    if not hasattr(os, "setpriority"):
        return None
    found = os.getpriority(os.PRIO_PROCESS, 0)
    if found <= NORMAL:
        return found
    try:
        for tid in threads():
            os.setpriority(os.PRIO_PROCESS, tid, NORMAL)
    except PermissionError:
        logger.warning("the engine runs at nice %d (Ray starts workers niced) and may not raise "
                       "it here: set RAY_worker_niceness=0 before `ray start`, or grant CAP_SYS_NICE",
                       found)
    except ProcessLookupError:  # a thread ended meanwhile: the others are set
        pass
    else:
        logger.info("engine threads: nice %d -> %d", found, NORMAL)
    return found
