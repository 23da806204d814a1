"""lm-evaluation-harness through splitserve vs the harness's own `hf` model, same weights.

    pip install lm-eval            # not a dependency of splitserve (datasets, sklearn, ...)
    python3 -m splitserve.bench.lm_eval_compare [--model GGUF] [--disaggregated] [--out F.json]

Runs the small multiple-choice task in bench/lm_eval_tasks (24 questions x 4 answers, its data
in the repo, nothing downloaded) twice: with `local-completions` against a splitserve mesh this
script starts (router + colocated worker; `--disaggregated`: router + prefill + decode +
kvstore, every prompt prefilled remotely), tokenizing through the server's /tokenize,
/detokenize and /tokenizer_info (`tokenizer_backend=remote`), and with `hf` (transformers,
float32) on the same GGUF file. The harness sends exactly its loglikelihood requests: token-id
prompts in batches, `echo`, `logprobs: 1`, `max_tokens: 1`. Prints, per document, whether
both picked the same answer, and the largest difference of any answer's log-likelihood; exits
1 when a choice differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

TASK = "splitserve_mc"
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def task_folder(out_dir: str) -> str:
    """The task's YAML with its data file's absolute path (the harness resolves data_files
    against the working directory)."""
    text = (TASK_DIR / f"{TASK}.yaml").read_text()
    data = str(TASK_DIR / f"{TASK}.jsonl")
    (Path(out_dir) / f"{TASK}.yaml").write_text(text.replace(f"{TASK}.jsonl", data, 1))
    return out_dir


def evaluate(model: str, model_args: dict[str, Any], tasks_dir: str, batch: int) -> list[dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=tasks_dir),
        batch_size=batch,
        log_samples=True,
        limit=None,
    )
    return sorted(result["samples"][TASK], key=lambda s: s["doc_id"])


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per document, each answer's log-likelihood."""
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def compare(ours: list[list[float]], ref: list[list[float]]) -> dict[str, Any]:
    def pick(lls: list[float]) -> int:
        return max(range(len(lls)), key=lambda i: lls[i])

    same = [pick(a) == pick(b) for a, b in zip(ours, ref, strict=True)]
    pairs = [xy for a, b in zip(ours, ref, strict=True) for xy in zip(a, b, strict=True)]
    diff = max(abs(x - y) for x, y in pairs)
    return {
        "documents": len(same),
        "same_choice": sum(same),
        "max_abs_loglikelihood_diff": diff,
        "choices_splitserve": [pick(a) for a in ours],
        "choices_hf": [pick(b) for b in ref],
    }


def run(args: argparse.Namespace) -> int:
    from splitserve.model.loader import default_model_path

    model_path = args.model or default_model_path()
    folder, name = os.path.split(os.path.abspath(model_path))
    tmp = tempfile.mkdtemp(prefix="lm-eval-")
    tasks_dir = task_folder(tmp)
    if args.splitserve_results:  # a previous run's, to redo only the reference
        ours = json.loads(Path(args.splitserve_results).read_text())
    else:
        ours = loglikelihoods(splitserve_samples(args, model_path, tasks_dir, tmp))
        Path(tmp, "splitserve.json").write_text(json.dumps(ours))
        print(f"splitserve's log-likelihoods: {tmp}/splitserve.json", file=sys.stderr)
    hf_args = {"pretrained": folder, "gguf_file": name, "dtype": "float32", "device": "cpu"}
    ref = loglikelihoods(evaluate("hf", hf_args, tasks_dir, 1))
    report = compare(ours, ref)
    report["mode"] = "disaggregated" if args.disaggregated else "colocated"
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("choices")}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if report["same_choice"] == report["documents"] else 1


def splitserve_samples(
    args: argparse.Namespace, model_path: str, tasks_dir: str, tmp: str
) -> list[dict]:
    from splitserve.bench import mesh_runner as mr
    from splitserve.bench.serve import disagg_serve_topology

    flags = ["--model", model_path, "--dtype", "float32"]
    topology = disagg_serve_topology(flags) if args.disaggregated else mr.colocated_topology(flags)
    # A loaded 2-core machine can take minutes to start a worker.
    with mr.running_mesh(topology, os.path.join(tmp, "logs"), timeout=900) as mesh:
        http = topology.router.ports["http"]
        base = f"http://{mr.HOST}:{http}"
        with mr.http_get(f"{base}/v1/models", headers=_auth(mesh.api_key)) as resp:
            model_id = json.load(resp)["data"][0]["id"]
        os.environ["OPENAI_API_KEY"] = mesh.api_key or "none"
        ours = evaluate(
            "local-completions",
            {
                "base_url": f"{base}/v1/completions",
                "model": model_id,
                "tokenizer_backend": "remote",
                "auth_token": mesh.api_key,
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks_dir,
            args.batch_size,
        )
    return ours


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--disaggregated", action="store_true")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per completions request")
    p.add_argument("--out", help="write the comparison as JSON here")
    p.add_argument(
        "--splitserve-results", help="splitserve.json from an earlier run: no mesh this time"
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
