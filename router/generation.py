"""Worker tokens -> what clients see: text deltas, stop strings, logprob text, finish and usage.

Workers never see text, so the router owns everything textual: incremental detokenization
(never a broken UTF-8 character in a delta), stop strings (matched on the decoded text, the
text cut before the match, and the worker's stream cancelled), and the text of each logprob's
token. `generate` ends the worker's stream whenever it stops early, so the worker frees the KV.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from splitserve.v1 import pb

from .admission import Deadline
from .dispatch import CallSlot, Dispatcher, Metadata, WorkerTokens
from .errors import UpstreamError
from .validation import ValidatedRequest

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
FINISH_CODES = {name: code for code, name in FINISH_REASONS.items()}


@dataclass(frozen=True)
class TopLogprobInfo:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class LogprobInfo:
    token_id: int
    token: str
    logprob: float | None  # None: the prompt's first token, which has none
    top: list[TopLogprobInfo]


@dataclass(frozen=True)
class UsageInfo:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationDelta:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[LogprobInfo] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    usage: UsageInfo | None = None  # on the last delta
    index: int = 0  # the choice it belongs to
    # echo, on the first delta: the prompt's text and ids, and its logprobs when asked for
    prompt_text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[LogprobInfo] = field(default_factory=list)


class OutputProcessor:
    """One per request; feed it each `WorkerTokens` in order."""

    def __init__(self, tokenizer: Tokenizer, request: ValidatedRequest) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.stops = request.params.stop
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        # Text that could still be the start of a stop string is held back until it can't.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.num_emitted = 0
        self.num_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        self.echoed = False

    def process(self, ev: WorkerTokens) -> GenerationDelta:
        if self.finished:
            raise RuntimeError("the request already finished")
        if self.request.prompt_only:  # max_tokens 0: the one token the worker made is dropped
            done = ev.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            reason = pb.FINISH_REASON_LENGTH if done else ev.finish_reason
            ev = WorkerTokens([], [], reason, ev.num_cached_tokens, ev.prompt_logprobs)
        delta = self._process(ev)
        if self.request.echo and not self.echoed:
            self.echoed = True
            delta.prompt_text = self.request.echo_text
            delta.prompt_token_ids = list(self.request.prompt_token_ids)
            delta.prompt_logprobs = self._prompt_logprobs(ev)
        return delta

    def _prompt_logprobs(self, ev: WorkerTokens) -> list[LogprobInfo]:
        ids = self.request.prompt_token_ids
        if self.request.params.prompt_logprobs is None or len(ev.prompt_logprobs) != len(ids) - 1:
            return []
        first = LogprobInfo(ids[0], self.token_text(ids[0]), None, [])
        rest = [
            LogprobInfo(t, self.token_text(t), lp.logprob, [self._top(x) for x in lp.top])
            for t, lp in zip(ids[1:], ev.prompt_logprobs, strict=True)
        ]
        return [first, *rest]

    def _process(self, ev: WorkerTokens) -> GenerationDelta:
        self.num_tokens += len(ev.token_ids)
        if ev.num_cached_tokens is not None:
            self.num_cached_tokens = max(self.num_cached_tokens, ev.num_cached_tokens)
        finish = FINISH_REASONS.get(ev.finish_reason)
        stop_reason = self._stop_token(ev, finish)
        self.text += self.detok.add(ev.token_ids)
        if finish is not None:
            self.text += self.detok.flush()
        hit = self._find_stop_string()
        if hit is not None:
            self.text = self.text[: hit[0]]
            finish, stop_reason = "stop", hit[1]
        end = len(self.text) if finish is not None else len(self.text) - self.holdback
        text = self.text[self.num_emitted : max(end, self.num_emitted)]
        self.num_emitted += len(text)
        delta = GenerationDelta(
            self.request.request_id,
            list(ev.token_ids),
            text,
            self._logprobs(ev),
            finish,
            stop_reason,
        )
        if finish is not None:
            self.finished = True
            delta.usage = UsageInfo(
                len(self.request.prompt_token_ids), self.num_tokens, self.num_cached_tokens
            )
        return delta

    def _stop_token(self, ev: WorkerTokens, finish: str | None) -> int | None:
        stop_ids = self.request.params.stop_token_ids
        if finish == "stop" and ev.token_ids and ev.token_ids[-1] in stop_ids:
            return ev.token_ids[-1]
        return None

    def _find_stop_string(self) -> tuple[int, str] | None:
        """The earliest stop string in the text not yet emitted (and its start)."""
        best: tuple[int, str] | None = None
        window = max(0, self.num_emitted - self.holdback)
        for s in self.stops:
            idx = self.text.find(s, window)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        return best

    def _logprobs(self, ev: WorkerTokens) -> list[LogprobInfo]:
        out = []
        for token_id, lp in zip(ev.token_ids, ev.logprobs, strict=False):
            top = [self._top(t) for t in lp.top]
            out.append(LogprobInfo(token_id, self.token_text(token_id), lp.logprob, top))
        return out

    def _top(self, t: pb.TopLogprob) -> TopLogprobInfo:
        return TopLogprobInfo(t.token_id, self.token_text(t.token_id), t.logprob)

    def token_text(self, token_id: int) -> str:
        # Special tokens are shown: a logprob for "<|im_end|>" should say so.
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


async def generate(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    request: ValidatedRequest,
    slot: CallSlot,
    metadata: Metadata,
    deadline: Deadline | None = None,
) -> AsyncIterator[GenerationDelta]:
    """The request's deltas, the last with `finish_reason` and `usage`.

    Returning early (a stop string) or being closed by the caller (client gone) closes the
    dispatcher's stream, which cancels the worker's stream. One processor sees every token
    whichever workers produced them: a request the dispatcher moved to another worker goes on
    with the same detokenizer, stop-string window and token count.
    """
    proc = OutputProcessor(tokenizer, request)
    events = dispatcher.stream(request, slot, metadata, deadline)
    async with aclosing(events):
        async for ev in events:
            delta = proc.process(ev)
            if delta.token_ids or delta.text or delta.finish_reason is not None:
                yield delta
            if proc.finished:
                return
    raise UpstreamError(grpc.StatusCode.INTERNAL, "the worker's stream ended without finishing")
