"""Which replicas form the expert-parallel DP group, generation by generation.

The DP coordinator owns this table. A generation is formed once exactly `target` live
replicas are known: the members of the previous generation keep their order (ranks are
re-numbered 0..n-1 when some left), joiners follow. Any change of membership (a scale, a
replica replaced after a crash) forms a new generation, which every member must join
under the new store prefix before the app serves again (`ready`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set


class Membership:
    def __init__(self, target: int) -> None:
        self.target = target
        self.generation = 0
        self.ranks: Dict[str, int] = {}  # replica key -> DP rank in the current generation
        self.joining: List[str] = []
        self.ready: Set[str] = set()  # members that have joined the current generation
        self._changed = False  # someone joined or left since the current generation formed

    def join(self, key: str) -> None:
        if key not in self.ranks and key not in self.joining:
            self.joining.append(key)
            self._changed = True

    def leave(self, key: str) -> None:
        if key in self.ranks or key in self.joining:
            self._changed = True
        self.ranks.pop(key, None)
        self.ready.discard(key)
        if key in self.joining:
            self.joining.remove(key)

    def maybe_form(self) -> bool:
        """Form the next generation if the live replicas now number `target` and differ from
        the current generation's. Returns True if a generation was formed."""
        alive = sorted(self.ranks, key=self.ranks.get) + self.joining
        if not self._changed or len(alive) != self.target:
            return False
        self.generation, self._changed = self.generation + 1, False
        self.ranks = {key: rank for rank, key in enumerate(alive)}
        self.joining, self.ready = [], set()
        return True

    def mark_ready(self, key: str, generation: int) -> None:
        if generation == self.generation and key in self.ranks:
            self.ready.add(key)

    @property
    def formed(self) -> bool:
        """Every member of the current generation has joined it."""
        return (self.generation > 0 and self.ready == set(self.ranks) and len(self.ranks)
                == self.target)

    def rank_of(self, key: str) -> Optional[int]:
        return self.ranks.get(key)
