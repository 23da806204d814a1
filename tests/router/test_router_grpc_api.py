"""The Inference servicer in a real in-process grpc.aio server, on a Router whose only worker
is unreachable: bad input -> INVALID_ARGUMENT / NOT_FOUND, no healthy worker -> UNAVAILABLE,
over --max-inflight -> RESOURCE_EXHAUSTED (HTTP 429), draining -> UNAVAILABLE; every outcome
counted; ListModels and Abort answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import grpc
import pytest
from router_testing import serve_router

from splitserve.model.loader import Checkpoint
from splitserve.router.app import Router, RouterConfig
from splitserve.router.auth import Authenticator
from splitserve.router.errors import OverloadedError, UnavailableError
from splitserve.router.grpc_api import InferenceServicer, add_to_server
from splitserve.v1 import pb, rpc

Scenario = Callable[[Router, rpc.InferenceStub], Awaitable[None]]


def serve(
    checkpoint: Checkpoint,
    scenario: Scenario,
    auth: Authenticator | None = None,
    **config: object,
) -> Router:
    router = Router(RouterConfig(decode=("127.0.0.1:9",), **config), checkpoint)
    add = partial(add_to_server, InferenceServicer(router, auth))
    return serve_router(router, add, rpc.InferenceStub, scenario)


async def status_of(stub: rpc.InferenceStub, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        async for _ in stub.Generate(request, timeout=10):
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_status_codes(smollm2_checkpoint: Checkpoint) -> None:
    async def scenario(router: Router, stub: rpc.InferenceStub) -> None:
        greedy = pb.SamplingOptions(temperature=0)
        cases = [
            (pb.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.GenerateRequest(prompt="hi", model="other"), grpc.StatusCode.NOT_FOUND),
            (
                pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(temperature=-1)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            # Valid, but the only worker never answered a health check.
            (pb.GenerateRequest(prompt="hi", sampling=greedy), grpc.StatusCode.UNAVAILABLE),
        ]
        for request, code in cases:
            assert await status_of(stub, request) == code, request
        (card,) = (await stub.ListModels(pb.ListModelsRequest())).models
        assert card.id == router.model.name and card.vocab_size == router.model.vocab_size
        assert not (await stub.Abort(pb.AbortRequest(request_id="nope"))).found

    router = serve(smollm2_checkpoint, scenario)
    body = router.metrics.render().decode()
    for status in ("empty_prompt", "model_not_found", "invalid_value", "service_unavailable"):
        assert f'api="grpc",status="{status}"' in body, status
    assert "splitserve_router_requests_in_flight 0.0" in body


def test_overload_is_refused_fast(smollm2_checkpoint: Checkpoint) -> None:
    async def scenario(router: Router, stub: rpc.InferenceStub) -> None:
        with router.admit("http"):  # one request in flight fills max_inflight=1
            code = await status_of(stub, pb.GenerateRequest(prompt="hi"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(OverloadedError) as info, router.admit("http"):
                pass
            assert info.value.http_status == 429
            assert info.value.openai_body()["error"]["code"] == "server_overloaded"
        await router.drain(timeout_s=1.0)
        assert await status_of(stub, pb.GenerateRequest(prompt="hi")) == (
            grpc.StatusCode.UNAVAILABLE
        )
        with pytest.raises(UnavailableError), router.admit("http"):
            pass

    router = serve(smollm2_checkpoint, scenario, max_inflight=1)
    assert router.num_inflight == 0


def test_api_keys_on_the_grpc_door(smollm2_checkpoint: Checkpoint) -> None:
    """Every Inference method needs a key when keys are configured; refusals are counted."""
    key = "sk-grpc-test"

    async def scenario(router: Router, stub: rpc.InferenceStub) -> None:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        for metadata in ([], [("authorization", "Bearer nope")], [("authorization", "")]):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata):
                    pass
            assert info.value.code() == unauthenticated
        for call, request in (
            (stub.ListModels, pb.ListModelsRequest()),
            (stub.Abort, pb.AbortRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(request)
            assert info.value.code() == unauthenticated
        for metadata in ([("authorization", f"Bearer {key}")], [("authorization", key)]):
            request = pb.GenerateRequest(prompt="hi")
            call = stub.Generate(request, metadata=metadata, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # past the door
            models = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert models.models[0].id == router.model.name

    router = serve(smollm2_checkpoint, scenario, auth=Authenticator([key]))
    body = router.metrics.render().decode()
    assert 'api="grpc",status="invalid_api_key"' in body
