"""Incremental detokenization with stop strings.

Text grows one token at a time through `tokenizers`' DecodeStream (primed with the
prompt's tail, so leading spaces and multi-byte characters come out right). A stop string
ends the request and cuts the text exactly before it (or after it, with
include_stop_str_in_output). While running, the last len(longest stop)-1 characters are
held back from `visible_text`, so a stream never shows the start of a stop string it later cuts.
"""
from __future__ import annotations

from typing import List, Optional

from tokenizers.decoders import DecodeStream

from raylm.sampling_params import SamplingParams

_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: List[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.params = params
        self.text = ""
        self.stop_reason: Optional[str] = None
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.num_tokens = 0
        if self.backend is not None:
            self.stream = DecodeStream(ids=list(prompt_token_ids[-_PRIME_TOKENS:]),
                                       skip_special_tokens=params.skip_special_tokens)
        else:
            self.token_ids: List[int] = []

    def update(self, new_token_ids: List[int]) -> bool:
        """Append tokens; returns True when a stop string was hit (text already cut)."""
        for token in new_token_ids:
            self.num_tokens += 1
            start = len(self.text)
            self.text += self._decode_one(token)
            if (self.params.stop and self.num_tokens >= self.params.min_tokens
                    and self._check_stop(start)):
                return True
        return False

    def _decode_one(self, token: int) -> str:
        if self.backend is not None:
            return self.stream.step(self.backend, token) or ""
        self.token_ids.append(token)  # slow path for tokenizers without a Rust backend
        full = self.tokenizer.decode(self.token_ids,
                                     skip_special_tokens=self.params.skip_special_tokens)
        if full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the token that completes it
        return full[len(self.text):]

    def _check_stop(self, new_start: int) -> bool:
        # The stop that completes first wins (ties: list order), as if the text were checked one
        # character at a time: the kept text then never contains any stop string.
        best = None
        for stop in self.params.stop:
            idx = self.text.find(stop, max(0, new_start - len(stop) + 1))
            if idx != -1 and (best is None or idx + len(stop) < best[0] + len(best[1])):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.text = self.text[:end]
        self.stop_reason = stop
        return True

    def visible_text(self, finished: bool) -> str:
        if finished or not self.holdback:
            return self.text
        return self.text[:max(0, len(self.text) - self.holdback)]
