"""The benchmark script runs (CPU, tiny model, toy size) so it can't rot between GPU sessions."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_measures_engine_pipeline_and_original_side_by_side(tmp_path):
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
        "engine,engine_async,pipeline,original",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        # The flag behind h200_x2.sh's two replicas per GPU (there {"GPU": 0.5, "CPU": 1}).
        "--placement-group-config",
        '{"bundle_per_worker": {"CPU": 2}}',
        # The flag behind h200_x2.sh's per-variant environment (mmgraph: VLLM_USE_V2_MODEL_RUNNER=0).
        "--env",
        "BENCH_ENV_MARK=1",
        # The flag behind h200_x2.sh's pend2048 and seqs2048 (Ray Data LLM's max_pending_requests).
        "--max-pending-requests",
        "12",
        # h200_x2.sh's variants name only the compilation_config keys they change.
        "--engine-kwargs",
        '{"limit_mm_per_prompt": {"image": 1}}',
        # The experiment behind h200_x2.sh's warmrenderer (benchmarks/warmhook).
        "--warm-renderer",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in records] == ["engine", "engine_async", "pipeline", "original"]
    for r in records:
        assert r["images"] == 6 and r["tokens_ok"] is True, r
        assert r["e2e_images_per_s"] > 0 and r["startup_s"] > 0
        assert r["versions"]["ray"]
    # Each pipeline run measured the configuration it is named for (the README table's rows).
    pipeline, original = (r["settings"] for r in records[2:])
    assert pipeline["batch_size"] == 8 and pipeline["final_only"] is True
    assert original["batch_size"] == 16 and original["final_only"] is False and original["detokenize"] is True
    assert "max_num_seqs" in pipeline["engine_kwargs"] and "max_num_seqs" not in original["engine_kwargs"]
    assert pipeline["placement_group_config"] == {"bundle_per_worker": {"CPU": 2}}
    assert pipeline["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 1, "video": 0}  # merged key by key
    assert original["placement_group_config"] == {"bundle_per_worker": {"CPU": 1}}  # the tutorial's
    assert pipeline["env_vars"]["BENCH_ENV_MARK"] == "1"  # recorded with the run it changed
    # Recorded, and what the engine actor used (its own log line); the original keeps Ray's default.
    assert pipeline["max_pending_requests"] == 12 and original["max_pending_requests"] is None
    # The preset caps it (here at the run's share: its 6 rows are one block of 8, one task); the
    # tutorial left Ray's default.
    in_flight = "max_tasks_in_flight_per_actor"
    assert pipeline[in_flight] == 1 and original[in_flight] is None
    assert pipeline["rows_per_block"] == original["rows_per_block"] == 8  # a cap's task is a block
    log = (tmp_path / "work" / "logs" / "pipeline-0.log").read_text()
    assert "Max pending requests is set to 12" in log
    # The hook reached the engine actor and warmed vLLM's renderer there; not the original's.
    assert pipeline["warm_renderer"] is True and original["warm_renderer"] is False
    assert re.search(r"vLLMEngineStageUDF.*warmhook: vLLM renderer warm-up took", log), log[-3000:]
    assert "warm-up failed" not in log
    assert "warmhook" not in (tmp_path / "work" / "logs" / "original-0.log").read_text()
