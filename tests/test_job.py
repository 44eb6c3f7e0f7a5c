"""The production job, end to end on CPU with the real engine: prompts the engine rejects, an empty
run; and the runner of a job in the background that the fault tests (test_faults.py) kill parts of.
The job over a real folder (error rows, resume, summary, contact sheet) runs in test_jobs_api.py."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import (
    kill_all_processes_mentioning,
    processes_mentioning,
)

ROOT = Path(__file__).resolve().parent.parent
JOB = [sys.executable, str(ROOT / "batch_inference_vision.py"), "--smoke"]


def run_job(*args: str, timeout: int = 600, env: dict | None = None) -> dict:
    proc = subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    output = args[args.index("--output") + 1]
    return json.loads(Path(output, "_summary.json").read_text())


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
