"""Faults in the middle of a run of the job, on CPU with the real engine.

Each ends with every id in the output exactly once: either the job survives the fault and
completes, or it exits non-zero with a clear message, and a rerun of the same command completes
the rest.
"""

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import first_sample_ids
from test_job import Job, run_job

from helpers.data import SAMPLE_SHARDS

ALL = 24  # the bundled images


def job_args(out: Path) -> list[str]:
    # Blocks of 2 rows: many small commits, so a fault lands between the first and the last.
    args = ["--input", f"{SAMPLE_SHARDS}/*.tar", "--output", str(out), "--no-contact-sheet"]
    return args + ["--rows-per-block", "2", "--batch-size", "2"]


def assert_every_id_exactly_once(out: Path) -> None:
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == ALL
    assert set(ids) == set(first_sample_ids(ALL))
    assert table.column("error").null_count == ALL, table.column("error").to_pylist()


@pytest.mark.parametrize(
    "title, after_first_commit",
    [("vLLMEngineStageUDF", True), ("ChatTemplateUDF", False)],
    ids=["engine-actor", "cpu-stage-actor"],
)
def test_a_worker_killed_mid_run(tmp_path, title, after_first_commit):
    out = tmp_path / "captions"
    job = Job(out, tmp_path / "job.log", job_args(out))
    try:
        # The CPU stages are done with every row before the engine's first batch is written,
        # so their actor is killed as soon as it works, the engine's once a file is committed.
        if after_first_commit:
            job.wait_for_first_commit()
        job.kill(title)
    finally:
        rc, log = job.finish()
    # Ray Data restarts a dead actor and retries its tasks, so the job is expected to complete.
    assert rc == 0, log[-3000:]
    assert_every_id_exactly_once(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: room for a few of the job's files (one 4 KiB page each), not all 12."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode:
        pytest.skip(f"can't mount a tmpfs here (needs root): {mount.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_output_disk_fails_clearly_then_resumes(tmp_path, small_disk):
    out = small_disk / "captions"
    job = Job(out, tmp_path / "job.log", job_args(out))
    rc, log = job.finish()
    assert rc == 1, log[-3000:]
    assert "[job] FAILED" in log and "No space left on device" in log, log[-3000:]
    assert "run the same command again" in log
    committed = pq.read_table(out).num_rows
    assert 0 <= committed < ALL
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    summary = run_job(*job_args(out))
    assert summary["rows_skipped_already_done"] == committed
    assert_every_id_exactly_once(out)
