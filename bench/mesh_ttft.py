"""`splitserve bench mesh`, parts (b) and (c): time to first token with a shared prefix, cold
and warm, and the KV transfer from prefill to decode on that first token's path.

Every request is a ~1,000-token system prompt shared by all of them plus a suffix of its own,
sent one at a time with disaggregate=true on the disaggregated mesh (mesh_runner's
`disagg_topology`: two routers, each with its own prefill worker, one decode worker, the
kvstore). Per request index i, the three cases use the same cache salt, so:

    cold        through `router-cold` (prefill-0): the prefix is in no cache yet
    warm_store  through `router` (prefill-1): the prefix is in the kvstore only, written back
                by prefill-0, so prefill-1 fetches it
    warm_local  through `router` again: prefill-1 has it in its own prefix cache

The decode worker's metrics, scraped before and after each case, give the KV it pulled and the
time that took (`TransferStats`), as a rate and as a share of the case's mean TTFT. The share
compares sizes only: the router streams prefill's first token before the hand-off
(router/dispatch.py), so the transfer delays the second token, not the first.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from splitserve.bench import BenchError
from splitserve.bench.report import LatencyStats, format_table, label_bars, ms, pct
from splitserve.bench.workload import random_prompt, ratio

if TYPE_CHECKING:
    from splitserve.bench.mesh_bench import MeshBenchSettings
    from splitserve.bench.mesh_runner import RunningMesh, StreamResult

MB = 1e6  # transfer rates in MB/s (10^6 bytes), as network rates are quoted
TTFT_CASES = ("cold", "warm_store", "warm_local")
CASE_LABELS = {
    "cold": "cold (fresh salt: in no cache)",
    "warm_store": "warm store (kvstore only)",
    "warm_local": "warm local (worker cache)",
}
CASE_ROUTERS = {"cold": "router-cold", "warm_store": "router", "warm_local": "router"}


# ---- prompts and the keys they produce -------------------------------------------------------
@dataclass(frozen=True)
class SharedPrefixPrompts:
    """Per TTFT case, one prompt per request: the shared system prompt + a distinct suffix.

    Request i of every case uses cache salt `salts[i]`, so the cold request i computes the
    prefix that warm-store request i fetches and warm-local request i finds cached; no other
    request can have warmed it (salts are fresh per run).
    """

    system: tuple[int, ...]
    prompts: dict[str, list[tuple[int, ...]]]
    salts: list[str]


def shared_prefix_prompts(
    settings: MeshBenchSettings, vocab_size: int, seed: int, nonce: str
) -> SharedPrefixPrompts:
    rng = random.Random(seed + 1000)
    system = random_prompt(rng, settings.system_prompt_tokens, vocab_size)
    prompts = {
        case: [
            system + random_prompt(rng, settings.suffix_tokens, vocab_size)
            for _ in range(settings.ttft_requests)
        ]
        for case in TTFT_CASES
    }
    salts = [f"mesh-bench-{nonce}-{i}" for i in range(settings.ttft_requests)]
    return SharedPrefixPrompts(system, prompts, salts)


@dataclass
class ChainKeys:
    """The kvstore keys (hash chains of full blocks) the TTFT requests produce."""

    prefix: list[list[bytes]]  # per request: the shared system prompt under its salt
    prompts: dict[str, list[list[bytes]]]  # per case and request: the whole prompt

    @classmethod
    def of(
        cls,
        prompts: SharedPrefixPrompts,
        namespace: bytes,
        block_size: int,
        tenant: str | None = None,
    ) -> ChainKeys:
        """`tenant`: the router's tenant for the bench's API key, which prefixes every salt."""
        from splitserve.engine.hashing import block_hashes
        from splitserve.router.validation import tenant_salt

        def chain(tokens: Sequence[int], salt: str) -> list[bytes]:
            return block_hashes(tokens, block_size, namespace, tenant_salt(salt, tenant))

        return cls(
            [chain(prompts.system, salt) for salt in prompts.salts],
            {
                case: [chain(p, salt) for p, salt in zip(ps, prompts.salts, strict=True)]
                for case, ps in prompts.prompts.items()
            },
        )


# ---- results -----------------------------------------------------------------------------------
def reduction(warm: float, cold: float) -> float:
    """How much lower `warm` is than `cold`: 0.8 = 80% lower; 0 when cold wasn't measured."""
    return 1.0 - warm / cold if cold > 0 else 0.0


