"""The production job, end to end on CPU with the real engine: prompts the engine rejects, an empty
run. The job over a real folder (error rows, resume, summary, contact sheet) runs in
test_jobs_api.py, its faults in test_faults.py."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bad_and_odd_images

from batch_inference_vision import complete, failure_reason, rows_to_caption
from helpers.data import list_input

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


@pytest.mark.parametrize("data_format", ["parquet", "tar"])
def test_local_input_that_repeats_an_id_is_refused_before_captioning(tmp_path, cluster, data_format):
    # Rows are written and resumed by id: local Parquet and shards are checked before the run.
    _, env = cluster
    image = bad_and_odd_images()["good"]["rgb.jpg"]
    if data_format == "parquet":
        ids = ["a", "a", "b", None, None]
        pq.write_table(pa.table({"id": ids, "image": [image] * len(ids)}), tmp_path / "in.parquet")
        expected = "2 input rows repeat an id of another row, in the id column 'id' (a null id is 'None'); "
        expected += "such as 'a', 'None'."
    else:
        for shard in range(2):  # keys numbered from 0 in each shard
            with tarfile.open(tmp_path / f"in-{shard}.tar", "w") as tar:
                for key in ("000", "001"):
                    info = tarfile.TarInfo(f"{key}.jpg")
                    info.size = len(image)
                    tar.addfile(info, io.BytesIO(image))
        expected = (
            "2 input rows repeat an id of another row, in the keys of another shard; such as '000', '001'."
        )
    out = tmp_path / "captions"
    args = ["--input", str(tmp_path / f"in*.{data_format}"), "--output", str(out), "--no-contact-sheet"]
    proc = subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert expected in proc.stderr and "Nothing was captioned." in proc.stderr
    assert not list(out.glob("*.parquet"))


def test_rows_that_share_an_id_are_counted_and_fail_the_job(tmp_path, cluster):
    # Within --limit (and for remote inputs) the rows are not checked before the run: the output keeps
    # one row per id, so rows with repeated ids, here a repeated key and two nulls, can't all be
    # kept, and the job must say so after the run and exit 1.
    _, env = cluster
    image = bad_and_odd_images()["good"]["rgb.jpg"]
    ids = ["a", "a", "b", None, None]
    pq.write_table(pa.table({"id": ids, "image": [image] * len(ids)}), tmp_path / "in.parquet")
    out = tmp_path / "captions"
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--no-contact-sheet"]
    args += ["--limit", "5"]
    proc = subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(Path(out, "_summary.json").read_text())
    assert summary["rows_with_a_repeated_id"] == 2 and summary["unique_ids"] == 3
    assert "2 rows had the id of another row" in proc.stderr


def test_the_job_counts_a_run_complete_only_with_every_row_once(tmp_path):
    for name in "abcde":
        (tmp_path / f"{name}.jpg").write_bytes(b"")
    listing = list_input(str(tmp_path))
    assert [rows_to_caption(listing, n) for n in (None, 3, 9)] == [5, 3, 5]
    assert rows_to_caption(None, 3) is None  # shards, a glob: not known before reading
    done = {"rows_in": 5, "rows_in_output": 5, "unique_ids": 5, "rows_with_a_repeated_id": 0}
    assert complete(done) and complete(done | {"rows_in": None})
    assert not complete(done | {"rows_in_output": 4, "unique_ids": 4})  # an input row without its row
    assert not complete(done | {"unique_ids": 4})  # an id twice in the output
    assert not complete(done | {"rows_with_a_repeated_id": 1})  # a row kept under another's id


def test_a_failed_job_names_the_error_not_rays_retry_advice(ray_local):
    def no_id_column(row):
        return {"id": row["key"]}

    with pytest.raises(Exception) as failed:
        ray_local.data.range(2).map(no_id_column).materialize()
    assert "retry" in str(failed.value).splitlines()[-1]  # what the job used to print
    assert failure_reason(failed.value) == "KeyError: 'key'"
    assert failure_reason(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"
