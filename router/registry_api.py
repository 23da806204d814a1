"""splitserve.v1.Registry on the router's internal port: workers join and leave the pools.

    Register(address, role, model, worker_id)   -> the pool for `role` (idempotent), then one
                                                   health check so a healthy worker gets traffic
                                                   at once
    Deregister(address)                          -> out of selection now (a draining worker)

INVALID_ARGUMENT for an address that isn't HOST:PORT or an unknown role; FAILED_PRECONDITION
when the worker serves another model than the router (its block hashes, and its answers, would
be another model's). The router's health loop keeps checking registered workers and drops one
that fails several checks in a row (router/registry.py).

Who may call: the internal port is never the public one (router/__main__.py). With mutual TLS
every caller has a certificate of the mesh's CA, and Register/Deregister also need it to be a
worker's (OU=worker, as `splitserve certs` makes it; services/security.py): a kvstore's, a
stage's or an operator's certificate gets PERMISSION_DENIED, logged at most every few seconds
with a count. Without TLS the port is on loopback, and this host's processes are trusted.
"""

from __future__ import annotations

import logging

import grpc

from splitserve.services.security import peer_identity
from splitserve.v1 import pb, rpc

from .app import Router
from .auth import RateLimitedLog

log = logging.getLogger("splitserve.router")

SERVICE_NAME = "splitserve.v1.Registry"
MAX_FIELD_CHARS = 256  # an address, a role, a model id: anything longer is not one


WORKER_ROLE = "worker"


class RegistryServicer(rpc.RegistryServicer):
    def __init__(self, router: Router, require_worker_cert: bool = False) -> None:
        self.router = router
        self.require_worker_cert = require_worker_cert
        self.refusals = RateLimitedLog("refused Registry calls from non-worker certificates")

    async def _check_caller(self, context: grpc.aio.ServicerContext) -> None:
        if not self.require_worker_cert:
            return
        peer = peer_identity(context)
        if peer is not None and peer.role == WORKER_ROLE:
            return
        who = f"{peer.name} ({peer.role or 'no role'})" if peer else "no certificate"
        self.refusals.hit(f"last: {who} from {context.peer()}")
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "only a worker's certificate may use the Registry"
        )

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        await self._check_caller(context)
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
        await self._check_caller(context)
        found = self.router.workers.deregister(request.address)
        if found:
            log.info("deregistered %s", request.address)
        return pb.DeregisterResponse(found=found)
