"""Throughput of the captioning pipeline beside the raw engine, measured in one run.

    python benchmarks/bench_vision.py --model /tmp/model/qwen25vl3b --dummy -n 2048 --out results.jsonl
    python benchmarks/bench_vision.py --smoke -n 16                       # CPU, tiny model

Runs, each in its own process so each starts a fresh engine and frees its memory:
  engine    vLLM `LLM.chat` alone, with the GPU preset's engine settings, those of one of its
            replicas per GPU, on a GPU of its own (it prepares every
            image before it generates: the offline API as written)
  engine_async  vLLM's AsyncLLM alone, the same settings, fed the way Ray Data LLM feeds it
            (the same number of requests in flight, each returned once finished): what the
            engine can do with a perfect feeder, the fair yardstick for the pipeline
  pipeline  the project's pipeline (helpers, GPU preset) through Ray Data LLM, as the job runs it
  fp8       the same with quantization="fp8"
  original  the original tutorial's settings: batch 16, concurrency 1, engine defaults

The workload is fixed so figures compare across runs: 225x225 images (64 image tokens), the
tutorial's prompt, temperature 0.3, exactly --max-tokens output tokens per image
(ignore_eos=True; every request is checked). With --dummy the weights are random
(load_format="dummy"): the compute is real, the captions are meaningless.
Two rates over a run's output, besides end to end:
  steady_images_per_s     rows out per second from the first output to the last, first wave
                          included: the requests admitted while the engines started come out
                          together right after the first output, so this overstates.
  sustained_images_per_s  rows out per second after that first wave has come out and before
                          the last (as large: the rows running once the input has run out come
                          out together, several times faster; see sustained_rate), over
                          `sustained_window_s` seconds; where the engines' KV caches filled, the
                          waves they ran (kv_bound_first_wave). None where a run is too short to
                          have such a window: choose N above two waves and 60 s of rows (the GPU
                          preset on an H200 at 48 tokens: 40,000).
  sustained_to_end_images_per_s  the same window run on to the last row, drain included.
  n_for_window            where the window is under 60 s or missing: the N that would hold 60 s.
Prints one JSON line per run and appends them to --out. Each run's log is written as it comes,
each line prefixed with its arrival time; each record gets `startup_breakdown` (when each start-up
phase ended, seconds from t0, from Ray's and vLLM's own log lines: see STARTUP_MARKS),
`startup_vllm_reported` (vLLM's own durations) and `engine_stats` (vLLM's Running/Waiting counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.cli import positive  # noqa: E402  (after ROOT joins sys.path)

RUNS = ("engine", "engine_async", "pipeline", "fp8", "original")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, toy size")
    p.add_argument("--model", help="model folder or id (default: the preset's)")
    p.add_argument("--dummy", action="store_true", help='load_format="dummy": random weights')
    p.add_argument("-n", "--num-images", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    p.add_argument(
        "--engine-kwargs", type=json.loads, default={}, help="JSON merged into the preset's (dicts by key)"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--max-concurrent-batches", type=int)
    p.add_argument(
        "--max-pending-requests",
        type=positive,
        # Ray documents <= 0 as "no limit", but Ray 2.58.1 and 2.60.0 then fail in the engine
        # actor (vllm_engine_stage.py calls asyncio.NullContext, which doesn't exist).
        help="requests an engine holds at once, running and queued (default: 1.1 x max_num_seqs)",
    )
    p.add_argument(
        "--placement-group-config",
        type=json.loads,
        help='JSON, e.g. {"bundle_per_worker": {"GPU": 0.5, "CPU": 1}}: two engine replicas per GPU '
        "(without the memory settings that go with it: --replicas-per-gpu)",
    )
    p.add_argument(
        "--replicas-per-gpu",
        type=positive,
        help="Preset.sharing_gpus: engine replicas per GPU with their memory settings (1: vLLM sizes "
        "the KV cache; default: as many as this GPU holds, as the notebook and the job pick: 3 on an "
        "H200, 2 on an 80 GB H100)",
    )
    p.add_argument(
        "--separate-tokenizer-stages",
        action="store_true",
        help="tokenize and detokenize in Ray Data LLM's own stages, the engine not detokenizing (the GPU "
        "preset's choice; on --smoke it runs the GPU preset's output path with the tiny model)",
    )
    p.add_argument(
        "--prepared-images",
        action="store_true",
        help="Preset.preparing_images: images resized to the patch grid (224) and named by a hash of "
        "their pixels in the CPU stage, so vLLM's processor neither resizes nor hashes them",
    )
    p.add_argument(
        "--cumulative",
        action="store_true",
        help="the engine's default output (an update per token, engine-side detokenize), for comparison",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the engine, added to the preset's env_vars; repeatable",
    )
    p.add_argument("--label", default="", help="a name for this configuration in the JSON lines")
    p.add_argument("--repeat", type=int, default=1, help="run each configuration this many times")
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--workdir", default="/tmp/bench_vision")
    p.add_argument("--logdir", help="each run's full log goes here (default: WORKDIR/logs)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    return p.parse_args(argv)


def log_name(run: str, label: str, attempt: int) -> str:
    """A run's log file in --logdir: the device scripts read its PROGRESS lines by this name."""
    return f"{run}{'-' + label if label else ''}-{attempt}.log"


