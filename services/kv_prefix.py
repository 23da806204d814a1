"""The kvstore tier in front of a worker's local prefix cache.

Before a prompt runs: find how many leading blocks the local cache holds, ask the kvstore for
the longest stored run of the hash chain, fetch the blocks between the two, check each payload
(key, dtype, shape, checksum: a bad one is a miss, and so is everything after it) and adopt
them as cached blocks, so the engine's own prefix lookup hits them. After it ran: write the full
blocks the store lacks back to it, in the background. A store that is absent, down or slow
only costs recomputation; nothing here can fail a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from splitserve.engine.hashing import BlockHash
from splitserve.engine.kv_codec import KVCodecError, decode_block, encode_block
from splitserve.engine.outputs import KVExport

if TYPE_CHECKING:
    from splitserve.engine.engine import LLMEngine
    from splitserve.services.engine_loop import AsyncEngine
    from splitserve.services.metrics import WorkerMetrics

log = logging.getLogger("splitserve")


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
    ) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        runner = engine.engine.runner
        pool = runner.kv_layout  # (layers, 2, num_blocks, block_size, kvh, hd)
        self.block_shape = pool[:2] + pool[3:]
        self.dtype = runner.dtype
        self.block_size = engine.engine.block_size
        self._writes: set[asyncio.Task[None]] = set()

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
                blocks.append(decode_block(payload, key, self.dtype, self.block_shape))
            except KVCodecError as exc:
                log.warning("kvstore block %s rejected: %s", key.hex()[:12], exc)
                break
        return blocks

    def write_back(self, plan: PrefixPlan, kv: KVExport) -> None:
        """Store the prompt's full blocks the kvstore lacks; returns at once."""
        if self.store is None or plan.num_stored_blocks >= len(plan.hashes):
            return
        if not getattr(self.store, "is_healthy", True):
            return  # it would drop them anyway: don't pay for encoding
        task = asyncio.create_task(self._put(plan.hashes, plan.num_stored_blocks, kv.data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, hashes: list[BlockHash], start: int, data: torch.Tensor) -> None:
        def encode() -> list[tuple[bytes, bytes]]:
            return [
                (hashes[i], encode_block(hashes[i], data[:, :, i]))
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
