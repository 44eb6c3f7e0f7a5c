"""The engine actor's work per request: vLLM's input processing, variants side by side in one run.

    python benchmarks/bench_render.py --smoke                      # CPU, the tiny model
    python benchmarks/bench_render.py --model /tmp/model/qwen25vl3b --dummy   # the device

On the GPU preset at 48-token captions one thread of each engine actor runs vLLM's input
processing for every request (the renderer pool's thread; benchmarks/README.md, the profile of
#29). That thread's work per request needs no GPU to measure: this times
`InputProcessor.process_inputs`, the function the pool runs for each request that Ray Data LLM
hands `AsyncLLM.generate`, on requests built as the pipeline builds them: `helpers.rows.preprocess`
on the bench's 225x225 JPEGs, the chat template as text, the image, and the image's uuid where the
row has one (Ray Data LLM's prepare stage passes it on as `multi_modal_uuids`).

Modes:
  inputs  one engine; the variants interleaved in rounds of --per-round requests (the order
          reversed every other round): ms per request, the median of the rounds, and its ratio to
          the preset's.
            preset    the GPU preset: 225x225, vLLM resizes to 224x224 and hashes the pixels
            resized   224x224 images, `do_resize: False`: no resize in vLLM
            named     225x225 images named by `rows.pixel_uuid`: no pixel hash in vLLM
            prepared  both: `Preset.preparing_images`
  profile cProfile of `process_inputs` over 3 x --per-round requests of the preset's variant:
          the functions with the most cumulative time, as seconds and shares of the whole.
  pool    AsyncLLM with `renderer_num_workers` 1 and 2 (--workers), each in its own process,
          alternating: requests per second through `process_inputs_async` with every request of a
          round in flight at once (more threads share the process's GIL).
  cache   the same as pool with one renderer thread, vLLM's processor cache (`mm_processor_cache_gb`)
          at its default 4 GiB and off (0), each in its own process, alternating: what the cache's
          bookkeeping costs the renderer thread on distinct images, where it never hits.
  warmup  the renderer's warm-up (what Serve LLM's replica runs at start, and what the first request
          of an engine that skipped it pays): the calls of vLLM 0.29's `_warmup_mm_processor`,
          a dummy image built and processed, timed in a fresh process (--rounds of them, one
          engine config and processor each, no engine), the first call and a second.

The image processor's settings are the GPU preset's (`max_pixels` 224x224: 64 image tokens), with
--smoke on the tiny model too (its own processor would make 16). Prints one JSON line per mode and
appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("preset", "resized", "named", "prepared")


def variants() -> dict[str, tuple[int, dict, bool]]:
    """name: (image size, the request's mm_processor_kwargs, image named by its pixels), taken from
    the GPU preset and its `preparing_images`, so the bench measures what the preset would run."""
    from helpers.pipeline import row_kwargs
    from helpers.presets import get_preset

    preset = get_preset(False)
    prepared = preset.preparing_images()
    off = {k: v for k, v in prepared.engine_kwargs["mm_processor_kwargs"].items() if k == "do_resize"}
    named = row_kwargs(prepared)["image_uuid"]
    return {
        "preset": (preset.image_size, {}, row_kwargs(preset)["image_uuid"]),
        "resized": (prepared.image_size, off, False),
        "named": (preset.image_size, {}, named),
        "prepared": (prepared.image_size, off, named),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny model")
    p.add_argument("--model", help="model folder (default: the preset's)")
    p.add_argument("--dummy", action="store_true", help='load_format="dummy": random weights')
    p.add_argument(
        "--modes",
        default="inputs,profile,pool",
        help="comma-separated subset of inputs,profile,pool,cache,warmup",
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=100, help="requests per variant and round")
    p.add_argument("--workers", default="1,2", help="pool mode: renderer_num_workers to compare")
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--pool-one", type=int, help=argparse.SUPPRESS)  # internal: one pool measurement
    p.add_argument("--warmup-one", action="store_true", help=argparse.SUPPRESS)  # internal: one warm-up
    p.add_argument("--cache-gb", type=float, help=argparse.SUPPRESS)  # internal: pool-one's cache size
    return p.parse_args(argv)


def engine_setup(args, **extra):
    """(model, engine kwargs): the smoke preset's engine on CPU, the GPU preset's on a GPU; both
    with the GPU preset's image processor settings and one engine's share of the work."""
    from helpers.presets import get_preset, resolve_model

    preset = get_preset(args.smoke)
    kwargs = dict(preset.engine_kwargs)
    kwargs["mm_processor_kwargs"] = dict(get_preset(False).engine_kwargs["mm_processor_kwargs"])
    if args.dummy:
        kwargs["load_format"] = "dummy"
    os.environ.update(preset.env_vars)
    return resolve_model(args.model or preset.model), {**kwargs, **extra}


def load_rows(n: int) -> list[dict]:
    """n distinct rows of the bench's 225x225 JPEGs, as the reader gives them."""
    import bench_vision

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_render_{os.getpid()}"
    return bench_vision.read_rows(bench_vision.make_shards(folder, n))


def requests(
    tokenizer, rows: list[dict], image_size: int, named: bool, mm_kwargs: dict | None = None
) -> list[dict]:
    """The rows as requests, as the engine stage gets them from the pipeline's CPU stages."""
    import bench_vision

    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
    return [
        {**bench_vision.engine_request(tokenizer, row, image_size=image_size, named=named), **extra}
        for row in rows
    ]


def medians(rounds: dict, value: str, ratio: str, *, digits: int) -> dict:
    """{variant: {value: median of its rounds, ratio: that over the first variant's, "rounds"}}."""
    base = statistics.median(next(iter(rounds.values())))
    return {
        name: {
            value: round(statistics.median(v), digits),
            ratio: round(statistics.median(v) / base, 3),
            "rounds": v,
        }
        for name, v in rounds.items()
    }


def measure_inputs(args) -> dict:
    from vllm import LLM, SamplingParams

    model, kwargs = engine_setup(args)
    llm = LLM(model=model, **kwargs)
    processor = llm.llm_engine.input_processor
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=1)
    ms = {name: [] for name in VARIANTS}
    per_variant = (args.rounds + 1) * args.per_round
    rows = load_rows(len(VARIANTS) * per_variant)  # every request's image distinct: no cache hit
    batches, tokens, placeholder_tokens = {}, {}, {}
    for v, (name, (size, mm_kwargs, named)) in enumerate(variants().items()):  # built before the clock
        mine = rows[v * per_variant : (v + 1) * per_variant]
        batches[name] = [
            requests(tokenizer, mine[r * args.per_round : (r + 1) * args.per_round], size, named, mm_kwargs)
            for r in range(args.rounds + 1)
        ]
        for i, request in enumerate(batches[name][0]):  # a warm-up round, and what it gave the engine
            out = processor.process_inputs(f"w-{name}-{i}", request, params, supported_tasks=("generate",))
        tokens[name] = len(out.prompt_token_ids)
        # An undecodable row's 28x28 placeholder must pass too (with do_resize off, on the grid).
        (bad,) = requests(tokenizer, [{"id": "bad", "image_bytes": b""}], size, named, mm_kwargs)
        out = processor.process_inputs(f"bad-{name}", bad, params, supported_tasks=("generate",))
        placeholder_tokens[name] = len(out.prompt_token_ids)
    for r in range(1, args.rounds + 1):
        for name in VARIANTS if r % 2 else reversed(VARIANTS):
            batch = batches[name][r]
            t = time.perf_counter()
            for i, request in enumerate(batch):
                processor.process_inputs(f"{name}-{r}-{i}", request, params, supported_tasks=("generate",))
            ms[name].append(round((time.perf_counter() - t) / len(batch) * 1000, 4))
    return {
        "mode": "inputs",
        "prompt_tokens": tokens,  # the same for every variant: the same 64 image tokens
        "placeholder_prompt_tokens": placeholder_tokens,
        "variants": medians(ms, "ms_per_request", "vs_preset", digits=3),
    }


