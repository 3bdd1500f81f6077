"""Served tokens/s by front door, in one run: clients through Serve's HTTP proxy, and through k2ray's edge (nginx) to
the ingress replica's own HTTP server (Serve's direct ingress, as deploy/config.yaml turns it on).

Starts one app on loopback (``--model``, local executor unless ``--ray``, fp32) with direct ingress on, and `k2ray
edge` in front of it; then, for each concurrency level, the same load (``k2ray bench serve``: completions, greedy,
EOS ignored) at the proxy, through the edge, and straight at the replica's own port, and prints each with its
ratio to the proxy.

    python bench/serve_paths.py [--concurrency 1 8 32 64] [--max-tokens 64] [--prompt-words 48] [--ray]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

from vs_vllm import free_port, wait_health

DIRECT_PORT = 30500


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="k2ray-tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--num-requests", type=int, default=None,
                    help="requests per level and path (default: 4 rounds of the concurrency, at least 32)")
    ap.add_argument("--ray", action="store_true", help="1 attention worker + 2 expert shards instead of local")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from k2ray import edge
    from k2ray.bench_serve import build_parser, run_level
    from k2ray.serve.app import build_app

    os.environ.setdefault("K2RAY_CACHE_DIR", tempfile.mkdtemp(prefix="k2ray-bench-"))
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_PORT)}
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    parallel = ({"executor": "ray", "attention_workers": 1, "expert_shards": 2, "cpus_per_worker": 0.5}
                if args.ray else {"executor": "local"})
    app_args = {"model": args.model, "engine": {"num_kv_blocks": 4096, "max_num_seqs": 64, "dtype": "float32"},
                "parallel": parallel, "router_cpus": 0.5, "max_queued_requests": 256}
    print(f"starting the app ({args.model}, {parallel['executor']} executor, direct ingress on) ...", flush=True)
    serve.run(build_app(app_args), name="k2ray", route_prefix="/")
    proxy = f"http://127.0.0.1:{port}"
    wait_health(proxy, "Serve's proxy")
    wait_health(f"http://127.0.0.1:{DIRECT_PORT}", "the ingress replica's own server")
    settings = edge.EdgeSettings(listen=f"127.0.0.1:{free_port()}", upstream=f"127.0.0.1:{port}",
                                 direct=f"127.0.0.1:{DIRECT_PORT}-{DIRECT_PORT}", max_requests=65535,
                                 max_per_client=65535)
    proc = edge.start(settings)
    paths = {"Serve's proxy": proxy, "edge -> direct ingress": "http://" + settings.listen,
             "direct ingress": f"http://127.0.0.1:{DIRECT_PORT}"}
    try:
        wait_health(paths["edge -> direct ingress"], "the edge")
        rows = []
        for c in args.concurrency:
            got = {}
            for name, url in paths.items():
                load = build_parser().parse_args([
                    "--url", url, "--model", args.model, "--max-tokens", str(args.max_tokens), "--prompt-words",
                    str(args.prompt_words), "--num-requests", str(args.num_requests or max(32, 4 * c)),
                    "--ignore-eos"])
                asyncio.run(run_level(load, "warm-up", 2, None))
                got[name] = asyncio.run(run_level(load, f"c={c}", c, None))
            rows.append((c, got))
            base = got["Serve's proxy"]
            line = [f"c={c:3d}"]
            for name, r in got.items():
                line.append(f"{name}: {r.output_tokens_per_s:6.1f} tok/s x{r.output_tokens_per_s / max(base.output_tokens_per_s, 1e-9):.2f} "
                            f"(TTFT p50 {r.ttft_ms.get('p50', 0):.0f} ms, ITL p50 {r.itl_ms.get('p50', 0):.1f} ms, "
                            f"errors {r.errors})")
            print(" | ".join(line), flush=True)
    finally:
        proc.terminate()
        proc.wait()
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
