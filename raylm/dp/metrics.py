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

from typing import Any, Dict, List

DESCRIPTIONS = {
    "dp_wave": "Current lockstep wave of the expert-parallel DP group",
    "dp_waves_completed": "Lockstep waves completed",
    "dp_ranks_running": "DP replicas stepping in the current wave",
    "dp_dummy_steps": "Dummy forwards run by a DP replica to keep lockstep (cumulative)",
    "dp_dummy_step_seconds": "Seconds of a DP replica's own work in dummy forwards, collective waits excluded (cumulative)",
}
PER_RANK = {"dp_dummy_steps": "dp_dummy_steps", "dp_dummy_step_seconds": "dp_dummy_seconds"}  # metric: stats key


def lockstep_values(waves, stats: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The metric values: app-wide ones, and per DP rank dummy steps."""
    lockstep = [s for s in stats.values() if "dp_dummy_steps" in s]
    values = {"dp_wave": waves.wave, "dp_waves_completed": waves.completed,
              "dp_ranks_running": sum(1 for s in lockstep if s.get("dp_running"))}
    for metric, key in PER_RANK.items():
        values[metric] = {str(s.get("dp_rank", 0)): s.get(key, 0) for s in lockstep}
    return values


def export_coordinator_metrics(gauges, waves, stats) -> Dict[str, Any]:
    """Set the Ray gauges (created on first use; returned for the next call)."""
    from ray.util.metrics import Gauge

    if gauges is None:
        gauges = {name: Gauge(f"raylm_{name}", desc, tag_keys=("dp_rank",) if name in PER_RANK else ())
                  for name, desc in DESCRIPTIONS.items()}
    values = lockstep_values(waves, stats)
    for name, value in values.items():
        if name in PER_RANK:
            for rank, count in value.items():
                gauges[name].set(count, tags={"dp_rank": rank})
        else:
            gauges[name].set(value)
    return gauges


def publish_lockstep(sink, control: Dict[str, Any], stats: List[Dict[str, Any]]) -> None:
    """The same values into the ingress's prometheus registry (`sink.lockstep` gauges)."""
    sink.set_lockstep("dp_wave", control.get("wave", 0), {})
    sink.set_lockstep("dp_waves_completed", control.get("waves_completed", 0), {})
    lockstep = [s for s in stats if "dp_dummy_steps" in s]
    sink.set_lockstep("dp_ranks_running", sum(1 for s in lockstep if s.get("dp_running")), {})
    for s in lockstep:
        for metric, key in PER_RANK.items():
            sink.set_lockstep(metric, s.get(key, 0), {"dp_rank": str(s.get("dp_rank", 0))})
