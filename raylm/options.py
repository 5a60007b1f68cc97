"""Engine options, declared once. Each is a field of one EngineConfig group (raylm.config),
with its type, default, bounds and help; everything else derives from those fields:

- `EngineArgs`: the options as one flat pydantic model (vLLM's keyword names). `LLM(**kw)`
  goes through it; `ServeArgs` (the Serve builder's args, YAML's `args:`) extends it with
  the serving options.
- `add_engine_args(parser)`: the CLI flags of every command that builds an engine
  (`--max-model-len`, `--enable-prefix-caching/--no-enable-prefix-caching`, ...), with the
  schema's defaults; `engine_kwargs(args)` reads them back.
"""
from __future__ import annotations

import argparse
import typing
from typing import Any, Dict, Iterable, Tuple

from pydantic import AliasChoices, ConfigDict, create_model
from pydantic.fields import FieldInfo

from raylm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

ENGINE_GROUPS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                 "parallel": ParallelConfig}
# Set at run time by the serving layer (the DP coordinator and the replica count), never by users.
RUNTIME_ONLY = frozenset({"data_parallel_size", "data_parallel_rank", "data_parallel_store",
                          "data_parallel_group"})
# Extra spellings of some flags (vLLM's short ones, or the long one of a short field name).
FLAG_ALIASES = {"tensor_parallel_size": ["--tp"], "pipeline_parallel_size": ["--pp"],
                "dp": ["--data-parallel-size"], "distributed_executor_backend": ["--executor"]}


def engine_options() -> Dict[str, Tuple[str, FieldInfo]]:
    """Every user-settable engine option: name -> (its EngineConfig group, its field)."""
    return {name: (group, f) for group, cls in ENGINE_GROUPS.items()
            for name, f in cls.model_fields.items() if name not in RUNTIME_ONLY}


def engine_option_names() -> set:
    """Every name an engine option is accepted under: field names and their aliases (tp, pp)."""
    names = set()
    for name, (_, f) in engine_options().items():
        aliases = f.validation_alias.choices if isinstance(f.validation_alias,
                                                           AliasChoices) else []
        names |= {name, *(a for a in aliases if isinstance(a, str))}
    return names


def _engine_config(self, **runtime: Any) -> EngineConfig:
    """The EngineConfig these options describe (`runtime`: RUNTIME_ONLY fields to set too).
    Each group validates its own fields: a bad value raises a ValueError naming it."""
    from raylm.attention import attention_backend_names  # a registry: known once backends import

    if self.attention_backend not in attention_backend_names():
        raise ValueError(f"attention_backend must be one of {attention_backend_names()} "
                         f"(got {self.attention_backend!r})")
    groups: Dict[str, Dict[str, Any]] = {g: {} for g in ENGINE_GROUPS}
    for name, (group, _) in engine_options().items():
        groups[group][name] = getattr(self, name)
    groups["parallel"].update(runtime)
    return EngineConfig(**{g: cls(**groups[g]) for g, cls in ENGINE_GROUPS.items()})


EngineArgs = create_model(
    "EngineArgs",
    __config__=ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True),
    __doc__="Every engine option, flat (vLLM's names); `engine_config()` groups them.",
    **{name: (f.annotation, f) for name, (_, f) in engine_options().items()})
EngineArgs.engine_config = _engine_config


def add_engine_args(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """A flag per engine option (`--kebab-name`; `--tp`/`--pp` too), default = the schema's.
    `skip`: options the command declares itself with the same meaning (bench serve's --model)."""
    add_field_args(parser, {n: f for n, (_, f) in engine_options().items() if n not in skip},
                   "engine options")


def add_field_args(parser: argparse.ArgumentParser, fields: Dict[str, FieldInfo],
                   title: str) -> None:
    """A flag per pydantic field, typed from its annotation, its help the field's description
    and its default the field's (None where a factory makes it, e.g. from the environment)."""
    group = parser.add_argument_group(title)
    for name, f in fields.items():
        flags = [f"--{name.replace('_', '-')}"] + FLAG_ALIASES.get(name, [])
        default = None if f.default_factory is not None else f.default
        group.add_argument(*flags, dest=name, default=default, help=f.description,
                           **_argparse_type(f.annotation))


def _argparse_type(annotation) -> Dict[str, Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]  # Optional[X] -> X
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin in (list, typing.List):
        return {"nargs": "*", "type": typing.get_args(annotation)[0]}
    if annotation in (int, float):
        return {"type": annotation}
    return {}  # str, or a union the schema parses from a string (kv_cache_memory)


def engine_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The engine options a parsed command line sets (None: unset, the schema's default)."""
    return {name: getattr(args, name) for name in engine_options()
            if getattr(args, name, None) is not None}
