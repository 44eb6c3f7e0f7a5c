"""Faults in the middle of runs of the job, on CPU with the real engine.

One output folder lives through the faults a long job meets, one after another, each run the same
command (the first 20 of the 24 bundled images, as job.yaml's --limit with retries):
  1. the output disk fills up: the job exits 1 with a clear message and what to do (a tmpfs,
     mounted as root; where it can't be, this step alone is left out, with a warning);
  2. the disk has room again, and the driver alone is SIGKILLed after its first commit, its Ray
     workers left running on for a moment;
  3. the rerun at once, during which a CPU-stage actor and then the engine's actor are SIGKILLed:
     Ray Data restarts them and retries their tasks, and the run completes.
Every run resumes from what the runs before it committed, and the output ends with the first 20 ids,
each exactly once, none an error.
"""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import first_sample_ids, kill_all_processes_mentioning, processes_mentioning
from test_job import JOB, ROOT

from helpers.data import SAMPLE_SHARDS
from helpers.output import read_output

LIMIT = 20  # of the 24 bundled images: a resumed run must complete the same first N


class Job:
    """One run of the job in the background, with its own Ray temp dir: the dir's path is in the
    environment of every process of this job, workers included, so it marks them all."""

    def __init__(self, out: Path, log: Path, args: list[str]):
        self.out, self.log = out, log
        self.before = set(out.glob("part-*.parquet"))  # what earlier runs committed
        self.marker = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [*JOB, *args],
                cwd=ROOT,
                env={**os.environ, "RAY_TMPDIR": self.marker},
                start_new_session=True,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    def ray_started(self, timeout: float = 300) -> bool:
        """Until the job's local Ray is up (True), or the job has ended because it didn't come up
        (False): on 2 busy cores a raylet can give up on its agents, whose ports it waits for 15 s."""
        deadline = time.time() + timeout
        while "ids already in" not in self.log.read_text():
            if self.proc.poll() is not None:
                log = self.log.read_text()
                assert "The current node timed out during startup" in log, log[-3000:]
                return False
            assert time.time() < deadline, "Ray did not start in time"
            time.sleep(0.2)
        return True

    @classmethod
    def start(cls, out: Path, log: Path, args: list[str], attempts: int = 3) -> "Job":
        """A job whose local Ray came up, started again (at most `attempts` times) if it didn't."""
        for _ in range(attempts - 1):
            job = cls(out, log, args)
            if job.ray_started():
                return job
            job.finish()
        return cls(out, log, args)

    def wait_for_first_commit(self, timeout: float = 400) -> None:
        """Until this run has committed a file of its own."""
        deadline = time.time() + timeout
        while not set(self.out.glob("part-*.parquet")) - self.before:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, "no file committed in time"
            time.sleep(0.2)

    def pids(self, title: str) -> list[int]:
        """This job's processes whose title (Ray names its workers after their actor) has title."""
        return processes_mentioning(self.marker, title)

    def kill(self, title: str, timeout: float = 400) -> None:
        """SIGKILL the processes named title once they run (past their constructor)."""
        deadline = time.time() + timeout
        while not (pids := set(self.pids(title)) - set(self.pids("__init__"))):
            assert self.proc.poll() is None, "the job ended before the fault"
            assert time.time() < deadline, f"no process named {title} in time"
            time.sleep(0.1)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            return self.proc.wait(timeout), self.log.read_text()
        finally:
            kill_all_processes_mentioning(self.marker)


def job_args(out: Path) -> list[str]:
    # Blocks of 2 rows: many small commits, so a fault lands between the first and the last.
    args = ["--input", f"{SAMPLE_SHARDS}/*.tar", "--output", str(out), "--limit", str(LIMIT)]
    return args + ["--no-contact-sheet", "--rows-per-block", "2", "--batch-size", "2"]


def ids_in(out: Path) -> list[str]:
    return pq.read_table(out).column("id").to_pylist()


@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs: room for a few of the job's files (one 4 KiB page each), not all 10. None
    where one can't be mounted (it needs root): the test then leaves out the full disk alone."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode:
        warnings.warn(
            f"the full-disk step is left out: can't mount a tmpfs here (needs root): "
            f"{mount.stderr.decode().strip()}",
            stacklevel=1,
        )
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_a_killed_driver_and_killed_workers_each_resume_to_the_first_n_ids_once(
    tmp_path, small_disk
):
    out = (small_disk or tmp_path) / "captions"
    args = job_args(out)

    # 1. The disk fills up: a clear failure, with what to do, and the rows committed before it.
    committed = []
    if small_disk:
        rc, log = Job.start(out, tmp_path / "full_disk.log", args).finish()
        assert rc == 1, log[-3000:]
        assert "[job] FAILED" in log and "No space left on device" in log, log[-3000:]
        assert "run the same command again" in log
        committed = ids_in(out)
        assert len(committed) < LIMIT
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)

    # 2. The driver alone, after its first commit: its Ray workers run on for a moment and may
    # still commit files, while the rerun below has already read what is there.
    killed = Job.start(out, tmp_path / "driver_killed.log", args)
    try:
        killed.wait_for_first_commit()
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait()
        first = ids_in(out)
        assert len(committed) < len(first) < LIMIT, "kill the job partway"
        # It resumed from exactly what the full disk's run had committed.
        assert f"[job] {len(committed)} ids already in" in killed.log.read_text()
        # A write interrupted mid-file leaves only a hidden temporary: never read as finished work.
        planted = out / ".tmp-deadbeef-part-x.parquet"
        planted.write_bytes(b"PAR1 half a file")
        assert set(read_output(str(out)).column("id").to_pylist()) >= set(first)

        # 3. The rerun, at once. Its CPU stages are done with every row before the engine's first
        # batch is written, so their actor is killed as soon as it works; the engine's actor
        # once this run has committed a file, with rows still to caption.
        rerun = Job.start(out, tmp_path / "rerun.log", args)
        try:
            rerun.kill("ChatTemplateUDF")
            rerun.wait_for_first_commit()
            rerun.kill("vLLMEngineStageUDF")
        finally:
            rc, log = rerun.finish()
    finally:
        kill_all_processes_mentioning(killed.marker)

    # Ray Data restarts a dead actor and retries its tasks, so the rerun completes.
    assert rc == 0, log[-3000:]
    assert re.search(r"ids already in .*; [1-9]\d* partial files", log), log[-3000:]  # the planted one
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == LIMIT
    assert set(ids) == set(first_sample_ids(LIMIT)) and set(first) <= set(ids)
    assert table.column("error").null_count == LIMIT, table.column("error").to_pylist()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_in_output"] == summary["unique_ids"] == LIMIT
    assert summary["rows_skipped_already_done"] >= len(first)
    assert not planted.exists()
