"""Routing policies: which engine replica a request goes to, given every candidate's load.

A policy orders the candidates best-first (the first is the choice, the rest fallbacks
should it refuse). Every policy sees the same inputs, the router's load scores
(`waiting * 4 + running`, corrected for what it routed since each replica's report) and
each replica's prefix-cache summary, so a comparison between policies compares the
decisions, not the signals:

  least_loaded   the lowest score (random among ties); raylm's default.
  power_of_two   the lower score of two replicas drawn at random (Ray Serve's default
                 policy; Serve probes queue lengths, here the scores stand in for them).
  round_robin    each replica in turn, ignoring load.
  prefix_aware   of the replicas whose score is within `max_imbalance` of the lowest, the
                 one holding the longest cached prefix of the prompt; least_loaded when
                 none holds any.

`create_routing_policy(name, **options)` builds one; ROUTING_POLICIES names them.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence

from raylm.dp.prefix import cached_blocks, prefix_hashes
from raylm.registry import Registry


@dataclass
class Candidate:
    """What a policy knows of one replica."""
    key: str
    load: int  # waiting * 4 + running, with the router's corrections (lower is better)
    prefix_blocks: FrozenSet[int] = frozenset()  # its prefix summary (raylm.dp.prefix)
    block_size: Optional[int] = None  # of its KV cache (None: not reported yet)
    replica: Any = field(default=None, repr=False)  # the router's handle on its Serve replica
    engine: Optional[int] = None  # its index in that replica (which may host several)
    rank: Optional[int] = None  # its DP rank (None: not reported yet)


class BaseRoutingPolicy(ABC):
    name: ClassVar[str]
    # whether `order` reads prefix summaries: replicas then push theirs as soon as they change
    reads_prefixes: ClassVar[bool] = False

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self.rng = rng or random.Random()

    @abstractmethod
    def order(self, candidates: Sequence[Candidate],
              prompt_token_ids: Sequence[int]) -> List[Candidate]:
        """`candidates` (non-empty) best-first."""

    def by_load(self, candidates: Sequence[Candidate]) -> List[Candidate]:
        """Lowest score first, ties in random order."""
        keyed = [(c.load, self.rng.random(), c) for c in candidates]
        return [c for _, _, c in sorted(keyed, key=lambda t: (t[0], t[1]))]


ROUTING_POLICIES = Registry("routing policy")
register = ROUTING_POLICIES.register


def create_routing_policy(name: str, **options: Any) -> BaseRoutingPolicy:
    """The policy registered as `name` (ValueError naming the known ones otherwise)."""
    return ROUTING_POLICIES.lookup(name)(**options)


@register("least_loaded")
class LeastLoaded(BaseRoutingPolicy):
    def order(self, candidates, prompt_token_ids):
        return self.by_load(candidates)


@register("power_of_two")
class PowerOfTwo(BaseRoutingPolicy):
    def order(self, candidates, prompt_token_ids):
        drawn = self.rng.sample(list(candidates), min(2, len(candidates)))
        rest = [c for c in candidates if c not in drawn]
        return self.by_load(drawn) + self.by_load(rest)


@register("round_robin")
class RoundRobin(BaseRoutingPolicy):
    def __init__(self, rng: Optional[random.Random] = None) -> None:
        super().__init__(rng)
        self.turn = 0

    def order(self, candidates, prompt_token_ids):
        ring = sorted(candidates, key=lambda c: c.key)  # a stable order as replicas come and go
        start = self.turn % len(ring)
        self.turn += 1
        return ring[start:] + ring[:start]


@register("prefix_aware")
class PrefixAware(BaseRoutingPolicy):
    """`max_imbalance`: how much higher than the lowest a replica's score may be and still
    get a request for its cached prefix (default 2: two more running, less than one queued
    request's 4; at 8 a 64-engine fleet's p99 TTFT was 2.6x this one's, docs/benchmarks.md)."""

    reads_prefixes = True

    def __init__(self, rng: Optional[random.Random] = None, max_imbalance: int = 2) -> None:
        super().__init__(rng)
        self.max_imbalance = max_imbalance

    def order(self, candidates, prompt_token_ids):
        ranked = self.by_load(candidates)
        bound = ranked[0].load + self.max_imbalance
        eligible = [c for c in ranked if c.load <= bound]  # a prefix
        hits = self.cached(eligible, prompt_token_ids)
        # the longest; then the least loaded
        best = max(range(len(eligible)), key=lambda i: (hits[i], -i))
        if hits[best] == 0:
            return ranked
        return [ranked[best]] + ranked[:best] + ranked[best + 1:]

    @staticmethod
    def cached(candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> List[int]:
        """Tokens of the prompt each candidate holds (per its summary)."""
        hashes: Dict[int, List[int]] = {}  # per block size (one, unless replicas differ)
        out = []
        for c in candidates:
            if not c.block_size or not c.prefix_blocks:
                out.append(0)
                continue
            if c.block_size not in hashes:
                hashes[c.block_size] = prefix_hashes(prompt_token_ids, c.block_size)
            out.append(cached_blocks(hashes[c.block_size], c.prefix_blocks) * c.block_size)
        return out
