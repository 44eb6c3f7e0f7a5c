"""helpers.presets.init_ray: a local start that Ray's fixed start-up wait fails is made again."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# In a fresh process (no Ray yet, no cluster to connect to): the real ray.init, made to fail first
# as it does when a busy machine's raylet misses its agents' ports, then to fail otherwise.
SCRIPT = """
import json, warnings
import ray
from helpers.presets import get_preset, init_ray

real_init, calls = ray.init, []

def failing_once(**kwargs):
    calls.append(kwargs)
    if len(calls) == 1:
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the raylet failed to startup or the GCS has become overloaded.")
    return real_init(**kwargs)

ray.init = failing_once
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    local = init_ray(get_preset(True))
started = {"local": local, "calls": len(calls), "cpus": ray.cluster_resources().get("CPU"),
           "warned": [str(w.message)[:80] for w in caught if "trying again" in str(w.message)]}
ray.shutdown()

def other_error(**kwargs):
    calls.append(kwargs)
    raise ValueError("not a start-up timeout")

ray.init, calls = other_error, []
try:
    init_ray(get_preset(True))
    other = "no error"
except ValueError as e:
    other = f"{e} after {len(calls)} call(s)"
print("RESULT " + json.dumps({"started": started, "other": other}))
"""


def test_a_local_start_that_times_out_is_made_again_with_the_presets_settings():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    started = result["started"]
    # Started on the second call, locally, with the offline preset's 8 logical CPUs (a default
    # cluster on this machine would have its 2), and the user was told.
    assert started["local"] is True and started["calls"] == 2 and started["cpus"] == 8
    assert len(started["warned"]) == 1
    # Any other error is the caller's at once.
    assert result["other"] == "not a start-up timeout after 1 call(s)"
