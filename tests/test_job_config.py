"""job.yaml, checked by Anyscale's own job config model and by the job's own argument parser."""

import shlex
from pathlib import Path

import pytest
import yaml
from anyscale.job.models import JobConfig

from batch_inference_vision import parse_args
from helpers.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent


def test_job_yaml_is_a_valid_anyscale_job_config():
    config = JobConfig.from_yaml(str(ROOT / "job.yaml"))  # raises on unknown or mistyped fields
    assert (ROOT / config.working_dir / "batch_inference_vision.py").exists()
    program, script, *args = shlex.split(config.entrypoint)
    assert (program, script) == ("python", "batch_inference_vision.py")
    parsed = parse_args(args)  # the job would accept its entrypoint's options
    assert parsed.output.startswith("/mnt/cluster_storage/") and parsed.limit == 10_000
    # The example's 48 GB GPUs hold one engine replica each, not the preset's two with their fixed
    # 28 GiB KV caches: vLLM sizes the one replica's cache from the GPU's memory.
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
