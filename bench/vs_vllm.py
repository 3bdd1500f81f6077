"""k2ray against vLLM's CPU build on the same checkpoint, same prompts, same load generator, in one run (#27).

Both engines run ``bench/vllm_checkpoint.py``'s float32 copy of the demo model (the same function as the demo; vLLM's
CPU build cannot run its INT4 experts or 48-wide heads). vLLM runs in its own virtual environment (``--vllm-venv``,
made from ``bench/vllm-requirements.lock`` when missing: its pins conflict with k2ray's, e.g. transformers).

- offline: each engine generates ``c`` prompts at once (token ids, greedy, EOS ignored), ``--rounds`` times after a
  warm-up round, for each concurrency ``c``; tokens/s and the k2ray / vLLM ratio; the first round's tokens compared.
- served: k2ray's Serve app (local executor, and with ``--layouts ... ep`` the expert-parallel layout of
  deploy/config.yaml; clients at the ingress replica's own port, Serve's direct ingress, or ``--front proxy``) and
  ``vllm serve`` get the same load from ``vllm bench serve`` (chat completions, random prompts of
  ``--input-len`` tokens, ``--output-len`` tokens, EOS ignored, greedy) at each concurrency: output tokens/s, TTFT and
  ITL p50/p99, ratios to vLLM; 8 greedy chats through both servers compared word for word.

    python bench/vs_vllm.py [--concurrency 1 8 32 64] [--parts offline served] [--layouts local ep]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = HERE / "vllm-requirements.lock"
MODEL_NAME = "demo"
DIRECT_PORT = 30600
VLLM_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_MLA_DISABLE": "1", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
            "OMP_NUM_THREADS": str(os.cpu_count() or 2), "TOKENIZERS_PARALLELISM": "false"}
CHATS = [f"Tell me about item {i}: what is it made of and what is it for?" for i in range(8)]


def say(msg: str) -> None:
    print(f"vs_vllm: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"bench: {what} did not answer within {timeout_s:.0f}s")


# -- vLLM's environment -------------------------------------------------------------------------------------------------
def vllm_python(venv: Path) -> Path:
    """The vLLM venv's python, made from the lock file first if it is missing or broken."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    say(f"creating vLLM's virtual environment {venv} from {LOCK.relative_to(ROOT)} (a few minutes) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-r", str(LOCK)], check=True)
    return py


# -- offline --------------------------------------------------------------------------------------------------------
def offline(args, model: Path, prompts: list[list[int]], py: Path) -> dict:
    from k2ray.llm import LLM
    from k2ray.runtime.sampling import SamplingParams

    rounds = {str(c): max(1, args.rounds if c >= 8 else args.rounds * 4) for c in args.concurrency}
    results: dict = {"k2ray": {}, "vllm": {}}
    say("offline: k2ray ...")
    llm = LLM(str(model), max_num_seqs=max(args.concurrency), max_model_len=args.max_model_len,
              num_kv_blocks=4096)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for c in args.concurrency:
        batch = prompts[:c]
        llm.generate(batch, params)  # warm-up
        outputs, tokens, t0 = None, 0, time.perf_counter()
        for _ in range(rounds[str(c)]):
            got = llm.generate(batch, params)
            tokens += sum(len(o.outputs[0].token_ids) for o in got)
            outputs = outputs or [list(o.outputs[0].token_ids) for o in got]
        results["k2ray"][c] = {"tokens": tokens, "seconds": time.perf_counter() - t0, "outputs": outputs}
        say(f"  k2ray c={c}: {tokens / results['k2ray'][c]['seconds']:.1f} tok/s")
    del llm
    say("offline: vLLM ...")
    job = {"model": str(model), "prompts": prompts, "levels": args.concurrency, "rounds": rounds,
           "output_len": args.output_len, "max_num_seqs": max(args.concurrency),
           "max_model_len": args.max_model_len}
    proc = subprocess.run([py, str(HERE / "vllm_offline.py")], input=json.dumps(job), capture_output=True,
                          text=True, env={**os.environ, **VLLM_ENV})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"vs_vllm: vLLM's offline run failed ({proc.returncode})")
    for line in proc.stdout.splitlines():
        if line.startswith('{"level"'):
            r = json.loads(line)
            results["vllm"][r["level"]] = r
            say(f"  vLLM c={r['level']}: {r['tokens'] / r['seconds']:.1f} tok/s")
    return results


