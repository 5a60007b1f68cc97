"""Offline API: `LLM(model=...).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

from tqdm.auto import tqdm

from raylm.config import EngineConfig
from raylm.options import EngineArgs, engine_option_names
from raylm.engine.llm_engine import LLMEngine, PromptType
from raylm.outputs import RequestOutput
from raylm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

def build_engine_config(**kwargs: Any) -> EngineConfig:
    """Flat keyword options (vLLM's names; raylm.options) -> EngineConfig. An unknown name
    or a bad value raises a ValueError naming it."""
    unknown = sorted(set(kwargs) - engine_option_names())
    if unknown:
        raise ValueError(f"unknown engine option {unknown[0]!r}")
    return EngineArgs(**kwargs).engine_config()


class LLM:
    """An engine in this process for batch generation.

    Options use vLLM's names: dtype, max_model_len, seed, block_size, kv_cache_memory
    (bytes or a fraction of free memory), num_blocks, enable_prefix_caching, max_num_seqs,
    max_num_batched_tokens, tensor_parallel_size, pipeline_parallel_size. With TP/PP the
    model runs on Ray worker actors (`ray.init()` is called if Ray is not up; options
    worker_num_cpus and pipeline_layer_split shape the grid); `shutdown()` stops them.
    """

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        """`model`: an embedded model name or a local HF dir (default: raylm.options' default);
        `kwargs`: any engine option (raylm.options.engine_options())."""
        self.engine = LLMEngine(build_engine_config(**kwargs,
                                                    **({"model": model} if model is not None
                                                       else {})))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt; tokenize_prompt rejects unknown types by name
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:  # nothing half-added stays in the engine
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: Optional[dict] = None) -> List[RequestOutput]:
        """One conversation (a list of {'role','content'}) or a list of them, through the
        model's chat template."""
        conversations = ([messages] if messages and isinstance(messages[0], dict)
                         else list(messages))
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt,
                                                                 chat_template_kwargs)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True,
                            chat_template_kwargs: Optional[dict] = None) -> List[int]:
        tok = self.engine.tokenizer
        if not tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with "
                             "plain prompts")
        out = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                      tokenize=True, return_dict=True,
                                      **(chat_template_kwargs or {}))
        return list(out["input_ids"])

    def _run(self, ids: List[str], use_tqdm: bool) -> List[RequestOutput]:
        results: Dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]

    def stats(self):
        return self.engine.core.stats()

    def shutdown(self) -> None:
        """Stop the engine's workers (Ray actors with TP/PP); the LLM is unusable after."""
        self.engine.core.shutdown()
