"""A mesh as `splitserve up` starts it by default, attacked from this host: who gets in.

`up`'s defaults on the tiny model, disaggregated, each worker's second pipeline stage a service
of its own: mutual TLS on every internal connection, an API key on the public ones. Then:

- a caller without a client certificate (plaintext, or TLS without one) is refused by the
  kvstore (a Put), a prefill worker, a decode worker, a stage service and the router's
  internal port (a rogue Register), and each service's log shows the refusal;
- a caller with a certificate of the mesh's CA that isn't a worker's can't Register or
  Deregister (PERMISSION_DENIED, logged), and the pools are unchanged;
- the public port serves no Registry, and without the key nothing is generated;
- supervision: a decode worker SIGKILLed while the mesh runs is restarted, registers with the
  router again and serves.

And a router alone with a public certificate: HTTPS and gRPC over TLS on its public ports.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mesh_fixtures import RunningMesh, http_post, metric_samples, start_mesh, stream_ids
from ports import free_ports

from splitserve.launcher.certs import CertBundle
from splitserve.services.security import TLSConfig, open_sync_channel
from splitserve.v1 import pb, rpc

INTERNAL = ["kvstore", "prefill-0", "decode-0", "prefill-0-stage-1", "decode-0-stage-1"]
HANDSHAKE_REFUSED = "Handshake failed"  # gRPC core's line, on the service's stderr


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Iterator[RunningMesh]:
    flags = ("--model", tiny_model_dir, "--pipeline-stages", "2", "--stage-services")
    running = start_mesh(tmp_path_factory.mktemp("secure-mesh"), *flags, "--kv-cache-mib", "16")
    try:
        yield running
    finally:
        running.stop()


def generate(mesh: RunningMesh, prompt: str = "Hello there", **kw) -> list[int]:
    req = pb.GenerateRequest(
        prompt=prompt, sampling=pb.SamplingOptions(max_tokens=4, temperature=0)
    )
    ids, _, _, _ = stream_ids(mesh.inference().Generate(req, timeout=120, **kw))
    return ids


def wait_for_log(mesh: RunningMesh, service: str, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while mesh.log(service).count(text) < count:
        if time.monotonic() > deadline:
            log = mesh.log(service)
            raise AssertionError(f"{service}'s log has no {text!r} (x{count}):\n{log}")
        time.sleep(0.2)


def no_certificate(mesh: RunningMesh, address: str) -> list[grpc.Channel]:
    """A plaintext channel, and a TLS one that trusts the mesh's CA but shows no certificate."""
    ca = (mesh.secrets_dir / "ca.crt").read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    return [grpc.insecure_channel(address), grpc.secure_channel(address, anonymous)]


def attempts(service: str) -> list:
    """Calls a stranger would make on `service`, as functions of a channel."""
    if service == "kvstore":
        block = pb.BlockPayload(key=b"\x01" * 32, payload=b"poison")
        return [lambda ch: rpc.KVStoreStub(ch).Put(iter([block]), timeout=10)]
    if service.startswith("prefill-0-stage") or service.startswith("decode-0-stage"):
        return [lambda ch: rpc.StageStub(ch).Stats(pb.StageStatsRequest(), timeout=10)]
    if service == "prefill-0":
        return [lambda ch: rpc.PrefillStub(ch).GetLoad(pb.LoadRequest(), timeout=10)]
    return [lambda ch: rpc.DecodeStub(ch).GetLoad(pb.LoadRequest(), timeout=10)]


def rogue_register(channel: grpc.Channel) -> pb.RegisterResponse:
    req = pb.RegisterRequest(address="127.0.0.1:1", role="decode", model="tiny", worker_id="evil")
    return rpc.RegistryStub(channel).Register(req, timeout=10)


def test_the_mesh_serves_with_its_key(mesh):
    assert len(generate(mesh)) == 4
    for name in [*INTERNAL, "router"]:
        # "... serving on ... (mutual TLS)"
        assert "(mutual TLS)" in mesh.wait_for_log(name, "(mutual TLS)"), name


