"""The production job submitted to a running Ray cluster through the Jobs API, as the README says.

The test starts its own single-node cluster (`ray start --head`, CPU only, its own temp dir and
ports, token authentication on as Ray 2.60 turns it on where a token exists), submits the job
with `ray job submit --working-dir .`, checks rows in = rows out, and then stops only the
processes of its own cluster.
"""

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port, kill_all_processes_mentioning

from helpers.presets import OFFLINE_ENV

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cluster")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this environment's
        "RAY_TMPDIR": temp_dir,  # also marks every process of this cluster, for the clean-up
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "8", "--temp-dir", temp_dir]
    start += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    start += [str(a) for kv in ports.items() for a in kv]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", {**env, "GCS_ADDRESS": f"127.0.0.1:{ports['--port']}"}
    finally:
        kill_all_processes_mentioning(temp_dir)


def test_ray_job_submit_to_a_running_cluster_captions_every_image(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "captions"
    # The README's command, with the offline preset. The client sends the cluster's token
    # because RAY_AUTH_MODE=token and the token's path are set in its environment.
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    cmd += ["--", "python", "batch_inference_vision.py", "--smoke", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "succeeded" in proc.stdout, log
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24, log  # the 24 bundled images, each once
    assert table.column("error").null_count == 24, log


def test_a_notebook_on_the_cluster_connects_with_the_smoke_preset(cluster):
    # The notebook's own call, with RAY_ADDRESS set as on a cluster's notebook node: it must
    # connect (Ray refuses the smoke preset's num_cpus when connecting) and see the cluster.
    _, env = cluster
    code = (
        "import ray\n"
        "from helpers.presets import get_preset, init_ray\n"
        "started = init_ray(get_preset(True), log_to_driver=False, logging_level='WARNING')\n"
        "print('started a local cluster:', started, 'CPUs:', ray.cluster_resources()['CPU'])\n"
    )
    env = {**env, "RAY_ADDRESS": env["GCS_ADDRESS"], "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started a local cluster: False CPUs: 8.0" in proc.stdout