INDEX_BITS = 24  # make_shards' images are distinct up to 2**24 of them


def make_shards(folder: Path, n: int, per_shard: int = 256, first: int = 0) -> str:
    """n distinct 225x225 JPEGs in WebDataset shards, the job's input format: images first ...
    first + n - 1 of one sequence, so runs given disjoint ranges never share an image.

    Distinct matters: a repeated image can hit vLLM's processor cache and, with prefix caching,
    its KV cache. Colour and square alone repeat every 19,200 images (periods 256 and 150), so
    the image's index is also drawn in its top edge, one 8x8 block per bit, black or white."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.tar"):
        old.unlink()
    for start in range(first, first + n, per_shard):
        with tarfile.open(folder / f"bench-{(start - first) // per_shard:05d}.tar", "w") as tar:
            for i in range(start, min(first + n, start + per_shard)):
                image = Image.new("RGB", (225, 225), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
                image.paste(
                    (255 - (i % 256), 128, i % 256),
                    (i % 150, (i * 7) % 150, i % 150 + 60, (i * 7) % 150 + 60),
                )
                for bit in range(INDEX_BITS):
                    shade = 255 if (i >> bit) & 1 else 0
                    image.paste((shade, shade, shade), (bit * 8, 0, bit * 8 + 8, 8))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return str(folder / "*.tar")


class GpuMemory:
    """Peak GPU memory in use (MiB, per GPU and summed), sampled with nvidia-smi."""

    def __init__(self):
        self.peak, self.per_gpu, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                used = [int(x) for x in out.split()]
                self.peak = max(self.peak, sum(used))
                if len(self.per_gpu) != len(used):
                    self.per_gpu = [0] * len(used)
                self.per_gpu = [max(a, b) for a, b in zip(self.per_gpu, used, strict=True)]
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def settings(args, run: str):
    """(preset, batch_size, concurrency) for one run; the preset carries its engine_kwargs."""
    from helpers.presets import get_preset, local_gpu_memory_bytes, merge_engine_kwargs

    preset = get_preset(args.smoke)
    if run != "original":  # the replicas this GPU holds, as the notebook and the job pick them
        preset = preset.for_gpu(local_gpu_memory_bytes(), args.replicas_per_gpu)
    if args.prepared_images and run != "original":
        preset = preset.preparing_images()
    # One level deep, so a variant that sets one compilation_config key keeps the preset's others.
    engine_kwargs = merge_engine_kwargs(preset.engine_kwargs, args.engine_kwargs)
    batch_size, concurrency = args.batch_size or preset.batch_size, args.concurrency or preset.concurrency
    if args.max_concurrent_batches:
        preset = dataclasses.replace(preset, max_concurrent_batches=args.max_concurrent_batches)
    if args.max_pending_requests is not None:
        preset = dataclasses.replace(preset, max_pending_requests=args.max_pending_requests)
    if args.placement_group_config and run != "original":
        preset = dataclasses.replace(preset, placement_group_config=args.placement_group_config)
    if args.separate_tokenizer_stages and run != "original":
        preset = dataclasses.replace(preset, separate_tokenizer_stages=True)
    if run == "fp8":
        engine_kwargs["quantization"] = "fp8"
    env_vars = dict(preset.env_vars)
    if run == "original":
        keep = ("max_model_len", "limit_mm_per_prompt", "dtype", "enforce_eager", "seed")
        engine_kwargs = {k: v for k, v in preset.engine_kwargs.items() if k in keep}
        batch_size, concurrency = 16, 1
        # One GPU per replica (Ray Data LLM's default); on CPU the smoke preset's CPU bundle.
        placement = preset.placement_group_config if args.smoke else None
        preset = dataclasses.replace(
            preset,
            max_concurrent_batches=8,
            max_pending_requests=None,
            separate_tokenizer_stages=True,
            placement_group_config=placement,
        )
        # The tutorial set no environment (on CPU the smoke preset's stays: it needs it to run).
        env_vars = env_vars if args.smoke else {}
    env_vars.update(kv.split("=", 1) for kv in args.env)
    if args.dummy:
        engine_kwargs["load_format"] = "dummy"
    preset = dataclasses.replace(
        preset, max_tokens=args.max_tokens, engine_kwargs=engine_kwargs, env_vars=env_vars
    )
    return preset, batch_size, concurrency


# vLLM's max_num_seqs where engine_kwargs leave it out and the engine is built from
# AsyncEngineArgs, as Ray Data LLM's engine stage and engine_async build it
# (SchedulerConfig.DEFAULT_MAX_NUM_SEQS in vLLM 0.26 and 0.29; only `LLM` gets larger defaults).
VLLM_DEFAULT_MAX_NUM_SEQS = 128
PROGRESS_EVERY = 500  # rows between PROGRESS points


def first_wave_rows(
    max_num_seqs: int | None,
    *,
    replicas: int,
    batch_size: int,
    max_concurrent_batches: int,
    max_pending_requests: int | None = None,
    tasks_in_flight: int | None = None,
    rows_per_task: int | None = None,
) -> int:
    """Rows that can be generating in the engines at once: the first wave.

    Rows prepared while the engines start all enter at once; with `ignore_eos` and a fixed
    `max_tokens` the ones admitted together also finish together, so they come out in a burst
    right after the first output. Each replica runs the smaller of its engine's `max_num_seqs`
    and what Ray Data LLM lets into it at once: `batch_size` x `max_concurrent_batches` rows (the
    batches its engine stage works on), capped by `max_pending_requests` (requests the engine
    holds, running and queued; Ray's default, 1.1 x max_num_seqs, never binds) and by the tasks
    Ray Data hands a replica (`max_tasks_in_flight_per_actor` x rows per task). The GPU preset
    runs 3 replicas of 2,048 sequences (its cap, 4,096 pending, is larger): 6,144 rows. The
    original tutorial's settings leave max_num_seqs at vLLM's default (128) and let 16 x 8 = 128
    rows in: 128 rows. The KV cache is not counted here: where it fills, the record's first wave
    is the one the engines ran (kv_bound_first_wave, from vLLM's stats after the run).
    """
    cap = batch_size * max_concurrent_batches
    if max_pending_requests:
        cap = min(cap, max_pending_requests)
    if tasks_in_flight and rows_per_task:
        cap = min(cap, tasks_in_flight * rows_per_task)
    return replicas * min(max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS, cap)


def sustained_rate(
    points: list[tuple[float, int]], first_wave: int, last_wave: int = 0
) -> tuple[float | None, float | None]:
    """(rows per second, window in seconds) between the run's two end bursts, from PROGRESS points
    (seconds, rows out so far): the slope from the point where `first_wave` rows were out to the
    last point where no more than the run's rows less `last_wave` were out (with `last_wave` 0:
    the last point). The bench passes the first wave as the last.

    The start is the last point before rows out pass `first_wave` (or the one that meets it
    exactly): rows come out in waves, each wave's rows together once they have been generated,
    so the first point past the first wave already holds part of the second wave's burst, and a
    window started there would count those rows without the time spent generating them.
    The end mirrors it. Once the input has run out and the engines' queues have emptied, the rows
    still running (a wave as large as the first) need no admission work any more (the engine
    core's scheduling and image processing of each new request, which paces the steady state):
    they finish together and come out several times faster than the rows before them (3 to 30
    times in the H100 and H200 runs of benchmarks/README.md). A window run on to the last row
    counts that burst as throughput a long run never sees.
    (None, None) where the run has no such window: it never got past its first wave, or the two
    waves overlap (choose N above the two waves and 60 s of rows: 40,000 for the GPU preset on an
    H200 at 48 tokens)."""
    points = sorted(points)
    past = next((i for i, (_, rows) in enumerate(points) if rows >= first_wave), None)
    if past is None:
        return None, None
    start = past if past == 0 or points[past][1] == first_wave else past - 1
    total = points[-1][1]
    end = max((i for i, (_, rows) in enumerate(points) if rows <= total - last_wave), default=-1)
    if end <= start:
        return None, None
    (t_wave, rows_wave), (t_end, rows_end) = points[start], points[end]
    if rows_end <= rows_wave or t_end <= t_wave or rows_end <= first_wave:
        return None, None
    return (rows_end - rows_wave) / (t_end - t_wave), t_end - t_wave


# The sustained window the bench aims for, in seconds.
WINDOW_AIM_S = 60


def images_for_window(first_wave: int, last_wave: int, rate: float | None) -> int | None:
    """The N whose sustained window would hold WINDOW_AIM_S seconds at `rate` rows a second: both
    waves and the window's rows. None without a rate."""
    return first_wave + last_wave + math.ceil(rate * WINDOW_AIM_S) if rate else None


# vLLM's KV cache this full (its highest stat line, in percent): the engines ran fewer sequences
# than the first wave counts.
KV_FULL_PCT = 95.0


def kv_bound_first_wave(record: dict) -> int | None:
    """The first wave as the engines ran it, where their KV caches bound: replicas x the median
    number of sequences each ran (vLLM's Running count), if that is under `first_wave_rows`; else
    None. `first_wave_rows` counts what Ray Data LLM lets into each engine (up to max_num_seqs);
    an engine whose KV cache fills runs fewer, so its first burst of rows is smaller, and a window
    started at `first_wave_rows` would skip the slow stretch after that burst and overstate (three
    replicas' 18.7 GiB caches at 256 tokens: about 1,290 of 2,048 sequences each)."""
    stats = record.get("engine_stats") or {}
    kv, running = stats.get("kv_cache_usage_pct_max"), stats.get("running_median")
    replicas = (record.get("settings") or {}).get("concurrency")
    if kv is None or kv < KV_FULL_PCT or not running or not replicas or not record.get("first_wave_rows"):
        return None
    wave = int(replicas * running)
    return wave if wave < record["first_wave_rows"] else None


def progress_points(lines: list[str]) -> list[tuple[float, int]]:
    """The PROGRESS points (seconds, rows out) of a run's output lines."""
    found = (re.search(r"PROGRESS (\d+) rows at ([\d.]+) s", line) for line in lines)
    return [(float(m.group(2)), int(m.group(1))) for m in found if m]


def apply_kv_bound(record: dict, lines: list[str]) -> dict:
    """`record` with its sustained rate counted from the first wave the engines ran
    (`kv_bound_first_wave`) where their KV caches bound; the configured wave is kept as
    `first_wave_rows_configured`. Unchanged elsewhere."""
    wave = kv_bound_first_wave(record)
    if wave is None:
        return record
    points = progress_points(lines)
    rate, window = sustained_rate(points, wave, wave)
    to_end, _ = sustained_rate(points, wave)
    return {
        **record,
        "sustained_images_per_s": round(rate, 2) if rate else None,
        "sustained_window_s": round(window, 1) if window else None,
        "sustained_to_end_images_per_s": round(to_end, 2) if to_end else None,
        "first_wave_rows": wave,
        "first_wave_rows_configured": record["first_wave_rows"],
    }


def progress(
    points: list[tuple[float, int]],
    rows: int,
    now: float,
    t0: float,
    *,
    last: bool = False,
    every: int = PROGRESS_EVERY,
    echo: bool = True,
) -> None:
    """Note a PROGRESS point (seconds from t0, rows out) every `every` rows, and the last; `echo`
    prints it as a PROGRESS line too (the runs' logs, which the device scripts watch)."""
    before = points[-1][1] if points else 0
    if (last and rows != before) or before // every != rows // every:
        points.append((round(now - t0, 2), rows))
        if echo:
            print(f"PROGRESS {rows} rows at {now - t0:.1f} s", flush=True)


def phase(name: str) -> float:
    """Mark the end of a phase in the run's log (the parent reads it back); returns the time."""
    now = time.time()
    print(f"PHASE {name} {now:.3f}", flush=True)
    return now


def read_rows(shards: str) -> list[dict]:
    """The benchmark's shards as `{"id", "image_bytes"}` rows, read without Ray."""
    import glob

    rows = []
    for path in sorted(glob.glob(shards)):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                rows.append({"id": m.name, "image_bytes": tar.extractfile(m).read()})
    return rows


def output_settings(args, preset, run: str) -> dict:
    """How the engine hands back results: the project's choice, or vLLM's default per-token
    updates for the original tutorial's settings and for --cumulative."""
    from helpers.pipeline import row_kwargs

    if run == "original" or args.cumulative:
        return {"final_only": False, "detokenize": True}
    kwargs = row_kwargs(preset)
    return {"final_only": kwargs["final_only"], "detokenize": kwargs["detokenize"]}


def engine_request(tokenizer, row: dict, *, image_size: int, named: bool) -> dict:
    """A row as AsyncLLM gets it from the pipeline's CPU stages: helpers.rows.preprocess, the chat
    template as text, the image, and its uuid where preprocess named it (Ray Data LLM's prepare
    stage passes it on as `multi_modal_uuids`)."""
    from helpers.rows import preprocess

    messages = preprocess(row, image_size=image_size, final_only=False, image_uuid=named)["messages"]
    part = messages[1]["content"][0]
    messages[1]["content"][0] = {"type": "image"}
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    request = {"prompt": prompt, "multi_modal_data": {"image": part["image_pil"]}}
    if "uuid" in part:
        request["multi_modal_uuids"] = {"image": [part["uuid"]]}
    return request


def run_engine_async(args, shards: str) -> dict:
    """vLLM's AsyncLLM alone, fed like Ray Data LLM feeds it: batch_size x max_concurrent_batches
    requests in flight, the same prompt, images, sampling and output settings as the pipeline."""
    import asyncio

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from helpers.presets import resolve_model

    preset, batch_size, _ = settings(args, "engine_async")
    os.environ.update(preset.env_vars)
    model = resolve_model(args.model or preset.model)
    out = output_settings(args, preset, "engine_async")
    tokenizer = AutoTokenizer.from_pretrained(model)
    # Decoded and resized before the clock starts: the engine's work only.
    requests = [
        engine_request(tokenizer, row, image_size=preset.image_size, named=preset.prepared_images)
        for row in read_rows(shards)
    ]
    params = SamplingParams(
        temperature=preset.temperature,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        detokenize=out["detokenize"],
        output_kind=RequestOutputKind.FINAL_ONLY if out["final_only"] else RequestOutputKind.CUMULATIVE,
    )
    in_flight = batch_size * preset.max_concurrent_batches
    points = []

    async def generate_all():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **preset.engine_kwargs))
        slots, finished, tokens = asyncio.Semaphore(in_flight), [], []

        async def one(i: int, request: dict):
            async with slots:
                final = None
                async for output in engine.generate(request, params, str(i)):
                    final = output
            if not finished:
                phase("first_output")
            finished.append(time.time())
            tokens.append(len(final.outputs[0].token_ids))
            progress(points, len(finished), finished[-1], t0)

        try:
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            engine.shutdown()
        return finished, tokens

    t0 = phase("t0")
    finished, tokens = asyncio.run(generate_all())
    first, done = min(finished), max(finished)
    progress(points, len(finished), done, t0, last=True)
    return {
        "images": len(tokens),
        "progress": points,
        "first_wave_rows": first_wave_rows(
            preset.engine_kwargs.get("max_num_seqs"),
            replicas=1,
            batch_size=batch_size,
            max_concurrent_batches=preset.max_concurrent_batches,
        ),
        "startup_s": round(first - t0, 1),
        "steady_s": done - first,
        "steady_images": len(tokens) - 1,  # counted after the first output arrived
        "e2e_s": done - t0,
        "tokens": tokens,
        "settings": {
            "engine_kwargs": preset.engine_kwargs,
            "in_flight": in_flight,
            **out,
        },
    }


