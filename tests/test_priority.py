"""Engine processes come back to normal CPU priority from Ray's worker niceness."""
import os
import subprocess
import sys

import pytest

CHILD = """
import logging, os, threading
from raylm.executor.priority import run_at_normal_priority, threads
logging.basicConfig(level=logging.INFO)
done = threading.Event()
helper = threading.Thread(target=done.wait)  # a thread made before the call
helper.start()
found = run_at_normal_priority()
later = threading.Thread(target=lambda: print("later", os.getpriority(os.PRIO_PROCESS, 0)))
later.start(); later.join()
print("found", found)
print("threads", sorted({os.getpriority(os.PRIO_PROCESS, t) for t in threads()}))
done.set(); helper.join()
"""


@pytest.mark.skipif(not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"),
                    reason="per-thread niceness is Linux's")
def test_a_niced_engine_process_returns_to_nice_0_on_every_thread():
    out = subprocess.run([sys.executable, "-c", CHILD], preexec_fn=lambda: os.nice(15), capture_output=True,
                         text=True, timeout=60, check=True)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["found"] == "15"
    if os.geteuid() == 0:  # may raise priority: every thread, and threads made later, at 0
        assert lines["threads"] == "[0]" and lines["later"] == "0"
        assert "nice 15 -> 0" in out.stderr
    else:  # may not: nothing changes, and the log says how to fix it
        assert lines["threads"] == "[15]" and "RAY_worker_niceness=0" in out.stderr


def test_a_process_at_normal_priority_is_left_alone():
    from raylm.executor.priority import run_at_normal_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before > 0:
        pytest.skip("this test process itself runs niced")
    assert run_at_normal_priority() == before and os.getpriority(os.PRIO_PROCESS, 0) == before
