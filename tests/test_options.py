"""Engine options are declared once, as raylm.config's fields. The option table here is
derived from that schema; every way in (LLM, each CLI command that builds an engine,
`raylm serve`, YAML `args:` and build_app) must accept each option with the schema's
default and carry a value set through it to the engine config."""
from __future__ import annotations

import typing

import pytest
import yaml

import raylm.llm
from raylm.cli import build_parser
from raylm.config import EngineConfig
from raylm.deployments.openai import ServeArgs, build_app
from raylm.llm import LLM, build_engine_config
from raylm.options import ENGINE_GROUPS, engine_kwargs, engine_options
from raylm.serve.launcher import serve_args

OPTIONS = engine_options()
# A value to set where the type alone does not give a valid one, and options it needs.
SAMPLES = {"model": "/models/x", "tokenizer": "/tokenizers/x", "dtype": "float32",
           "attention_backend": "torch", "kv_cache_dtype": "float32", "kv_cache_memory": "1GiB",
           "pipeline_layer_split": [2, 3], "expert_placement": [0], "sim_device": "a100",
           "sim_model": "llama-3-8b"}
NEEDS = {"expert_placement": {"enable_expert_parallel": True}}
# Where serving deliberately differs from the engine's default (ServeArgs declares why).
SERVE_DEFAULTS = {"max_waiting_requests": 256}
COMMANDS = [["generate", "x"], ["chat"], ["serve"], ["bench", "throughput"], ["bench", "latency"],
            ["bench", "step"], ["bench", "serve", "--backend", "inprocess"]]


def _sample(name):
    if name in SAMPLES:
        return SAMPLES[name]
    f = OPTIONS[name][1]
    kind = next((a for a in typing.get_args(f.annotation) if a is not type(None)), f.annotation)
    if f.annotation is bool:
        return not f.default
    if typing.get_origin(f.annotation) is typing.Literal:
        return next(c for c in typing.get_args(f.annotation) if c != f.default)
    if kind is int:
        return (f.default or 32) + 1
    if kind is float:
        return f.default / 2
    raise AssertionError(f"no sample value for {name} ({f.annotation}): add one to SAMPLES")


def _read(config: EngineConfig, name: str):
    return getattr(getattr(config, OPTIONS[name][0]), name)


def _flags(name, value):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    return [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]


def _config_from(cmd, argv):
    args = build_parser().parse_args(cmd + argv)
    return (serve_args(args).engine_config() if cmd == ["serve"]
            else build_engine_config(**engine_kwargs(args)))


def test_the_table_is_every_group_field_but_the_runtime_ones():
    fields = {n for cls in ENGINE_GROUPS.values() for n in cls.model_fields}
    assert set(OPTIONS) == fields - {"data_parallel_size", "data_parallel_rank",
                                     "data_parallel_store", "data_parallel_group"}
    assert {"kv_cache_dtype", "attention_backend", "device", "long_prefill_token_threshold",
            "step_timeout_s", "pipeline_layer_split", "gpu_memory_utilization"} <= set(OPTIONS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_every_option_with_the_schema_default(cmd):
    defaults, schema = _config_from(cmd, []), EngineConfig()
    for name in OPTIONS:
        want = (SERVE_DEFAULTS.get(name, _read(schema, name)) if cmd == ["serve"]
                else _read(schema, name))
        assert _read(defaults, name) == want, (cmd, name)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_value_set_any_way_reaches_the_engine_config(name, monkeypatch):
    value, needs = _sample(name), NEEDS.get(name, {})
    assert value != _read(EngineConfig(), name)
    argv = [a for k, v in {name: value, **needs}.items() for a in _flags(k, v)]
    for cmd in COMMANDS:
        assert _read(_config_from(cmd, argv), name) == value, (cmd, argv)
    built = []
    monkeypatch.setattr(raylm.llm, "LLMEngine", built.append)  # LLM's engine, not started
    LLM(**{name: value, **needs})
    assert _read(built[0], name) == value
    from_yaml = yaml.safe_load(yaml.safe_dump({name: value, **needs}))  # YAML `args:`
    assert _read(ServeArgs(**from_yaml).engine_config(), name) == value
    engine = build_app({name: value, **needs})._bound_deployment.init_args[1]  # what replicas get
    assert _read(EngineConfig(**engine), name) == value


def test_unknown_and_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown engine option 'max_num_seq'"):
        LLM(max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        build_engine_config(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_seq"):
        ServeArgs(max_num_seq=4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])