@pytest.mark.parametrize("service", INTERNAL)
def test_a_caller_without_a_certificate_is_refused_and_logged(mesh, service):
    before = mesh.log(service).count(HANDSHAKE_REFUSED)
    for channel in no_certificate(mesh, mesh.address(service)):
        for call in attempts(service):
            with channel, pytest.raises(grpc.RpcError) as info:
                call(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    wait_for_log(mesh, service, HANDSHAKE_REFUSED, before + 2)


def test_a_rogue_register_without_a_certificate_is_refused(mesh):
    before = mesh.log("router").count(HANDSHAKE_REFUSED)
    for channel in no_certificate(mesh, mesh.internal_address()):
        with channel, pytest.raises(grpc.RpcError) as info:
            rogue_register(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_for_log(mesh, "router", HANDSHAKE_REFUSED, before + 2)


def test_a_certificate_that_is_not_a_workers_cannot_register(mesh):
    """The launcher's own certificate, and the kvstore's: the CA's, but not for workers."""
    d = mesh.secrets_dir
    for name in ("client", "kvstore"):
        tls = TLSConfig.load(str(d / f"{name}.crt"), str(d / f"{name}.key"), str(d / "ca.crt"))
        with open_sync_channel(mesh.internal_address(), tls) as channel:
            with pytest.raises(grpc.RpcError) as info:
                rogue_register(channel)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            dereg = pb.DeregisterRequest(address=mesh.address("decode-0"))
            with pytest.raises(grpc.RpcError) as info:
                rpc.RegistryStub(channel).Deregister(dereg, timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    wait_for_log(mesh, "router", "refused Registry calls from non-worker certificates")
    workers = {labels["worker"] for labels, _ in pool(mesh)}
    assert "127.0.0.1:1" not in workers and mesh.address("decode-0") in workers
    assert len(generate(mesh)) == 4


def pool(mesh: RunningMesh) -> list[tuple[dict[str, str], float]]:
    return metric_samples(mesh.router_metrics(), "splitserve_router_worker_healthy")


def test_the_public_port_has_no_registry_and_wants_the_key(mesh):
    public = grpc.insecure_channel(mesh.address("router"))
    with public, pytest.raises(grpc.RpcError) as info:
        rogue_register(public)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as info:
        generate(mesh, metadata=[("authorization", "Bearer sk-made-up-key")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    status, _ = http_post(f"{mesh.http_url}/v1/completions", body)
    assert status == 401
    status, reply = mesh.http_post("/v1/completions", body)
    assert status == 200, reply


def test_a_killed_decode_worker_is_restarted_and_rejoins(mesh):
    mesh.supervise()
    old = mesh.mesh.children["decode-0"]
    # It joined the router's pool over mutual TLS (retrying with backoff until the router,
    # which starts after it, was up).
    wait_for_log(mesh, "decode-0", "registered with router", 1)
    registered = mesh.log("decode-0").count("registered with router")
    os.kill(old.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:
        new = mesh.mesh.children["decode-0"]
        if new is not old and new.ready:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"decode-0 was not restarted\n{mesh.tails()}")
        time.sleep(0.2)
    assert new.proc.pid != old.proc.pid
    wait_for_log(mesh, "decode-0", "registered with router", registered + 1)
    deadline = time.monotonic() + 60
    while (mesh.address("decode-0"), 1.0) not in [(lb["worker"], v) for lb, v in pool(mesh)]:
        assert time.monotonic() < deadline, mesh.tails()
        time.sleep(0.2)
    assert len(generate(mesh)) == 4


def test_the_routers_public_ports_speak_tls_when_given_a_certificate(tmp_path, tiny_model_dir):
    """--public-tls-cert/--public-tls-key: HTTPS and gRPC over TLS, no client certificate;
    reflection lists only the public services."""
    CertBundle(tmp_path).write([("router", "router")])
    grpc_port, http_port = free_ports(2)
    argv = [
        sys.executable, "-m", "splitserve.router", "--model", tiny_model_dir,
        *("--grpc-port", str(grpc_port), "--http-port", str(http_port), "--internal-port", "0"),
        *("--public-tls-cert", str(tmp_path / "router.crt")),
        *("--public-tls-key", str(tmp_path / "router.key"), "--api-key", "sk-test-public-tls"),
    ]  # fmt: skip
    log = (tmp_path / "router.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(
        f"https://127.0.0.1:{http_port}/v1/models",
        headers={"Authorization": "Bearer sk-test-public-tls"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with opener.open(request, timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "router.log"
                ).read_text()
                time.sleep(0.3)
        creds = grpc.ssl_channel_credentials((tmp_path / "ca.crt").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", creds) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
            names = {s.name for s in reply.list_services_response.service}
            assert names == {
                "splitserve.v1.Inference",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
        plain = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        with plain, pytest.raises(grpc.RpcError):
            rpc.InferenceStub(plain).ListModels(pb.ListModelsRequest(), timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
