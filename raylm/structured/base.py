"""The grammar backend interface and its registry.

A backend compiles a `StructuredOutputsParams` into a grammar (cached: the same constraint
compiles once) and makes a matcher per request. Matchers live where the scheduler runs:
each step the engine fills one bitmask row per constrained request that samples (bit t of
a row set = token t allowed; int32 words, `ceil(vocab / 32)` per row: the layout xgrammar
and llguidance share), the workers apply it to those rows' logits before sampling, and the
scheduler advances each matcher by the token sampled.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Sequence

import torch

from raylm.kernels import cpu_ops
from raylm.registry import Registry
from raylm.sampling_params import StructuredOutputsParams


class BaseGrammar(ABC):
    """One request's position in its grammar."""

    vocab_size: int  # the logits' width, which bitmask rows cover

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """Bitmask rows for this grammar's vocabulary, every token allowed."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance by `token`; False if the grammar does not allow it (state unchanged)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask`."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The output is complete: nothing more may follow."""


class BaseGrammarBackend(ABC):
    name: str = ""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> Any:
        """A compiled grammar for `spec` (cached); a ValueError naming `spec.field` if it
        does not compile. Thread-safe: engines compile off their step loop."""

    @abstractmethod
    def matcher(self, compiled: Any) -> BaseGrammar:
        """A fresh matcher at the start of `compiled`."""


_BACKENDS = Registry("structured_outputs_backend")
register_grammar_backend = _BACKENDS.register


def create_grammar_backend(name: str, tokenizer: Any, vocab_size: int) -> BaseGrammarBackend:
    if name == "xgrammar" and name not in _BACKENDS:
        import raylm.structured.xgrammar_backend  # noqa: F401 (registers itself; imports xgrammar)
    return _BACKENDS.lookup(name, sorted(_BACKENDS) or ["xgrammar"])(tokenizer, vocab_size)


_SHIFTS: Dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set logits[rows[i], t] to -inf wherever bit t of bitmask[i] is clear (in place): a C
    loop on CPU (raylm.kernels.cpu_ops.mask_rows, when built), else torch ops."""
    if not len(rows):
        return
    if (logits.device.type == "cpu" and logits.dtype in cpu_ops.DTYPES and logits.stride(1) == 1
            and cpu_ops.available()):
        cpu_ops.mask_rows(logits, bitmask, torch.tensor(list(rows), dtype=torch.long))
        return
    vocab = logits.shape[-1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
