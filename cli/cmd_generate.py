"""`splitserve generate PROMPT`: stream a completion from the in-process engine."""

from __future__ import annotations

import argparse
import sys

from splitserve.executors.flags import add_engine_args, engine_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="stream a completion to stdout",
        description="Run the engine in this process and stream the completion of PROMPT. The "
        "model's chat template is applied unless --raw.",
    )
    p.add_argument("prompt", help="the user message (or, with --raw, the exact prompt text)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timing and KV stats to stderr")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.executors.build import create_engine
    from splitserve.model.loader import open_checkpoint

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    params.validate()  # fail before the model loads
    cfg = engine_config(args)
    ckpt = open_checkpoint(cfg.model)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path} has no tokenizer; generate needs one")
    tok = ckpt.tokenizer
    if args.raw:
        ids = tok.encode(args.prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    engine = create_engine(cfg, ckpt)
    start = time.perf_counter()
    engine.add_request("cli", ids, params)
    first = None
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            first = first or time.perf_counter()
            n += len(out.new_token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        end = time.perf_counter()
        decode = (n - 1) / (end - first) if n > 1 and first else 0.0
        print(
            f"prompt {len(ids)} tokens, generated {n}, first token {first - start:.3f}s, "
            f"decode {decode:.1f} tok/s",
            file=sys.stderr,
        )
    return 0
