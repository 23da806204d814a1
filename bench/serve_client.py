"""The client half of `splitserve bench serve`: workloads, arrivals, streamed requests to any
OpenAI-compatible endpoint, and the statistics of what came back.

    convs = make_dataset(spec, seed)                   # conversations of one or more turns
    offsets = arrival_offsets(len(convs), rate, "poisson", rng)
    results, seconds = await run_load_point(endpoint, convs, offsets, concurrency, progress)
    summary = summarize(results, seconds, SLO(ttft_ms=500, tpot_ms=100))

Prompts are text (any server tokenizes them its own way): words drawn from a fixed list, about
one token each for a BPE vocabulary; the prompt tokens each server counted come back in its
`usage`. Output lengths are exact where the server honours `ignore_eos` (vLLM, SGLang,
llama-server and splitserve do).

Per request, from the client's clock: TTFT (send to first content chunk), end-to-end (send to
the stream's end), TPOT ((end-to-end - TTFT) / (output tokens - 1)) and ITL (the gaps between
consecutive content chunks; a chunk carrying several tokens is one gap). Output tokens are the
server's `usage.completion_tokens` where the stream carries one (`stream_options.include_usage`),
else the number of content chunks; each result says which (`token_source`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.bench.report import percentile

DATASETS = ("random", "shared-prefix", "chat")
ARRIVALS = ("poisson", "constant")
ENDPOINTS = ("chat", "completions")
PERCENTILES = (0.5, 0.9, 0.99)

# Common English words: one BPE token each (with their leading space) in most vocabularies.
WORDS = tuple(
    """time year people way day man thing woman life child world school state family student
    group country problem hand part place case week company system program question work
    government number night point home water room mother area money story fact month lot right
    study book eye job word business issue side kind head house service friend father power hour
    game line end member law car city community name president team minute idea kid body
    information back parent face others level office door health person art war history party
    result change morning reason research girl guy moment air teacher force education foot boy
    age policy process music market sense nation plan college interest death experience effect
    use class control care field development role effort rate heart drug show leader light voice
    wife police mind price report decision son view relationship town road arm difference value
    building action model season society tax director position player record paper space ground
    form event official matter center couple site project activity star table need court oil
    situation cost industry figure street image phone data picture practice piece land product
    doctor wall patient worker news test movie north love support technology step baby computer
    type attention film tree source organization hair window evidence population""".split()  # noqa: SIM905
)


# ---- workloads -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """What one load point sends. Lengths are in words (about one token each)."""

    name: str = "random"
    num_requests: int = 32  # conversations; chat has `turns` requests per conversation
    input_len: int = 128  # random: prompt words; chat: words per user turn
    output_len: int = 128  # max_tokens of every request
    range_ratio: float = 0.0  # random: lengths uniform in len * [1 - r, 1 + r]
    prefix_len: int = 1024  # shared-prefix: the words every prompt starts with
    suffix_len: int = 32  # shared-prefix: each prompt's own words after it
    turns: int = 3  # chat: user turns per conversation, each answered before the next

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {self.name!r}")
        for key in ("num_requests", "input_len", "output_len", "prefix_len", "suffix_len", "turns"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError("range ratio must be in [0, 1)")


@dataclass(frozen=True)
class Turn:
    """One request: `text` is the user message (chat) or appended prompt text (completions)."""

    text: str
    max_tokens: int


@dataclass(frozen=True)
class Conversation:
    """Turns sent one after the other; each later turn carries the replies to the earlier ones.
    A `prefix` is sent in front of the first turn (a system message for chat)."""

    turns: tuple[Turn, ...]
    prefix: str = ""


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def make_dataset(spec: DatasetSpec, seed: int) -> list[Conversation]:
    """The same spec and seed always give the same conversations. Every prompt starts with a
    tag of its own (the seed and its index), so no two requests share a first block unless the
    dataset means them to (shared-prefix)."""
    rng = random.Random(f"{spec.name}:{seed}")
    convs: list[Conversation] = []
    if spec.name == "shared-prefix":
        prefix = f"Document {seed}: {words(rng, spec.prefix_len)}\n\n"
        for i in range(spec.num_requests):
            text = f"Question {i}: {words(rng, spec.suffix_len)}"
            convs.append(Conversation((Turn(text, spec.output_len),), prefix))
        return convs
    turns = spec.turns if spec.name == "chat" else 1
    for i in range(spec.num_requests):
        conv = []
        for t in range(turns):
            n = _length(rng, spec.input_len, spec.range_ratio)
            out = _length(rng, spec.output_len, spec.range_ratio)
            conv.append(Turn(f"Request {seed}-{i}-{t}: {words(rng, n)}", out))
        convs.append(Conversation(tuple(conv)))
    return convs


def arrival_offsets(n: int, rate: float, process: str, rng: random.Random) -> list[float]:
    """When each of `n` conversations starts, in seconds after the first: all at once for an
    infinite rate; `rate` per second on average as a Poisson process (exponential gaps), or
    exactly 1/rate apart (constant)."""
    if process not in ARRIVALS:
        raise ValueError(f"arrival process must be one of {', '.join(ARRIVALS)}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0; got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate) if process == "poisson" else 1.0 / rate
        offsets.append(t)
    return offsets


# ---- one request ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    name: str  # how the tables call it
    base_url: str  # ".../v1"
    model: str
    kind: str = "chat"  # chat | completions
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0


@dataclass
class RequestResult:
    ok: bool
    start: float  # seconds after the load point's first send
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # the server's usage, where it sent one
    token_source: str = "chunks"  # usage | chunks
    chunks: int = 0  # content chunks
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the reply (the next chat turn sends it back); not in the JSON
    turn: int = 0  # its place in its conversation

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with a single token."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def request_body(ep: Endpoint, conv: Conversation, history: Sequence[str], turn: int) -> dict:
    """The JSON of turn `turn`, `history` holding the replies to the turns before it."""
    body: dict[str, Any] = {
        "model": ep.model,
        "max_tokens": conv.turns[turn].max_tokens,
        "temperature": ep.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ep.ignore_eos:
        body["ignore_eos"] = True
    if ep.kind == "chat":
        messages = [{"role": "system", "content": conv.prefix}] if conv.prefix else []
        for t in range(turn):
            messages.append({"role": "user", "content": conv.turns[t].text})
            messages.append({"role": "assistant", "content": history[t]})
        messages.append({"role": "user", "content": conv.turns[turn].text})
        body["messages"] = messages
    else:
        parts = [conv.prefix]
        for t in range(turn):
            parts.append(f"User: {conv.turns[t].text}\nAssistant:{history[t]}\n")
        parts.append(f"User: {conv.turns[turn].text}\nAssistant:" if turn else conv.turns[0].text)
        body["prompt"] = "".join(parts)
    return body


def _content(kind: str, chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if kind == "chat":
        delta = c.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return c.get("text") or ""


async def send(session: Any, ep: Endpoint, body: dict, t0: float, timeout: float) -> RequestResult:
    """One streamed request; never raises for a failed one (the result says why)."""
    import aiohttp

    url = f"{ep.base_url.rstrip('/')}/{'chat/completions' if ep.kind == 'chat' else 'completions'}"
    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    sent = time.perf_counter()
    res = RequestResult(ok=False, start=sent - t0)
    times: list[float] = []
    pieces: list[str] = []
    usage: dict | None = None
    try:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with session.post(url, json=body, headers=headers, timeout=client_timeout) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    return res
                text = _content(ep.kind, chunk)
                if text:
                    times.append(time.perf_counter())
                    pieces.append(text)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        return res
    done = time.perf_counter()
    if not times:
        res.error = "the stream ended without any content"
        return res
    res.ok = True
    res.ttft, res.e2e = times[0] - sent, done - sent
    res.chunks = len(times)
    res.itl = [b - a for a, b in itertools.pairwise(times)]
    res.text = "".join(pieces)
    if usage and usage.get("completion_tokens"):
        res.output_tokens, res.token_source = int(usage["completion_tokens"]), "usage"
    else:
        res.output_tokens = len(times)
    if usage and usage.get("prompt_tokens") is not None:
        res.prompt_tokens = int(usage["prompt_tokens"])
    return res


# ---- one load point ------------------------------------------------------------------------
def client_session(limit: int = 0) -> Any:
    """An aiohttp session that never goes through a proxy (the servers are usually local)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    return aiohttp.ClientSession(connector=connector, trust_env=False, read_bufsize=1 << 20)


