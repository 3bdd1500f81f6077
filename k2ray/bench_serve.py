"""``k2ray bench serve``: an HTTP load generator for any OpenAI-compatible endpoint.

Closed loop (``--concurrency 1 8 32``: that many clients, each sending its next request when the last finishes) or
open loop (``--rate R``: Poisson arrivals at R requests/s). Streams every response and measures time to first token
and inter-token latency from the SSE chunks. Bounded by ``--num-requests`` and ``--duration``. Prints a table and,
with ``--json FILE``, writes every figure for comparison between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx

WORDS = ("the weather in paris is sunny and the answer to the question is forty two because numbers "
         "like to add up while cities such as tokyo lima and oslo report degrees").split()


@dataclass
class Result:
    ok: bool
    status: int
    ttft: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


@dataclass
class Summary:
    label: str
    requests: int
    errors: int
    error_statuses: dict
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict
    itl_ms: dict
    e2e_ms: dict


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p):
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))] * 1e3

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(s) * 1e3}


def make_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


async def one_request(client: httpx.AsyncClient, args, rng: random.Random) -> Result:
    prompt_words = max(1, int(rng.gauss(args.prompt_words, args.prompt_words * args.spread)))
    max_tokens = max(1, int(rng.gauss(args.max_tokens, args.max_tokens * args.spread)))
    body = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        url = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": make_prompt(rng, prompt_words)}]
    else:
        url = "/v1/completions"
        body["prompt"] = make_prompt(rng, prompt_words)
    if args.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    t0 = time.perf_counter()
    last = None
    res = Result(ok=False, status=0)
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=args.request_timeout) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:200]
                res.latency = time.perf_counter() - t0
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = str(chunk["error"])[:200]
                    res.latency = time.perf_counter() - t0
                    return res
                if chunk.get("usage") and not chunk.get("choices"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", res.output_tokens)
                    continue
                now = time.perf_counter()
                if any(_has_text(c) for c in chunk.get("choices", [])):
                    if res.ttft is None:
                        res.ttft = now - t0
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    res.latency = time.perf_counter() - t0
    return res


def _has_text(choice: dict) -> bool:
    d = choice.get("delta") or {}
    return bool(choice.get("text") or d.get("content") or d.get("reasoning_content") or d.get("tool_calls"))


async def run_level(args, label: str, concurrency: Optional[int], rate: Optional[float]) -> Summary:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=256)
    results: list[Result] = []
    deadline = time.perf_counter() + args.duration
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=args.request_timeout) as client:
        t0 = time.perf_counter()
        if concurrency is not None:
            counter = iter(range(args.num_requests))

            async def worker():
                for _ in counter:
                    if time.perf_counter() > deadline:
                        return
                    results.append(await one_request(client, args, rng))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            for _ in range(args.num_requests):
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(one_request(client, args, rng)))
                await asyncio.sleep(rng.expovariate(rate))
            results.extend(await asyncio.gather(*tasks))
        dt = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    statuses: dict[str, int] = {}
    for r in results:
        if not r.ok:
            statuses[str(r.status or "transport")] = statuses.get(str(r.status or "transport"), 0) + 1
    return Summary(
        label=label,
        requests=len(results),
        errors=len(results) - len(ok),
        error_statuses=statuses,
        duration_s=dt,
        requests_per_s=len(ok) / dt if dt else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / dt if dt else 0.0,
        ttft_ms=_pcts([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=_pcts([x for r in ok for x in r.itl]),
        e2e_ms=_pcts([r.latency for r in ok]),
    )


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_table(rows: list[Summary]) -> None:
    print(f"{'load':>10} {'reqs':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} "
          f"{'TTFT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>20}")
    for s in rows:
        t, i = s.ttft_ms, s.itl_ms
        print(f"{s.label:>10} {s.requests:>5} {s.errors:>4} {s.requests_per_s:>7.2f} {s.output_tokens_per_s:>9.1f} "
              f"{_fmt(t['p50']) + '/' + _fmt(t['p90']) + '/' + _fmt(t['p99']):>22} "
              f"{_fmt(i['p50']) + '/' + _fmt(i['p90']) + '/' + _fmt(i['p99']):>20}")
        if s.errors:
            print(f"{'':>10} errors by status: {s.error_statuses}")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="k2ray bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default="k2ray-tiny")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    p.add_argument("--concurrency", type=int, nargs="+", help="closed-loop client counts (default: 1 8 32 64)")
    p.add_argument("--rate", type=float, nargs="+", help="open-loop Poisson request rates (req/s) instead")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level (bound)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per level (bound)")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--spread", type=float, default=0.25, help="relative std-dev of prompt/output lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    if args.num_requests < 1 or args.duration <= 0:
        print("error: --num-requests and --duration must be positive", file=sys.stderr)
        return 2
    levels: list[tuple[str, Optional[int], Optional[float]]]
    if args.rate:
        levels = [(f"{r:g}/s", None, r) for r in args.rate]
    else:
        levels = [(f"c={c}", c, None) for c in (args.concurrency or [1, 8, 32, 64])]
    rows = []
    try:
        for label, c, r in levels:
            rows.append(asyncio.run(run_level(args, label, c, r)))
    except KeyboardInterrupt:
        pass
    print(f"{args.url} model={args.model} endpoint={args.endpoint} prompt~{args.prompt_words} words "
          f"max_tokens~{args.max_tokens}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            simple = (str, int, float, bool, list, type(None))
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "api_key" and isinstance(v, simple)},
                       "results": [asdict(s) for s in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
