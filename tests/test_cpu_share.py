"""Core sharing between a node's CPU engines (raylm.executor.cpu_share): shares against
hand-counted splits, a dead engine's slot, and the step thread's torch threads."""
import os
import subprocess
import sys

import pytest
import torch

from raylm.executor.cpu_share import NodeCpuShare, remove_stale_tables, table_path


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "cores")


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_an_engine_busy_alone_runs_on_the_idle_ones_cores(path):
    a, b, c = NodeCpuShare(path, 0, 2), NodeCpuShare(path, 1, 1), NodeCpuShare(path, 5, 1)
    a.before_step(True)
    assert a.threads == 4 and torch.get_num_threads() == 4  # 2 + 1 + 1, nobody else busy
    b.before_step(True)
    assert b.threads == 2  # 4 cores over 2 busy engines
    a.before_step(True)
    assert a.threads == 2  # a gives back what it borrowed at its next step
    c.before_step(True)
    assert c.threads == 1 and c.share() == 1  # 4 over 3: rank 0 takes the remainder
    assert a.share() == 2 and b.share() == 1
    b.before_step(False)
    c.before_step(False)
    assert a.share() == 4


def test_never_below_an_engines_own_reservation(path):
    big, small = NodeCpuShare(path, 0, 3), NodeCpuShare(path, 1, 1)
    big.before_step(True)
    small.before_step(True)
    assert big.share() == 3 and small.share() == 2  # 4 over 2; big keeps its 3


def test_a_dead_engines_slot_lends_nothing_and_takes_nothing(path):
    code = ("import sys; from raylm.executor.cpu_share import NodeCpuShare; "
            "NodeCpuShare(sys.argv[1], 3, 2).before_step(True)")
    subprocess.run([sys.executable, "-c", code, path], check=True)  # exits still marked busy
    alive = NodeCpuShare(path, 0, 1)
    assert alive.share() == 1  # the dead one's 2 cores are not lent, nor is it counted busy


def test_a_closed_slot_is_free_and_the_last_one_out_removes_the_table(path):
    a, b = NodeCpuShare(path, 0, 1), NodeCpuShare(path, 1, 1)
    assert a.share() == 2
    b.close()
    assert a.share() == 1 and os.path.exists(path)  # a still uses it
    a.close()
    assert not os.path.exists(path)


def test_bad_slots_are_value_errors(path):
    with pytest.raises(ValueError, match="DP ranks 0..63"):
        NodeCpuShare(path, 64, 1)
    with pytest.raises(ValueError, match="at least one core"):
        NodeCpuShare(path, 0, 0)
    assert table_path("abcdef0123456789ffff", "app").endswith("raylm-cores-abcdef0123456789-app")


def test_killed_engines_tables_are_removed_by_the_next_engine(tmp_path):
    code = ("import sys; from raylm.executor.cpu_share import NodeCpuShare; "
            "NodeCpuShare(sys.argv[1], 0, 1).before_step(True)")
    stale, young = tmp_path / "raylm-cores-a-app", tmp_path / "raylm-cores-b-app"
    for table in (stale, young):
        subprocess.run([sys.executable, "-c", code, str(table)], check=True)  # exits, no close()
    live, other = NodeCpuShare(str(tmp_path / "raylm-cores-c-app"), 0, 1), tmp_path / "unrelated"
    other.write_bytes(b"")
    an_hour_ago = os.stat(stale).st_mtime - 3600
    for path in (stale, other, live.path):
        os.utime(path, (an_hour_ago, an_hour_ago))
    NodeCpuShare(str(tmp_path / "raylm-cores-d-app"), 0, 1)
    # dead and old: removed; dead but young (may be starting), live, not a table: kept
    assert not stale.exists() and young.exists() and os.path.exists(live.path) and other.exists()
    assert remove_stale_tables(str(tmp_path), older_than_s=0) == [str(young)]
