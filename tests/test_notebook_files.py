"""The notebook is committed clean, and README.md is its exact nbconvert render."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "llm_batch_inference_vision.ipynb"


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
    elsewhere = [c for c in code if c is not tagged[0] and "os.environ" in "".join(c["source"])]
    assert not elsewhere, "only the parameters cell may read environment variables"


def test_no_pip_install_on_the_executable_path():
    assert not any("pip install" in "".join(c["source"]) for c in cells() if c["cell_type"] == "code")


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
