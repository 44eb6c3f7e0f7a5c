"""The GPU preset's engine output settings and replica layout, checked on CPU with the tiny model.

The GPU preset tokenizes and detokenizes in Ray Data LLM's own stages and tells the engine not to
detokenize (detokenize=False) and to return each request once, finished (FINAL_ONLY). That path
runs for real on CPU in the benchmark's smoke test (tests/test_bench.py: every caption has text,
from Ray's detokenize stage). Ray's vLLM stage returns only the finished output whatever the output
kind, so FINAL_ONLY can't be seen in the results: the first test here checks the SamplingParams that
stage builds from the rows.
Most of the rest check the presets' configuration without running the engine (a GPU is needed for
that): the GPU preset's fixed pool of replicas and its queue of prepared requests, the rows a
replica takes in at once (both presets, and with Ray Data for real: two replicas with the engine
stage's settings, one up later than the other, both get rows), how the job's engine kwargs merge
into the preset's, the GPU preset's engine kwargs against the pinned vLLM, and the CPU stages'
pools. The last test runs the pipeline for real on a logical GPU shared by two engines, whose CPU
stages would otherwise take every CPU.
"""

import asyncio
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import vllm
from conftest import GIB, H100_KV, encode
from PIL import Image
from ray.llm._internal.batch.processor.base import Processor
from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list
from vllm.sampling_params import RequestOutputKind

from helpers.pipeline import build_caption_processor, processor_config, row_kwargs
from helpers.presets import get_preset, resolve_model

ROOT = Path(__file__).resolve().parent.parent


def test_the_engine_stage_builds_final_only_no_detokenize_sampling_params(ray_local):
    preset = get_preset(smoke_test=False)
    config = processor_config(preset, resolve_model("tiny"))
    processor = build_caption_processor(config, model_name="tiny", **row_kwargs(preset))
    image = encode(Image.new("RGB", (64, 48), "blue"), "JPEG")
    # The processor's own preprocess, run by Ray Data: the rows cross blocks as on the way to vLLM.
    rows = ray.data.from_items([{"id": "a", "image_bytes": image}]).map(processor.preprocess).take_all()
    sampling_params = rows[0][Processor.DATA_COLUMN]["sampling_params"]
    # As Ray Data LLM's vLLM stage does (vllm_engine_stage.py, _prepare_llm_request).
    params = vllm.SamplingParams(**maybe_convert_ndarray_to_list(sampling_params))
    assert params.output_kind == RequestOutputKind.FINAL_ONLY and params.detokenize is False


# Config only (with the local test model: Ray Data LLM reads the model's config, and the Hub is out
# of reach here): a fixed pool (min == max) is what makes Ray start every replica at once.
def test_engine_replicas_are_configured_as_a_fixed_pool():
    config = processor_config(get_preset(smoke_test=False), resolve_model("tiny"), concurrency=3)
    pool = config.get_concurrency(autoscaling_enabled=True)  # what Ray Data LLM asks of Ray Data
    assert pool == {"min_size": 3, "max_size": 3}


# Config only: vLLM prepares an image when its request enters the engine, and Ray Data LLM lets in
# at most max_pending_requests. The GPU preset lets in a full second wave (prepared, queued) and
# keeps rows beyond that in the engine stage, so its actor has images to prepare meanwhile.
def test_the_engine_holds_a_queue_of_prepared_requests_beyond_those_it_runs():
    preset = get_preset(smoke_test=False)
    processor = build_caption_processor(
        processor_config(preset, resolve_model("tiny")), model_name="x", **row_kwargs(preset)
    )
    stage = processor.get_stage_by_name("vLLMEngineStage")
    pending = stage.fn_constructor_kwargs["max_pending_requests"]  # what the engine actor gets
    assert pending == preset.max_pending_requests
    assert pending >= 2 * preset.engine_kwargs["max_num_seqs"]
    assert preset.batch_size * preset.max_concurrent_batches > pending


