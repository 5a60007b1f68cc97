"""The DP coordinator's lockstep metrics, for the Ray dashboard (ray.util.metrics, exported
by the coordinator's process) and the ingress's /metrics (from the same values).

raylm:dp_wave              the current wave number (the next one while paused)
raylm:dp_waves_completed   waves completed since the app started
raylm:dp_ranks_running     replicas stepping in the current wave
raylm:dp_dummy_steps       dummy forwards per replica (label dp_rank), cumulative
raylm:dp_dummy_step_seconds  their own work per replica (waits in collectives excluded), cumulative
(On the Ray dashboard the prefix is `raylm_`, like the engine replicas' metrics.)
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

DESCRIPTIONS = {
    "dp_wave": "Current lockstep wave of the expert-parallel DP group",
    "dp_waves_completed": "Lockstep waves completed",
    "dp_ranks_running": "DP replicas stepping in the current wave",
    "dp_dummy_steps": "Dummy forwards run by a DP replica to keep lockstep (cumulative)",
    "dp_dummy_step_seconds": "Seconds of a DP replica's own work in dummy forwards, collective "
                             "waits excluded (cumulative)",
}
# metric: stats key
PER_RANK = {"dp_dummy_steps": "dp_dummy_steps", "dp_dummy_step_seconds": "dp_dummy_seconds"}


def lockstep_values(wave: int, waves_completed: int, stats: Iterable[Dict[str, Any]]):
    """(metric, value, tags) for every lockstep gauge: app-wide ones, then per DP rank."""
    lockstep = [s for s in stats if "dp_dummy_steps" in s]
    yield "dp_wave", wave, {}
    yield "dp_waves_completed", waves_completed, {}
    yield "dp_ranks_running", sum(1 for s in lockstep if s.get("dp_running")), {}
    for s in lockstep:
        for metric, key in PER_RANK.items():
            yield metric, s.get(key, 0), {"dp_rank": str(s.get("dp_rank", 0))}


def export_coordinator_metrics(gauges, waves, stats: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Set the Ray gauges (created on first use; returned for the next call)."""
    from ray.util.metrics import Gauge

    if gauges is None:
        gauges = {name: Gauge(f"raylm_{name}", desc, tag_keys=("dp_rank",
                              ) if name in PER_RANK else ())
                  for name, desc in DESCRIPTIONS.items()}
    for name, value, tags in lockstep_values(waves.wave, waves.completed, stats.values()):
        gauges[name].set(value, tags=tags or None)
    return gauges


def publish_lockstep(sink, control: Dict[str, Any], stats: List[Dict[str, Any]]) -> None:
    """The same values into the ingress's prometheus registry (`sink.lockstep` gauges)."""
    for name, value, tags in lockstep_values(control.get("wave", 0),
                                             control.get("waves_completed", 0), stats):
        sink.set_lockstep(name, value, tags)