@dataclass
class TransferStats:
    """KV pulled by the decode worker over one phase: metric deltas."""

    transfers: int = 0
    bytes: float = 0.0
    seconds: float = 0.0  # summed PullKV + reassembly time

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.transfers if self.transfers else 0.0

    @property
    def mean_mb(self) -> float:
        return self.bytes / MB / self.transfers if self.transfers else 0.0

    @classmethod
    def total(cls, parts: Sequence[TransferStats]) -> TransferStats:
        return cls(
            sum(t.transfers for t in parts), sum(t.bytes for t in parts),
            sum(t.seconds for t in parts),
        )  # fmt: skip


def transfer_delta(before: dict, after: dict) -> TransferStats:
    """From two scrapes of the decode worker's /metrics."""
    from splitserve.bench.mesh_runner import sample

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    return TransferStats(
        transfers=round(delta("splitserve_worker_kv_transfer_seconds_count")),
        bytes=delta("splitserve_worker_kv_transfer_bytes_total", direction="received"),
        seconds=delta("splitserve_worker_kv_transfer_seconds_sum"),
    )


@dataclass
class TTFTCase:
    name: str
    ttfts: list[float]
    prompt_tokens: list[int]
    cached_tokens: list[int]  # usage.cached_prompt_tokens: local + kvstore hits at prefill
    store_blocks_before: list[int]  # prefix blocks in the kvstore just before each request
    store_blocks_fetched: int  # the prefill worker's kvstore_blocks_fetched_total delta
    transfer: TransferStats

    @property
    def stats(self) -> LatencyStats:
        return LatencyStats.of(self.ttfts)

    @property
    def transfer_share(self) -> float:
        """Mean KV transfer time / mean TTFT: the transfer is on the first token's path."""
        return ratio(self.transfer.mean_seconds, self.stats.mean)


def ttft_reduction(ttft: dict[str, TTFTCase], case: str, stat: str = "mean") -> float:
    """How much lower `case`'s TTFT `stat` (mean, median, ...) is than the cold case's."""
    return reduction(getattr(ttft[case].stats, stat), getattr(ttft["cold"].stats, stat))


def sequential_transfer_rate(ttft: dict[str, TTFTCase]) -> float:
    """Over every sequential (TTFT) transfer: total bytes / total time."""
    return TransferStats.total([c.transfer for c in ttft.values()]).mb_per_s


# ---- measuring ---------------------------------------------------------------------------------
async def run_case(
    case: str, mesh: RunningMesh, prompts: SharedPrefixPrompts, keys: ChainKeys, num_tokens: int
) -> TTFTCase:
    """One request at a time, each after the previous one's kvstore write-back has landed (the
    cold case's is what the warm-store case needs; waiting also keeps the machine quiet)."""
    from splitserve.bench.mesh_runner import (
        generate_request,
        sample,
        scrape_metrics,
        store_match,
        stream_generate,
        wait_stored,
    )
    from splitserve.v1 import rpc

    fetched_name = "splitserve_worker_kvstore_blocks_fetched_total"
    router = CASE_ROUTERS[case]
    prefill = "prefill-0" if router == "router-cold" else "prefill-1"
    before_d = scrape_metrics(mesh.metrics_url("decode-0"))
    before_p = scrape_metrics(mesh.metrics_url(prefill))
    results: list[StreamResult] = []
    stored_before: list[int] = []
    async with mesh.channel(router) as ch, mesh.channel("kvstore") as kv_ch:
        stub, store = rpc.InferenceStub(ch), rpc.KVStoreStub(kv_ch)
        for i, prompt in enumerate(prompts.prompts[case]):
            stored_before.append(await store_match(store, keys.prefix[i]))
            req = generate_request(
                f"ttft-{case}-{i}", prompt, num_tokens, cache_salt=prompts.salts[i],
                disaggregate=True,
            )  # fmt: skip
            results.append(await stream_generate(stub, req))
            if not await wait_stored(store, keys.prompts[case][i]):
                raise BenchError(
                    f"TTFT {case} request {i}: its KV never reached the kvstore under the keys "
                    "the benchmark computed (salt, namespace or block size differ)"
                )
    after_d = scrape_metrics(mesh.metrics_url("decode-0"))
    after_p = scrape_metrics(mesh.metrics_url(prefill))
    return TTFTCase(
        case,
        [r.ttft for r in results],
        [len(p) for p in prompts.prompts[case]],
        [r.cached_prompt_tokens for r in results],
        stored_before,
        round(sample(after_p, fetched_name) - sample(before_p, fetched_name)),
        transfer_delta(before_d, after_d),
    )