# Config only: Ray Data hands an engine replica up to max_tasks_in_flight_per_actor tasks before
# the next replica gets any, and a task is a block of the repartition (rows_per_block, at least a
# batch). Ray's default (2 x max_concurrent_batches tasks) let the first replica up take every row of
# a two-replica run on two H200s, and a cap of max_concurrent_batches tasks with blocks of 256 rows
# did the same on one H200: Ray Data shut the second replica down, idle. A replica
# must take in only the rows it runs at once, batch_size x max_concurrent_batches, whatever the
# block size the job is given (--rows-per-block, --batch-size).
def test_an_engine_replica_takes_in_only_the_rows_it_runs_at_once():
    for smoke_test in (True, False):
        base = get_preset(smoke_test=smoke_test)
        cases = ((None, None), (4 * base.batch_size, None), (None, 2 * base.batch_size))
        for rows_per_block, batch_size in cases:
            preset = dataclasses.replace(base, rows_per_block=rows_per_block or base.rows_per_block)
            batch = batch_size or preset.batch_size
            config = processor_config(preset, resolve_model("tiny"), concurrency=2, batch_size=batch)
            processor = build_caption_processor(config, model_name="x", **row_kwargs(preset))
            stage = processor.get_stage_by_name("vLLMEngineStage")
            compute = stage.map_batches_kwargs["compute"]  # what Ray Data gets
            rows_per_task = max(batch, preset.rows_per_block)
            tasks, rows_run = compute.max_tasks_in_flight_per_actor, batch * preset.max_concurrent_batches
            # the fewest whole tasks that hold the rows it runs at once
            case = (preset.name, rows_per_block, batch)
            assert (tasks - 1) * rows_per_task < rows_run <= tasks * rows_per_task, case
            assert stage.map_batches_kwargs["max_concurrency"] == preset.max_concurrent_batches
        # The presets' own blocks are one batch each: no Ray warning about fewer tasks than batches.
        assert base.rows_per_block == base.batch_size


# Config only: where the run's size is known (the notebook's runs, the job's --limit), a replica takes
# in at most an even share of it, in whole blocks, so the replica that is up first can't take it all.
def test_a_replica_takes_in_at_most_an_even_share_of_a_run_of_known_size():
    gpu = get_preset(smoke_test=False)
    # The notebook's first run on the GPU preset: 10,000 images in 64 blocks of 157 rows, 3 replicas.
    tasks = gpu.replica_tasks_in_flight(64, rows=10_000, blocks=64, replicas=3)
    assert tasks * 157 <= 3_334 < (tasks + 1) * 157  # whole blocks, within the share
    # More replicas than blocks to spare: each of 4 still gets a block of the 5 (2, 1, 1, 1).
    assert gpu.replica_tasks_in_flight(64, rows=5 * 64, replicas=4) == 1
    # A run far bigger than the replicas' batches in flight: the cap is what a replica runs at once.
    assert gpu.replica_tasks_in_flight(64, rows=1_000_000, replicas=8) == gpu.max_concurrent_batches
    # The job's --limit reaches Ray Data: 4,096 rows over two replicas, blocks of one batch.
    config = processor_config(gpu, resolve_model("tiny"), concurrency=2, rows=4096)
    processor = build_caption_processor(config, model_name="x", **row_kwargs(gpu))
    compute = processor.get_stage_by_name("vLLMEngineStage").map_batches_kwargs["compute"]
    assert compute.max_tasks_in_flight_per_actor == 2048 // gpu.rows_per_block


# Config only: the GPU preset runs three engine replicas per GPU. Sized by a fraction of the GPU,
# engines that start together each count the others' memory as their own, and the last found none
# left for its KV cache: replicas that share a GPU need a fixed KV cache, and their
# shares may not add up to more than the GPU. Ray Data must ask for a replica's share of a GPU, not a
# whole one (or a 1-GPU node would run one replica and wait for more GPUs for the others).
def test_engine_replicas_that_share_a_gpu_ask_for_their_share_and_a_fixed_kv_cache():
    base = get_preset(smoke_test=False)
    assert base.replicas_per_gpu == 3
    for preset in (base, base.sharing_gpus(1), base.sharing_gpus(2), base.sharing_gpus(4)):
        n = preset.replicas_per_gpu
        # The local model: Ray Data LLM reads the model's config, and the Hub is out of reach here.
        config = processor_config(preset, resolve_model("tiny"), concurrency=2 * n)
        processor = build_caption_processor(config, model_name="x", **row_kwargs(preset))
        stage = processor.get_stage_by_name("vLLMEngineStage")
        assert stage.map_batches_kwargs["num_gpus"] == pytest.approx(1 / n), n  # what Ray gets
        kwargs = stage.fn_constructor_kwargs["engine_kwargs"]  # what vLLM gets
        assert n * kwargs["gpu_memory_utilization"] <= 0.9 + 1e-9, n
        assert ("kv_cache_memory_bytes" in kwargs) == (n > 1), n
        if n > 1:  # the GPU holds the preset's KV cache, however many replicas share it
            assert n * kwargs["kv_cache_memory_bytes"] <= 3 * base.engine_kwargs["kv_cache_memory_bytes"]
    assert base.sharing_gpus(3).engine_kwargs == base.engine_kwargs
    # The same GPUs, with n replicas on each: the first run on one, the scale-up on four.
    for n in (1, 2, 4):
        assert (base.sharing_gpus(n).concurrency, base.sharing_gpus(n).scale_up_concurrency) == (n, 4 * n)
    with pytest.raises(ValueError, match="CPU"):
        get_preset(smoke_test=True).sharing_gpus(2)


