"""The router's bookkeeping between coordinator reports, by hand (no Serve needed)."""
from collections import defaultdict
from types import SimpleNamespace

from raylm.dp.router import REPORT_LAG_S, WAITING_WEIGHT, LeastLoadedRouter


def test_a_report_absorbs_only_requests_routed_well_before_it():
    r = SimpleNamespace(_delta=defaultdict(int), _outstanding={})
    t = 100.0
    r._outstanding = {"old": ("A", WAITING_WEIGHT, t - 1.0), "new": ("A", WAITING_WEIGHT, t - REPORT_LAG_S / 2),
                      "other": ("B", WAITING_WEIGHT, t - 1.0)}
    r._delta.update({"A": 2 * WAITING_WEIGHT, "B": WAITING_WEIGHT})
    LeastLoadedRouter._absorb_report(r, "A", computed_at=t)
    # "old" is in the report (its running slot, 1, comes off when it completes); "new" may
    # not have reached the replica when the report was computed: it keeps its +4
    assert r._delta["A"] == WAITING_WEIGHT and r._delta["B"] == WAITING_WEIGHT
    assert r._outstanding["old"][1] == 1 and r._outstanding["new"][1] == WAITING_WEIGHT
    LeastLoadedRouter.on_request_completed(r, SimpleNamespace(unique_id="A"), "old")
    LeastLoadedRouter.on_request_completed(r, SimpleNamespace(unique_id="A"), "new")
    assert r._delta["A"] == -1 and "old" not in r._outstanding