# -- served ----------------------------------------------------------------------------------------------------------
class K2rayServer:
    """The Serve app in this process (Ray driver): local executor, or deploy/config.yaml's expert-parallel layout."""

    def __init__(self, model: Path, layout: str, front: str, max_num_seqs: int):
        import ray
        import yaml
        from ray import serve

        from k2ray.serve.app import build_app

        deploy = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())["applications"][0]["args"]
        parallel = deploy["parallel"] if layout == "ep" else {"executor": "local"}
        engine = {**deploy["engine"], "max_num_seqs": max_num_seqs, "kv_cache_memory_gb": 0.25}
        app_args = {**deploy, "model": str(model), "served_model_name": MODEL_NAME, "parallel": parallel,
                    "engine": engine, "max_queued_requests": 512}
        env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_PORT)}
        ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name="k2ray", route_prefix="/")
        self.url = f"http://127.0.0.1:{DIRECT_PORT if front == 'direct' else port}"
        wait_health(self.url, f"k2ray ({layout})")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class VllmServer:
    def __init__(self, py: Path, model: Path, max_num_seqs: int, max_model_len: int, log: Path):
        port = free_port()
        cmd = [str(py), str(HERE / "vllm_cli.py"), "serve", str(model), "--served-model-name", MODEL_NAME, "--dtype", "float32",
               "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len)]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        wait_health(self.url, f"vllm serve (log: {log})", self.proc)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def load(py: Path, url: str, model: Path, c: int, args, out_dir: Path, tag: str) -> dict:
    """One level of ``vllm bench serve`` against ``url``; its saved result."""
    n = args.num_prompts or max(16, 4 * c)
    name = f"{tag}-c{c}.json"
    cmd = [str(py), str(HERE / "vllm_cli.py"), "bench", "serve", "--backend", "openai-chat", "--base-url", url,
           "--endpoint", "/v1/chat/completions", "--model", MODEL_NAME, "--tokenizer", str(model),
           "--trust-remote-code", "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(n), "--max-concurrency", str(c),
           "--ignore-eos", "--temperature", "0", "--seed", "0", "--percentile-metrics", "ttft,itl",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **VLLM_ENV})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"vs_vllm: vllm bench serve failed against {tag} at c={c}")
    return json.loads((out_dir / name).read_text())


def chats(url: str) -> list[str]:
    out = []
    for text in CHATS:
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "temperature": 0.0,
            "max_tokens": 32})
        r.raise_for_status()
        m = r.json()["choices"][0]["message"]
        # vLLM runs without a reasoning parser: its content is the thinking and the answer as one text.
        out.append((m.get("reasoning_content") or m.get("reasoning") or "") + (m.get("content") or ""))
    return out


def served(args, model: Path, py: Path, work: Path) -> dict:
    results: dict = {}
    warm = argparse.Namespace(**{**vars(args), "num_prompts": 4})
    for layout in args.layouts:
        say(f"served: k2ray ({layout} layout, {args.front} front door) ...")
        server = K2rayServer(model, layout, args.front, max(args.concurrency))
        try:
            load(py, server.url, model, 2, warm, work, f"warm-{layout}")
            results[f"k2ray-{layout}"] = {c: load(py, server.url, model, c, args, work, f"k2ray-{layout}")
                                          for c in args.concurrency}
            results[f"chats-{layout}"] = chats(server.url)
        finally:
            server.stop()
    say("served: vLLM ...")
    server = VllmServer(py, model, max(args.concurrency), args.max_model_len, work / "vllm-serve.log")
    try:
        load(py, server.url, model, 2, warm, work, "warm-vllm")
        results["vllm"] = {c: load(py, server.url, model, c, args, work, "vllm") for c in args.concurrency}
        results["chats-vllm"] = chats(server.url)
    finally:
        server.stop()
    return results