# Config only. Replicas that share a GPU too small for the preset's KV cache beside them split what is
# left of 90% of it after about 14 GiB each of weights, activations and CUDA graphs: two of the
# preset's 28 GiB caches would not fit in 80 GB. Two of 22 GiB ran on an 80 GB H100
# (benchmarks/README.md) and peaked at 71.3 GiB together; the rule gives them a little less. Told to
# run the preset's three there, they get smaller caches still; more than the GPU holds is refused.
def test_replicas_on_a_gpu_too_small_for_the_presets_kv_cache_split_what_is_left():
    base = get_preset(smoke_test=False)
    h100, h200, gpu_96, gpu_110 = 81559 * 2**20, 143771 * 2**20, 97871 * 2**20, 110 * GIB
    kv = {  # (GPU, replicas asked for or None) -> each replica's KV cache
        (h100, None): H100_KV,  # 21.84 GiB
        (h100, 3): 10_623_857_459,  # 9.89 GiB
        (h100, 1): None,
        (h200, None): 56 * GIB // 3,
        (gpu_96, None): 56 * GIB // 3 * 3 // 2,  # room for the preset's cache: it is kept
        (gpu_110, None): 56 * GIB // 3 * 3 // 2,
        (None, 2): 56 * GIB // 3 * 3 // 2,  # size unknown (a CPU head node): the preset's cache
    }
    default = {h100: 2, h200: 3, gpu_96: 2, gpu_110: 2}  # replicas where none are asked for
    for (gpu, asked), want in kv.items():
        preset = base.for_gpu(gpu, asked)
        assert preset.engine_kwargs.get("kv_cache_memory_bytes") == want, (gpu, asked)
        assert preset.replicas_per_gpu == (asked or default[gpu]), (gpu, asked)
    assert base.for_gpu(h100).engine_kwargs["kv_cache_memory_bytes"] <= 22 * GIB  # no more than ran
    assert base.sharing_gpus(2, h100).engine_kwargs == base.for_gpu(h100).engine_kwargs
    with pytest.raises(ValueError, match="3 engine replicas do not fit a GPU of 45.0 GiB"):
        base.for_gpu(46068 * 2**20, 3)


# Config only; the engine runs it in test_bench.py's smoke run (--prepared-images). vLLM's processor
# refuses an image off the patch grid once it no longer resizes (225x225: "Failed to apply
# Qwen2_5_VLProcessor"), so the preset must not let one through.
def test_preparing_images_puts_them_on_the_patch_grid_and_turns_the_engines_resize_off():
    for base in (get_preset(smoke_test=False), get_preset(smoke_test=True)):
        assert base.prepared_images is False and row_kwargs(base)["image_uuid"] is False
        prepared = base.preparing_images()
        assert prepared.image_size == 224 and prepared.prepared_images is True  # 225 -> 224
        assert row_kwargs(prepared)["image_uuid"] is True and row_kwargs(prepared)["image_size"] == 224
        mm_kwargs = prepared.engine_kwargs["mm_processor_kwargs"]
        assert mm_kwargs["do_resize"] is False
        assert {k: v for k, v in mm_kwargs.items() if k != "do_resize"} == base.engine_kwargs.get(
            "mm_processor_kwargs", {}
        )  # the preset's own processor settings kept
        config = processor_config(prepared, resolve_model("tiny"))
        assert config.engine_kwargs["mm_processor_kwargs"]["do_resize"] is False
        assert "do_resize" not in base.engine_kwargs.get("mm_processor_kwargs", {})  # base untouched
    assert get_preset(smoke_test=False).preparing_images(112).image_size == 112
    with pytest.raises(ValueError, match="multiple of 28"):
        get_preset(smoke_test=False).preparing_images(225)


