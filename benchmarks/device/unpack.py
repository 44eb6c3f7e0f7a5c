"""Install files of the staged stream (device side): wheels into /tmp/site, the model folder into
/tmp/model.

usage: python3 unpack.py KIT_DIR (NAME | torch | rest)...     (NAME as in KIT_DIR/manifest.txt;
                                                             torch: torch + NCCL; rest: the others)

The pieces staged so far in /tmp/stage (part_00, part_01, ...) are one stream of files, each at
the offset manifest.txt gives with its sha256, so a file can be installed as soon as the pieces
that hold it are there (torch and NCCL before the rest travels). A wheel is installed as
`pip install --no-deps --target` would, without pip: `*.data/purelib` and `*.data/platlib` to the
top, scripts and headers left out, executable bits kept (triton's ptxas). Wheels unpack in
parallel.
"""

import glob
import hashlib
import io
import os
import re
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor

SITE, MODEL = "/tmp/site", "/tmp/model"
DATA = re.compile(r"^[^/]+\.data/(purelib|platlib)/")
SKIP = re.compile(r"^[^/]+\.data/(scripts|headers|data)/")


def read(parts: list[str], offset: int, size: int) -> bytes:
    out, pos = bytearray(), 0
    for path in parts:
        n = os.path.getsize(path)
        if pos + n > offset and pos < offset + size:
            with open(path, "rb") as f:
                f.seek(max(0, offset - pos))
                out += f.read(min(n, offset + size - pos) - max(0, offset - pos))
        pos += n
    return bytes(out)


def install(job: tuple[str, int, int, str]) -> str:
    name, offset, size, sha = job
    t = time.time()
    data = read(sorted(glob.glob("/tmp/stage/part_*")), offset, size)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        return f"UNPACK_BAD {name}: {len(data)} of {size} bytes, or its sha256 differs: stage its pieces"
    if name.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                target = DATA.sub("", info.filename)
                if info.is_dir() or SKIP.match(target):
                    continue
                path = os.path.join(SITE, target)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(z.read(info))
                if (info.external_attr >> 16) & 0o111:
                    os.chmod(path, 0o755)
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(MODEL, filter="fully_trusted")
    return f"UNPACK_OK {name} ({size / 1e6:.0f} MB) in {time.time() - t:.1f} s"


def main(kit: str, names: list[str]) -> int:
    manifest = [line.split() for line in open(os.path.join(kit, "manifest.txt"))]
    first = ("torch-", "nvidia_nccl_cu13-")
    wanted = [
        (name, int(offset), int(size), sha)
        for name, offset, size, sha in manifest
        if name in names
        or ("torch" in names and name.startswith(first))
        or ("rest" in names and not name.startswith(first))
    ]
    t = time.time()
    os.makedirs(SITE, exist_ok=True)
    with ProcessPoolExecutor(8) as pool:
        results = list(pool.map(install, sorted(wanted, key=lambda job: -job[2])))
    large = [r for r in results if "MB) in" in r and int(r.split("(")[1].split()[0]) > 20]
    print("\n".join([r for r in results if "BAD" in r] + large))
    print(f"unpacked {len(results)} files in {time.time() - t:.1f} s")
    return 2 if any("BAD" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
