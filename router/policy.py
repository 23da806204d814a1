"""Routing policies: which healthy worker of a pool gets a request.

- `round_robin`: cycles through the pool.
- `least_tokens`: the fewest outstanding tokens (prompt work + output budget in flight).
- `prefix_aware`: the lowest `uncached prompt tokens + outstanding tokens`, unless the chosen
  worker is overloaded by SGLang's two tests (load > min load + `abs_threshold` AND load >
  `rel_threshold` x min load), when the least loaded worker wins instead.

Ties are broken at random: always taking the first of equals is how cache-aware routers herd
every request onto one worker (dynamo#3581, sglang PR#15473).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from splitserve.engine.hashing import BlockHash

from .registry import Worker

DEFAULT_ABS_THRESHOLD = 2048  # tokens
DEFAULT_REL_THRESHOLD = 1.5


@dataclass(frozen=True)
class RoutingJob:
    """What a policy needs to know of a request."""

    block_hashes: Sequence[BlockHash]
    num_prompt_tokens: int
    block_size: int

    def cached_tokens(self, worker: Worker) -> int:
        return worker.prefixes.match(self.block_hashes) * self.block_size

    def uncached_tokens(self, worker: Worker) -> int:
        return max(0, self.num_prompt_tokens - self.cached_tokens(worker))


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def select(self, workers: Sequence[Worker], job: RoutingJob) -> Worker:
        if not workers:
            raise ValueError("no workers to choose from")
        return self._select(workers, job)

    @abstractmethod
    def _select(self, workers: Sequence[Worker], job: RoutingJob) -> Worker: ...

    def _pick_min(self, workers: Sequence[Worker], key: Callable[[Worker], Any]) -> Worker:
        keys = [key(w) for w in workers]
        best = min(keys)
        return self.rng.choice([w for w, k in zip(workers, keys, strict=True) if k == best])


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next = 0

    def _select(self, workers: Sequence[Worker], job: RoutingJob) -> Worker:
        # Sorted so the cycle survives a worker leaving and coming back.
        ordered = sorted(workers, key=lambda w: w.address)
        worker = ordered[self._next % len(ordered)]
        self._next += 1
        return worker


class LeastOutstandingTokens(Policy):
    name = "least_tokens"

    def _select(self, workers: Sequence[Worker], job: RoutingJob) -> Worker:
        return self._pick_min(workers, _load)


class PrefixAware(Policy):
    name = "prefix_aware"

    def __init__(
        self,
        abs_threshold: int = DEFAULT_ABS_THRESHOLD,
        rel_threshold: float = DEFAULT_REL_THRESHOLD,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(rng)
        if abs_threshold < 0 or rel_threshold < 1.0:
            raise ValueError("need abs_threshold >= 0 and rel_threshold >= 1")
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold

    def _select(self, workers: Sequence[Worker], job: RoutingJob) -> Worker:
        best = self._pick_min(workers, lambda w: job.uncached_tokens(w) + w.load.tokens)
        min_load = min(w.load.tokens for w in workers)
        if self.is_overloaded(best.load.tokens, min_load):
            return self._pick_min(workers, _load)
        return best

    def is_overloaded(self, load: int, min_load: int) -> bool:
        """SGLang's test: imbalanced both in absolute and in relative terms."""
        return load > min_load + self.abs_threshold and load > self.rel_threshold * min_load


POLICY_NAMES = ("prefix_aware", "round_robin", "least_tokens")


def make_policy(
    name: str,
    abs_threshold: int = DEFAULT_ABS_THRESHOLD,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
    rng: random.Random | None = None,
) -> Policy:
    if name == "prefix_aware":
        return PrefixAware(abs_threshold, rel_threshold, rng)
    if name == "round_robin":
        return RoundRobin(rng)
    if name in ("least_tokens", "least_outstanding_tokens"):
        return LeastOutstandingTokens(rng)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def _load(worker: Worker) -> tuple[int, int]:
    return worker.load.tokens, worker.load.requests