# Ray Data for real, a replica coming up after the other: the engine stage's compute and concurrency
# as processor_config sets them. "blocks": blocks of several batches (a target of 32 rows; Ray cut
# blocks of 16 from this range). With a cap of max_concurrent_batches tasks (one that doesn't
# count rows) the first replica takes all 128 rows and Ray Data shut the second down,
# idle. "small run": a run smaller than the rows the replicas run at once (the
# notebook's first run on the GPU preset: 10,000 images against 3 x 6,144): without the cap's even
# share the first replica takes every row. With replica_tasks_in_flight both replicas caption.
@pytest.mark.parametrize(
    ("case", "rows_per_block", "n", "first_up_s", "second_up_s", "batch_s"),
    [("blocks", 32, 128, 0, 8, 5), ("small run", 8, 32, 6, 2, 10)],
)
def test_two_replicas_share_the_rows(
    ray_local, tmp_path, case, rows_per_block, n, first_up_s, second_up_s, batch_s
):
    class TimedReplica:  # in the test: Ray workers unpickle it by value
        """Ray Data's side of an engine replica, with fixed timings: the first replica is up after
        `first_up_s` (long enough for every block to queue, as during the engines' 2-minute start
        on the H200s), the second `second_up_s` after it (0.7-0.9 s on the H200s), and a batch
        takes `batch_s`. Which replica gets rows then depends only on how many tasks Ray Data
        hands each, which is what this test checks; the engine itself runs in the tests above."""

        def __init__(self, flag: str):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
                time.sleep(first_up_s)
            except FileExistsError:
                time.sleep(first_up_s + second_up_s)

        async def __call__(self, batch):
            await asyncio.sleep(batch_s)
            return {"id": batch["id"], "pid": np.full(len(batch["id"]), os.getpid())}

    preset = dataclasses.replace(
        get_preset(smoke_test=True), max_concurrent_batches=4, rows_per_block=rows_per_block
    )
    config = processor_config(preset, resolve_model("tiny"), concurrency=2, rows=n)
    stage = build_caption_processor(config, model_name="x", **row_kwargs(preset)).get_stage_by_name(
        "vLLMEngineStage"
    )
    kw = stage.map_batches_kwargs
    ds = ray.data.range(n).repartition(target_num_rows_per_block=preset.rows_per_block)
    out = ds.map_batches(
        TimedReplica,
        fn_constructor_kwargs={"flag": str(tmp_path / "first")},
        batch_size=config.batch_size,
        compute=kw["compute"],
        max_concurrency=kw["max_concurrency"],
        # Stand-ins that only sleep take no CPU slot, so the read and repartition tasks run beside
        # them on any cluster (a config test may have started Ray with this machine's 2 CPUs first,
        # and then two 1-CPU replicas left none for the read: the run hung).
        num_cpus=0,
    ).to_pandas()
    assert sorted(out["id"]) == list(range(n))  # rows in = rows out
    assert out["pid"].nunique() == 2, (case, out.groupby("pid").size().to_dict())


# Config only: the job's --engine-kwargs override a preset's keys; a dict such as compilation_config
# is merged key by key, so naming one of its keys keeps the preset's CUDA graph sizes.
def test_engine_kwargs_given_to_the_job_merge_into_the_presets_key_by_key():
    preset = get_preset(smoke_test=False)
    override = {"max_num_seqs": 2048, "compilation_config": {"mode": 0}}
    merged = processor_config(preset, resolve_model("tiny"), engine_kwargs=override).engine_kwargs
    graphs = preset.engine_kwargs["compilation_config"]["cudagraph_capture_sizes"]
    assert merged["max_num_seqs"] == 2048 and merged["compilation_config"]["mode"] == 0
    assert merged["compilation_config"]["cudagraph_capture_sizes"] == graphs
    assert merged["max_model_len"] == preset.engine_kwargs["max_model_len"]
    assert "mode" not in preset.engine_kwargs["compilation_config"]  # the preset itself is unchanged


# Config only: the GPU preset is tuned on the device's vLLM 0.26; this checks that the pinned vLLM
# accepts every engine kwarg and keeps the batch limits (a kwarg it doesn't know raises here).
def test_the_gpu_presets_engine_kwargs_make_a_valid_engine_config_on_the_pinned_vllm():
    from vllm.engine.arg_utils import AsyncEngineArgs

    preset = get_preset(smoke_test=False)
    kwargs = copy.deepcopy(preset.engine_kwargs)
    config = AsyncEngineArgs(model=resolve_model("tiny"), **kwargs).create_engine_config()
    assert config.scheduler_config.max_num_seqs == kwargs["max_num_seqs"]
    assert config.scheduler_config.max_num_batched_tokens == kwargs["max_num_batched_tokens"]
    assert max(kwargs["compilation_config"]["cudagraph_capture_sizes"]) == kwargs["max_num_seqs"]
    assert config.model_config.max_model_len == kwargs["max_model_len"]


