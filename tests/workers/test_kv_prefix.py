"""PrefixTier's write-back to the kvstore: bounded in the KV it keeps alive."""

from __future__ import annotations

import asyncio

import pytest
import torch
from workers_util import tiny_engine

from splitserve.engine.outputs import KVExport
from splitserve.workers import kv_prefix
from splitserve.workers.engine_loop import AsyncEngine
from splitserve.workers.kv_prefix import PrefixPlan, PrefixTier


class _Store:
    is_healthy = True

    def __init__(self) -> None:
        self.puts: list[list[bytes]] = []

    def put_background(self, items) -> bool:
        self.puts.append([key for key, _ in items])
        return True


class _Metrics:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def kvstore_request(self, op: str, outcome: str) -> None:
        self.outcomes.append((op, outcome))


@pytest.mark.asyncio
async def test_write_backs_past_the_byte_budget_are_dropped(monkeypatch) -> None:
    """A burst of prompts can't keep a copy of every prompt's KV alive while their write-backs
    wait: past WRITE_BACK_MAX_BYTES held, a write-back is dropped and counted; one is always
    let through; the budget comes back as they finish."""
    store, metrics = _Store(), _Metrics()
    tier = PrefixTier(AsyncEngine(tiny_engine()), store, metrics)  # type: ignore[arg-type]
    layers, two, _, bs, kvh, hd = tier.engine.engine.runner.kv_layout

    def prompt_kv(blocks: int) -> tuple[PrefixPlan, KVExport]:
        data = torch.zeros(layers, two, blocks, bs, kvh, hd, dtype=torch.float32)
        hashes = [bytes([blocks, i]) * 16 for i in range(blocks)]
        return PrefixPlan(hashes), KVExport(data, blocks * bs)

    one = prompt_kv(2)[1].data.nbytes
    monkeypatch.setattr(kv_prefix, "WRITE_BACK_MAX_BYTES", 3 * one)
    gate = asyncio.get_running_loop().create_future()  # the write-backs wait on it
    tier.write_back(*prompt_kv(7), after=gate)  # 3.5x the budget alone: still let through
    tier.write_back(*prompt_kv(2), after=gate)  # over the budget with it: dropped
    assert len(tier._writes) == 1 and metrics.outcomes == [("put", "dropped")]
    gate.set_result(None)
    await asyncio.gather(*tier._writes)
    assert len(store.puts) == 1 and len(store.puts[0]) == 7 and tier._held_bytes == 0
    gate2 = asyncio.get_running_loop().create_future()
    for blocks in (2, 3, 4):  # the budget is 6 blocks' worth: 2 + 3 fit, then 4 does not
        tier.write_back(*prompt_kv(blocks), after=gate2)
    assert len(tier._writes) == 2 and metrics.outcomes == [("put", "dropped")] * 2
    gate2.set_result(None)
    await asyncio.gather(*tier._writes)
    assert tier._held_bytes == 0
    await tier.close()
