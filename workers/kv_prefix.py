"""The kvstore tier in front of a worker's local prefix cache.

Before a prompt runs: find how many leading blocks the local cache holds, ask the kvstore for
the longest stored run of the hash chain, fetch the blocks between the two, check each payload
(key, dtype, shape, checksum and, with a mesh secret, its signature: a bad one is a miss, and
so is everything after it) and adopt them as cached blocks, so the engine's own prefix lookup
hits them. After it ran: write the full blocks the store lacks back to it, in the background,
signed with the mesh secret. A store that is absent, down or slow only costs recomputation;
nothing here can fail a request.

Every check runs before a block reaches the engine: a rejected block never enters the local
prefix cache, where it would outlive the store's copy. Rejections are counted by reason
(`kvstore_blocks_rejected_total{reason}`) and logged at most once per `REJECT_LOG_INTERVAL_S`
per reason: a store full of forged blocks must not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from splitserve.engine.hashing import BlockHash
from splitserve.engine.outputs import KVExport
from splitserve.wire.kv_codec import KVCodecError, decode_block, encode_block

if TYPE_CHECKING:
    from splitserve.engine.engine import LLMEngine
    from splitserve.workers.engine_loop import AsyncEngine
    from splitserve.workers.metrics import WorkerMetrics

log = logging.getLogger("splitserve")

REJECT_LOG_INTERVAL_S = 10.0
# A prefill worker's write-back waits for the hand-off of the same KV to end, at most this long.
WRITE_BACK_WAIT_S = 5.0
# KV held by write-backs not yet handed to the store's queue (waiting for a hand-off, or being
# encoded), at most this many bytes: past it a prompt's write-back is dropped (a later request
# recomputes what the store would have held) rather than a burst of long prompts keeping a copy
# of each prompt's KV alive at once (16 prompts of 1,000 tokens: 750 MB of float32 SmolLM2 KV).
# One write-back is always let through, whatever its size.
WRITE_BACK_MAX_BYTES = 256 << 20


class PrefixStore(Protocol):
    """What this needs of services.kvstore_client.KVStoreClient (fakes in tests)."""

    async def match(self, keys: Sequence[bytes]) -> int: ...
    async def get(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def put_background(self, items: Sequence[tuple[bytes, bytes]]) -> bool: ...


@dataclass
class PrefixPlan:
    hashes: list[BlockHash]  # the prompt's full blocks
    num_local_blocks: int = 0  # leading blocks already cached here
    num_stored_blocks: int = 0  # leading blocks the kvstore holds
    num_fetched_blocks: int = 0  # fetched from the kvstore and adopted


class PrefixTier:
    def __init__(
        self,
        engine: AsyncEngine,
        store: PrefixStore | None,
        metrics: WorkerMetrics | None = None,
        secret: bytes | None = None,
    ) -> None:
        """`secret`: the mesh secret; blocks are signed with it and must verify with it."""
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.secret = secret
        self._reject_log = _RateLimitedLog(REJECT_LOG_INTERVAL_S)
        runner = engine.engine.runner
        pool = runner.kv_layout  # (layers, 2, num_blocks, block_size, kvh, hd)
        self.block_shape = pool[:2] + pool[3:]
        self.dtype = runner.kv_format  # the model dtype's name, or the packed format's
        self.block_size = engine.engine.block_size
        self._writes: set[asyncio.Task[None]] = set()
        self._held_bytes = 0  # KV the tasks in _writes hold

    async def prepare(self, prompt: Sequence[int], cache_salt: str | None) -> PrefixPlan:
        """Warm the local cache from the kvstore for this prompt; never raises for the store."""
        hashes = self.engine.engine.prompt_block_hashes(prompt, cache_salt)
        plan = PrefixPlan(hashes)
        if self.store is None or not hashes:
            return plan
        # The engine always computes the prompt's last token, so that block is never a hit.
        usable = hashes[: (len(prompt) - 1) // self.block_size]
        plan.num_local_blocks = await self.engine.call(lambda e: e.num_cached_prefix_blocks(usable))
        try:
            plan.num_stored_blocks = await self.store.match(hashes)
            wanted = usable[plan.num_local_blocks : plan.num_stored_blocks]
            if wanted:
                plan.num_fetched_blocks = await self._fetch(usable, plan.num_local_blocks, wanted)
        except Exception:  # the store is an optimisation: any failure is a miss
            log.warning("kvstore prefix fetch failed; recomputing", exc_info=True)
        return plan

    async def _fetch(self, usable: list[BlockHash], start: int, wanted: list[BlockHash]) -> int:
        payloads = await self.store.get(wanted)  # type: ignore[union-attr]
        blocks = await asyncio.to_thread(self._decode, wanted, payloads)
        if not blocks:
            return 0
        chain = usable[: start + len(blocks)]

        def adopt(e: LLMEngine) -> int:
            # Stacked on the engine thread, like all large tensor work (engine_loop.py).
            data = torch.stack(blocks, dim=2)  # (layers, 2, n, block_size, kvh, hd)
            return e.cache_prefix_blocks(chain, data)

        n = await self.engine.call(adopt)
        if self.metrics is not None:
            self.metrics.kvstore_blocks_fetched(n)
        return n

    def _decode(self, keys: list[BlockHash], payloads: list[bytes | None]) -> list[torch.Tensor]:
        """The leading run of valid blocks: a chain is useless past its first hole."""
        blocks = []
        for key, payload in zip(keys, payloads, strict=True):
            if payload is None:
                break
            try:
                blocks.append(decode_block(payload, key, self.dtype, self.block_shape, self.secret))
            except KVCodecError as exc:
                self._rejected(key, exc)
                break
        return blocks

    def _rejected(self, key: bytes, exc: KVCodecError) -> None:
        reason = getattr(exc, "reason", "format")
        if self.metrics is not None:
            self.metrics.kvstore_block_rejected(reason)
        suppressed = self._reject_log.allow(reason)
        if suppressed is not None:
            more = f" ({suppressed} more {reason} rejections since the last report)"
            log.warning(
                "kvstore block %s rejected (%s): %s; recomputing%s",
                key.hex()[:12], reason, exc, more if suppressed else "",
            )  # fmt: skip

    def write_back(
        self, plan: PrefixPlan, kv: KVExport, after: asyncio.Future[None] | None = None
    ) -> None:
        """Store the prompt's full blocks the kvstore lacks; returns at once. `after`: start
        once it is done (a prefill worker's lease pulled), or after WRITE_BACK_WAIT_S."""
        if self.store is None or plan.num_stored_blocks >= len(plan.hashes):
            return
        if not getattr(self.store, "is_healthy", True):
            return  # it would drop them anyway: don't pay for encoding
        held = kv.data.nbytes
        if self._writes and self._held_bytes + held > WRITE_BACK_MAX_BYTES:
            if self.metrics is not None:
                self.metrics.kvstore_request("put", "dropped")
            return
        self._held_bytes += held
        task = asyncio.create_task(self._put(plan.hashes, plan.num_stored_blocks, kv.data, after))
        self._writes.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._writes.discard(t)
            self._held_bytes -= held

        task.add_done_callback(done)

    async def _put(
        self,
        hashes: list[BlockHash],
        start: int,
        data: torch.Tensor,
        after: asyncio.Future[None] | None = None,
    ) -> None:
        if after is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(after, WRITE_BACK_WAIT_S)

        def encode() -> list[tuple[bytes, bytes]]:
            return [
                (hashes[i], encode_block(hashes[i], data[:, :, i], self.secret, self.dtype))
                for i in range(start, len(hashes))
            ]

        try:
            items = await asyncio.to_thread(encode)
            self.store.put_background(items)  # type: ignore[union-attr]
        except Exception:
            log.warning("kvstore write-back failed", exc_info=True)

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _RateLimitedLog:
    """At most one line per key per `interval_s`; the next one says how many were skipped."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: stay quiet. Otherwise log now; the value is how many were skipped."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)
