"""Batched sampling: one logits row per running request, each with its own SamplingParams.

Pipeline per step (rows are processed together; Python loops only run over rows, never vocab):

    raw logits (B, V) -> float32
      ├─ logprobs: log_softmax(raw) for rows that ask (the model's distribution, as OpenAI/vLLM)
      └─ logit_bias (one scatter-add for the batch)
         -> penalties: repetition (prompt+output) -> frequency, presence (output)
         -> min_tokens: mask EOS and stop_token_ids while the output is shorter than min_tokens
         -> grammar: rows with a guide keep only the tokens their grammar allows (one bitmask
            for all of them, engine/guided.py); EOS only where the grammar accepts
         -> greedy rows: argmax (first index on ties, as HF greedy)
         -> other rows: / temperature -> top-k -> top-p -> min-p -> exponential race

Reproducibility: a seeded row samples with its own generator, reseeded before every draw from
(seed, output position) and drawing exactly V exponentials, so the token at output position i
depends only on the seed, i and the logits: not on the batch, the row's place in it, or where
the request started. A request resumed at position k on another worker (after a prefill worker
sampled its first token, or after the router migrated it) draws what the original would have.
Unseeded rows share the sampler's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.engine.guided import grammar_mask
from splitserve.engine.sampling_params import SamplingParams

# exponential_ may return exactly 0, and p/0 would be inf or nan.
_MIN_EXPONENTIAL = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingRow:
    """One running request's view for this step, built by the engine."""

    params: SamplingParams
    # The request's own generator (see make_generator), kept across steps; None => shared.
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The request's grammar (engine/guided.py Guide), None when its output is free.
    guide: Any = None


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's raw logprob; None where not asked
    top_logprobs: list[list[tuple[int, float]] | None]  # top-N (id, logprob), sorted desc


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for SamplingRow.generator; None when the request has no seed.
    The sampler reseeds it for every output position (position_seed), so its state between
    steps does not matter."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(position_seed(seed, 0))


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed for a request's output position: a SplitMix64 finalizer over the
    request's seed and the position, so neighbouring positions (and seeds) get unrelated streams.
    """
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Sampler:
    """Samples one token per row. `eos_token_ids` are masked while a row is under min_tokens."""

    def __init__(self, seed: int = 0, eos_token_ids: Sequence[int] = ()) -> None:
        self._seed = seed
        self._eos_token_ids = tuple(eos_token_ids)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if all(_is_plain_greedy(r) for r in rows):
            return self._greedy_fast_path(logits)
        raw = logits.float()  # (B, V)
        processed = self.process_logits(raw, rows)
        token_ids = processed.argmax(dim=-1)  # greedy rows keep this
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if sampled:
            token_ids[sampled] = self._sample(processed[sampled], [rows[i] for i in sampled])
        tokens = _checked_tokens(token_ids, processed.amax(dim=-1))
        logprobs, top = _logprobs(raw, token_ids, rows)
        return SampleResult(tokens, logprobs, top)

    def _greedy_fast_path(self, logits: torch.Tensor) -> SampleResult:
        values, token_ids = logits.max(dim=-1)  # first maximal index on ties
        tokens = _checked_tokens(token_ids, values)
        return SampleResult(tokens, [None] * len(tokens), [None] * len(tokens))

    def process_logits(self, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Penalties and the min_tokens mask, before temperature: what greedy takes the argmax
        of. Returns `raw` itself when nothing applies, else a new tensor."""
        penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
        masked = self._min_tokens_mask(rows, raw.shape[1])
        biased = _logit_bias(rows, raw.shape[1])
        guided = [i for i, r in enumerate(rows) if r.guide is not None]
        if not penalised and not masked[0] and not biased[0] and not guided:
            return raw
        processed = raw.clone()  # raw may alias the caller's logits and is needed for logprobs
        if biased[0]:  # one scatter for the whole batch
            rows_t, toks_t, values = (torch.tensor(x, device=raw.device) for x in biased)
            processed.index_put_((rows_t, toks_t), values.to(processed.dtype), accumulate=True)
        if penalised:
            processed[penalised] = _apply_penalties(
                processed[penalised], [rows[i] for i in penalised]
            )
        if masked[0]:
            processed[masked] = float("-inf")
        if guided:  # last: the grammar decides, whatever the bias and penalties left
            allowed = grammar_mask([rows[i].guide for i in guided], raw.shape[1], raw.device)
            processed[guided] = processed[guided].masked_fill(~allowed, float("-inf"))
        return processed

    def _min_tokens_mask(
        self, rows: Sequence[SamplingRow], vocab_size: int
    ) -> tuple[list[int], list[int]]:
        """(row, token) index pairs to mask because the row has not reached min_tokens."""
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, r in enumerate(rows):
            # Under a grammar EOS is allowed exactly when the grammar accepts, min_tokens or not.
            if len(r.output_token_ids) >= r.params.min_tokens or r.guide is not None:
                continue
            eos = () if r.params.ignore_eos else self._eos_token_ids
            for t in set(r.params.stop_token_ids) | set(eos):
                if 0 <= t < vocab_size:
                    row_idx.append(i)
                    tok_idx.append(t)
        return row_idx, tok_idx

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Sampled token ids, (S,), for non-greedy rows' penalised logits (S, V)."""
        params = [r.params for r in rows]
        temperature = _column([p.temperature for p in params], logits)
        # Shifting the max to 0 first means a small temperature can only underflow, never overflow.
        shifted = logits - logits.amax(dim=-1, keepdim=True)
        probs = filter_probs(shifted / temperature, params)
        q = self._exponentials(rows, logits.shape[1], logits.device)
        # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p; zero-p never wins.
        race = torch.where(probs > 0, probs / q.clamp_min(_MIN_EXPONENTIAL), -1.0)
        return race.argmax(dim=-1)

    def _exponentials(
        self, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        q = torch.empty(len(rows), vocab_size, device=device)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            q[shared] = q[shared].exponential_(generator=self._shared_generator(device))
        for i, r in enumerate(rows):
            if r.generator is None:
                continue
            gen = r.generator
            if r.params.seed is not None:  # position i of the output draws from (seed, i) alone
                gen.manual_seed(position_seed(r.params.seed, len(r.output_token_ids)))
            if gen.device == q.device:
                q[i].exponential_(generator=gen)  # exactly V draws
            else:  # a CPU generator for CUDA logits: the same draws, wherever the row runs
                q[i] = torch.empty(vocab_size, device=gen.device).exponential_(generator=gen)
        return q

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]