# -- report ------------------------------------------------------------------------------------------------------------
def report(args, off: dict | None, srv: dict | None) -> None:
    if off:
        print("\noffline (tokens/s; same prompts, greedy, EOS ignored)")
        print(f"{'c':>4} {'k2ray':>9} {'vLLM':>9} {'k2ray/vLLM':>11}  same tokens")
        for c in args.concurrency:
            k, v = off["k2ray"].get(c), off["vllm"].get(c)
            if not k or not v:
                continue
            kt, vt = k["tokens"] / k["seconds"], v["tokens"] / v["seconds"]
            same = sum(a == b for a, b in zip(k["outputs"], v["outputs"]))
            print(f"{c:4d} {kt:9.1f} {vt:9.1f} {kt / vt:11.2f}  {same}/{len(k['outputs'])}")
    if srv:
        print(f"\nserved (vllm bench serve, chat, {args.input_len} prompt tokens, {args.output_len} output tokens; "
              f"k2ray via {args.front})")
        print(f"{'c':>4} {'engine':<14} {'tok/s':>8} {'x vLLM':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8} {'failed':>6}")
        for c in args.concurrency:
            base = srv["vllm"][c]["output_throughput"]
            for name in [f"k2ray-{lay}" for lay in args.layouts] + ["vllm"]:
                r = srv[name][c]
                print(f"{c:4d} {name:<14} {r['output_throughput']:8.1f} {r['output_throughput'] / base:7.2f} "
                      f"{r.get('median_ttft_ms', 0):9.1f} {r.get('p99_ttft_ms', 0):9.1f} "
                      f"{r.get('median_itl_ms', 0):8.1f} {r.get('p99_itl_ms', 0):8.1f} "
                      f"{r.get('failed', r.get('num_prompts', 0) - r.get('completed', 0)):6}")
            if "ep" in args.layouts and "local" in args.layouts:
                ep, loc = srv["k2ray-ep"][c]["output_throughput"], srv["k2ray-local"][c]["output_throughput"]
                print(f"{c:4d} {'ep / local':<14} {ep / loc:8.2f}")
        for lay in args.layouts:
            same = sum(a == b for a, b in zip(srv[f"chats-{lay}"], srv["chats-vllm"]))
            print(f"greedy chats, k2ray ({lay}) and vLLM word for word: {same}/{len(CHATS)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="k2ray-demo")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--parts", nargs="+", default=["offline", "served"], choices=["offline", "served"])
    ap.add_argument("--layouts", nargs="+", default=["local"], choices=["local", "ep"])
    ap.add_argument("--front", default="direct", choices=["direct", "proxy"])
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="offline rounds per level (x4 below 8)")
    ap.add_argument("--num-prompts", type=int, default=None, help="served requests per level (default 4 x c, >= 16)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    ap.add_argument("--work-dir", default=None, help="keep the converted model and results here")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from vllm_checkpoint import convert

    py = vllm_python(Path(args.vllm_venv))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"converting {args.model} for both engines into {work / 'model'} ...")
    model = convert(args.model, work / "model")
    from k2ray.engine.input_processor import load_tokenizer

    tok = load_tokenizer(model)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    prompts = [tok.encode(" ".join(words[(i + j) % len(words)] for j in range(args.input_len * 3 // 4)) + f" #{i}")
               [: args.input_len] for i in range(max(args.concurrency))]
    off = offline(args, model, prompts, py) if "offline" in args.parts else None
    srv = served(args, model, py, work) if "served" in args.parts else None
    (work / "results.json").write_text(json.dumps({"offline": off, "served": srv}, default=str))
    report(args, off, srv)
    say(f"raw results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
