"""Several choices for one request: `n`, `best_of` and a list of prompts, on both front doors.

    choices = Choices(router, requests)           # one ValidatedRequest per prompt
    async for delta in choices.stream(parent, arrival, timeout_s):
        ...                                       # delta.index: prompt i's choice j is i * n + j
    choices.usage                                 # the whole request's, once the stream ended

    requests = await validate_prompts(router, inputs, "prompt")   # one per prompt of a list


Each choice is a request of its own through the dispatcher (so admission, deadlines and
migration hold for each), with the id `<id>-<i>-<j>` when there is more than one.

KV sharing is by prefix caching: a prompt's choice 0 starts first, and its other choices start
once its first token is back, when its prompt's full blocks are registered on its decode worker
(which the prefix-aware policy then picks for them), so they compute at most the prompt's last
partial block. `usage.prompt_tokens` counts each prompt once; its `cached_tokens` is the
largest prefix any of its choices found cached.

Seeds: choice j of a request with `seed` s samples with seed s + j (wrapped to int64), so
`n=4, seed=s` gives the four outputs of four requests with seeds s, s+1, s+2, s+3.

`best_of` > n: every candidate's tokens are scored by their cumulative logprob (the model's
raw distribution, as the `logprobs` field reports it); the n best are returned, in the order
of their scores, and only once all candidates have finished. So with `stream` the winners
are buffered, on both front doors: the stream (SSE, or the gRPC Generate stream) carries
nothing until every candidate has finished, then each winner's deltas, one choice after
another. vLLM does the same (it does not stream when best_of != n; OpenAI documents that
best_of results cannot be streamed): the request is served, not refused.

Prompt logprobs (`echo` with `logprobs`) are computed by choice 0 only, and copied to the
others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from .app import Router
from .errors import RequestValidationError
from .generation import GenerationDelta, LogprobInfo, UsageInfo
from .validation import GenerateInput, ValidatedRequest

_INT64 = 1 << 64


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice j: seed + j, wrapped into int64 (the wire's type)."""
    if seed is None or j == 0:
        return seed
    return (seed + j + (1 << 63)) % _INT64 - (1 << 63)


async def validate_prompts(
    router: Router, inputs: list[GenerateInput], param: str | None = None
) -> list[ValidatedRequest]:
    """One validated request per prompt. With a list of prompts (`param`: the front door's
    field for it), an error about one prompt says which: `prompt[2]: token ids must be ...`."""
    out = []
    for i, raw in enumerate(inputs):
        try:
            out.append(await router.validate(raw))
        except RequestValidationError as e:
            if param is None or e.param != "prompt" or type(e) is not RequestValidationError:
                raise
            message = f"{param}[{i}]: {e.message}"
            raise RequestValidationError(e.code or "invalid_value", message, param) from e
    return out


@dataclass
class _Choice:
    prompt: int  # which prompt
    j: int  # which candidate of that prompt
    request: ValidatedRequest
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its first delta is back
    deltas: list[GenerationDelta] = field(default_factory=list)  # kept for best_of
    score: float = 0.0
    usage: UsageInfo | None = None
    aborted: bool = False


class Choices:
    def __init__(self, router: Router, requests: list[ValidatedRequest]) -> None:
        self.router = router
        self.requests = requests
        self.n = requests[0].n
        self.best_of = requests[0].best_of
        self.usage: UsageInfo | None = None
        self._prompt_logprobs: dict[int, list[LogprobInfo]] = {}  # each prompt's, from choice 0
        self._choices = [
            _Choice(i, j, _sub_request(r, i, j, len(requests) == 1 and self.best_of == 1))
            for i, r in enumerate(requests)
            for j in range(self.best_of)
        ]

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.n

    async def stream(
        self, parent: Any = None, arrival: float | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[GenerationDelta]:
        """Every choice's deltas as they come, `index` set; with best_of > n, the winners'
        at the end. Closing it early cancels every choice still running."""
        queue: asyncio.Queue[tuple[_Choice, GenerationDelta | BaseException | None]]
        queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._run(c, queue, parent, arrival, timeout_s))
            for c in self._choices
        ]
        pending = len(tasks)
        try:
            while pending:
                choice, item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, BaseException):
                    raise item
                elif self.best_of > self.n:
                    choice.deltas.append(item)
                else:
                    item.index = choice.prompt * self.n + choice.j
                    yield item
            if self.best_of > self.n:
                for delta in self._winners():
                    yield delta
            self.usage = self._total_usage()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        choice: _Choice,
        queue: asyncio.Queue[tuple[_Choice, GenerationDelta | BaseException | None]],
        parent: Any,
        arrival: float | None,
        timeout_s: float | None,
    ) -> None:
        leader = self._choices[choice.prompt * self.best_of]
        try:
            if choice is not leader:
                await leader.started.wait()  # its prompt blocks are cached by now
                if leader.aborted:  # Abort came before this choice started: it never runs
                    end = GenerationDelta(choice.request.request_id, finish_reason="abort")
                    queue.put_nowait((choice, end))
                    queue.put_nowait((choice, None))
                    return
            deltas = self.router.generate(choice.request, parent, arrival, timeout_s)
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    self._observe(choice, leader, delta)
                    queue.put_nowait((choice, delta))
            queue.put_nowait((choice, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the stream ends with the first error
            queue.put_nowait((choice, e))
        finally:
            choice.started.set()  # never leave the prompt's other choices waiting

    def _observe(self, choice: _Choice, leader: _Choice, delta: GenerationDelta) -> None:
        if not choice.started.is_set():
            choice.started.set()
            if choice is leader:
                self._prompt_logprobs[choice.prompt] = delta.prompt_logprobs
            elif choice.request.echo and not delta.prompt_logprobs:
                delta.prompt_logprobs = self._prompt_logprobs.get(choice.prompt, [])
        choice.aborted = delta.finish_reason == "abort"
        choice.score += sum(lp.logprob or 0.0 for lp in delta.logprobs)
        choice.usage = delta.usage or choice.usage

    def _winners(self) -> list[GenerationDelta]:
        out: list[GenerationDelta] = []
        wants_logprobs = self.requests[0].params.logprobs is not None
        for i in range(len(self.requests)):
            group = self._choices[i * self.best_of : (i + 1) * self.best_of]
            ranked = sorted(group, key=lambda c: -c.score)[: self.n]  # stable: ties by j
            for rank, c in enumerate(ranked):
                for d in c.deltas:
                    d.index = i * self.n + rank
                    if not wants_logprobs:
                        d.logprobs = []
                    out.append(d)
        return out

    def _total_usage(self) -> UsageInfo:
        prompt = sum(len(r.prompt_token_ids) for r in self.requests)
        completion = sum(c.usage.completion_tokens for c in self._choices if c.usage)
        cached = 0
        for i in range(len(self.requests)):
            group = self._choices[i * self.best_of : (i + 1) * self.best_of]
            cached += max((c.usage.cached_tokens for c in group if c.usage), default=0)
        return UsageInfo(prompt, completion, cached)


def _sub_request(r: ValidatedRequest, i: int, j: int, alone: bool) -> ValidatedRequest:
    params = r.params
    if r.best_of > r.n and params.logprobs is None:  # candidates are scored by their logprobs
        params = replace(params, logprobs=0)
    params = replace(
        params,
        seed=choice_seed(params.seed, j),
        # Choice 0 computes them; the others may take the prompt from the prefix cache.
        prompt_logprobs=params.prompt_logprobs if j == 0 else None,
    )
    request_id = r.request_id if alone else f"{r.request_id}-{i}-{j}"
    return replace(r, request_id=request_id, params=params)