async def run_load_point(
    ep: Endpoint,
    convs: Sequence[Conversation],
    offsets: Sequence[float],
    concurrency: int | None,
    progress: Callable[[RequestResult], None] = lambda r: None,
    timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Every conversation started at its offset, at most `concurrency` requests in flight
    (None: no cap); returns the results (in completion order) and the seconds from the first
    send to the last answer."""
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    results: list[RequestResult] = []
    async with client_session() as session:
        t0 = time.perf_counter()

        async def conversation(conv: Conversation, offset: float) -> None:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            history: list[str] = []
            for turn in range(len(conv.turns)):
                body = request_body(ep, conv, history, turn)
                if sem is None:
                    res = await send(session, ep, body, t0, timeout)
                else:
                    async with sem:
                        res = await send(session, ep, body, t0, timeout)
                res.turn = turn
                results.append(res)
                progress(res)
                if not res.ok:
                    return  # a later turn would send a history that never happened
                history.append(res.text)

        await asyncio.gather(*(conversation(c, o) for c, o in zip(convs, offsets, strict=True)))
        seconds = time.perf_counter() - t0
    return results, seconds


# ---- statistics ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and 1000 * r.ttft > self.ttft_ms:
            return False
        tpot = r.tpot
        return not (self.tpot_ms is not None and tpot is not None and 1000 * tpot > self.tpot_ms)

    @property
    def stated(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


def distribution(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (report.percentile's rank rule), in milliseconds."""
    out = {"mean": 1000 * statistics.fmean(values) if values else 0.0}
    for q in PERCENTILES:
        out[f"p{round(100 * q)}"] = 1000 * percentile(values, q)
    return out


def summarize(results: Sequence[RequestResult], seconds: float, slo: SLO) -> dict[str, Any]:
    """A load point's numbers: counts, throughput, latency distributions (ms) and goodput."""
    ok = [r for r in results if r.ok]
    sources = {r.token_source for r in ok}
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    good = sum(1 for r in ok if slo.met_by(r))
    rate = (lambda x: x / seconds) if seconds > 0 else (lambda x: 0.0)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "seconds": seconds,
        "prompt_tokens": sum(prompt) if len(prompt) == len(ok) else None,
        "output_tokens": out_tokens,
        "output_tokens_counted_by": "/".join(sorted(sources)) or "-",
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(out_tokens),
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "good_requests": good if slo.stated else None,
        "goodput": rate(good) if slo.stated else None,
    }


