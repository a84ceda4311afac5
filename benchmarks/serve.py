"""Load generator for any OpenAI-compatible server (imp-jax serve, llama-server, vLLM), as ``vllm bench serve``.

At each concurrency level (default 1, 4, 16, 64) that many clients send streaming ``/v1/completions`` requests
back to back until ``--requests`` have been sent or ``--time-limit`` seconds have passed, so a run always ends
by itself. Each level starts with a warm-up burst of one request per client, of the measured size (not measured:
imp-jax compiles each step shape once, llama-server fills its slots). Reported per level: TTFT and inter-token latency
(p50 / p99, from the arrival of streamed chunks), request throughput, output tok/s (the server's usage counts when
it sends them, else one token per text chunk).

Example (both servers on the same GGUF, one after the other, in one device call):
  python benchmarks/serve.py --url http://127.0.0.1:8000/v1 --label imp-jax --json imp.json
  python benchmarks/serve.py --url http://127.0.0.1:8080/v1 --label llama-server --json llama.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import httpx

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "judge", "boxing", "matches"]  # fmt: skip


def prompt_text(i: int, words: int) -> str:
    """A distinct prompt per request (no shared prefix beyond the first words), ``words`` words long."""
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


async def one_request(client: httpx.AsyncClient, args, i: int, max_tokens: int) -> dict:
    body = {"model": args.model, "prompt": prompt_text(i, args.prompt_words), "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    arrivals: list[float] = []
    chunks, usage_tokens = 0, None
    async with client.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("error"):  # a stream that began with 200 and then failed (the engine's error event)
                return {"ok": False, "status": data["error"].get("message", "error")}
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            if any(c.get("text") for c in data.get("choices", [])):
                arrivals.append(time.perf_counter())
                chunks += 1
    tokens = usage_tokens if usage_tokens is not None else chunks
    ttft = arrivals[0] - t0 if arrivals else None
    itl = (arrivals[-1] - arrivals[0]) / (tokens - 1) if len(arrivals) > 1 and tokens > 1 else None
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"ok": True, "ttft": ttft, "itl": itl, "gaps": gaps, "tokens": tokens, "latency": time.perf_counter() - t0}


async def level(client: httpx.AsyncClient, args, concurrency: int) -> dict:
    # the warm-up: one request of the measured size per client (prompt and max_tokens), so the measured requests
    # meet no step shape the server has not run (a short warm-up left the multi-step decode of every row count to
    # compile inside the measurement)
    await asyncio.gather(*(one_request(client, args, 10_000 + k, args.max_tokens) for k in range(concurrency)))
    sent, results = 0, []
    deadline = time.perf_counter() + args.time_limit
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal sent
        while sent < args.requests and time.perf_counter() < deadline:
            sent += 1
            results.append(await one_request(client, args, sent, args.max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(ok), "failed": len(results) - len(ok),
        "elapsed_s": elapsed, "request_per_s": len(ok) / elapsed, "output_tok_per_s": out_tokens / elapsed,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
    }  # fmt: skip


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1e3
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3


def table(label: str, rows: list[dict]) -> str:
    cols = ["concurrency", "requests", "failed", "request_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms"]  # fmt: skip
    lines = [f"## {label}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r[c], float) else ("-" if r[c] is None else str(r[c])) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8)
    timeout = httpx.Timeout(args.time_limit + 300)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        if args.model is None:
            args.model = (await client.get("/models")).json()["data"][0]["id"]
        return [await level(client, args, c) for c in args.concurrency]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default="server")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=128, help="requests per level at most (default 128)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most (default 60)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = asyncio.run(main_async(args))
    print(table(args.label, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "url": args.url, "model": args.model, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
