import io
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from glob import glob
from pathlib import Path

import pytest
from PIL import Image

from helpers.presets import OFFLINE_ENV

# The files whose tests use the session's running cluster (the `cluster` fixture): one worker
# runs them all, so it starts once.
SHARE_THE_CLUSTER = ("tests/test_bench.py", "tests/test_job.py", "tests/test_jobs_api.py")
# The long scopes, which the workers take first in this order (a fresh clone's make test: the
# cluster's files about 400 s, the fault chain 400-460, the notebook 100-150, test_pipeline 80,
# test_data 40); the short ones follow in xdist's order. A worker whose scope has 2 tests or fewer
# left takes the next at once, so the fault chain's worker runs the notebook after it, outside the
# cluster's worker (nice 5: the notebook's local Ray must come up within Ray's fixed waits, and
# init_ray starts it again when it doesn't). Left to
# xdist, which orders by the number of tests, the one-test fault chain came last and ran alone.
LONGEST_FIRST = (
    "cluster",
    "tests/test_faults.py",
    "notebook",
    "tests/test_pipeline.py",
    "tests/test_data.py",
)
BIN = Path(sys.executable).parent


def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`make test` runs two workers, ci/test.sh), a file's tests run in one
    worker, so a module's fixtures (a job run) are made once; the files that share the session's
    cluster run in one worker; and the notebook's cells (nbval runs them in one kernel) run in one
    worker with tests/test_notebook_run.py, which checks that run's outputs, in collection order.
    The workers take the LONGEST_FIRST scopes first."""
    from collections import OrderedDict

    from xdist.scheduler import LoadScopeScheduling

    def rank(scope: str) -> int:
        return LONGEST_FIRST.index(scope) if scope in LONGEST_FIRST else len(LONGEST_FIRST)

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]  # a cell of nbval's is "<notebook>.ipynb::Cell N"
            if path.endswith(".ipynb") or path == "tests/test_notebook_run.py":
                return "notebook"
            return "cluster" if path in SHARE_THE_CLUSTER else path

        def _assign_work_unit(self, node) -> None:
            self.workqueue = OrderedDict(sorted(self.workqueue.items(), key=lambda unit: rank(unit[0])))
            super()._assign_work_unit(node)

    return ByFile(config, log)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with a few logical CPUs, so reads and maps can run side by side on 2 cores:
    one for the session (each pytest-xdist worker has its own)."""
    import ray

    from helpers.presets import start_ray

    # Made again where the other worker's load makes it miss Ray's fixed start-up wait.
    start_ray(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running single-node Ray cluster, as on a real cluster's head node: (its dashboard's
    address, an environment for its clients: RAY_ADDRESS is its GCS, so a driver connects).
    Started once per pytest worker (`ray start --head`, CPU only, its own temp dir and ports, token
    authentication on as Ray 2.60 turns it on where a token exists); the tests that run a Ray Job,
    the job as a driver of the cluster, or the benchmark share it. Only its own processes stop."""
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
    # Every port given: the raylet then doesn't wait for its agents to write theirs (it gives up
    # after 15 s, too soon for a Python agent starting on 2 busy cores).
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    start = [str(BIN / "ray"), "start", "--head", "--num-cpus", "8", "--temp-dir", temp_dir]
    start += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    start += [str(a) for kv in ports.items() for a in kv]
    # The worker that runs the cluster's files yields the CPU to the other (its Ray starts are
    # local ones, which must come up within Ray's fixed start-up waits): nice 5, inherited by the
    # cluster, the jobs and the benchmark.
    os.nice(5)
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", {**env, "RAY_ADDRESS": f"127.0.0.1:{ports['--port']}"}
    finally:
        kill_all_processes_mentioning(temp_dir)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's signature."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


WHITE = (255, 255, 255)


def near(colour: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Each channel within 24 of the expected: what JPEG, WebP and the web palette keep of a colour."""
    return all(abs(a - b) <= 24 for a, b in zip(colour, expected, strict=True))


