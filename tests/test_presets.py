"""helpers.presets.init_ray: a local start that Ray's fixed start-up wait fails is made again."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Loaded by every Python process of the run through PYTHONPATH: the first dashboard agent that Ray
# starts sleeps past the raylet's fixed 15 s wait for its ports, as on a busy machine, so the real
# first start fails ("The current node timed out during startup").
SLOW_FIRST_AGENT = """
import os, sys, time
if any("dashboard/agent.py" in a for a in sys.argv):
    try:
        os.close(os.open(os.path.join(os.path.dirname(__file__), "slowed"), os.O_CREAT | os.O_EXCL))
        time.sleep(25)
    except FileExistsError:
        pass
"""

# In a fresh process (no Ray yet, no cluster to connect to), the real ray.init, counted.
SCRIPT = """
import json, warnings
import ray
from helpers.presets import get_preset, init_ray

real_init, calls = ray.init, []

def counted(**kwargs):
    calls.append(kwargs)
    return real_init(**kwargs)

ray.init = counted
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    local = init_ray(get_preset(True))
started = {"local": local, "calls": len(calls), "cpus": ray.cluster_resources().get("CPU"),
           "warned": [str(w.message)[:120] for w in caught if "trying again" in str(w.message)]}
ray.shutdown()
calls.clear()
try:
    init_ray(get_preset(True), no_such_setting=1)
    other = "no error"
except RuntimeError as e:
    other = f"{e} after {len(calls)} call(s)"
print("RESULT " + json.dumps({"started": started, "other": other}))
"""


def test_a_local_start_that_times_out_is_made_again_with_the_presets_settings(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_FIRST_AGENT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT}"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "slowed").exists()  # the first start did meet a slow agent
    result = json.loads(lines[-1].removeprefix("RESULT "))
    started = result["started"]
    # Up on the second start, locally, with the offline preset's 8 logical CPUs (a default cluster
    # on this machine would have its 2), and the user was told why it took longer.
    assert started["local"] is True and started["calls"] == 2 and started["cpus"] == 8
    assert len(started["warned"]) == 1 and "timed out during startup" in started["warned"][0]
    # Any other error is the caller's at once.
    assert result["other"] == "Unknown keyword argument(s): no_such_setting after 1 call(s)"