def run_engine(args, shards: str) -> dict:
    """vLLM alone: the same requests, prepared by the same preprocess, through LLM.chat."""
    from vllm import LLM, SamplingParams

    from helpers.presets import resolve_model
    from helpers.rows import preprocess

    preset, _, _ = settings(args, "engine")
    os.environ.update(preset.env_vars)
    rows = read_rows(shards)
    t0 = phase("t0")
    requests = [
        preprocess(r, image_size=preset.image_size, final_only=False, image_uuid=preset.prepared_images)
        for r in rows
    ]
    llm = LLM(model=resolve_model(args.model or preset.model), **preset.engine_kwargs)
    started = time.time()
    params = SamplingParams(temperature=preset.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.chat([r["messages"] for r in requests], params, use_tqdm=False)
    done = time.time()
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    return {
        "images": len(outputs),
        # LLM.chat hands every output back at the end: no points to measure a sustained rate on.
        "progress": [],
        "first_wave_rows": preset.engine_kwargs.get("max_num_seqs"),
        "startup_s": round(started - t0, 1),
        "steady_s": done - started,
        "e2e_s": done - t0,
        "tokens": tokens,
        "settings": {
            "engine_kwargs": preset.engine_kwargs,
            "image_size": preset.image_size,
            "prepared_images": preset.prepared_images,
        },
    }


def run_pipeline(args, shards: str, run: str) -> dict:
    """The project's pipeline through Ray Data LLM: read shards, preprocess, engine, postprocess."""
    import ray

    from helpers.data import read_images
    from helpers.pipeline import build_caption_processor, caption, processor_config, row_kwargs
    from helpers.presets import init_ray, resolve_model

    preset, batch_size, concurrency = settings(args, run)
    t0 = phase("t0")
    model_name = args.model or preset.model
    runtime_env = preset.runtime_env()
    init_ray(preset, runtime_env)  # connects when RAY_ADDRESS is set (h200_x2.sh's shared cluster)
    phase("ray_up")
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = processor_config(
        preset,
        resolve_model(model_name),
        batch_size=batch_size,
        concurrency=concurrency,
        rows=args.num_images,  # each replica takes in an even share of the run at most
        cluster=ray.cluster_resources(),  # the CPU stages' actors leave a CPU to read with
    )
    if run == "original":  # the tutorial left Ray Data's default (2 x max_concurrent_batches)
        config = config.model_copy(update={"max_tasks_in_flight_per_actor": None})
    # ignore_eos: random weights rarely stop, so every request makes exactly max_tokens.
    out = output_settings(args, preset, run)
    kwargs = {**row_kwargs(preset), **out, "ignore_eos": True}
    processor = build_caption_processor(config, model_name=model_name, **kwargs)
    # Ray Data LLM's build_processor imports vLLM in the driver and waits on its telemetry actor
    # before any stage starts: on the critical path of every run.
    phase("processor_built")
    ds = read_images(shards).repartition(target_num_rows_per_block=preset.rows_per_block)
    ds = caption(ds, processor, model_name=model_name)
    first, first_rows = None, 0
    tokens, points, empty, ids = [], [], 0, set()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        now = time.time()
        if first is None:
            first, first_rows = phase("first_output"), batch.num_rows
        tokens.extend(batch.column("num_generated_tokens").to_pylist())
        errors = [e for e in batch.column("error").to_pylist() if e]
        assert not errors, errors[:3]
        ids.update(batch.column("id").to_pylist())
        assert len(ids) == len(tokens), "an image came out twice"
        # A caption with no text: with detokenize=False the text comes from Ray's detokenize stage.
        empty += sum(1 for c in batch.column("caption").to_pylist() if not (c or "").strip())
        progress(points, len(tokens), now, t0)
    done = time.time()
    if tokens:  # the last rows' arrival, not the iterator's end
        progress(points, len(tokens), now, t0, last=True)
    ray.shutdown()
    return {
        "images": len(tokens),
        "empty_captions": empty,
        "progress": points,
        "first_wave_rows": first_wave_rows(
            preset.engine_kwargs.get("max_num_seqs"),
            replicas=concurrency,
            batch_size=batch_size,
            max_concurrent_batches=preset.max_concurrent_batches,
            max_pending_requests=preset.max_pending_requests,
            tasks_in_flight=config.max_tasks_in_flight_per_actor,
            # A task is a block: the repartition above makes blocks of rows_per_block rows.
            rows_per_task=max(batch_size, preset.rows_per_block),
        ),
        "startup_s": round(first - t0, 1),
        "steady_s": done - first,
        "steady_images": len(tokens) - first_rows,  # counted after the first output arrived
        "e2e_s": done - t0,
        "tokens": tokens,
        "settings": {
            "engine_kwargs": preset.engine_kwargs,
            "batch_size": batch_size,
            "concurrency": concurrency,
            "max_concurrent_batches": preset.max_concurrent_batches,
            "max_pending_requests": preset.max_pending_requests,
            "max_tasks_in_flight_per_actor": config.max_tasks_in_flight_per_actor,
            # Ray Data's task is a block: the cap above holds this many rows per task.
            "rows_per_block": preset.rows_per_block,
            "separate_tokenizer_stages": preset.separate_tokenizer_stages,
            # Each CPU stage's actor pool where the cluster is short of CPUs (None: the engines' pool).
            "cpu_stage_pool": config.prepare_multimodal_stage["concurrency"],
            "image_size": preset.image_size,
            "prepared_images": preset.prepared_images,
            "placement_group_config": preset.placement_group_config,
            "env_vars": preset.env_vars,
            **out,
            "ray_address": os.environ.get("RAY_ADDRESS") or None,
        },
    }


def one(args) -> None:
    run = args.one
    shards = str(Path(args.workdir) / "shards" / "*.tar")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    with GpuMemory() as memory:
        if run == "engine":
            result = run_engine(args, shards)
        elif run == "engine_async":
            result = run_engine_async(args, shards)
        else:
            result = run_pipeline(args, shards, run)
    tokens = result.pop("tokens")
    n = result["images"]
    steady_n = result.pop("steady_images", n)
    first_wave = result.pop("first_wave_rows")
    points = result.pop("progress")
    # LLM.chat ("engine") and the bench's own async loop (engine_async) take every request at once:
    # the whole run after the first wave is the drain, and their window runs to the end.
    last_wave = 0 if run in ("engine", "engine_async") else first_wave
    sustained, window = sustained_rate(points, first_wave, last_wave) if first_wave else (None, None)
    to_end, _ = sustained_rate(points, first_wave) if first_wave else (None, None)
    steady_rate = steady_n / result["steady_s"] if steady_n and result["steady_s"] > 0 else None
    # Steady: first output to last, first wave included. LLM.chat ("engine") returns all outputs
    # together at the end, so its steady window is the whole generate call (start of generation
    # to last output).
    record = {
        "run": run,
        "label": args.label,
        "images": n,
        "tokens_ok": n == args.num_images and all(t == args.max_tokens for t in tokens),
        "empty_captions": result.get("empty_captions"),  # counted where the pipeline writes captions
        "e2e_images_per_s": round(n / result["e2e_s"], 2),
        "steady_images_per_s": round(steady_rate, 2) if steady_rate else None,
        "sustained_images_per_s": round(sustained, 2) if sustained else None,
        "sustained_window_s": round(window, 1) if window else None,
        "first_wave_rows": first_wave,
        # The window run on to the last row, the engines' drain included: how earlier records
        # counted their sustained figure, kept to compare with them.
        "sustained_to_end_images_per_s": round(to_end, 2) if to_end else None,
        # Where the window is short of WINDOW_AIM_S (or missing): the N that would hold it.
        "n_for_window": images_for_window(first_wave or 0, last_wave, sustained or steady_rate)
        if not window or window < WINDOW_AIM_S
        else None,
        "max_tokens": args.max_tokens,
        "startup_s": result["startup_s"],
        "e2e_s": round(result["e2e_s"], 1),
        "output_tokens_per_s": round(sum(tokens) / result["e2e_s"], 1),
        "peak_gpu_mem_mib": memory.peak or None,
        "peak_gpu_mem_mib_per_gpu": memory.per_gpu or None,
        "settings": result["settings"],
    }
    print("RESULT " + json.dumps(record, default=str), flush=True)


# Start-up phases, each taken from the first log line that marks its end: Ray's and vLLM's own
# lines (vLLM 0.26 and 0.29 log the same words), forwarded to the driver and timed as they arrive
# (within about a second of when they were written), or the run's own PHASE marks.
# Engine lines only: those of the engine actor or the engine-core process, or any line when the
# engine runs in the benchmark's own process (no Ray prefix).
STARTUP_MARKS = (
    ("dataset_started", r"Starting execution of Dataset", False),
    ("engine_actor_started", r"Downloading model and tokenizer|Excluding safetensors files", True),
    ("vllm_imported", r"Resolved architecture", True),  # the engine's config: vllm imported
    ("engine_core_up", r"Initializing a V1 LLM engine", True),  # the engine-core process
    ("weights_loaded", r"Model loading took", True),
    ("torch_compile_done", r"torch\.compile (?:took|takes) [\d.]+ s in total", True),
    ("kv_cache_allocated", r"GPU KV cache size", True),
    ("cuda_graphs_captured", r"Graph capturing finished", True),
    ("engine_ready", r"init engine \(profile, create kv cache, warmup model\) took", True),
    ("engine_actor_ready", r"Max pending requests is set to", True),
    # The vision encoder's first real batch: vLLM 0.26 warns when its rotary kernel is first
    # compiled (or loaded) after warm-up, which its profiling run doesn't cover.
    ("first_vision_kernel", r"JIT compilation during inference: rotary_kernel", True),
)
# Durations vLLM reports itself (seconds).
VLLM_REPORTED = (
    ("weights_load_s", r"Loading weights took ([\d.]+) seconds"),
    ("model_load_s", r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds"),
    ("dynamo_transform_s", r"Dynamo bytecode transform time: ([\d.]+) s"),
    ("torch_compile_s", r"torch\.compile (?:took|takes) ([\d.]+) s in total"),
    ("graph_capture_s", r"Graph capturing finished in ([\d.]+) secs"),
    ("init_engine_s", r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
    ("kv_cache_gib", r"Available KV cache memory: ([\d.]+) GiB"),
    ("kv_cache_tokens", r"GPU KV cache size: ([\d,]+) tokens"),
)
BATCH_DONE = re.compile(r"\[vLLM\] Elapsed time for batch \w+ with size \d+: ([\d.]+)")
STATS = re.compile(
    r"Avg generation throughput: ([\d.]+) tokens/s, Running: (\d+) reqs, Waiting: (\d+) reqs"
    r"(?:.*?GPU KV cache usage: ([\d.]+)%)?"
)


def _engine_line(line: str) -> bool:
    return "vLLMEngineStageUDF" in line or "EngineCore" in line or not re.match(r"\(\S+.* pid=\d+", line)


def startup_breakdown(lines: list[tuple[float, str]]) -> dict:
    """`startup_breakdown` (phase -> seconds from the run's t0 to the phase's end, in order),
    `startup_vllm_reported` (vLLM's own durations), `engine_stats` (vLLM's Running/Waiting counts
    and generation rate over the steady window), from a run's log as (arrival time, line)."""
    marks = {}
    for _, line in lines:
        m = re.search(r"PHASE (\w+) ([\d.]+)", line)
        if m:
            marks.setdefault(m.group(1), float(m.group(2)))
    t0 = marks.get("t0")
    if t0 is None:
        return {}
    found, reported, batch_starts, stats = {}, {}, [], []
    for arrived, line in lines:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # Ray colours its prefixes
        for name, pattern, engine_only in STARTUP_MARKS:
            if name not in found and (not engine_only or _engine_line(line)) and re.search(pattern, line):
                found[name] = arrived
        for name, pattern in VLLM_REPORTED:
            m = re.search(pattern, line)
            if m and name not in reported:
                reported[name] = float(m.group(1).replace(",", ""))
        m = BATCH_DONE.search(line)
        if m:
            batch_starts.append(arrived - float(m.group(1)))
        m = STATS.search(line)
        if m and "first_output" in marks and arrived > marks["first_output"]:
            stats.append([float(x) if x is not None else None for x in m.groups()])
    if batch_starts:
        found["first_batch_in"] = min(batch_starts)  # when the engine's first batch arrived
    for name in ("ray_up", "processor_built", "first_output"):
        if name in marks:
            found[name] = marks[name]
    breakdown = dict(sorted(((k, round(v - t0, 1)) for k, v in found.items()), key=lambda kv: kv[1]))
    out = {"startup_breakdown": breakdown, "startup_vllm_reported": reported}
    if stats:
        import statistics

        def med(i):
            values = [row[i] for row in stats if row[i] is not None]
            return round(statistics.median(values), 1) if values else None

        out["engine_stats"] = {
            "samples": len(stats),  # vLLM's stat lines after the first output (one per finished batch)
            "running_median": med(1),
            "running_max": max(row[1] for row in stats),
            "waiting_median": med(2),
            "generation_tokens_per_s_median": med(0),
            "kv_cache_usage_pct_max": max((row[3] for row in stats if row[3] is not None), default=None),
        }
    return out


def device() -> str:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            .stdout.strip()
            .replace("\n", " + ")
            or "cpu"
        )
    except OSError:
        return "cpu"


def run_logged(cmd: list[str], log: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run a child, each output line to its log as it comes, prefixed with the seconds since the
    child started (Ray forwards the workers' lines, so this times the engine's phases too)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    timed = []
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        )
        for line in proc.stdout:
            now = time.time()
            line = line.rstrip("\n")
            timed.append((now, line))
            f.write(f"{now - start:8.2f}| {line}\n")
            f.flush()
        proc.wait()
    return proc.returncode, timed


def main(args) -> list[dict]:
    from helpers.output import package_versions

    if args.one:
        one(args)
        return []
    make_shards(Path(args.workdir) / "shards", args.num_images)
    common = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device(),
        "versions": package_versions(),
        "num_images": args.num_images,
        "max_tokens": args.max_tokens,
        "model": args.model or ("tiny" if args.smoke else "Qwen/Qwen2.5-VL-3B-Instruct"),
        "dummy_weights": args.dummy,
    }
    records = []
    forward = sys.argv[1:]  # each child measures one run; only this process writes --out
    # Each child's output goes straight to its log, so a run cut short still leaves one.
    logdir = Path(args.logdir or Path(args.workdir) / "logs")
    logdir.mkdir(parents=True, exist_ok=True)
    for run in args.runs.split(","):
        for attempt in range(args.repeat):
            cmd = [sys.executable, __file__, *forward, "--one", run]
            log = logdir / log_name(run, args.label, attempt)
            returncode, timed = run_logged(cmd, log)
            output = "\n".join(line for _, line in timed)
            lines = [ln for _, ln in timed if ln.startswith("RESULT ")]
            if returncode or not lines:
                record = {"run": run, "error": output[-2000:]}
            else:
                record = json.loads(lines[-1][len("RESULT ") :])
                record.update(startup_breakdown(timed))
                record = apply_kv_bound(record, [line for _, line in timed])
            record = {**common, "attempt": attempt, **record}
            print(json.dumps(record, default=str), flush=True)
            records.append(record)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record, default=str) + "\n")
    return records


if __name__ == "__main__":
    recs = main(parse_args())
    sys.exit(1 if any("error" in r for r in recs) else 0)
