"""Lockstep waves and DP group membership, by hand: the state machines the replicas and the
DP coordinator run (raylm.dp.waves, raylm.dp.membership)."""
from __future__ import annotations

from raylm.dp.membership import Membership
from raylm.dp.waves import EngineWaves, WaveTable


def _engines(n):
    table, said = WaveTable(), []

    def announcer(rank):
        def announce(event, wave):
            said.append((rank, event, wave))
            (table.start if event == "start" else table.complete)(wave)
        return announce

    return table, [EngineWaves(announcer(r)) for r in range(n)], said


def test_a_wave_starts_on_local_work_and_ends_on_every_rank_together():
    table, (a, b), said = _engines(2)
    a.start_local()
    assert a.running and said == [(0, "start", 0)] and table.running and table.wave == 0
    assert b.on_start(table.wave) and b.running  # START_DP_WAVE reaches the idle rank
    for _ in range(3):
        a.after_step(dummy=False, ranks_with_work=1)
        b.after_step(dummy=True, ranks_with_work=1)
    assert (a.dummy_steps, b.dummy_steps) == (0, 3)
    # nobody had work: no forward ran, no dummy counted
    a.after_step(dummy=True, ranks_with_work=0)
    b.after_step(dummy=True, ranks_with_work=0)
    assert not a.running and not b.running and a.wave == b.wave == 1 and b.dummy_steps == 3
    assert table.wave == 1 and not table.running and table.completed == 1  # two reports, one wave


def test_stale_starts():
    table, (a, b), _ = _engines(2)
    a.start_local()
    b.on_start(0)
    a.after_step(False, 0)
    b.after_step(True, 0)
    assert not b.on_start(0) and not b.running  # a start for a wave that has ended here is stale
    # a request routed on old news reaches the coordinator while the app is paused: the
    # current wave starts anyway, and every rank follows it
    assert table.start(0) == 1 and table.running
    assert b.on_start(1) and b.running
    assert not b.on_start(1)  # already running


def test_a_start_racing_ahead_of_the_completion_is_followed():
    table = WaveTable()
    table.start(0)
    # a rank finished wave 0 and started 1 before rank 0's completion arrived
    assert table.start(1) == 1
    assert not table.complete(0) and table.running and table.wave == 1 and table.completed == 1
    assert table.complete(1) and table.wave == 2 and table.completed == 2


def test_membership_generations():
    m = Membership(target=2)
    m.join("a")
    assert not m.maybe_form() and m.generation == 0
    m.join("b")
    assert m.maybe_form() and m.generation == 1 and m.ranks == {"a": 0, "b": 1}
    assert not m.maybe_form()  # nothing changed
    m.mark_ready("a", 1)
    assert not m.formed
    m.mark_ready("b", 0)  # a stale generation's ready does not count
    m.mark_ready("b", 1)
    assert m.formed
    m.target = 3  # scale up: the old members keep their ranks, the joiner follows
    m.join("c")
    assert m.maybe_form() and m.ranks == {"a": 0, "b": 1, "c": 2} and not m.formed
    m.target = 1  # scale down: survivors are renumbered from 0
    m.leave("a")
    assert not m.maybe_form()  # still two alive
    m.leave("b")
    assert m.maybe_form() and m.ranks == {"c": 0} and m.generation == 3
    m.leave("c")
    m.join("d")  # a replacement for a crashed replica forms a new generation too
    assert m.maybe_form() and m.ranks == {"d": 0} and m.generation == 4
