"""The public gRPC service: splitserve.v1.Inference (Generate stream, Abort, ListModels).

Errors are status codes (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, ...),
never messages in the stream. A client that cancels its call cancels the worker's stream.
Health and reflection come with `ServiceServer` and stay open; with API keys configured, every
Inference method needs one in the `authorization` metadata (`Bearer KEY`, or the bare key),
else UNAUTHENTICATED, and Abort only finds the caller's own tenant's requests.

`add_to_server` registers the servicer with lenient deserializers: a message that doesn't parse
(corrupt bytes, a string that isn't UTF-8) reaches the method as `Undecodable` and gets
INVALID_ARGUMENT, where grpc's own handling would answer UNKNOWN.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from splitserve.services.tracing import extract_context
from splitserve.v1 import pb, rpc

from .app import Router
from .auth import Authenticator
from .choices import Choices, validate_prompts
from .errors import AuthenticationError, RouterError
from .generation import FINISH_CODES, GenerationDelta, LogprobInfo
from .structured import guided_from_proto
from .tools import GrpcToolCalls, apply_grpc_tools
from .validation import GenerateInput, check_prompt_list

log = logging.getLogger("splitserve.router")

SERVICE_NAME = "splitserve.v1.Inference"

M = TypeVar("M")


@dataclass(frozen=True)
class Undecodable:
    """A request message that didn't parse; the method answers INVALID_ARGUMENT."""

    reason: str


def _lenient(parse: Callable[[bytes], M]) -> Callable[[bytes], M | Undecodable]:
    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(str(e))

    return deserialize


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """`rpc.add_InferenceServicer_to_server`, but an unparsable message is INVALID_ARGUMENT."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient(pb.GenerateRequest.FromString),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort,
            request_deserializer=_lenient(pb.AbortRequest.FromString),
            response_serializer=pb.AbortResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_lenient(pb.ListModelsRequest.FromString),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpc >= 1.62: the faster lookup
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


class InferenceServicer(rpc.InferenceServicer):
    def __init__(self, router: Router, auth: Authenticator | None = None) -> None:
        self.router = router
        self.auth = auth or Authenticator()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic()
        timeout_s = context.time_remaining()  # the caller's deadline, if it set one
        try:
            tenant = await self._authenticate(context)
            await _check_decoded(request, context)
            with self.router.admit("grpc"), self.auth.admit(tenant):
                raws = generate_inputs(request, caller=_caller(context))
                for raw in raws:
                    raw.tenant = tenant
                calls = GrpcToolCalls(apply_grpc_tools(raws[0], request))  # chat with tools
                validated = await validate_prompts(self.router, raws, _list_field(request))
                parent = extract_context(context)
                deltas = Choices(self.router, validated).stream(parent, arrival, timeout_s)
                async with aclosing(deltas) as stream:
                    async for delta in stream:
                        yield calls.add(to_response(delta), delta)
        except RouterError as e:
            await context.abort(e.grpc_code, e.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the router")

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        tenant = await self._authenticate(context)
        await _check_decoded(request, context)
        # Only the caller's own tenant's requests can be found (and aborted).
        return pb.AbortResponse(found=self.router.abort(request.request_id, tenant))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._authenticate(context)
        await _check_decoded(request, context)
        m = self.router.model
        card = pb.ModelCard(id=m.name, max_model_len=m.max_model_len, vocab_size=m.vocab_size)
        return pb.ListModelsResponse(models=[card])

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant (None with authentication off); else UNAUTHENTICATED."""
        try:
            return self.auth.authenticate(_caller(context), allow_bare=True)
        except AuthenticationError as e:
            self.router.metrics.requests.labels("grpc", e.code).inc()
            await context.abort(e.grpc_code, e.message)
            raise AssertionError("unreachable: abort raises") from e


