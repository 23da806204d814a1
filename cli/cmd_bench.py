"""`splitserve bench ...`: the benchmarks under bench/, printed as ratios vs a baseline."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (ratios against a same-run baseline)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from splitserve.bench import engine_bench, mesh_bench

    engine_bench.add_parser(bsub)
    mesh_bench.add_parser(bsub)

    from splitserve.bench import dp_bench

    dp_bench.add_parser(bsub)

    from splitserve.bench import pipeline_bench

    pipeline_bench.add_parser(bsub)

    from splitserve.bench import linear_bench

    linear_bench.add_parser(bsub)

    from splitserve.bench import quant_quality

    quant_quality.add_parser(bsub)

    from splitserve.bench import kv_cache_bench

    kv_cache_bench.add_parser(bsub)

    from splitserve.bench import faults

    faults.add_parser(bsub)

    from splitserve.bench import serve

    serve.add_parser(bsub)

    from splitserve.bench import kv_handoff

    kv_handoff.add_parser(bsub)
