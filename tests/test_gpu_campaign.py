"""The GPU campaign (#26, bench/gpu/): its dry run — the same code at tiny shapes on CPU — and its summary's verdicts.

The campaign itself needs a GPU (bench/gpu/README.md says how a session with one runs it); here `campaign.sh
--dry-run` runs every section at tiny shapes (the Triton kernels in Triton's interpreter) so that none of its code
paths rots, and the report's target verdicts are checked on made-up GPU figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = {"correctness", "bandwidth", "moe", "mla", "layer", "engine"}


def _campaign():
    spec = importlib.util.spec_from_file_location("k2ray_gpu_campaign", os.path.join(ROOT, "bench", "gpu", "campaign.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_campaign_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "K2RAY_KERNELS")}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", os.path.join("bench", "gpu", "campaign.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    camp = _campaign()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:  # every line is one of the typed records, complete
        fields = {k: v for k, v in r.items() if k not in ("record", "section")}
        assert set(fields) == {f.name for f in dataclasses.fields(camp.RECORDS[r["record"]])}, r
        assert r["section"] in SECTIONS
    status = {r["section"]: r for r in rows if r["record"] == "SectionStatus"}
    assert set(status) == SECTIONS
    assert all(r["ok"] for r in status.values()), status
    kinds = {}
    for r in rows:
        kinds.setdefault(r["record"], []).append(r)
    checks = kinds["Check"]
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    names = " ".join(c["name"] for c in checks)
    assert "moe_align/" in names and "fused_moe/" in names and "mla_decode/" in names and "model/" in names
    assert kinds["CopyBandwidth"][0]["bytes_per_s"] > 0
    assert [p["tokens"] for p in kinds["MoEPoint"]] == list(camp.DRY.moe_tokens)
    assert all(p["bf16_ref_s"] and p["max_rel_err"] is not None and p["max_rel_err"] < 3e-2 for p in kinds["MoEPoint"])
    assert len(kinds["MLAPoint"]) == len(camp.DRY.mla_contexts) * len(camp.DRY.mla_batches)
    assert [p["batch"] for p in kinds["LayerPoint"]] == list(camp.DRY.layer_batches)
    assert all(p["floor_s"] and p["seconds"] > 0 and p["mode"] == "eager" for p in kinds["LayerPoint"])
    engine = kinds["EnginePoint"]
    assert {(p["system"], p["concurrency"]) for p in engine} == {
        (s, c) for s in ("k2ray", "transformers") for c in camp.DRY.concurrency}
    assert all(p["tok_s"] > 0 for p in engine)
    assert all(p["same_tokens"] is not None for p in engine if p["system"] == "transformers")
    assert kinds["Env"][0]["dry_run"] is True

    summary = (tmp_path / "summary.md").read_text()
    assert "NOT GPU figures" in summary
    for title in ("## Correctness", "## Copy bandwidth", "## W4A16 fused MoE", "## MLA absorbed decode",
                  "## K2 layer slice", "## Engine end to end"):
        assert title in summary
    assert "**met**" not in summary and "**missed**" not in summary  # no verdict on CPU figures
    assert (tmp_path / "campaign.log").stat().st_size > 0


def test_summary_judges_the_targets_on_gpu_figures():
    camp = _campaign()

    def row(rec):
        return {"record": type(rec).__name__, "section": "x", **dataclasses.asdict(rec)}

    bw = 3.0e12
    rows = [row(camp.Env(device="NVIDIA H100 80GB HBM3", dry_run=False, torch="2", triton="3", transformers="5",
                         python="3.12")),
            row(camp.CopyBandwidth(2**32, 2 * 2**32 / bw, bw, 0.9))]
    for t in (1, 8, 32, 64):
        nbytes = 200e6
        rows.append(row(camp.MoEPoint(t, 8, int(nbytes), nbytes / (0.7 * bw), 0.0, 0.7, 3 * nbytes / (0.7 * bw), 3.0)))
    rows.append(row(camp.MLAPoint(64, 8192, int(600e6), 600e6 / (0.4 * bw), 0.0, 0.4)))
    rows.append(row(camp.LayerPoint(1, 4096, "eager", 8, int(490e6), 490e6 / bw, 1e-3, 6.1)))
    rows.append(row(camp.LayerPoint(1, 4096, "cuda-graph", 8, int(490e6), 490e6 / bw, 2e-4, 1.22)))
    text = camp.summary_markdown(rows, dry=False)
    assert "Target at 8–64 tokens: **met**" in text
    assert "Target at 8K (batch 64): **missed** (40.0%)" in text
    assert "Target at batch 1: **met** (1.22× the floor" in text
    assert "| 1 | 4096 | 8 | 490.0 | 163.3 µs | 1000.0 µs | 6.10× | 200.0 µs | 1.22× |" in text
    assert "NOT GPU figures" not in text


def test_a_raising_check_is_recorded_and_the_section_goes_on(tmp_path):
    camp = _campaign()
    ctx = camp.Ctx("correctness", True, tmp_path, 60, None)

    def boom():
        raise RuntimeError("PassManager::run failed\nsecond line")

    camp._guard(ctx, "fused_moe/x", boom)
    camp._guard(ctx, "fused_moe/y", lambda name: ctx.emit(camp.Check(name, True, "fine")))
    rows = camp.read_results(tmp_path / "results.jsonl")
    assert [(r["name"], r["ok"]) for r in rows] == [("fused_moe/x", False), ("fused_moe/y", True)]
    assert rows[0]["detail"] == "raised RuntimeError: PassManager::run failed second line"
