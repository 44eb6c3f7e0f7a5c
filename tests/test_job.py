"""The production job, end to end on CPU with the real engine: prompts the engine rejects, an empty
run. The job over a real folder (error rows, resume, summary, contact sheet) runs in
test_jobs_api.py, its faults in test_faults.py."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
JOB = [sys.executable, str(ROOT / "batch_inference_vision.py"), "--smoke"]


def run_job(*args: str, timeout: int = 600, env: dict | None = None) -> dict:
    proc = subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    output = args[args.index("--output") + 1]
    return json.loads(Path(output, "_summary.json").read_text())


def test_limit_zero_captions_nothing(tmp_path, cluster):
    _, env = cluster  # the job's driver connects to the running cluster
    out = tmp_path / "captions"
    summary = run_job("--limit", "0", "--output", str(out), "--no-contact-sheet", env=env)
    assert summary["rows_in_output"] == 0 and summary["rows_written_this_run"] == 0


def test_prompts_the_engine_rejects_become_error_rows(tmp_path, cluster):
    _, env = cluster
    out = tmp_path / "captions"
    args = [
        "--limit",
        "4",
        "--engine-kwargs",
        '{"max_model_len": 100}',
        "--output",
        str(out),
        "--no-contact-sheet",
    ]
    summary = run_job(*args, env=env)
    table = pq.read_table(out)
    assert table.num_rows == 4 and summary["errors_by_reason"] == {"engine rejected the request": 4}
    assert all("maximum context length" in e for e in table.column("error").to_pylist())
    assert pa.compute.all(pa.compute.is_null(table.column("caption"))).as_py()