# ---- report ------------------------------------------------------------------------------------
def ttft_table(ttft: dict[str, TTFTCase]) -> list[str]:
    rows = []
    for case in (c for c in TTFT_CASES if c in ttft):
        c, st = ttft[case], ttft[case].stats
        rows.append([
            CASE_LABELS[case], ms(st.mean), ms(st.median), ms(st.min), ms(st.max),
            f"{statistics.fmean(c.cached_tokens):.0f}/{statistics.fmean(c.prompt_tokens):.0f}",
            str(c.store_blocks_fetched),
            "-" if case == "cold" else pct(ttft_reduction(ttft, case)),
            "-" if case == "cold" else pct(ttft_reduction(ttft, case, "median")),
        ])  # fmt: skip
    header = "(b) TTFT|mean ms|median ms|min ms|max ms|cached/prompt|store blocks fetched|" \
        "lower (mean)|lower (median)"  # fmt: skip
    return format_table(header.split("|"), rows)


def transfer_table(
    ttft: dict[str, TTFTCase], workload: TransferStats | None, num_requests: int
) -> list[str]:
    rows = []
    for case in (c for c in TTFT_CASES if c in ttft):
        c, t = ttft[case], ttft[case].transfer
        rows.append([
            CASE_LABELS[case], str(t.transfers), f"{t.mean_mb:.1f}", ms(t.mean_seconds),
            f"{t.mb_per_s:,.0f}", ms(c.stats.mean), pct(c.transfer_share),
        ])  # fmt: skip
    if workload is not None:
        t = workload
        rows.append([
            f"{num_requests}-request workload (concurrent)", str(t.transfers),
            f"{t.mean_mb:.1f}", ms(t.mean_seconds), f"{t.mb_per_s:,.0f}", "-", "-",
        ])  # fmt: skip
    header = "(c) KV transfer prefill->decode|transfers|MB each|ms each|MB/s|TTFT ms|share of TTFT"
    return format_table(header.split("|"), rows)


def transfer_json(t: TransferStats | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        **asdict(t),
        "mb_per_s": t.mb_per_s,
        "mean_seconds": t.mean_seconds,
        "mean_mb": t.mean_mb,
    }


def ttft_json(ttft: dict[str, TTFTCase]) -> dict[str, Any]:
    out = {}
    for case, c in ttft.items():
        out[case] = {
            "ttft_seconds": c.ttfts,
            "stats": asdict(c.stats),
            "prompt_tokens": c.prompt_tokens,
            "cached_prompt_tokens": c.cached_tokens,
            "store_prefix_blocks_before": c.store_blocks_before,
            "store_blocks_fetched": c.store_blocks_fetched,
            "transfer": transfer_json(c.transfer),
            "transfer_share_of_ttft": c.transfer_share,
        }
        if case != "cold":
            out[case]["reduction_vs_cold_mean"] = ttft_reduction(ttft, case, "mean")
            out[case]["reduction_vs_cold_median"] = ttft_reduction(ttft, case, "median")
    return out


def plot_ttft(ax_b: Any, ax_c: Any, ttft: dict[str, TTFTCase], prefix_tokens: int) -> None:
    """(b) TTFT per case (mean bars, median dots); (c) TTFT split into KV transfer and the
    rest, with the transfer rate."""
    cases = [c for c in TTFT_CASES if c in ttft]
    names = ["cold", "warm\nstore", "warm\nlocal"][: len(cases)]
    means = [1000 * ttft[c].stats.mean for c in cases]
    medians = [1000 * ttft[c].stats.median for c in cases]
    ax_b.bar(names, means, color=["tab:red", "tab:green", "tab:olive"][: len(cases)], label="mean")
    ax_b.plot(names, medians, "ko", label="median")
    label_bars(
        ax_b,
        ((x, means[x], "" if c == "cold" else f"-{100 * ttft_reduction(ttft, c):.0f}%")
         for x, c in enumerate(cases)),
    )  # fmt: skip
    ax_b.set_ylim(0, 1.25 * max(means + medians))
    ax_b.set_ylabel("time to first token, ms")
    ax_b.set_title(f"(b) TTFT, {prefix_tokens}-token shared prefix")
    ax_b.legend()

    transfer = [1000 * ttft[c].transfer.mean_seconds for c in cases]
    rest = [max(0.0, m - t) for m, t in zip(means, transfer, strict=True)]
    ax_c.bar(names, transfer, color="tab:purple", label="KV transfer (decode metrics)")
    ax_c.bar(names, rest, bottom=transfer, color="lightgray", label="rest of TTFT")
    label_bars(
        ax_c,
        ((x, means[x], f"{ttft[c].transfer.mb_per_s:,.0f} MB/s\n"
          f"{100 * ttft[c].transfer_share:.0f}%") for x, c in enumerate(cases)),
    )  # fmt: skip
    ax_c.set_ylim(0, 1.35 * max(means))
    ax_c.set_ylabel("ms")
    ax_c.set_title("(c) KV transfer prefill->decode, share of TTFT")
    ax_c.legend()
