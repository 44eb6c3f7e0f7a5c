"""The notebook is committed clean, and README.md is its exact nbconvert render."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def fake_nvidia_smi(folder: Path, mib: str | None) -> str:
    """A PATH holding only a stand-in `nvidia-smi` that reports GPUs of `mib` MiB (one per line),
    or none at all: this machine has no GPU."""
    if mib is not None:
        script = folder / "nvidia-smi"
        script.write_text(f"#!/bin/sh\nprintf '{mib}\\n'\n")
        script.chmod(0o755)
    return str(folder)


# The GPU preset's two engines per GPU peaked at 80-84 GiB together on an H200: on an 80 GB GPU its
# defaults would fail at the engines' start. The parameters cell runs two per GPU only where this
# machine's GPUs hold them, and one on a smaller GPU or where it sees no GPU (a CPU head node).
@pytest.mark.parametrize(
    ("mib", "replicas"),
    [("143771", 2), ("81559", 1), ("143771\n81559", 1), ("", 1), (None, 1)],
    ids=["H200", "H100", "mixed", "no-answer", "no-nvidia-smi"],
)
def test_the_parameters_cell_runs_two_engines_per_gpu_only_where_the_gpu_holds_them(
    tmp_path, monkeypatch, mib, replicas
):
    from helpers.presets import get_preset

    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, mib))
    monkeypatch.setenv("SMOKE_TEST", "0")
    monkeypatch.delenv("REPLICAS_PER_GPU", raising=False)
    monkeypatch.delenv("CONCURRENCY", raising=False)
    cell = next(c for c in cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    scope: dict = {}
    exec("".join(cell["source"]), scope)
    preset = scope["PRESET"]
    assert (scope["REPLICAS_PER_GPU"], preset.replicas_per_gpu) == (replicas, replicas)
    # One engine per GPU sizes its KV cache from the GPU; the two share a fixed one.
    assert ("kv_cache_memory_bytes" in preset.engine_kwargs) == (replicas == 2)
    assert scope["CONCURRENCY"] == get_preset(smoke_test=False).concurrency // 2 * replicas
    # The offline preset runs on CPU whatever the machine holds.
    assert get_preset(smoke_test=True).replicas_per_gpu_for(scope["GPU_BYTES"]) == 1


def test_replicas_per_gpu_set_by_hand_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, "143771"))
    monkeypatch.setenv("SMOKE_TEST", "0")
    monkeypatch.setenv("REPLICAS_PER_GPU", "1")
    cell = next(c for c in cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    scope: dict = {}
    exec("".join(cell["source"]), scope)
    assert scope["PRESET"].replicas_per_gpu == 1
