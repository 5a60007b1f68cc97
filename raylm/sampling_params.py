"""Per-request sampling options, with vLLM's names and defaults."""
from __future__ import annotations

import copy
import json as _json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

_GREEDY_EPS = 1e-5
OUTPUT_KINDS = ("cumulative", "delta")
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    """One constraint on the output, enforced by a token mask each step (vLLM's names):
    `json` a JSON schema (dict or JSON text), `json_object` any JSON object, `regex`,
    `choice` one of some strings, `grammar` an EBNF grammar. `field` names the request
    field it came from, so an error about it names that field."""

    json: Union[None, str, Dict] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"{self.field} must set exactly one of {', '.join(STRUCTURED_KINDS)} "
                             f"(got {', '.join(given) or 'none'})")
        if self.choice is not None and (not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"{self.field}: choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """The constraint itself (not the field it came from): equal constraints, one key."""
        value = getattr(self, self.kind)
        return self.kind, value if isinstance(value, str) else _json.dumps(value, sort_keys=True)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. Penalties follow vLLM: repetition over prompt+output
    (divide positive logits, multiply negative ones), presence and frequency over the
    output only (OpenAI's definition). `logprobs=N` returns the sampled token's logprob
    plus the top N, computed from the raw model logits. Every invalid value raises a
    ValueError naming the field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Union[None, str, List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[Dict[int, float]] = None  # token id -> bias in [-100, 100]
    structured_outputs: Optional[StructuredOutputsParams] = None
    skip_special_tokens: bool = True
    # How an AsyncEngine stream reports progress: "cumulative" (every output holds all text
    # and tokens so far; the offline API's form) or "delta" (only what is new since the last
    # output; what crosses the Serve boundary). vLLM's RequestOutputKind, by name.
    output_kind: str = "cumulative"
    # Filled in by the engine from the tokenizer / generation config; not a user option.
    all_stop_token_ids: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        self.logit_bias = self.logit_bias or None
        if self.temperature < _GREEDY_EPS:
            # Greedy: the other filters cannot change an argmax.
            self.temperature, self.top_p, self.top_k, self.min_p = 0.0, 1.0, 0, 0.0

    def _validate(self) -> None:
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0,
             "must be -1, 0 (disabled) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("max_tokens",
             self.max_tokens is None
             or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "must be an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             "must be an integer >= 0"),
            ("logprobs",
             self.logprobs is None
             or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be an integer in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             "must be an integer in [0, 20]"),
            ("logit_bias", self.logit_bias is None or _valid_bias(self.logit_bias),
             "must map token ids (integers >= 0) to numbers in [-100, 100]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop),
             "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("output_kind", self.output_kind in OUTPUT_KINDS, f"must be one of {OUTPUT_KINDS}"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("structured_outputs", self.structured_outputs is None
             or isinstance(self.structured_outputs, StructuredOutputsParams),
             "must be a StructuredOutputsParams"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


def _valid_bias(bias) -> bool:
    return isinstance(bias, dict) and all(
        isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
        for t, b in bias.items())
