"""The unmodified notebook, executed headless as `make run` does (papermill, `SMOKE_TEST=1`).

It must run to the end, write one caption row per image with no error rows, and read well:
pictures and tables, not pages of log lines.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import first_sample_ids

from helpers.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "llm_batch_inference_vision.ipynb"
SMOKE = get_preset(smoke_test=True)

# A cell that runs datasets prints Ray Data's three lines per dataset (start, plan, finished)
# and a line or two of its own; the busiest cell runs two datasets, and an error's message
# needs room too. 30 lines is that with a wide margin, and a tenth of one progress dump.
MAX_LINES_PER_CELL = 30
MAX_LINES_IN_ALL = 100
# Lines that mean something leaked that a setting of ours could have kept out of the notebook:
# worker logs (they carry "pid="), vLLM and Python warnings, deprecations, progress dumps.
PREVENTABLE = re.compile(r"pid=|WARNING|Warning:|deprecat|Elapsed time|ArrowConversionError|Running Dataset")
# Allowed, each said once: Ray 2.60 starts a local cluster with token authentication on and says
# so (a security notice; turning authentication off to hide it would be wrong), and Ray Data
# confirms that its progress tables are off and says how to turn them back on.
ALLOWED = re.compile(
    r"Token authentication is enabled|Generated new authentication token|Progress bars disabled"
)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebook")
    env = {
        **os.environ,
        "SMOKE_TEST": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OUTPUT_DIR": str(out / "captions"),
    }
    cmd = [sys.executable, "-m", "papermill", "--no-progress-bar", "-k", "python3", str(NOTEBOOK)]
    proc = subprocess.run(
        [*cmd, str(out / "executed.ipynb")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / "executed.ipynb").read_text()), out


def stream_lines(cell) -> list[str]:
    text = "".join("".join(o["text"]) for o in cell.get("outputs", []) if o["output_type"] == "stream")
    return text.splitlines()


def test_every_cell_prints_a_few_lines_and_no_preventable_warnings(executed):
    notebook, _ = executed
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    total = 0
    for cell in code:
        lines = stream_lines(cell)
        total += len(lines)
        first = "".join(cell["source"]).splitlines()[0]
        assert len(lines) <= MAX_LINES_PER_CELL, (first, len(lines), lines[:40])
        leaked = [ln for ln in lines if PREVENTABLE.search(ln) and not ALLOWED.search(ln)]
        assert not leaked, (first, leaked)
    assert total < MAX_LINES_IN_ALL, total


def test_pictures_reach_the_notebook(executed):
    notebook, _ = executed
    pictures = [
        o
        for c in notebook["cells"]
        for o in c.get("outputs", [])
        if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    assert len(pictures) == 2  # the sample grid, then the same samples with their captions


@pytest.mark.parametrize(
    "suffix, images", [("", SMOKE.num_images), ("_scaled", SMOKE.scale_up_images)], ids=["first", "scaled"]
)
def test_each_run_wrote_one_caption_per_image(executed, suffix, images):
    _, out = executed
    table = pq.read_table(f"{out}/captions{suffix}")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == images
    assert table.column("error").null_count == table.num_rows, "the offline preset makes no error rows"
    assert all(c for c in table.column("caption").to_pylist())
    # The first run takes the first images in order, so the samples shown at the start are in it.
    assert set(first_sample_ids(images)) == set(ids)