def measure_profile(args, top: int = 40) -> dict:
    import cProfile
    import pstats

    from vllm import LLM, SamplingParams

    model, kwargs = engine_setup(args)
    llm = LLM(model=model, **kwargs)
    processor = llm.llm_engine.input_processor
    n = 3 * args.per_round
    batch = requests(llm.get_tokenizer(), load_rows(n + 20), 225, False)
    params = SamplingParams(max_tokens=1)
    for i, request in enumerate(batch[:20]):  # warm-up
        processor.process_inputs(f"w-{i}", request, params, supported_tasks=("generate",))
    profile = cProfile.Profile()
    profile.enable()
    for i, request in enumerate(batch[20:]):
        processor.process_inputs(f"p-{i}", request, params, supported_tasks=("generate",))
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    whole = max(v[3] for k, v in stats.items() if k[2] == "process_inputs")
    rows = sorted(stats.items(), key=lambda kv: -kv[1][3])[:top]
    return {
        "mode": "profile",
        "requests": n,
        "process_inputs_s": round(whole, 4),
        "top_cumulative": [
            {
                "function": f"{Path(f).parent.name}/{Path(f).name}:{line}({name})",
                "calls": nc,
                "cum_s": round(cum, 4),
                "share": round(cum / whole, 3),
            }
            for (f, line, name), (_, nc, _, cum, _) in rows
        ],
    }


def pool_one(args, workers: int) -> dict:
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    cache = {} if args.cache_gb is None else {"mm_processor_cache_gb": args.cache_gb}
    model, kwargs = engine_setup(args, renderer_num_workers=workers, **cache)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kwargs))
    rows = load_rows((args.rounds + 1) * args.per_round)
    tokenizer = engine.input_processor.tokenizer
    batches = [
        requests(tokenizer, rows[r * args.per_round : (r + 1) * args.per_round], 225, False)
        for r in range(args.rounds + 1)
    ]
    params = SamplingParams(max_tokens=1)

    async def rates():
        out = []
        for r, batch in enumerate(batches):
            t = time.perf_counter()
            await asyncio.gather(
                *[
                    engine.input_processor.process_inputs_async(
                        f"{r}-{i}", p, params, supported_tasks=("generate",)
                    )
                    for i, p in enumerate(batch)
                ]
            )
            out.append(round(len(batch) / (time.perf_counter() - t), 1))
        return out[1:]  # the first round warms up

    try:
        return {
            "renderer_num_workers": workers,
            # as the engine resolved it (vLLM's default: 4)
            "mm_processor_cache_gb": engine.model_config.multimodal_config.mm_processor_cache_gb,
            "requests_per_s": asyncio.run(rates()),
        }
    finally:
        engine.shutdown()


