"""The unmodified notebook, executed headless with `SMOKE_TEST=1`: the run `make test` makes with
nbval (`pytest --nbval-lax llm_batch_inference_vision.ipynb tests`, ci/test.sh), or, when pytest
runs without it, a papermill run as `make run` makes.

It must run to the end, write one caption row per image with no error rows, and read well:
pictures and tables, not pages of log lines, and no stderr box.
"""

import ast
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
from helpers.rows import SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "llm_batch_inference_vision.ipynb"
SMOKE = get_preset(smoke_test=True)

# A cell that runs datasets prints a line or two of its own; an error's message needs room too.
# 30 lines is that with a wide margin, and a tenth of one progress dump.
MAX_LINES_PER_CELL = 30
MAX_LINES_IN_ALL = 100
# Lines that mean something leaked that a setting of ours could have kept out of the notebook:
# worker logs (they carry "pid="), vLLM and Python warnings, deprecations, progress dumps, Ray
# Data's INFO lines (the notebook logs warnings and errors only: logging.disable(logging.INFO)).
PREVENTABLE = re.compile(
    r"pid=|WARNING|Warning:|deprecat|Elapsed time|ArrowConversionError|Running Dataset|"
    r"Starting execution|execution finished"
)

# Ray Core logs this for every actor whose constructor arguments are in the object store, which is
# how Ray Data starts each stage's actors: https://github.com/ray-project/ray/issues/53727
RAY_CORE_ACTOR_RESTARTS = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*max_restarts > 0"
)

# init_ray's retry where a loaded machine's raylet or GCS is slow to come up (seen on the 2-core CI
# machine under two test workers): the start it retries is not a setting's to prevent. Python
# prints the warning's line, then the source line that called init_ray.
RAY_START_RETRY = re.compile(
    r"UserWarning: Ray's local start failed \(.*timed out during startup.*\); trying again"
)


def without_ray_start_retries(lines: list[str]) -> list[str]:
    """`lines` less init_ray's retry warnings, each with the source line Python prints after it."""
    kept, skip_source = [], False
    for line in lines:
        if RAY_START_RETRY.search(line):
            skip_source = True
            continue
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = False
        kept.append(line)
    return kept


def nbval_run(session) -> list[dict] | None:
    """The notebook's cells as nbval ran them in this pytest session, if it ran every one."""
    cells = [
        item
        for item in session.items
        if type(item).__name__ == "IPyNbCell" and Path(str(item.fspath)) == NOTEBOOK
    ]
    if not cells or any(getattr(c, "test_outputs", None) is None for c in cells):
        return None
    return [
        {"cell_type": "code", "source": c.cell.source, "outputs": [dict(o) for o in c.test_outputs]}
        for c in cells
    ]


@pytest.fixture(scope="module")
def executed(request, tmp_path_factory):
    cells = nbval_run(request.session)
    if cells is not None:
        return {"cells": cells}, Path(os.environ["OUTPUT_DIR"]).parent
    out = tmp_path_factory.mktemp("notebook")
    env = {
        **os.environ,
        "SMOKE_TEST": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_AUTH_MODE": "token",
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
        lines = without_ray_start_retries(stream_lines(cell))
        total += len(lines)
        first = "".join(cell["source"]).splitlines()[0]
        assert len(lines) <= MAX_LINES_PER_CELL, (first, len(lines), lines[:40])
        leaked = [ln for ln in lines if PREVENTABLE.search(ln)]
        assert not leaked, (first, leaked)
        # Normal operation shows no stderr box: anything on stderr is an error or a warning, except
        # Ray Core's one line on Ray Data's actors (the notebook says why it needs no action).
        stderr = [
            line
            for o in cell.get("outputs", [])
            if o.get("name") == "stderr"
            for line in without_ray_start_retries("".join(o["text"]).splitlines())
            if not RAY_CORE_ACTOR_RESTARTS.search(line)
        ]
        assert not stderr, (first, stderr)
        assert not [o for o in cell.get("outputs", []) if o["output_type"] == "error"], first
    assert total < MAX_LINES_IN_ALL, total


def test_only_init_rays_retry_is_let_through():
    """The exemption above lets init_ray's retry through and nothing else, its source line included."""
    retry = (
        "/tmp/ipykernel_1/1.py:9: UserWarning: Ray's local start failed (The current node timed out during "
        "startup. This could happen because some of the raylet failed to startup or the GCS has become "
        "overloaded.); trying again (2)"
    )
    source = '  init_ray(PRESET, log_to_driver=False, logging_level="WARNING")'
    assert without_ray_start_retries([retry, source, "preset=smoke"]) == ["preset=smoke"]
    other = "/tmp/ipykernel_1/1.py:9: UserWarning: something else"
    assert without_ray_start_retries([other, source]) == [other, source]
    failed = "UserWarning: Ray's local start failed (connection refused); trying again (2)"
    assert without_ray_start_retries([failed]) == [failed]


def test_deterministic_outputs_are_as_written(executed):
    """The cells whose output doesn't depend on the machine or the preset show what they should."""
    notebook, _ = executed
    by_start = {
        "".join(c["source"]).splitlines()[0]: c for c in notebook["cells"] if c["cell_type"] == "code"
    }
    request = next(c for first, c in by_start.items() if first.startswith("from functools import partial"))
    assert SYSTEM_PROMPT in stream_lines(request)
    large = next(c for first, c in by_start.items() if first.startswith("large_vlm_config"))
    # nbval keeps a text as one string, a notebook file (papermill's run) as a list of lines
    texts = [o["data"]["text/plain"] for o in large["outputs"] if o["output_type"] == "execute_result"]
    shown = "".join("".join(t) if isinstance(t, list) else t for t in texts)
    written = {
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "max_model_len": 8192,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
    }
    shown = ast.literal_eval(shown)  # Ray Data LLM adds its own keys (task_type)
    assert {k: shown.get(k) for k in written} == written


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
