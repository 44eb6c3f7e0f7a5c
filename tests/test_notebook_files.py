"""The notebook is committed clean, and README.md is its exact nbconvert render."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GIB, H100_KV, gpus_reporting

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "llm_batch_inference_vision.ipynb"
# Every way a cell can read the environment or install packages, not just the usual spelling.
READS_ENV = re.compile(r"\b(?:os\.environ|os\.getenv|getenv\(|environ\b)|^\s*%env\b", re.M)
INSTALLS = re.compile(r"\b(?:pip3?|uv\s+pip|conda|mamba)\s+install\b|^\s*[%!]\s*pip3?\b", re.M)


def cells():
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_notebook_is_committed_without_outputs():
    dirty = [
        i
        for i, c in enumerate(cells())
        if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])
    ]
    assert not dirty, f"cells {dirty} carry outputs: clear them (Jupyter: Edit > Clear All Outputs)"


def test_one_parameters_cell_reads_the_environment():
    code = [c for c in cells() if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert "SMOKE_TEST" in "".join(tagged[0]["source"])
    elsewhere = [
        i for i, c in enumerate(code) if c is not tagged[0] and READS_ENV.search("".join(c["source"]))
    ]
    assert not elsewhere, "only the parameters cell may read environment variables"


def test_no_pip_install_on_the_executable_path():
    installs = [
        i for i, c in enumerate(cells()) if c["cell_type"] == "code" and INSTALLS.search("".join(c["source"]))
    ]
    assert not installs, f"cells {installs} install packages"


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('x = os.getenv("X")', READS_ENV),
        ('from os import environ; environ["X"]', READS_ENV),
        ("%env X=1", READS_ENV),
        ("!pip3 install vllm", INSTALLS),
        ("%pip install -q ray", INSTALLS),
        ("!python -m pip install ray", INSTALLS),
        ("!uv pip install ray", INSTALLS),
    ],
)
def test_the_scans_catch_every_spelling(line, pattern):
    assert pattern.search(line)


def test_readme_equals_a_fresh_render(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "markdown",
            str(NOTEBOOK),
            "--output",
            "README",
            "--output-dir",
            str(tmp_path),
            "--log-level",
            "WARN",
        ],
        check=True,
    )
    fresh = (tmp_path / "README.md").read_text()
    assert (ROOT / "README.md").read_text() == fresh, "README.md is stale: run `make readme` and commit"


# The GPU preset's three engines per GPU peaked at 95-96 GiB together on an H200: on an 80 GB GPU its
# defaults would fail at the engines' start. The parameters cell runs three per GPU only where this
# machine's GPUs hold them (120 GiB), two from 75 GiB, and one on a smaller GPU, a MIG slice, or where
# it sees no GPU (a CPU head node). On an 80 GB GPU the two split a smaller KV cache (two of 28 GiB
# would not fit). nvidia-smi is a stand-in (conftest.gpus_reporting): this machine has
# no GPU.
@pytest.mark.parametrize(
    ("smoke", "gpus", "replicas", "kv_cache"),
    [
        ("0", "143771, Disabled", 3, 56 * GIB // 3),
        ("0", "81559, Disabled", 2, H100_KV),
        ("0", "143771, [N/A]", 3, 56 * GIB // 3),
        ("0", "97871, Disabled", 2, 28 * GIB),
        ("0", "112640, Disabled", 2, 28 * GIB),
        ("0", "143771, Disabled\n112640, Disabled", 2, 28 * GIB),
        ("0", "143771, Disabled\n81559, Disabled", 2, H100_KV),
        ("0", "46068, Disabled", 1, None),
        ("0", "143771, Enabled", 1, None),
        ("0", "143771, Disabled\n[N/A], [N/A]", 1, None),
        ("0", "", 1, None),
        ("0", None, 1, None),
        ("1", "143771, Disabled", 1, None),
    ],
    ids=[
        "H200",
        "H100",
        "no-mig-support",
        "96GB",
        "110GiB",
        "mixed-110GiB",
        "mixed",
        "48GB",
        "MIG",
        "unknown",
        "no-answer",
        "no-nvidia-smi",
        "offline",
    ],
)
def test_the_parameters_cell_runs_as_many_engines_per_gpu_as_the_gpu_holds(
    tmp_path, monkeypatch, smoke, gpus, replicas, kv_cache
):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, gpus))
    monkeypatch.setenv("SMOKE_TEST", smoke)
    monkeypatch.delenv("REPLICAS_PER_GPU", raising=False)
    monkeypatch.delenv("CONCURRENCY", raising=False)
    monkeypatch.delenv("GPU_MEMORY_GIB", raising=False)
    scope = run_parameters_cell()
    preset = scope["PRESET"]
    assert (scope["REPLICAS_PER_GPU"], preset.replicas_per_gpu) == (replicas, replicas)
    # One engine per GPU sizes its KV cache from the GPU; engines that share one get a fixed one.
    kv = preset.engine_kwargs.get("kv_cache_memory_bytes")
    assert kv == (None if kv_cache is None else pytest.approx(kv_cache, abs=2))  # split by integer division
    if smoke == "0":  # the same GPUs either way: the first run on one
        assert scope["CONCURRENCY"] == replicas


# A kernel on a CPU head node sees no GPU: GPU_MEMORY_GIB says what the workers have, and the cell
# picks the replicas and KV caches for it as on such a GPU. A mistyped value is refused, not read as
# no GPU.
@pytest.mark.parametrize(
    ("gib", "replicas", "kv_cache"), [("80", 2, 22 * GIB), ("141", 3, 56 * GIB // 3), ("48", 1, None)]
)
def test_gpu_memory_gib_stands_for_the_gpus_a_head_node_cant_see(
    tmp_path, monkeypatch, gib, replicas, kv_cache
):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, None))
    monkeypatch.setenv("SMOKE_TEST", "0")
    monkeypatch.delenv("REPLICAS_PER_GPU", raising=False)
    monkeypatch.setenv("GPU_MEMORY_GIB", gib)
    preset = run_parameters_cell()["PRESET"]
    assert preset.replicas_per_gpu == replicas
    assert preset.engine_kwargs.get("kv_cache_memory_bytes") == kv_cache
    monkeypatch.setenv("GPU_MEMORY_GIB", "80GB")
    with pytest.raises(ValueError, match="GPU_MEMORY_GIB"):
        run_parameters_cell()


def test_replicas_per_gpu_set_by_hand_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, "143771, Disabled"))
    monkeypatch.setenv("SMOKE_TEST", "0")
    monkeypatch.setenv("REPLICAS_PER_GPU", "1")
    assert run_parameters_cell()["PRESET"].replicas_per_gpu == 1


def run_parameters_cell() -> dict:
    cell = next(c for c in cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    scope: dict = {}
    exec("".join(cell["source"]), scope)
    return scope


DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")


def test_the_notebook_stays_a_tutorial_and_the_lab_report_stays_in_benchmarks():
    """The notebook teaches; benchmarks/README.md reports (measurements, history, what was tried)."""
    markdown = ["".join(c["source"]) for c in cells() if c["cell_type"] == "markdown"]
    assert sum(map(len, markdown)) <= 18_000, "the notebook's prose grew: move detail to benchmarks/README.md"
    assert len(markdown[0]) <= 2_000
    assert len((ROOT / "benchmarks" / "README.md").read_text()) >= 3_000
    assert len(DATE.findall(NOTEBOOK.read_text())) <= 1, "one date in the notebook: that of the figures"
    code = [*ROOT.joinpath("helpers").glob("*.py"), ROOT / "batch_inference_vision.py"]
    dated = [p.name for p in code if DATE.search(p.read_text())]
    assert not dated, f"code says the present, without dates: {dated}"
    long = [p.name for p in ROOT.joinpath("benchmarks").glob("*.sh") if len(p.read_text().splitlines()) > 300]
    assert not long, long
    assert len(json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())) <= 40
    assert "--nbval-lax" in (ROOT / "ci" / "test.sh").read_text()
    assert re.search(r"^nbval==", (ROOT / "requirements-dev.txt").read_text(), re.M)