def warmup_one(args) -> dict:
    """In this fresh process: the renderer warm-up's two calls (vllm/renderers/base.py,
    `_warmup_mm_processor`) on the processor vLLM builds for the engine config, timed the first time
    and a second time. vLLM builds the Hugging Face processor (and its tokenizer) lazily, at the
    first call."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import TimingContext

    model, kwargs = engine_setup(args)
    keep = ("max_model_len", "limit_mm_per_prompt", "mm_processor_kwargs", "dtype")
    config = ModelConfig(model=model, **{k: v for k, v in kwargs.items() if k in keep})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    limits = {k: v for k, v in processor.info.allowed_mm_limits.items() if v > 0}
    calls = []
    for _ in range(2):
        t = time.perf_counter()
        inputs = processor.dummy_inputs.get_dummy_processor_inputs(
            seq_len=config.max_model_len,
            mm_counts=dict.fromkeys(limits, 1),
            mm_options=config.get_multimodal_config().limit_per_prompt,
        )
        out = processor.apply(inputs, timing_ctx=TimingContext(enabled=False))
        calls.append(round(time.perf_counter() - t, 3))
    patches = {k: list(v.shape) for k, v in out["mm_kwargs"].get_data().items() if hasattr(v, "shape")}
    return {"first_s": calls[0], "second_s": calls[1], "patches": patches}


def in_fresh_process(flag: list[str], prefix: str, what: str) -> dict:
    """This script again in a process of its own with an internal `flag` (and this run's
    arguments): the JSON of its last line that starts with `prefix`."""
    cmd = [sys.executable, __file__, *flag, *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix + " ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(prefix) + 1 :])


def measure_warmup(args) -> dict:
    runs = [in_fresh_process(["--warmup-one"], "WARMUP", "warm-up run") for _ in range(args.rounds)]
    return {
        "mode": "warmup",
        "first_s": [r["first_s"] for r in runs],
        "second_s": [r["second_s"] for r in runs],
        "first_s_median": statistics.median(r["first_s"] for r in runs),
        "patches": runs[-1]["patches"],
    }


def alternating_pool_runs(variants: dict) -> dict:
    """{name: its pool_one records}: each variant (the flags after --pool-one) twice, each time in
    a process of its own, in turn and then in reverse order."""
    records = {name: [] for name in variants}
    for order in (list(variants), list(variants)[::-1]):
        for name in order:
            records[name].append(
                in_fresh_process(["--pool-one", *variants[name]], "POOL", f"pool run {name}")
            )
    return records


def round_rates(records: dict) -> dict:
    """{name: every round's requests per second, over its records}."""
    return {name: [r for one in ones for r in one["requests_per_s"]] for name, ones in records.items()}


def measure_pool(args) -> dict:
    records = alternating_pool_runs({w: [str(w)] for w in map(int, args.workers.split(","))})
    return {"mode": "pool", "variants": medians(round_rates(records), "requests_per_s", "vs_first", digits=1)}


def measure_cache(args, sizes: tuple[float, ...] = (4.0, 0.0)) -> dict:
    records = alternating_pool_runs({f"cache_gb={g:g}": ["1", "--cache-gb", str(g)] for g in sizes})
    for g, ones in zip(sizes, records.values(), strict=True):
        if any(one["mm_processor_cache_gb"] != g for one in ones):
            raise RuntimeError(f"asked for a {g} GiB cache, the engine has another: {ones}")
    return {
        "mode": "cache",
        "variants": medians(round_rates(records), "requests_per_s", "vs_first", digits=1),
    }


MODES = {
    "inputs": measure_inputs,
    "profile": measure_profile,
    "pool": measure_pool,
    "cache": measure_cache,
    "warmup": measure_warmup,
}


def main(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # bench_vision: the bench's images
    if args.pool_one:
        print("POOL " + json.dumps(pool_one(args, args.pool_one)), flush=True)
        return
    if args.warmup_one:
        print("WARMUP " + json.dumps(warmup_one(args)), flush=True)
        return
    for mode in args.modes.split(","):
        result = MODES[mode](args)
        result.update(
            per_round=args.per_round,
            rounds=args.rounds,
            model=args.model or ("tiny" if args.smoke else "preset"),
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
            versions={m: __import__(m).__version__ for m in ("vllm", "transformers", "torch")},
            date=time.strftime("%Y-%m-%d"),
        )
        line = json.dumps(result)
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it re-imports this file
    main(parse_args())