def _logit_bias(
    rows: Sequence[SamplingRow], vocab_size: int
) -> tuple[list[int], list[int], list[float]]:
    """(row, token, bias) triples of every row's logit_bias, ids outside the logits dropped."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, r in enumerate(rows):
        for t, b in r.params.logit_bias:
            if 0 <= t < vocab_size:
                row_idx.append(i)
                tok_idx.append(t)
                values.append(b)
    return row_idx, tok_idx, values


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (
        p.is_greedy
        and not p.has_penalties
        and not p.logit_bias
        and p.logprobs is None
        and len(row.output_token_ids) >= p.min_tokens
        and row.guide is None
    )


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as a (S, 1) column for broadcasting against (S, V)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _checked_tokens(token_ids: torch.Tensor, row_max: torch.Tensor) -> list[int]:
    # One host sync: bad rows come back as -1 rather than through a separate .any() check.
    tokens = torch.where(torch.isfinite(row_max), token_ids, -1).tolist()
    if -1 in tokens:
        bad = [i for i, t in enumerate(tokens) if t == -1]
        raise ValueError(f"rows {bad} have no finite logits to sample from (all -inf, inf or nan)")
    return tokens


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor(
        [[*s, *([pad] * (width - len(s)))] for s in seqs], dtype=torch.long, device=device
    ).reshape(len(seqs), width)


def _token_counts(
    seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """(S, V) float counts of each token id per row; pad ids land in a dropped extra column."""
    ids = _padded(seqs, vocab_size, device)
    # Ids the lm_head cannot produce (padded embedding tables) are not penalised, as in HF.
    ids = torch.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
    counts = torch.zeros(len(seqs), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (HF: divide positive, multiply negative; prompt + output) then OpenAI's
    `logit - frequency * count - presence * (count > 0)` over output tokens."""
    vocab_size, device = logits.shape[1], logits.device
    params = [r.params for r in rows]
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab_size, device)
    # Prompts can be long: only rows with a repetition penalty pay for counting theirs.
    prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows]
    prompt_counts = _token_counts(prompts, vocab_size, device)
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = _column([p.repetition_penalty for p in params], logits)
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalised, logits)
    frequency = _column([p.frequency_penalty for p in params], logits)
    presence = _column([p.presence_penalty for p in params], logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def filter_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities (S, V) of temperature-scaled logits after top-k, top-p and min-p, each
    applied to what the previous one kept. Public for tests and speculative decoding."""
    vocab_size = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if all(k == vocab_size for k in top_k) and all(
        p.top_p >= 1.0 and p.min_p <= 0.0 for p in params
    ):
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # sort once for all three
    rank = torch.arange(vocab_size, device=logits.device)
    # top-k: exactly k survivors, by rank.
    sorted_logits = sorted_logits.masked_fill(rank >= _column(top_k, rank), float("-inf"))
    # top-p: keep a token while the mass strictly before it is < p, so the one crossing p stays.
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = _column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], probs)
    drop = (mass_before >= top_p) & (rank > 0)  # the top token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # min-p: p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p); renormalising cancels.
    log_min_p = _column([p.min_p for p in params], sorted_logits).log()
    drop = (sorted_logits - sorted_logits[:, :1]) < log_min_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    return torch.empty_like(sorted_probs).scatter_(1, order, sorted_probs)


def _logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Raw-distribution logprob of the chosen token, plus top-N, for rows that ask."""
    n = len(rows)
    chosen: list[float | None] = [None] * n
    top: list[list[tuple[int, float]] | None] = [None] * n
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not asking:
        return chosen, top
    logprobs = torch.log_softmax(raw[asking], dim=-1)  # (A, V)
    picked = logprobs.gather(1, token_ids[asking].unsqueeze(1)).squeeze(1).tolist()
    max_n = min(max(rows[i].params.logprobs or 0 for i in asking), raw.shape[1])
    top_values, top_ids = logprobs.topk(max_n, dim=-1)  # sorted descending
    top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
    for a, i in enumerate(asking):
        k = rows[i].params.logprobs or 0
        chosen[i] = picked[a]
        top[i] = list(zip(top_ids_l[a][:k], top_values_l[a][:k], strict=True))
    return chosen, top


def prompt_logprobs(
    logits: torch.Tensor, next_ids: Sequence[int], k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For logits rows (P, V) at prompt positions p and the prompt tokens at p + 1: each
    token's logprob under the model's raw distribution and the top-k (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (P, V)
    ids = torch.tensor(list(next_ids), dtype=torch.long, device=logits.device)
    picked = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(min(k, logits.shape[1]), dim=-1)  # sorted descending
    tv, ti = top_values.tolist(), top_ids.tolist()
    return [(picked[j], list(zip(ti[j], tv[j], strict=True))) for j in range(len(picked))]
