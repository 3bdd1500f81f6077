"""Image input (#23): the VisionEncoder pool's throughput and what an image adds to time to first token.

Writes a tiny K2.5 checkpoint (``k2ray make-tiny --format kimi_k25``), serves it with a VisionEncoder pool of
``--vision-workers`` replicas (1 attention worker + 1 expert shard, Ray executor), and measures, in one run:

* encoder images/s: ``--images`` distinct images (``--size`` pixels square) sent to the pool one call at a time,
  then all at once (the pool batches concurrent calls), next to the same encoder in this process (the baseline: what
  a router replica runs when ``vision_workers`` is 0);
* TTFT of a streamed chat completion (``--requests`` sequential requests, greedy, 8 tokens) with the same text and no
  image, one new image (encoded on the way), and an image already encoded (the pool's cache).

    python bench/vision.py                               # 32 images of 224x224, 1 vision worker
    python bench/vision.py --size 448 --images 16 --vision-workers 2
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import tempfile
import time

import httpx
import numpy as np


def _image(size: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttft(base: str, content) -> float:
    body = {"model": "tiny-k25", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") or delta.get("reasoning_content"):
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a token")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--vision-workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from k2ray.checkpoint.tiny import make_tiny
    from k2ray.config import ModelArgs
    from k2ray.runtime.vision import VisionRunner
    from k2ray.serve.app import build_app
    from k2ray.tokenizer.image import ImageProcessorConfig, load_image

    tmp = tempfile.mkdtemp(prefix="k2ray-bench-vision-")
    os.environ.setdefault("K2RAY_CACHE_DIR", tmp)
    model_dir = make_tiny(os.path.join(tmp, "tiny-k25"), seed=0, format="kimi_k25")
    cfg = ImageProcessorConfig.from_dir(model_dir)
    raw = [_image(args.size, seed) for seed in range(args.images)]
    processed = [load_image(b, cfg) for b in raw]
    print(f"{args.images} images of {args.size}x{args.size}: {processed[0].num_tokens} image tokens each", flush=True)

    # Baseline: the encoder in this process, one image per call (what a router replica does without a pool).
    local = VisionRunner(model_dir, ModelArgs.from_dir(model_dir), cache_size=0)
    local.encode(processed[:1])  # warm
    t0 = time.perf_counter()
    for im in processed:
        local.encode([im])
    local_s = time.perf_counter() - t0
    print(f"in-process encoder, one at a time: {args.images / local_s:7.1f} images/s", flush=True)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"model": str(model_dir), "served_model_name": "tiny-k25",
                "engine": {"num_kv_blocks": 512, "block_size": 16, "max_num_seqs": 8},
                "parallel": {"executor": "ray", "attention_workers": 1, "expert_shards": 1, "cpus_per_worker": 0.5},
                "router_cpus": 0.5, "vision_workers": args.vision_workers, "vision_worker_cpus": 1,
                "vision_cache_images": 4 * args.images + 16}
    print(f"starting the app ({args.vision_workers} vision worker(s)) ...", flush=True)
    serve.run(build_app(app_args), name="k2ray", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    while httpx.get(base + "/health", timeout=5).status_code != 200:
        time.sleep(0.5)
    pool = serve.get_deployment_handle("VisionEncoder", app_name="k2ray")
    pool.encode.remote([load_image(_image(args.size, 10_000), cfg)]).result(timeout_s=300)  # warm

    fresh = [load_image(_image(args.size, 20_000 + k), cfg) for k in range(2 * args.images)]
    t0 = time.perf_counter()
    for im in fresh[:args.images]:
        pool.encode.remote([im]).result(timeout_s=300)
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calls = [pool.encode.remote([im]) for im in fresh[args.images:]]
    for c in calls:
        c.result(timeout_s=300)
    conc_s = time.perf_counter() - t0
    st = pool.stats.remote().result(timeout_s=60)
    print(f"pool, one call at a time:          {args.images / seq_s:7.1f} images/s "
          f"({args.images / seq_s / (args.images / local_s):.2f}x in-process)")
    print(f"pool, {args.images} concurrent calls:      {args.images / conc_s:7.1f} images/s "
          f"({args.images / conc_s / (args.images / local_s):.2f}x in-process; largest batch {st['largest_batch']} "
          f"images)", flush=True)

    text = "Describe the picture in one sentence."
    _ttft(base, text)  # warm the chat path
    rows = {"text only": [], "text + a new image": [], "text + a cached image": []}
    for k in range(args.requests):
        rows["text only"].append(_ttft(base, f"{text} ({k})"))
        url = _data_url(_image(args.size, 30_000 + k))
        rows["text + a new image"].append(_ttft(base, [{"type": "text", "text": f"{text} ({k})"},
                                                       {"type": "image_url", "image_url": {"url": url}}]))
        rows["text + a cached image"].append(_ttft(base, [{"type": "text", "text": f"{text} ({k}) again"},
                                                          {"type": "image_url", "image_url": {"url": url}}]))
    base_ms = statistics.median(rows["text only"]) * 1e3
    for name, xs in rows.items():
        ms = statistics.median(xs) * 1e3
        print(f"TTFT {name:22s} median {ms:7.1f} ms  ({ms / base_ms:.2f}x text only)")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
