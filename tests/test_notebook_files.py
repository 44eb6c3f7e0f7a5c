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