def bad_and_odd_images() -> dict[str, bytes]:
    """name -> bytes: every kind of input the pipeline must survive (valid ones first)."""
    rgb = Image.new("RGB", (64, 48), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    # Frames that differ (red, then blue), so decoding the last frame instead is caught.
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    palette_alpha = Image.new("P", (20, 20), 0)
    palette_alpha.putpalette([0, 0, 0] * 256)
    good = {
        "rgb.jpg": encode(rgb, "JPEG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        # Mid-grey: 32768 rescales to 127; a plain convert("RGB") would clip it to 255.
        "gray16.png": encode(Image.new("I;16", (32, 32), 32768), "PNG"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "palette_transparent.png": encode(palette_alpha, "PNG", transparency=0),
        "la.png": encode(Image.new("LA", (32, 32), (0, 0)), "PNG"),
        "rgba.png": encode(Image.new("RGBA", (32, 32), (0, 0, 0, 0)), "PNG"),
        "rotated.jpg": encode(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
        "tiny_1x1.png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "webp.webp": encode(rgb, "WEBP"),
        "bitmap.bmp": encode(rgb, "BMP"),
    }
    jpeg = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    bad = {
        "empty.jpg": b"",
        "text_as_image.jpg": b"this is a text file, not a JPEG\n" * 4,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": png_claiming_size(100_000, 100_000),
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # no plugin accepts it
        # A BMP signature with a header Pillow's BMP reader rejects (OSError) while opening.
        "bad_header.bmp": b"BM" + bytes(60),
    }
    return {"good": good, "bad": bad}


# What write_mixed_folder leaves for the readers to skip on purpose, by reason (helpers.data).
MIXED_FOLDER_SKIPS = {
    "hidden (name starts with '.')": 2,  # .DS_Store and .thumbnails/rgb.jpg
    "broken symbolic link": 1,
    "not a regular file (pipe, socket or device)": 1,
}


def write_mixed_folder(root) -> dict[str, bytes]:
    """A folder tree of good, odd and broken images plus a text file, and what a real photo folder
    holds: a camera's `_DSC0001.JPG` (Ray's own listing skips names starting with `_`), names with
    spaces and non-ASCII letters, a deep tree, a link to a file. Returns relative path -> bytes of
    every file that must become a row; the rest is in MIXED_FOLDER_SKIPS."""
    images = bad_and_odd_images()
    files = {f"{kind}/{name}": data for kind, items in images.items() for name, data in items.items()}
    files["notes/README.txt"] = b"not an image"
    files["_DSC0001.JPG"] = images["good"]["rgb.jpg"]
    files["photos 2026/Zürich café.png"] = images["good"]["rgba.png"]
    files["/".join(["nested"] * 40) + "/deep.webp"] = images["good"]["webp.webp"]
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "link.jpg").symlink_to(root / "good" / "rgb.jpg")
    files["link.jpg"] = images["good"]["rgb.jpg"]
    (root / ".DS_Store").write_bytes(b"Bud1")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "rgb.jpg").write_bytes(images["good"]["rgb.jpg"])
    (root / "moved.jpg").symlink_to(root / "gone.jpg")
    os.mkfifo(root / "notes" / "pipe")
    return files


def processes_mentioning(marker: str, title: str = "") -> list[int]:
    """The processes with marker in their environment (Ray workers rewrite their command line,
    but inherit the environment) and, if given, title in their command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and marker.encode() in (entry / "environ").read_bytes()
                and title.encode() in (entry / "cmdline").read_bytes()
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_all_processes_mentioning(marker: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        pids = processes_mentioning(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.time() < deadline, f"processes of the killed job survive: {pids}"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_sample_ids(n: int) -> list[str]:
    """The first n ids of the bundled shards, in the shards' own order."""
    from helpers.data import SAMPLE_SHARDS

    ids = []
    for shard in sorted(glob(f"{SAMPLE_SHARDS}/*.tar")):
        with tarfile.open(shard) as tar:
            ids += list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    return ids[:n]


GIB = 2**30
# Each of two engine replicas' KV cache on an 80 GB H100 (81559 MiB), in bytes: 21.84 GiB, what is left
# of 90% of it after 14 GiB each (helpers/presets.py, Preset.sharing_gpus). Two of 22 GiB ran there
# (benchmarks/README.md).
H100_KV = 23_451_978_956


def gpus_reporting(folder, gpus: str | None) -> str:
    """A PATH holding only a stand-in `nvidia-smi` that answers `gpus` (a line per GPU, as
    `--query-gpu=memory.total,mig.mode.current --format=csv,noheader,nounits` does), or none at
    all (None): this machine has no GPU."""
    if gpus is not None:
        script = Path(folder) / "nvidia-smi"
        script.write_text(f"#!/bin/sh\nprintf '{gpus}\\n'\n")
        script.chmod(0o755)
    return str(folder)