async def _check_decoded(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad message: {request.reason}")


def _caller(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


_LISTS = ("prompts", "token_id_lists")  # the input oneof's members that hold several prompts


def _list_field(request: pb.GenerateRequest) -> str | None:
    kind = request.WhichOneof("input")
    return kind if kind in _LISTS else None


def generate_inputs(request: pb.GenerateRequest, caller: str | None = None) -> list[GenerateInput]:
    """One validator input per prompt: `prompts` / `token_id_lists` give one each (checked: at
    least one, at most MAX_PROMPTS, none empty; INVALID_ARGUMENT naming the field), every
    other input one. The prompts share the request's id, so Abort finds all their choices."""
    kind = _list_field(request)
    if kind is None:
        return [generate_input(request, caller)]
    if kind == "prompts":
        prompts: list[object] = list(request.prompts.texts)
    else:
        prompts = [list(t.ids) for t in request.token_id_lists.lists]
    check_prompt_list(prompts, kind)
    first = generate_input(request, caller)
    first.request_id = first.request_id or f"cmpl-{uuid.uuid4().hex}"
    out = []
    for prompt in prompts:
        raw = replace(first, sampling=dict(first.sampling))
        if isinstance(prompt, str):
            raw.prompt = prompt
        else:
            raw.prompt_token_ids = prompt
        out.append(raw)
    return out


def generate_input(request: pb.GenerateRequest, caller: str | None = None) -> GenerateInput:
    """The proto's fields as the validator's input (proto3 has no null: unset = default); for
    a list of prompts, all but the prompt (generate_inputs sets each)."""
    kind = request.WhichOneof("input")
    raw = GenerateInput(
        model=request.model or None,
        request_id=request.request_id or None,
        cache_salt=request.cache_salt or None,
        caller=caller,
        disaggregate=request.disaggregate if request.HasField("disaggregate") else None,
        sampling=_sampling_fields(request.sampling),
        guided=guided_from_proto(request.sampling),
        body_bytes=request.ByteSize(),
        n=request.n or 1,
        best_of=request.best_of or None,
        echo=request.echo,
    )
    if request.echo and "logprobs" in raw.sampling:  # the prompt's too, as on HTTP
        raw.sampling.setdefault("prompt_logprobs", raw.sampling["logprobs"])
    if kind == "prompt":
        raw.prompt = request.prompt
    elif kind == "chat":
        raw.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    elif kind == "token_ids":
        raw.prompt_token_ids = list(request.token_ids.ids)
    return raw


def _sampling_fields(s: pb.SamplingOptions) -> dict[str, object]:
    fields: dict[str, object] = {
        "min_tokens": s.min_tokens,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "stop": tuple(s.stop),
        "stop_token_ids": tuple(s.stop_token_ids),
        "ignore_eos": s.ignore_eos,
    }
    names = ("max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "logprobs")
    for name in (*names, "prompt_logprobs"):
        if s.HasField(name):
            fields[name] = getattr(s, name)
    if s.logit_bias:
        fields["logit_bias"] = dict(s.logit_bias)
    return fields


def _token_logprob(lp: LogprobInfo) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, text=t.token) for t in lp.top]
    return pb.TokenLogprob(logprob=lp.logprob or 0.0, top=top)


def to_response(delta: GenerationDelta) -> pb.GenerateResponse:
    out = pb.GenerateResponse(
        request_id=delta.request_id,
        token_ids=delta.token_ids,
        text=delta.prompt_text + delta.text,  # echo: the prompt first
        index=delta.index,
        prompt_token_ids=delta.prompt_token_ids,
    )
    out.logprobs.extend(_token_logprob(lp) for lp in delta.logprobs)
    out.prompt_logprobs.extend(_token_logprob(lp) for lp in delta.prompt_logprobs)
    if delta.finish_reason is not None:
        out.finish_reason = FINISH_CODES[delta.finish_reason]
        if delta.stop_reason is not None:
            out.stop_reason = str(delta.stop_reason)
    if delta.usage is not None:
        u = delta.usage
        out.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_prompt_tokens=u.cached_tokens,
            )
        )
    return out
