"""The benchmark script runs (CPU, tiny model, toy size) so it can't rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_measures_engine_and_pipeline_side_by_side(tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_vision.py"),
        "--smoke",
        "-n",
        "6",
        "--max-tokens",
        "4",
        "--runs",
        "engine,engine_async,pipeline",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in records] == ["engine", "engine_async", "pipeline"]
    for r in records:
        assert r["images"] == 6 and r["tokens_ok"] is True, r
        assert r["e2e_images_per_s"] > 0 and r["startup_s"] > 0
        assert r["versions"]["ray"] and r["model"] == "tiny"
