"""`splitserve bench handoff`: the prefill -> decode KV hand-off rate, against bare gRPC in the
same run.

- **Baseline**: how fast grpc.aio moves 4 MiB `bytes` messages from one process to another on
  this machine with nothing else in the way (identity serializers, plaintext, no checks): the
  ceiling of any gRPC hand-off written in Python here.
- **Ours**: a disaggregated mesh (router, 2 prefill, 1 decode, kvstore; mutual TLS unless
  `--insecure`, as `splitserve up` runs it) serves `--prompts` sequential prompts of
  `--prompt-tokens` random tokens, each with a fresh cache salt so that the prefill worker
  computes and hands off all of it. The rate is the decode worker's own: received KV bytes over
  the summed PullKV + reassembly seconds (the metrics `bench mesh` reads for its part (c)).
  `--path both` (the default) runs the mesh twice: as it starts (same host: the KV goes through
  a shared-memory file, wire/kv_shm.py) and with every byte streamed over gRPC
  (`--kv-shm-dir ''`, what workers on different hosts do).

The last line is `kv_handoff_ratio_vs_grpc: X.XX` (ours, the first path run / the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import random
import time
from typing import Any

from splitserve.bench.report import final_line, finish, format_table

FINAL_KEY = "kv_handoff_ratio_vs_grpc"
MB = 1e6
PROBE_MESSAGE = 4 << 20
PROBE_METHOD = "/splitserve.bench.Probe/Pull"
SHM_BYTES_METRIC = "splitserve_worker_kv_transfer_shm_bytes_total"
PATH_NAMES = {"shm": "same host (shared-memory file)", "grpc": "streamed over gRPC"}


def add_parser(bsub: Any) -> None:
    p = bsub.add_parser(
        "handoff",
        help="KV hand-off prefill -> decode vs bare gRPC, same run",
        description=__doc__.split("\n\n", 1)[0] + " Ratio: ours / bare gRPC.",
    )
    p.add_argument("--model", default=None, help="a GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--prompts", type=int, default=8, help="sequential prompts (8)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens a prompt (1024)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="each worker's KV pool (256)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"])
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC inside the mesh")
    p.add_argument(
        "--path",
        choices=["both", "shm", "grpc"],
        default="both",
        help="the hand-off as workers on one host make it (shm), streamed over gRPC as across "
        "hosts (grpc), or both, one mesh each (both)",
    )
    p.add_argument("--probe-mb", type=int, default=48, help="bytes per baseline run, MB (48)")
    p.add_argument("--quick", action="store_true", help="2 prompts of 128 tokens: a smoke test")
    p.add_argument("--log-dir", default=None, help="the services' logs (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(run=run)


# ---- the baseline: bare grpc.aio between two processes --------------------------------------
def _probe_server(port: int, total: int, ready: Any, parent: int) -> None:
    import grpc

    from splitserve.services.parent import PARENT_PID_ENV, follow_launcher

    os.environ[PARENT_PID_ENV] = str(parent)
    follow_launcher()  # a benchmark killed with SIGKILL takes its probe server along

    async def main() -> None:
        payload = os.urandom(PROBE_MESSAGE)

        async def pull(request: bytes, context: Any):
            for _ in range(-(-total // PROBE_MESSAGE)):
                yield payload

        handler = grpc.unary_stream_rpc_method_handler(
            pull, request_deserializer=bytes, response_serializer=bytes
        )
        server = grpc.aio.server(options=_probe_options())
        service, method = PROBE_METHOD.strip("/").split("/")
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _probe_options() -> list[tuple[str, int]]:
    limit = 2 * PROBE_MESSAGE
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def grpc_ceiling(total_bytes: int, runs: int = 4) -> float:
    """The best MB/s of `runs` pulls of `total_bytes` over loopback, server in a child process."""
    import grpc

    from splitserve.launcher.up import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    args = (port, total_bytes, ready, os.getpid())
    proc = ctx.Process(target=_probe_server, args=args, daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the gRPC probe server did not start")

        async def pull_all() -> float:
            best = 0.0
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=_probe_options()
            ) as ch:
                call = ch.unary_stream(
                    PROBE_METHOD, request_serializer=bytes, response_deserializer=bytes
                )
                for _ in range(runs):
                    start, got = time.perf_counter(), 0
                    async for message in call(b""):
                        got += len(message)
                    best = max(best, got / MB / (time.perf_counter() - start))
            return best

        return asyncio.run(pull_all())
    finally:
        proc.terminate()
        proc.join(10)


# ---- ours: a disaggregated mesh -------------------------------------------------------------
def measure_mesh(args: argparse.Namespace, log_dir: str, shm: bool = True) -> dict[str, float]:
    from splitserve.bench import mesh_runner as mr
    from splitserve.bench.mesh_ttft import transfer_delta
    from splitserve.v1 import rpc

    flags = ["--threads", str(args.threads), "--kv-cache-mib", str(args.kv_cache_mib)]
    flags += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.model:
        flags += ["--model", args.model]
    if args.insecure:
        flags.append("--insecure")
    topology = mr.disagg_topology(flags)
    if not shm:  # what workers on two hosts do: every byte over gRPC
        topology = dataclasses.replace(
            topology,
            services=[
                dataclasses.replace(s, args=[*s.args, "--kv-shm-dir", ""])
                if s.module in ("splitserve.prefill", "splitserve.decode")
                else s
                for s in topology.services
            ],
        )
    with mr.bench_errors(log_dir), mr.running_mesh(topology, log_dir) as mesh:

        async def go() -> dict[str, float]:
            rng = random.Random(0)
            decode = mesh.metrics_url("decode-0")
            ttfts = []
            async with mesh.channel("router") as ch:
                stub = rpc.InferenceStub(ch)
                await mr.stream_generate(  # warm-up: first calls, first allocations
                    stub, mr.generate_request("w", [1000] * 16, 2, cache_salt="warm")
                )
                before = mr.scrape_metrics(decode)
                for i in range(args.prompts):
                    prompt = [rng.randrange(100, 10000) for _ in range(args.prompt_tokens)]
                    salt = f"handoff-{i}-{time.time_ns()}"
                    request = mr.generate_request(
                        f"h{i}", prompt, 2, cache_salt=salt, disaggregate=True
                    )
                    ttfts.append((await mr.stream_generate(stub, request)).ttft)
            after = mr.scrape_metrics(decode)
            t = transfer_delta(before, after)
            shm_bytes = mr.sample(after, SHM_BYTES_METRIC, direction="received") - mr.sample(
                before, SHM_BYTES_METRIC, direction="received"
            )
            return {
                "shm_mb_each": shm_bytes / MB / max(1, t.transfers),
                "transfers": t.transfers,
                "mb_each": t.mean_mb,
                "ms_each": t.mean_seconds * 1e3,
                "mb_per_s": t.mb_per_s,
                "ttft_ms_mean": sum(ttfts) / len(ttfts) * 1e3,
            }

        return asyncio.run(go())


def run(args: argparse.Namespace) -> int:
    import tempfile

    if args.quick:
        args.prompts, args.prompt_tokens, args.probe_mb = 2, 128, 8
    if args.prompts < 1 or args.prompt_tokens < 1 or args.probe_mb < 1:
        raise ValueError("--prompts, --prompt-tokens and --probe-mb must be at least 1")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="splitserve-handoff-")
    ceiling = grpc_ceiling(args.probe_mb * 1_000_000)
    paths = {"both": ["shm", "grpc"], "shm": ["shm"], "grpc": ["grpc"]}[args.path]
    runs = {}
    for path in paths:
        run_dir = os.path.join(log_dir, path)
        runs[path] = measure_mesh(args, run_dir, shm=path == "shm")
        if not runs[path]["transfers"]:
            print(f"bench handoff: the decode worker pulled no KV over {path} (did the prompts go "
                  "disaggregated?)")  # fmt: skip
            return 1
    ours = runs[paths[0]]
    ratio = ours["mb_per_s"] / ceiling
    transport = "plaintext" if args.insecure else "mutual TLS"
    rows = [["bare grpc.aio, 4 MiB bytes messages (baseline)", "", "", "", f"{ceiling:,.0f}"]]
    for path, r in runs.items():
        rows.append(
            [
                f"splitserve PullKV, {PATH_NAMES[path]}",
                f"{r['mb_each']:.1f}",
                f"{r['shm_mb_each']:.1f}",
                f"{r['ms_each']:.1f}",
                f"{r['mb_per_s']:,.0f}",
            ]
        )
    lines = [
        f"KV hand-off prefill -> decode: {args.prompts} prompts of {args.prompt_tokens} tokens, "
        f"KV {args.kv_cache_dtype}, {transport}, {args.threads} torch thread(s) a worker",
        *format_table(["", "MB each", "of it via shm", "ms each", "MB/s"], rows),
        "ours: the decode worker's metrics (received bytes over PullKV + checks, summed)",
        *(
            f"mean time to first token, {path}: {r['ttft_ms_mean']:,.0f} ms"
            for path, r in runs.items()
        ),
        f"logs in {log_dir}",
    ]
    doc = {"grpc_mb_per_s": ceiling, **ours, "ratio": ratio, "paths": runs}
    finish(args, lines, final_line(FINAL_KEY, ratio), lambda: doc)
    return 0
