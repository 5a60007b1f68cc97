"""What the OpenAI HTTP layer needs from an engine, whatever stands behind it.

`LocalEngineClient` drives an AsyncEngine in this process (tests, single-process use);
the Serve ingress implements the same interface over a DeploymentHandle to the
`LLMServer` replicas. Requests arrive already tokenized; outputs are cumulative
RequestOutputs; closing the output iterator early aborts the request (its KV blocks are
freed), which is how a client disconnect propagates.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Dict, List

from raylm.outputs import RequestOutput
from raylm.sampling_params import SamplingParams


class EngineClient(ABC):
    model_name: str
    max_model_len: int
    tokenizer: Any

    @abstractmethod
    def generate(self, prompt_token_ids: List[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs; raises ValueError for bad input before yielding."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine(s) cannot serve."""

    async def stats(self) -> List[Dict[str, Any]]:
        """Per-replica engine stats (waiting, running, KV usage ...), for /metrics."""
        return []


class LocalEngineClient(EngineClient):
    """`admission` (optional, raylm.serve.admission.Admission): the in-flight bound, request
    deadline and shutdown drain the Serve ingress applies, here for one in-process engine."""

    def __init__(self, engine, model_name: str, admission=None) -> None:
        self.engine = engine  # raylm.engine.async_engine.AsyncEngine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.admission = admission

    def generate(self, prompt_token_ids, params, request_id):
        stream = self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id)
        return stream if self.admission is None else self.admission.guard(stream)

    async def check_health(self) -> None:
        self.engine.check_health()

    async def stats(self):
        s = self.engine.stats()
        return [{"dp_rank": 0, **s.__dict__}]
