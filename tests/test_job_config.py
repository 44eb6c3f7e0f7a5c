"""job.yaml, checked by Anyscale's own job config model and by the job's own argument parser."""

import shlex
from pathlib import Path

import pytest
import yaml
from anyscale.job.models import JobConfig
from conftest import GIB, H100_KV, gpus_reporting

from batch_inference_vision import job_preset, parse_args
from helpers.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent


def test_job_yaml_is_a_valid_anyscale_job_config():
    config = JobConfig.from_yaml(str(ROOT / "job.yaml"))  # raises on unknown or mistyped fields
    assert (ROOT / config.working_dir / "batch_inference_vision.py").exists()
    program, script, *args = shlex.split(config.entrypoint)
    assert (program, script) == ("python", "batch_inference_vision.py")
    parsed = parse_args(args)  # the job would accept its entrypoint's options
    assert parsed.output.startswith("/mnt/cluster_storage/") and parsed.limit == 10_000
    # The example's 48 GB GPUs hold one engine replica each, not the preset's three with their fixed
    # KV caches: vLLM sizes the one replica's cache from the GPU's memory.
    assert parsed.replicas_per_gpu == 1 and parsed.engine_kwargs == {}
    preset = get_preset(smoke_test=False).sharing_gpus(parsed.replicas_per_gpu)
    assert preset.placement_group_config["bundle_per_worker"]["GPU"] == 1
    assert "kv_cache_memory_bytes" not in preset.engine_kwargs
    assert config.max_retries > 0  # a retry resumes, so retries are cheap


def test_the_schema_check_catches_a_mistake():
    data = yaml.safe_load((ROOT / "job.yaml").read_text())
    data["compute_config"]["worker_nodes"][0]["min_node"] = data["compute_config"]["worker_nodes"][0].pop(
        "min_nodes"
    )
    with pytest.raises(TypeError, match="min_node"):
        JobConfig.from_dict(data)


# The job picks engine replicas per GPU as the notebook does (tests/test_notebook_files.py): the
# preset's three only where the driver's machine has GPUs of 120 GiB, two from 75 GiB, unless
# --replicas-per-gpu says.
@pytest.mark.parametrize(
    ("gpus", "options", "replicas", "kv_cache"),
    [
        ("143771, Disabled", [], 3, 56 * GIB // 3),
        ("112640, Disabled", [], 2, 56 * GIB // 3 * 3 // 2),
        # two replicas split what an 80 GB GPU has left
        ("81559, Disabled", [], 2, H100_KV),
        ("46068, Disabled", [], 1, None),
        (None, [], 1, None),  # a driver on a CPU head node
        (None, ["--replicas-per-gpu", "2"], 2, 56 * GIB // 3 * 3 // 2),
        # the workers' GPUs, which a CPU head node can't see
        (None, ["--gpu-memory-gib", "80"], 2, 22 * GIB),
        (None, ["--gpu-memory-gib", "141"], 3, 56 * GIB // 3),
        (None, ["--gpu-memory-gib", "48"], 1, None),
        ("143771, Disabled", ["--replicas-per-gpu", "1"], 1, None),
        ("143771, Disabled", ["--smoke"], 1, None),
    ],
    ids=[
        "H200",
        "110GiB",
        "H100",
        "48GB",
        "no-gpu",
        "no-gpu-told-2",
        "told-80GiB",
        "told-141GiB",
        "told-48GiB",
        "H200-told-1",
        "offline",
    ],
)
def test_the_job_runs_as_many_engines_per_gpu_as_the_gpu_holds(
    tmp_path, monkeypatch, gpus, options, replicas, kv_cache
):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, gpus))
    monkeypatch.delenv("GPU_MEMORY_GIB", raising=False)
    preset = job_preset(parse_args(["--output", str(tmp_path / "out"), *options]))
    assert preset.replicas_per_gpu == replicas
    # One replica per GPU sizes its KV cache from the GPU; replicas that share one get a fixed one.
    assert preset.engine_kwargs.get("kv_cache_memory_bytes") == kv_cache


def test_the_job_says_so_when_told_to_share_a_gpu_it_does_not_use(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, "143771, Disabled"))
    with pytest.raises(ValueError, match="runs on CPU"):
        job_preset(parse_args(["--output", str(tmp_path / "out"), "--smoke", "--replicas-per-gpu", "2"]))
