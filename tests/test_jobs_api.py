"""The production job on a running Ray cluster, submitted through the Jobs API as the README says,
over a real folder of good, odd and broken files: one row per file, error rows, resume, summary and
contact sheet, all from that one run of the job.

The cluster is the session's (tests/conftest.py: `ray start --head`, CPU only, its own temp dir
and ports, token authentication on as Ray 2.60 turns it on where a token exists); the job goes to
it with `ray job submit --working-dir .`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIN, MIXED_FOLDER_SKIPS, WHITE, near, write_mixed_folder
from PIL import Image, ImageChops, ImageDraw

from helpers.output import OUTPUT_SCHEMA
from helpers.rows import decode_image
from helpers.show import GREY, draw_tile_text, tile_boxes

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_REASONS = {
    "bad/empty.jpg": "empty file (0 bytes)",
    "bad/text_as_image.jpg": "not an image: unrecognised format",
    "bad/truncated.jpg": "truncated or corrupt JPEG image",
    "bad/bomb.png": "image too large",
    "bad/garbage.png": "not an image: unrecognised format",
    "bad/bad_header.bmp": "unreadable image header",
    "notes/README.txt": "not an image: unrecognised format",
}

# Rows an earlier run committed (resume): names that Ray's own listing would drop or that aren't ASCII.
DONE_EARLIER = ("_DSC0001.JPG", "photos 2026/Zürich café.png")


@pytest.fixture(scope="module")
def mixed_run(cluster, tmp_path_factory):
    """The README's submit command, with the offline preset, over a mixed folder whose output
    already holds rows of an earlier run. The client sends the cluster's token because
    RAY_AUTH_MODE=token and the token's path are set in its environment."""
    address, env = cluster
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
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    cmd += ["--", "python", "batch_inference_vision.py", "--smoke"]
    cmd += ["--input", str(folder), "--output", str(out), "--contact-sheet-size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    summary = json.loads((out / "_summary.json").read_text())
    return files, out, summary, proc.stdout


def test_ray_job_submit_to_a_running_cluster_runs_the_job_to_success(mixed_run):
    *_, stdout = mixed_run
    assert "succeeded" in stdout, stdout[-4000:]
    # The job's own lines reach the client: what it found at the start, the summary at the end.
    assert "[job] preset smoke" in stdout and "files found under" in stdout and "[job] summary:" in stdout


def test_one_row_per_file_and_bad_files_become_error_rows(mixed_run):
    files, out, summary, _ = mixed_run
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
    files, out, summary, _ = mixed_run
    bad = len(EXPECTED_REASONS)
    assert summary["rows_in_output"] == summary["unique_ids"] == summary["rows_in"] == len(files)
    assert summary["rows_written_this_run"] == len(files) - len(DONE_EARLIER)
    assert summary["rows_skipped_already_done"] == len(DONE_EARLIER)
    # What went in: every regular file under the input is a row or a counted skip.
    assert summary["skipped_files"] == MIXED_FOLDER_SKIPS
    assert summary["files_found"] == len(files) + sum(MIXED_FOLDER_SKIPS.values())
    assert summary["captioned"] == len(files) - bad and summary["errors"] == bad
    assert summary["errors_by_reason"] == {
        "not an image": 3,
        "empty file": 1,
        "truncated or corrupt JPEG image": 1,
        "image too large": 1,
        "unreadable image header": 1,
    }
    assert summary["images_per_s"] > 0 and summary["versions"]["ray"]


def test_contact_sheet_shows_each_image_with_its_caption_or_error(mixed_run):
    files, out, summary, _ = mixed_run
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
        if not grey:  # the tile's image is that row's: its main colour (white is the background)
            tile = [c for c in sorted(sheet.crop(image_box).getcolors(192 * 192))[::-1] if c[1] != WHITE]
            image = decode_image(files[ids[0]])
            main = max(image.getcolors(image.width * image.height))[1]
            assert near(tile[0][1], main), (ids[0], main)
    assert len(set(shown)) == 8


def test_a_notebook_on_the_cluster_connects_with_the_smoke_preset(cluster):
    # The notebook's own call, with RAY_ADDRESS set as on a cluster's notebook node: it must
    # connect (Ray refuses the smoke preset's num_cpus when connecting) and see the cluster.
    _, env = cluster
    code = (
        "import ray\n"
        "from helpers.presets import get_preset, init_ray\n"
        "started = init_ray(get_preset(True), log_to_driver=False, logging_level='WARNING')\n"
        "print('started a local cluster:', started, 'CPUs:', ray.cluster_resources()['CPU'])\n"
    )
    env = {**env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started a local cluster: False CPUs: 8.0" in proc.stdout
