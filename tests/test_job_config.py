"""job.yaml, checked by Anyscale's own job config model and by the job's own argument parser."""

import shlex
from pathlib import Path

import pytest
import yaml
from anyscale.job.models import JobConfig

from batch_inference_vision import parse_args

ROOT = Path(__file__).resolve().parent.parent


def test_job_yaml_is_a_valid_anyscale_job_config():
    config = JobConfig.from_yaml(str(ROOT / "job.yaml"))  # raises on unknown or mistyped fields
    assert (ROOT / config.working_dir / "batch_inference_vision.py").exists()
    program, script, *args = shlex.split(config.entrypoint)
    assert (program, script) == ("python", "batch_inference_vision.py")
    parsed = parse_args(args)  # the job would accept its entrypoint's options
    assert parsed.output.startswith("/mnt/cluster_storage/") and parsed.limit == 10_000
    # The example's 48 GB GPUs hold the KV cache of 2,048 sequences, not the preset's 4,096.
    assert parsed.engine_kwargs == {"max_num_seqs": 2048}
    assert config.max_retries > 0  # a retry resumes, so retries are cheap


def test_the_schema_check_catches_a_mistake():
    data = yaml.safe_load((ROOT / "job.yaml").read_text())
    data["compute_config"]["worker_nodes"][0]["min_node"] = data["compute_config"]["worker_nodes"][0].pop(
        "min_nodes"
    )
    with pytest.raises(TypeError, match="min_node"):
        JobConfig.from_dict(data)
