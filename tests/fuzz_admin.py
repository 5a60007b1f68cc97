"""Fuzz cases for the admin routes (/scale_elastic_ep, /is_scaling_elastic_ep): random bodies
and keys. Without an admin key configured every one must answer 404 (the routes do not exist);
with one, anything but the admin key gets 401, and with it a size below 1, past the app's
bound or not a number gets 400, the current size (a no-op scale) 200. Nothing a case sends
may change the replica set: the tests check it afterwards."""
from __future__ import annotations

import hypothesis.strategies as st

from tests.fuzz_cases import SCALARS, Case, Draw, dump_json

JSON_CT = {"content-type": "application/json"}
ADMIN_ROUTES = ("/scale_elastic_ep", "/is_scaling_elastic_ep")


def _size(d: Draw):
    """(new_data_parallel_size, expected status with the admin key). The field is a strict
    integer: "2", 2.0 and true are refused. A size that would really resize the app (1..max_dp
    other than dp) becomes 0, so that the fuzz never changes the replica set."""
    env = d.env
    refused = [0, -1, -(2 ** 63), env.max_dp + 1, 24550920, 10 ** 30, 2 ** 64, 1.5, "2", None, [],
               {}, True]
    size = d.weighted((55, lambda d: d.choice(refused)),
                      (25, st.integers(env.max_dp + 1, 10 ** 12)), (10, SCALARS),
                      (10, lambda d: env.dp))
    is_int = isinstance(size, int) and not isinstance(size, bool)
    if is_int and 1 <= size <= env.max_dp and size != env.dp:
        size = 0
    return size, "200" if is_int and size == env.dp else "400"


def _body(d: Draw):
    size, expect = _size(d)
    body = {"new_data_parallel_size": size}
    if d.pct(30):  # the per-call timeouts, good and bad
        key = d.choice(["timeout", "drain_timeout"])
        value = d.choice([0, -1, "x", None, 1e308, 30])
        body[key] = value
        ok = value in (1e308, 30) or (value is None and key == "timeout")
        expect = expect if ok else "400"
    if d.pct(5):
        body["unknown"] = 1
        expect = "400"
    return body, expect


def admin_case(d: Draw) -> Case:
    """One admin request; with an admin key configured its Authorization header is its own."""
    path = d.choice(ADMIN_ROUTES)
    body, expect = _body(d) if path == "/scale_elastic_ep" else ({}, "200")
    key = d.env.admin_api_key
    header = d.weighted((60, lambda d: f"Bearer {key}" if key else None),
                        (15, lambda d: f"Bearer {d.env.api_key}" if d.env.api_key else None),
                        (10, lambda d: None), (15, lambda d: f"Bearer {(key or 'sk-admin')}x"))
    if key is None:  # not there: `authorize` sends the inference key (or, with bad_auth, not)
        return Case("admin", "POST", path, dump_json(body), dict(JSON_CT), "404")
    if header != f"Bearer {key}":
        expect = "401"
    headers = {**JSON_CT, **({} if header is None else {"authorization": header})}
    return Case("admin", "POST", path, dump_json(body), headers, expect)
