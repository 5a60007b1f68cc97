"""Grammars by xgrammar (the default; vLLM's and SGLang's too): measured against
llguidance on this CPU, SmolLM2's vocabulary, a JSON schema, 32 matchers, it filled the
step's bitmask in 0.08 ms against 1.9 ms (docs/benchmarks.md, session 13)."""
from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch
import xgrammar as xgr

from raylm.sampling_params import StructuredOutputsParams
from raylm.structured.base import BaseGrammar, BaseGrammarBackend, register_grammar_backend

CACHE_BYTES = 64 << 20


class XGrammar(BaseGrammar):
    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


@register_grammar_backend("xgrammar")
class XGrammarBackend(BaseGrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # the engine keeps what it compiled (LLMEngine.compile_grammar); xgrammar's own cache
        # is bounded, so many distinct schemas cannot grow it without limit
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
        self._lock = threading.Lock()  # one compile at a time (max_threads=1 above)

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        try:
            with self._lock:
                return self._compile(spec)
        except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError) as exc:
            what = {"json": "JSON schema", "json_object": "JSON grammar", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[spec.kind]
            raise ValueError(f"{spec.field}: the {what} does not compile: "
                             f"{_first_line(exc)}") from None

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = spec.kind
        if kind == "json":
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            return self.compiler.compile_json_schema(schema, any_whitespace=False)
        if kind == "json_object":  # OpenAI's json_object: an object, not any JSON value
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec.regex)
        if kind == "choice":  # EBNF string literals take JSON's escapes
            return self.compiler.compile_grammar("root ::= "
                                                 + " | ".join(json.dumps(c) for c in spec.choice))
        return self.compiler.compile_grammar(spec.grammar)

    def matcher(self, compiled: xgr.CompiledGrammar) -> BaseGrammar:
        return XGrammar(compiled, self.vocab_size)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)[:300]  # xgrammar's "[time] file:line: "
