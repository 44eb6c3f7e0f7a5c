"""Summary of one profile_steps.sh run folder (RUN/prof): GPU use, the busiest processes and
threads (top), and per profiled process py-spy's view of each busy thread.

    python3 pyspy_summary.py /tmp/prof/LABEL            # or the folder unpacked from LABEL.tgz

py-spy's raw format is one collapsed stack a line, root first ("thread (0x..): NAME;func
(file:line);...;leaf (file:line) COUNT"). It does not mark idle samples: a sample of the --idle
record counts as idle when its innermost frame is a blocking wait (IDLE_LEAVES). The --gil record
holds only the samples where the thread held the GIL: its share of the ticks is the GIL's use.
"""

from __future__ import annotations

import collections
import re
import statistics
import sys
from pathlib import Path

# Innermost frames that mean the thread waits (a C call below them blocks).
IDLE_LEAVES = (
    "wait (threading.py",
    "_wait_for_tstate_lock (threading.py",
    "select (selectors.py",
    "poll (zmq",
    "poll (selectors.py",
    "main_loop (ray",
    "sleep (",
    "get (queue.py",
    "_worker (concurrent/futures/thread.py",
    "run_loop (ray",
    "_recv_socket (",
    "recv_multipart (zmq",
    "recv (zmq",
    "_poll (",
    "_run_once (asyncio",
    "_poll_uss (",
    "run_forever (",
)
# Frames every stack of a thread passes through: left out of the inclusive lists.
WRAPPERS = (
    "Thread._bootstrap",
    "Thread.run ",
    "_worker (concurrent",
    "run_forever (",
    "_run_once (",
    "Handle._run (",
    "run_loop (",
    "<module> (",
    "main_loop (",
    "spawn_main (",
    "_main (multiprocessing",
    "BaseProcess._bootstrap",
    "BaseProcess.run",
    "Context.run",
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str, line: bool = False) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame[:120]
    path = m.group("file")
    for cut in ("site-packages/", "python3.12/", "/tmp/site/"):
        if cut in path:
            path = path.split(cut, 1)[1]
    return f"{m.group('func')} ({path}{':' + m.group('line') if line and m.group('line') else ''})"


def parse(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """thread -> [(frames root first, count)]"""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        k = next((i for i, f in enumerate(frames) if f.startswith("thread (")), None)
        key = frames[k] if k is not None else "?"
        threads[key].append((frames[k + 1 :] if k is not None else frames, int(count)))
    return threads


def samples_of(log: Path) -> int | None:
    m = re.search(r"Samples: (\d+)", log.read_text(errors="replace")) if log.exists() else None
    return int(m.group(1)) if m else None


def idle(frames: list[str]) -> bool:
    return not frames or any(frames[-1].startswith(p) or p in frames[-1] for p in IDLE_LEAVES)


def summarize_active(path: Path, ticks: int | None, busy_threads: int = 3, top: int = 10) -> list[str]:
    """The record without --idle: only the samples where the thread ran (py-spy asks the OS)."""
    threads = parse(path)
    base = ticks or 1000
    rows = sorted(((sum(c for _, c in s), n, s) for n, s in threads.items()), key=lambda r: -r[0])
    out = []
    for active, name, stacks in rows[:busy_threads]:
        out.append(f"  {name[:70]}: active in {active} of {base} ticks ({100 * active / base:.1f}%)")
        incl, leaf = collections.Counter(), collections.Counter()
        for frames, c in stacks:
            for f in {short(f) for f in frames if not f.startswith(WRAPPERS)}:
                incl[f] += c
            if frames:
                leaf[short(frames[-1], line=True)] += c
        out.append(
            "    inclusive: " + "; ".join(f"{f} {100 * c / base:.1f}%" for f, c in incl.most_common(top))
        )
        out.append("    self: " + "; ".join(f"{f} {100 * c / base:.1f}%" for f, c in leaf.most_common(top)))
    return out


def summarize_idle(path: Path) -> list[str]:
    """The --idle record: every thread's samples, with those whose innermost frame is a wait."""
    threads = parse(path)
    rows = []
    for name, stacks in threads.items():
        total = sum(c for _, c in stacks)
        waiting = sum(c for f, c in stacks if idle(f))
        rows.append(f"{name[:40]} {total - waiting}/{total}")
    head = f"  --idle record, samples not in a wait frame / all (threads: {len(rows)}): "
    return [head + "; ".join(rows[:6])]


def summarize_gil(path: Path, ticks: int | None) -> list[str]:
    threads = parse(path)
    per = sorted(((sum(c for _, c in s), n) for n, s in threads.items()), reverse=True)
    held = sum(c for c, _ in per)
    base = ticks or 1000
    lines = [
        f"  GIL held in {held} of {base} ticks ({100 * held / base:.1f}%): "
        + "; ".join(f"{n[:50]} {100 * c / base:.1f}%" for c, n in per[:4])
    ]
    return lines


def main(run: Path) -> None:
    d = run / "prof"
    if not d.exists():
        print(f"no profile in {run}")
        return
    at = (d / "at.txt").read_text().split("\n") if (d / "at.txt").exists() else []
    print("profile window:", " | ".join(x for x in at if x))
    util = []
    for line in (d / "gpu-util.csv").read_text().splitlines() if (d / "gpu-util.csv").exists() else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) > 1 and parts[1].endswith("%"):
            util.append(int(parts[1].rstrip(" %")))
    if util:
        print(
            f"GPU utilization.gpu: median {statistics.median(util)}% min {min(util)} max {max(util)} "
            f"({len(util)} samples at 0.5 s)"
        )
    sm = (
        [
            int(x.split()[1])
            for x in (d / "dmon.txt").read_text().splitlines()
            if x.strip() and not x.startswith("#") and x.split()[1].isdigit()
        ]
        if (d / "dmon.txt").exists()
        else []
    )
    if sm:
        print(
            f"dmon sm%: median {statistics.median(sm)} min {min(sm)} max {max(sm)} ({len(sm)} samples at 1 s)"
        )
    for name, n in (("top-procs.txt", 8), ("top-threads.txt", 12)):
        p = d / name
        if not p.exists():
            continue
        blocks = p.read_text(errors="replace").split("top - ")
        last = blocks[-1].splitlines() if len(blocks) > 1 else []
        cpu = [x for x in last if x.startswith("%Cpu")]
        body = [x for x in last if re.match(r"\s*\d+ ", x)][:n]
        print(f"{name} (last 5 s): {cpu[0] if cpu else ''}")
        for x in body:
            f = x.split()
            print(f"  pid {f[0]} cpu {f[8]}% {' '.join(f[11:])[:60]}")
    pids = (d / "pids.txt").read_text().splitlines() if (d / "pids.txt").exists() else []
    for rec in sorted(d.glob("rec-act-*.txt")):
        pid = rec.stem.rsplit("-", 1)[1]
        who = next((x for x in pids if x.strip().startswith(pid + " ")), pid)
        ticks = samples_of(d / f"rec-act-{pid}.log")
        print(f"pid {pid}: {who.strip()[:110]}  (ticks {ticks})")
        print("\n".join(summarize_active(rec, ticks)))
        g = d / f"rec-gil-{pid}.txt"
        if g.exists():
            print("\n".join(summarize_gil(g, samples_of(d / f"rec-gil-{pid}.log"))))
        i = d / f"rec-idle-{pid}.txt"
        if i.exists() and "--all" in sys.argv:
            print("\n".join(summarize_idle(i)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
