"""The production job, end to end on CPU with the real engine: error rows, resume, summary."""

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
import pytest
from conftest import (
    MIXED_FOLDER_SKIPS,
    first_sample_ids,
    kill_all_processes_mentioning,
    processes_mentioning,
    write_mixed_folder,
)
from PIL import Image, ImageChops, ImageDraw

from helpers.data import SAMPLE_SHARDS
from helpers.output import OUTPUT_SCHEMA
from helpers.show import GREY, draw_tile_text, tile_boxes

ROOT = Path(__file__).resolve().parent.parent
JOB = [sys.executable, str(ROOT / "batch_inference_vision.py"), "--smoke"]

EXPECTED_REASONS = {
    "bad/empty.jpg": "empty file (0 bytes)",
    "bad/text_as_image.jpg": "not an image: unrecognised format",
    "bad/truncated.jpg": "truncated or corrupt JPEG image",
    "bad/bomb.png": "image too large",
    "bad/garbage.png": "not an image: unrecognised format",
    "bad/bad_header.bmp": "unreadable image header",
    "notes/README.txt": "not an image: unrecognised format",
}


def run_job(*args: str, timeout: int = 600) -> dict:
    proc = subprocess.run([*JOB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    output = args[args.index("--output") + 1]
    return json.loads(Path(output, "_summary.json").read_text())


class Job:
    """One run of the job in the background, with its own Ray temp dir: the dir's path is in the
    environment of every process of this job, workers included, so it marks them all."""

    def __init__(self, out: Path, log: Path, args: list[str]):
        self.out, self.log = out, log
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

    def wait_for_first_commit(self, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while not list(self.out.glob("part-*.parquet")):
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


# Rows an earlier run committed (resume): names that Ray's own listing would drop or that aren't ASCII.
DONE_EARLIER = ("_DSC0001.JPG", "photos 2026/Zürich café.png")


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    files = write_mixed_folder(folder)
    out = tmp_path_factory.mktemp("out") / "captions"
    out.mkdir()
    done = [
        {"id": i, "caption": "from an earlier run", "error": None, "num_input_tokens": 9,
         "num_generated_tokens": 3, "model": "tiny"}
        for i in DONE_EARLIER
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(done, schema=OUTPUT_SCHEMA), out / "part-earlier.parquet")
    summary = run_job("--input", str(folder), "--output", str(out), "--contact-sheet-size", "8")
    return files, out, summary


def test_one_row_per_file_and_bad_files_become_error_rows(mixed_run):
    files, out, summary = mixed_run
    table = pq.read_table(out)  # one call reads every part file; _summary.json is skipped
    assert table.schema == OUTPUT_SCHEMA
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(files) and table.num_rows == len(files)
    assert {rows[i]["caption"] for i in DONE_EARLIER} == {"from an earlier run"}  # resumed, not redone
    for rel, reason in EXPECTED_REASONS.items():
        assert rows[rel]["caption"] is None
        assert rows[rel]["error"] and reason in rows[rel]["error"], (rel, rows[rel]["error"])
    for rel in files:
        if rel.startswith("good/"):
            assert rows[rel]["error"] is None, rows[rel]
            assert isinstance(rows[rel]["caption"], str) and rows[rel]["num_generated_tokens"] > 0
            assert rows[rel]["num_input_tokens"] > 0


def test_summary_counts_match_the_output(mixed_run):
    files, out, summary = mixed_run
    bad = len(EXPECTED_REASONS)
    assert summary["rows_in_output"] == summary["unique_ids"] == summary["rows_in"] == len(files)
    assert summary["rows_written_this_run"] == len(files) - len(DONE_EARLIER)
    assert summary["rows_skipped_already_done"] == len(DONE_EARLIER)
    # What went in: every regular file under the input is a row or a counted skip.
    assert summary["skipped_files"] == MIXED_FOLDER_SKIPS
    assert summary["files_found"] == len(files) + sum(MIXED_FOLDER_SKIPS.values())
    assert summary["captioned"] == len(files) - bad and summary["errors"] == bad
    assert sum(summary["errors_by_reason"].values()) == bad
    assert summary["errors_by_reason"]["not an image"] >= 2
    assert summary["images_per_s"] > 0 and summary["versions"]["ray"]


def test_contact_sheet_shows_each_image_with_its_caption_or_error(mixed_run):
    _, out, summary = mixed_run
    sheet = Image.open(Path(out, "_contact_sheet.png")).convert("RGB")
    # 8 images in 4 columns of 208 px; rows 208 + 5 text lines of 12 px; a 24 px title.
    assert sheet.size == (4 * 208, 24 + 2 * (208 + 60))
    # What each tile must say, drawn as the sheet draws it: "id: caption" or "id: [error] reason".
    expected = {}
    for r in pq.read_table(out).to_pylist():
        text = r["caption"] if r["caption"] is not None else f"[error] {r['error']}"
        _, box = tile_boxes(0)
        expected[r["id"]] = strip = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), "white")
        draw_tile_text(ImageDraw.Draw(strip), (0, 0), f"{r['id']}: {text}")
    shown = []
    for i in range(8):
        image_box, text_box = tile_boxes(i, titled=True)
        text = sheet.crop(text_box)
        ids = [k for k, strip in expected.items() if not ImageChops.difference(text, strip).getbbox()]
        assert len(ids) == 1, f"tile {i} shows no caption or error of the output ({ids})"
        shown += ids
        # A grey tile for exactly the files that aren't images.
        grey = sheet.crop(image_box).getcolors() == [(192 * 192, GREY)]
        assert grey == (ids[0] in EXPECTED_REASONS), (i, ids[0])
    assert len(set(shown)) == 8


def test_driver_killed_alone_and_rerun_at_once_gives_the_first_n_ids_exactly_once(tmp_path):
    out = tmp_path / "captions"
    limit = 20  # of 24: resume must complete the same first N (job.yaml runs --limit with retries)
    args = ["--input", f"{SAMPLE_SHARDS}/*.tar", "--output", str(out), "--limit", str(limit)]
    args += ["--rows-per-block", "2", "--batch-size", "2", "--no-contact-sheet"]
    job = Job(out, tmp_path / "job.log", args)
    try:
        job.wait_for_first_commit()
        # The driver alone: its Ray workers run on for a moment and may still commit files,
        # while the rerun below has already read what is there.
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
        first = pq.read_table(out).column("id").to_pylist()
        assert 0 < len(first) < limit, "kill the job partway"
        # A write interrupted mid-file leaves only a hidden temporary: never read as finished work.
        planted = out / ".tmp-deadbeef-part-x.parquet"
        planted.write_bytes(b"PAR1 half a file")
        assert pq.read_table(out).num_rows >= len(first)
        summary = run_job(*args)  # at once
    finally:
        kill_all_processes_mentioning(job.marker)
    ids = pq.read_table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == limit
    assert set(ids) == set(first_sample_ids(limit)) and set(first) <= set(ids)
    assert summary["rows_in_output"] == summary["unique_ids"] == limit
    assert summary["rows_skipped_already_done"] >= len(first)
    assert not planted.exists()


def test_limit_zero_captions_nothing(tmp_path):
    out = tmp_path / "captions"
    summary = run_job("--limit", "0", "--output", str(out), "--no-contact-sheet")
    assert summary["rows_in_output"] == 0 and summary["rows_written_this_run"] == 0


def test_prompts_the_engine_rejects_become_error_rows(tmp_path):
    out = tmp_path / "captions"
    summary = run_job(
        "--limit",
        "4",
        "--engine-kwargs",
        '{"max_model_len": 100}',
        "--output",
        str(out),
        "--no-contact-sheet",
    )
    table = pq.read_table(out)
    assert table.num_rows == 4 and summary["errors_by_reason"] == {"engine rejected the request": 4}
    assert all("maximum context length" in e for e in table.column("error").to_pylist())
    assert pa.compute.all(pa.compute.is_null(table.column("caption"))).as_py()
