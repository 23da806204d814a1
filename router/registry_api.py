"""splitserve.v1.Registry on the router's gRPC port: workers join and leave the pools at runtime.

    Register(address, role, model, worker_id)   -> the pool for `role` (idempotent), then one
                                                   health check so a healthy worker gets traffic
                                                   at once
    Deregister(address)                          -> out of selection now (a draining worker)

INVALID_ARGUMENT for an address that isn't HOST:PORT or an unknown role; FAILED_PRECONDITION
when the worker serves another model than the router (its block hashes, and its answers, would
be another model's). The router's health loop keeps checking registered workers and drops one
that fails several checks in a row (router/registry.py).
"""

from __future__ import annotations

import logging

import grpc

from splitserve.v1 import pb, rpc

from .app import Router

log = logging.getLogger("splitserve.router")

SERVICE_NAME = "splitserve.v1.Registry"
MAX_FIELD_CHARS = 256  # an address, a role, a model id: anything longer is not one


class RegistryServicer(rpc.RegistryServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        for name in ("address", "role", "model", "worker_id"):
            if len(getattr(request, name)) > MAX_FIELD_CHARS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is too long")
        if self.router.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        served = self.router.model
        if request.model not in (served.name, *served.aliases):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the worker serves {request.model or 'no model'!r}; this router serves "
                f"{served.name!r}",
            )
        try:
            worker, added = await self.router.workers.register(request.address, request.role)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if added:
            log.info(
                "registered %s %s at %s (%s)",
                request.role,
                request.worker_id or "(no id)",
                request.address,
                "healthy" if worker.healthy else "not healthy yet",
            )
        return pb.RegisterResponse(added=added, healthy=worker.healthy)

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        found = self.router.workers.deregister(request.address)
        if found:
            log.info("deregistered %s", request.address)
        return pb.DeregisterResponse(found=found)
