"""Waves: how DP replicas of an expert-parallel MoE model stay in lockstep.

Every MoE layer is a collective over all replicas, so while any replica has work, every
replica steps, the idle ones with a dummy forward. A run of such steps is a *wave*. Each
step the workers exchange "I have unfinished work" flags over the DP group (riding on the
token-count all-gather the MoE layers need anyway, so agreement costs no extra
collective); when no replica has any, all of them stop after that same step and wait.

`EngineWaves` is one replica's side (owned by its EngineCore, used on the engine loop);
`WaveTable` is the DP coordinator's. A request reaching a paused replica starts a wave
there and the replica announces START_DP_WAVE; the coordinator tells every replica, whose
paused engines then join with dummy steps. Wave numbers only grow: a start for an older
wave than a replica's is stale, yet a stale start at the coordinator while the app is
paused still starts the current wave (a request routed on old news must not wait).
"""
from __future__ import annotations

from typing import Callable, Optional


class EngineWaves:
    """One replica's wave state. `announce(event, wave)` (event "start" or "complete") tells
    the coordinator; it must not block (the serving layer submits an actor call)."""

    def __init__(self, announce: Optional[Callable[[str, int], None]] = None) -> None:
        self.wave = 0  # the current wave if running, else the next one to start
        self.running = False
        self.dummy_steps = 0
        # own work in dummy steps, collective waits excluded (the idle rank's cost)
        self.dummy_seconds = 0.0
        self.announce = announce or (lambda event, wave: None)

    def start_local(self) -> None:
        """Work arrived here while paused: start the wave and tell everyone."""
        if not self.running:
            self.running = True
            self.announce("start", self.wave)

    def on_start(self, wave: int) -> bool:
        """START_DP_WAVE(wave) from the coordinator; returns True if this replica now runs."""
        if self.running or wave < self.wave:
            return False  # already stepping, or a start for a wave that has ended here
        self.wave, self.running = wave, True
        return True

    def after_step(self, dummy: bool, ranks_with_work: int, seconds: float = 0.0) -> None:
        """Book one lockstep step; when no rank had work the wave ends here, on every rank."""
        if dummy and ranks_with_work > 0:  # (no rank busy: no forward ran)
            self.dummy_steps += 1
            self.dummy_seconds += seconds
        if ranks_with_work == 0:
            self.running = False
            self.announce("complete", self.wave)
            self.wave += 1

    def reset(self, wave: int) -> None:
        """A re-formed group (elastic scaling) starts paused at the coordinator's wave."""
        self.wave, self.running = wave, False


class WaveTable:
    """The coordinator's view: the current wave, whether the app is running it, and how
    many waves have completed."""

    def __init__(self) -> None:
        self.wave = 0
        self.running = False
        self.completed = 0
        self._last_completed = -1

    def start(self, wave: int) -> int:
        """A replica started `wave`; returns the wave every replica must run."""
        if wave > self.wave:
            self.wave = wave  # a replica ahead of us (we missed its completion): follow it
        self.running = True
        return self.wave

    def complete(self, wave: int) -> bool:
        """A replica finished `wave` (every replica reports it; the first report counts).
        Returns True if the app is now paused."""
        if wave > self._last_completed:
            self._last_completed, self.completed = wave, self.completed + 1
        if wave != self.wave or not self.running:
            return False  # a later wave has started already
        self.running, self.wave = False, wave + 1
        return True
