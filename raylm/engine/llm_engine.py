"""LLMEngine: prompts in, RequestOutputs out. Validates input, owns the tokenizer and
the OutputProcessor; the offline LLM and the AsyncEngine both drive one of these."""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Dict, List, Optional, Union

from raylm.config import EngineConfig, ModelConfig
from raylm.engine.core import EngineCore
from raylm.engine.output_processor import OutputProcessor
from raylm.engine.request import Request
from raylm.models.loader import load_hf_config, resolve_model_path
from raylm.outputs import RequestOutput
from raylm.sampling_params import SamplingParams
from raylm.structured import BaseGrammarBackend, create_grammar_backend

logger = logging.getLogger(__name__)

PromptType = Union[str, List[int], Dict]
GRAMMAR_CACHE = 256  # compiled constraints kept per engine


def max_model_len_for(model: ModelConfig, hf_config) -> int:
    """The configured max_model_len, capped by (and defaulting to) the model's positions."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    return min(model.max_model_len or limit, limit)


def load_tokenizer(model: ModelConfig, model_path: str):
    """The HF tokenizer: `model.tokenizer` if set, else the one beside the weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.tokenizer or model_path)


def tokenizer_and_max_len(model: Union[ModelConfig, Dict]):
    """(HF tokenizer, max_model_len) for a model config, without building an engine."""
    model = model if isinstance(model, ModelConfig) else ModelConfig(**model)
    path = resolve_model_path(model.model)
    return load_tokenizer(model, path), max_model_len_for(model, load_hf_config(path))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model.model)
        self.hf_config = load_hf_config(self.model_path)
        self.tokenizer = load_tokenizer(config.model, self.model_path)
        self.max_model_len = max_model_len_for(config.model, self.hf_config)
        self.eos_token_ids = self._eos_ids()
        self.vocab_size = self.hf_config.vocab_size
        self.core = EngineCore(config, self.model_path, self.max_model_len)
        self.processor = OutputProcessor(self.tokenizer, config.scheduler.stream_interval)
        self._ids = itertools.count()
        self._grammars: Optional[BaseGrammarBackend] = None  # made at the first structured request
        # compiles may come from threads (AsyncEngine.prepare)
        self._grammars_lock = threading.Lock()
        self._compiled: Dict[tuple, object] = {}  # constraint -> compiled grammar, oldest first

    def _eos_ids(self) -> List[int]:
        ids = [self.tokenizer.eos_token_id]
        extra = getattr(self.hf_config, "eos_token_id", None)
        ids += extra if isinstance(extra, list) else [extra]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def tokenize_prompt(self, prompt: PromptType):
        """-> (text or None, token ids). Accepts text, token ids, or {'prompt'|'prompt_token_ids':
        ...}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt must be a string, a list of token ids or a dict (got "
                         f"{type(prompt).__name__})")

    def validate(self, prompt_ids: List[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; max_model_len is "
                             f"{self.max_model_len} (the prompt must leave room for at least one "
                             "generated token)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids out of vocabulary (size {self.vocab_size}): "
                             f"{bad[:5]}")
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams (got "
                             f"{type(params).__name__})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        # they index the logits (min_tokens masks them): out of range would fail the whole step
        if bad:
            raise ValueError(f"stop_token_ids out of vocabulary (size {self.vocab_size}): "
                             f"{bad[:5]}")
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids out of vocabulary (size {self.vocab_size}): "
                             f"{bad[:5]}")
        if params.structured_outputs is not None:
            self.compile_grammar(params)  # a constraint that does not compile fails here

    def compile_grammar(self, params: SamplingParams):
        """The request's compiled constraint; a ValueError naming its field if it does not
        compile. The last GRAMMAR_CACHE compiled are kept, read without a lock, so a request
        whose constraint was compiled (AsyncEngine.prepare, in a thread) never waits here
        behind another one's compile."""
        spec = params.structured_outputs
        key = spec.cache_key()
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = create_grammar_backend("xgrammar", self.tokenizer,
                                                        self.vocab_size)
        compiled = self._grammars.compile(spec)  # the backend serializes compiles itself
        with self._grammars_lock:
            self._compiled[key] = compiled
            while len(self._compiled) > GRAMMAR_CACHE:
                self._compiled.pop(next(iter(self._compiled)))
        return compiled

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        params = params or SamplingParams()
        text, prompt_ids = self.tokenize_prompt(prompt)
        self.validate(prompt_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        children = [self._child_params(params, i) for i in range(params.n)]
        ids = self.processor.add_request(request_id, text, prompt_ids, params, children)
        compiled = self.compile_grammar(params) if params.structured_outputs is not None else None
        for cid, cp in zip(ids, children):
            grammar = self._grammars.matcher(compiled) if compiled is not None else None
            self.core.add_request(Request(cid, prompt_ids, cp, grammar=grammar))
        return request_id

    def _child_params(self, params: SamplingParams, index: int) -> SamplingParams:
        child = params.clone()
        child.n = 1
        if child.seed is not None:
            child.seed += index  # n samples of one seeded request differ, and reproduce
        eos = set() if child.ignore_eos else set(self.eos_token_ids)
        child.all_stop_token_ids = eos | set(child.stop_token_ids)
        if child.max_tokens is None:
            child.max_tokens = self.max_model_len
        return child

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.processor.abort(request_id))

    def step(self) -> List[RequestOutput]:
        outputs, stopped = self.processor.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.processor.has_unfinished()

    def warmup(self, prompt_len: int = 64, max_tokens: int = 4) -> None:
        """Run one throwaway request (a prefill and a few decode steps) so the first real one
        does not pay for kernel JIT and first-touch page faults (seconds on CPU with oneDNN).
        Must run before any other request: it steps the engine until nothing is left."""
        if self.has_unfinished_requests():
            raise RuntimeError("warmup() must run on an idle engine")
        prompt_len = max(1, min(prompt_len, self.max_model_len - max_tokens - 1))
        ids = [i % self.vocab_size for i in range(100, 100 + prompt_len)]
        self.add_request({"prompt_token_ids": ids},
                         SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                         "raylm-warmup")
        while self.has_unfinished_requests():
            self.step()
