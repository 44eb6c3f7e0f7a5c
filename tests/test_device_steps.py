"""benchmarks/h200_x2.sh's engine variants: each must be JSON that the benchmark merges into the
GPU preset, or a device call (minutes of a 30-minute budget) fails at its first run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.presets import get_preset, merge_engine_kwargs

ROOT = Path(__file__).resolve().parents[1]


def variants() -> dict[str, str]:
    # The script's variable definitions only: everything above `declare -A VARIANT_ENV`, without
    # `set -u`/`source` and the steps (they need the device).
    text = (ROOT / "benchmarks" / "h200_x2.sh").read_text()
    start, end = text.index("SIZES1024="), text.index("declare -A VARIANT_ENV")
    listing = 'for k in "${!VARIANT[@]}"; do printf "%s\\t%s\\n" "$k" "${VARIANT[$k]}"; done'
    script = text[start:end] + "\n" + listing + "\n"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines())


def test_every_engine_variant_is_json_that_merges_into_the_gpu_preset():
    found = variants()
    assert {"preset", "seqs4096", "two2048", "graphs16k", "fp8"} <= set(found)
    preset = get_preset(smoke_test=False)
    for name, value in found.items():
        kwargs = json.loads(value)  # raises on a broken variant
        merged = merge_engine_kwargs(preset.engine_kwargs, kwargs)
        sizes = merged["compilation_config"].get("cudagraph_capture_sizes")
        if sizes is not None:
            assert sizes == sorted(set(sizes)), name
    sizes = json.loads(found["graphs16k"])["compilation_config"]["cudagraph_capture_sizes"]
    assert max(sizes) == preset.engine_kwargs["max_num_batched_tokens"]
    assert set(preset.engine_kwargs["compilation_config"]["cudagraph_capture_sizes"]) < set(sizes)


def test_profile_steps_watches_the_log_of_the_run_it_started(tmp_path):
    # The watch stops a run with no row out after FIRST_ROW_S: reading another run's log name
    # (pipeline-LABEL-0.log where a --runs fp8 run writes fp8-LABEL-0.log) it sees no row and stops
    # a healthy run, minutes of a device session lost.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vision import log_name  # benchmarks/ is no package

    script = ROOT / "benchmarks" / "device" / "profile_steps.sh"
    cases = {
        ("-n", "100"): "pipeline",
        ("--runs", "fp8", "-n", "26000", "--max-tokens", "48"): "fp8",
        ("--max-tokens", "48", "--runs=original"): "original",
        ("--runs", "fp8,pipeline"): "fp8",
    }
    for args, run in cases.items():
        out = subprocess.run(
            ["bash", str(script), "log", "lbl", *args],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
        ).stdout.strip()
        assert Path(out).name == log_name(run, "lbl", 0), args
        assert Path(out).parent.name == "logs", args