def request_json(r: RequestResult) -> dict[str, Any]:
    """One request in the JSON (times in ms; the reply text left out)."""
    return {
        "ok": r.ok,
        "turn": r.turn,
        "start_ms": 1000 * r.start,
        "ttft_ms": 1000 * r.ttft,
        "tpot_ms": None if r.tpot is None else 1000 * r.tpot,
        "e2e_ms": 1000 * r.e2e,
        "output_tokens": r.output_tokens,
        "prompt_tokens": r.prompt_tokens,
        "token_source": r.token_source,
        "chunks": r.chunks,
        "error": r.error or None,
    }


# ---- progress ------------------------------------------------------------------------------
class Progress:
    """tqdm where it is installed, else a line on stderr rewritten in place."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.failed = total, desc, 0, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            self._draw()
        else:
            self.bar = tqdm(total=total, desc=desc, unit="req", leave=False)

    def __call__(self, r: RequestResult) -> None:
        self.n += 1
        self.failed += 0 if r.ok else 1
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed)
        else:
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.n // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        failed = f" ({self.failed} failed)" if self.failed else ""
        print(f"\r{self.desc} [{bar}] {self.n}/{self.total}{failed}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print("\r" + " " * (len(self.desc) + 50) + "\r", end="", file=sys.stderr)
