"""SamplingParams validation and normalisation, checked against vLLM's documented rules."""
from __future__ import annotations

import math

import pytest

from raylm.sampling_params import SamplingParams

# (field named in the error, kwargs) -- every row is invalid under vLLM's rules.
BAD = [
    ("n", dict(n=0)),
    ("n", dict(n=-3)),
    ("n", dict(n=1.5)),
    ("temperature", dict(temperature=-0.01)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=math.nan)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=-0.5)),
    ("top_p", dict(top_p=1.0001)),
    ("top_p", dict(top_p=math.nan)),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=-100)),
    ("top_k", dict(top_k=2.5)),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.01)),
    ("min_p", dict(min_p=math.nan)),
    ("presence_penalty", dict(presence_penalty=2.01)),
    ("presence_penalty", dict(presence_penalty=-2.01)),
    ("frequency_penalty", dict(frequency_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-3.0)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-5)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=10, max_tokens=5)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=21)),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", ""])),
    ("stop_token_ids", dict(stop_token_ids=[5, -1])),
    ("seed", dict(seed=1.5)),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}={list(k.values())}" for f, k in BAD])
def test_bad_values_raise_naming_the_field(field, kwargs):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert field in str(info.value)


GOOD = [
    dict(),
    dict(n=4, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=3),
    dict(temperature=0.0),
    dict(top_p=1.0, top_k=0, min_p=0.0),
    dict(top_p=1e-6, min_p=1.0),
    dict(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=2.0),
    dict(presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=0.01),
    dict(max_tokens=1, min_tokens=1),
    dict(max_tokens=None, min_tokens=1000),
    dict(logprobs=0),
    dict(logprobs=20),
    dict(stop="###", stop_token_ids=[0, 7]),
    dict(stop=["a", "bc"], include_stop_str_in_output=True),
    dict(seed=-7),
    dict(ignore_eos=True, skip_special_tokens=False),
]


@pytest.mark.parametrize("kwargs", GOOD)
def test_good_values_accepted_and_kept(kwargs):
    p = SamplingParams(**kwargs)
    greedy = kwargs.get("temperature", 1.0) == 0.0
    for name, value in kwargs.items():
        if name == "stop":
            assert p.stop == ([value] if isinstance(value, str) else value)
        elif greedy and name in ("top_p", "top_k", "min_p"):
            continue
        else:
            assert getattr(p, name) == value, name


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.skip_special_tokens is True
    assert not p.greedy


def test_top_k_minus_one_means_disabled():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


def test_temperature_zero_is_greedy_and_resets_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.greedy
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.0, 1.0, 0, 0.0)
    assert not SamplingParams(temperature=0.01).greedy


def test_filters_are_validated_even_when_greedy():
    # Normalisation to greedy must not hide an invalid value.
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=0.0, top_p=0.0)


def test_stop_normalisation_and_clone_independence():
    p = SamplingParams(stop="END", stop_token_ids=None)
    assert p.stop == ["END"] and p.stop_token_ids == []
    q = p.clone()
    q.stop.append("X")
    q.all_stop_token_ids.add(9)
    assert p.stop == ["END"] and p.all_stop_token_ids == set()
