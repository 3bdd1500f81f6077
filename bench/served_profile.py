"""Where the served path spends its time: per-process CPU and a py-spy profile of the router and the ingress replica
under ``vllm bench serve`` load (#27: "where a target is missed, the profile of that configuration").

Starts ``bench/vs_vllm.py``'s Serve app on its converted checkpoint (local layout unless ``--layout ep``), warms it,
then records both replicas with py-spy while ``--concurrency`` clients stream. Prints the CPU each process used (in
cores), the router's samples by thread and the top frames of each replica. Needs vLLM's venv (``bench/vs_vllm.py``
makes it) for the load generator.

    python bench/served_profile.py [--concurrency 32] [--seconds 25] [--layout local] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_vllm as V  # noqa: E402
from vllm_checkpoint import convert  # noqa: E402

def summarize(path: Path, top: int) -> None:
    total, threads, frames = 0, collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        parts, count = stack.split(";"), int(n)
        total += count
        threads[parts[0].split("): ", 1)[-1][:60]] += count  # "thread (tid): name"
        frames[parts[-1][:100]] += count
    print(f"  {total} samples by thread:")
    for t, n in threads.most_common(6):
        print(f"    {n / total:6.1%}  {t}")
    print("  top frames:")
    for f, n in frames.most_common(top):
        print(f"    {n / total:6.1%}  {f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="k2ray-demo")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=25, help="py-spy recording time")
    ap.add_argument("--layout", default="local", choices=["local", "ep"])
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--vllm-venv", default=str(V.ROOT / ".venv-vllm"))
    ap.add_argument("--work-dir", default=None)
    a = ap.parse_args()
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise SystemExit("served_profile: py-spy is not installed in this environment (pip install py-spy)")
    py = V.vllm_python(Path(a.vllm_venv))
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="served-profile-"))
    model = work / "model"
    if not (model / "config.json").is_file():
        V.say(f"converting {a.model} into {model} ...")
        convert(a.model, model)
    load_args = argparse.Namespace(input_len=64, output_len=64, num_prompts=max(64, 8 * a.concurrency),
                                   concurrency=[a.concurrency])
    server = V.K2rayServer(model, a.layout, "direct", max(64, a.concurrency))
    try:
        me = psutil.Process()
        names = {p.pid: " ".join(p.cmdline())[:70] for p in me.children(recursive=True)}
        replicas = {role: next(pid for pid, c in names.items() if role in c) for role in ("K2Router", "OpenAIIngress")}
        V.load(py, server.url, model, 2, argparse.Namespace(**{**vars(load_args), "num_prompts": 4}), work, "warm")
        spies = {role: subprocess.Popen([str(py_spy), "record", "-p", str(pid), "-d", str(a.seconds), "-r", "50",
                                         "-f", "raw", "-o", str(work / f"{role}.txt"), "--nonblocking", "--threads"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for role, pid in replicas.items()}
        before = {p.pid: sum(p.cpu_times()[:2]) for p in me.children(recursive=True)}
        t0 = time.monotonic()
        r = V.load(py, server.url, model, a.concurrency, load_args, work, "profile")
        wall = time.monotonic() - t0
        used = {}
        for p in me.children(recursive=True):
            try:
                if p.pid in before:
                    used[p.pid] = sum(p.cpu_times()[:2]) - before[p.pid]
            except psutil.Error:
                pass
        for s in spies.values():
            s.wait()
    finally:
        server.stop()
    print(f"\nc={a.concurrency}, {a.layout} layout: {r['output_throughput']:.1f} output tok/s, ITL p50 "
          f"{r['median_itl_ms']:.1f} ms; CPU by process over {wall:.0f} s (cores):")
    for pid, sec in sorted(used.items(), key=lambda x: -x[1])[:8]:
        print(f"  {sec / wall:5.2f}  {names.get(pid, pid)}")
    for role in replicas:
        print(f"\n{role} (py-spy, active samples only)")
        summarize(work / f"{role}.txt", a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
