"""The official `openai` client's `chat.completions.parse` against any running endpoint, for every
pydantic model in bench/structured_schemas.py (20), all at once.

    splitserve up --insecure --no-auth &        # or any OpenAI-compatible server
    python3 -m splitserve.bench.structured_clients --base-url http://127.0.0.1:8000/v1

Prints each model's result (the parsed object, or why it failed) and the wall time; the last
line is `structured_parse_ok: N/20`. CI runs half of them (tests/e2e/test_structured_e2e.py).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from splitserve.bench.structured_schemas import SCHEMAS, prompt_for


def main(argv: list[str] | None = None) -> None:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
    model = client.models.list().data[0].id

    def parse(cls: type) -> tuple[str, bool, str]:
        try:
            reply = client.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": prompt_for(cls)}],
                response_format=cls,
                temperature=0,
                max_tokens=args.max_tokens,
            )
        except Exception as e:  # a length finish, a 4xx: reported, not raised
            return cls.__name__, False, f"{type(e).__name__}: {e}"[:120]
        parsed = reply.choices[0].message.parsed
        return cls.__name__, isinstance(parsed, cls), repr(parsed)[:120]

    t = time.perf_counter()
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(parse, SCHEMAS))
    wall = time.perf_counter() - t
    for name, ok, shown in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name:<10} {shown}")
    ok = sum(r[1] for r in results)
    print(f"{len(SCHEMAS)} requests at once on {model}: {wall:.1f} s")
    print(f"structured_parse_ok: {ok}/{len(SCHEMAS)}")


if __name__ == "__main__":
    main()