# Config only: Ray Data LLM gives each CPU stage the engine's pool of actors (a fixed pool of n:
# n actors of one CPU each), and Ray Data starts them whether the CPUs hold them or not. The
# preset keeps a CPU free to read with, where the cluster already has the engines' GPUs.
def test_the_cpu_stages_leave_a_cpu_to_read_the_images_with():
    gpu = get_preset(smoke_test=False)
    assert gpu.cpu_stages == 4 and get_preset(smoke_test=True).cpu_stages == 2
    h200 = {"CPU": 16.0, "GPU": 1.0}  # the device's machine
    # Three replicas and their four stages hold 15 CPUs: the 16th reads. Ray Data's default stays.
    assert gpu.cpu_stage_pool((3, 3), h200) is None
    # Four replicas would take 20: two actors a stage, 4 + 8 + 1 = 13 CPUs.
    four = gpu.sharing_gpus(4)
    assert four.cpu_stage_pool((4, 4), h200) == (2, 2)
    config = processor_config(four, resolve_model("tiny"), cluster=h200)
    processor = build_caption_processor(config, model_name="x", **row_kwargs(four))
    for name in ("PrepareMultimodalStage", "ChatTemplateStage", "TokenizeStage", "DetokenizeStage"):
        compute = processor.get_stage_by_name(name).map_batches_kwargs["compute"]  # what Ray Data gets
        assert (compute.min_size, compute.max_size) == (2, 2), name
    # Unknown, or an autoscaling cluster still without the engines' GPUs: Ray Data LLM's default.
    assert four.cpu_stage_pool((4, 4), None) is None
    assert four.cpu_stage_pool((4, 4), {"CPU": 8.0}) is None
    assert processor_config(four, resolve_model("tiny")).chat_template_stage["concurrency"] is None
    # Not one actor a stage fits: say so before anything starts.
    with pytest.raises(ValueError, match="need at least 9 CPUs .* this cluster has 8"):
        four.cpu_stage_pool((4, 4), {"CPU": 8.0, "GPU": 1.0})
    # The offline preset on its 8 logical CPUs: one engine, two stages.
    assert get_preset(smoke_test=True).cpu_stage_pool((1, 1), {"CPU": 8.0}) is None


# In a fresh process, a local Ray with 8 logical CPUs and one logical GPU, and the real pipeline on
# the tiny model: two engine replicas sharing the "GPU" (vLLM's CPU backend runs them) and the GPU
# preset's four CPU stages. With Ray Data LLM's default pools the stages' 8 actors and the engines'
# 2 take 10 CPUs of 8: two actors never start, nothing is read, and no row ever comes out (as four
# replicas on the device's 16-CPU H200, #29).
STAGES_SCRIPT = """
import dataclasses, json, time
import ray
from helpers.data import SAMPLE_SHARDS, read_images
from helpers.pipeline import build_caption_processor, caption, processor_config, row_kwargs
from helpers.presets import get_preset, init_ray, resolve_model

preset = dataclasses.replace(
    get_preset(True),
    placement_group_config={"bundle_per_worker": {"GPU": 0.5, "CPU": 1}},
    separate_tokenizer_stages=True,
    max_tokens=4,
    ray_init_kwargs={"num_cpus": 8, "num_gpus": 1, "include_dashboard": False},
)
init_ray(preset)  # a local start, again if Ray's fixed start-up wait fails it on a busy machine
ray.data.DataContext.get_current().enable_progress_bars = False
cluster = ray.cluster_resources()
config = processor_config(preset, resolve_model("tiny"), concurrency=2, rows=16, cluster=cluster)
processor = build_caption_processor(config, model_name="tiny", **row_kwargs(preset))
t = time.time()
rows = caption(read_images(SAMPLE_SHARDS + "/*.tar").limit(16), processor, model_name="tiny").take_all()
ids, errors = sorted(r["id"] for r in rows), [r["error"] for r in rows if r["error"]]
pool = config.chat_template_stage["concurrency"]
print("RESULT " + json.dumps({"ids": ids, "errors": errors, "pool": pool, "s": round(time.time() - t, 1)}))
"""


def test_engine_replicas_with_more_stage_actors_than_cpus_still_get_rows():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    # Its own session, so that a stalled run's Ray processes go with it.
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGES_SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=420)  # about 90 s here
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no result in 420 s (stalled?): {err[-1500:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-2000:] + err[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["pool"] == [1, 1]  # 2 replicas + 4 stages x 1 actor + 1 to read = 7 of 8 CPUs
    assert len(result["ids"]) == 16 == len(set(result["ids"])) and not result["errors"]  # rows in = rows out
