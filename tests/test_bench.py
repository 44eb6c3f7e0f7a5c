"""The benchmark script runs (CPU, tiny model, toy size) so it can't rot between GPU sessions."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_vision  # noqa: E402  (benchmarks/ is no package)
import pytest  # noqa: E402
from conftest import gpus_reporting  # noqa: E402

from helpers.presets import get_preset  # noqa: E402


def test_sustained_rate_counts_from_the_end_of_the_first_wave():
    # 4,096 rows come out in the first second (the wave admitted during start-up), then 200 a second.
    wave = [(100.0 + (i + 1) / 8, 512 * (i + 1)) for i in range(8)]
    steady = [(101.0 + k * 2.5, 4096 + 500 * k) for k in range(1, 52)]
    rate, window = bench_vision.sustained_rate(steady[::-1] + wave, first_wave=4096)
    assert round(rate, 6) == 200.0 and round(window, 6) == 127.5
    # From the first output, as steady_images_per_s counts, the wave inflates the rate.
    (t_first, _), (t_end, rows_end) = wave[0], steady[-1]
    assert rows_end / (t_end - t_first) > 1.1 * rate
    # No figure when the run never gets past its first wave, or only one point does.
    assert bench_vision.sustained_rate(wave, first_wave=8192) == (None, None)
    assert bench_vision.sustained_rate(wave, first_wave=4096) == (None, None)
    assert bench_vision.sustained_rate([], first_wave=1) == (None, None)


def test_sustained_rate_does_not_count_the_second_wave_without_its_generation_time():
    # Four waves of 4,096 rows, each generated in 20 s and then out in 64 batches over 2 s, noted
    # by the bench's own PROGRESS rule (a point every 500 rows): 12,288 rows in the 60 s after
    # the first wave's burst, 204.8 a second. The first point past 4,096 is 4,544 rows, early in
    # the second wave's burst; a window started there would count that wave without its 20 s.
    points = []
    for wave in range(4):
        for batch in range(1, 65):
            bench_vision.progress(points, 4096 * wave + 64 * batch, 100 + 20 * wave + 2 * batch / 64, 0)
    bench_vision.progress(points, 16384, 162, 0, last=True)  # the run's last rows, as the bench notes them
    rate, window = bench_vision.sustained_rate(points, first_wave=4096)
    assert abs(rate - 204.8) / 204.8 < 0.01 and abs(window - 60) < 0.1, (rate, window)


def test_sustained_rate_stops_before_the_last_wave():
    # Three replicas run 6,144 rows at once. The first wave comes out in 2 s, then 350 rows a
    # second while each row out lets a new one in; once the queues have emptied, the last 6,144
    # rows running need no admission work and come out together in 3 s.
    points = []
    for rows in range(512, 6145, 512):
        bench_vision.progress(points, rows, 100 + 2 * rows / 6144, 0)
    for rows in range(6144 + 500, 23856, 500):
        bench_vision.progress(points, rows, 102 + (rows - 6144) / 350, 0)
    t_last = 102 + (23856 - 6144) / 350
    for rows in range(23856, 30001, 512):
        bench_vision.progress(points, rows, t_last + 3 * (rows - 23856) / 6144, 0)
    bench_vision.progress(points, 30000, t_last + 3, 0, last=True)
    rate, window = bench_vision.sustained_rate(points, first_wave=6144, last_wave=6144)
    assert abs(rate - 350) < 1 and window > 45, (rate, window)
    # Run on to the last row, the window counts the last wave's burst as throughput.
    to_end, _ = bench_vision.sustained_rate(points, first_wave=6144)
    assert to_end > 1.2 * rate
    # N for a 60 s window at that rate: both waves and 60 s of rows.
    assert bench_vision.images_for_window(6144, 6144, rate) == 12288 + 21000
    assert bench_vision.images_for_window(6144, 6144, None) is None
    # A run whose two waves overlap has no sustained window.
    short = [(t, r) for t, r in points if r <= 12000] + [(points[-1][0], 12000)]
    assert bench_vision.sustained_rate(short, first_wave=6144, last_wave=6144) == (None, None)


# The PROGRESS points of a three-replica run at 256 tokens on the H200 (r3-256-c2 in
# benchmarks/results/2026-12-05-h200-r3-pairs.jsonl): its engines' KV caches filled (99.9%) and each
# ran a median of 1,290.5 of its 2,048 sequences, so the first burst ended near 4,544 rows and a
# slow stretch followed; started at the configured wave of 6,144 the window skipped it.
R3_256_POINTS = [
    (200.3, 512), (201.8, 1024), (202.6, 1536), (205.1, 2048), (206.6, 2560), (207.1, 3008), (207.7, 3520),
    (208.3, 4032), (209.9, 4544), (218.2, 5056), (222.2, 5504), (228.1, 6016), (244.2, 6528), (246.0, 7040),
    (247.1, 7552), (248.3, 8000), (249.0, 8512), (250.2, 9024), (251.7, 9536), (253.2, 10048), (255.1, 10560),
    (261.5, 11008), (268.4, 11520), (272.4, 12032), (281.7, 12544), (281.9, 13056), (282.2, 13504),
    (282.4, 14016), (282.6, 14504), (282.9, 15016), (283.6, 15528), (283.8, 16040), (283.9, 16552),
    (283.9, 17000),
]  # fmt: skip


def test_where_the_kv_cache_filled_the_first_wave_is_what_the_engines_ran():
    lines = [f"PROGRESS {rows} rows at {t} s" for t, rows in R3_256_POINTS]
    configured_rate, _ = bench_vision.sustained_rate(R3_256_POINTS, 6144)
    record = {
        "first_wave_rows": 6144,
        "sustained_images_per_s": round(configured_rate, 2),
        "settings": {"concurrency": 3},
        "engine_stats": {"running_median": 1290.5, "kv_cache_usage_pct_max": 99.9},
    }
    out = bench_vision.apply_kv_bound(record, lines)
    assert (out["first_wave_rows"], out["first_wave_rows_configured"]) == (3871, 6144)
    # From 3,520 rows at 207.7 s (the last point before 3,871) to 13,056 at 281.9 s (the last
    # point before the last wave, the final 3,871 rows): 9,536 rows in 74.2 s. Run on to the end,
    # the window counted the last 4,456 rows, out in 2.2 s, as well.
    assert (out["sustained_images_per_s"], out["sustained_window_s"]) == (128.52, 74.2)
    assert out["sustained_to_end_images_per_s"] == 176.9
    assert configured_rate > 1.1 * out["sustained_to_end_images_per_s"]  # the skipped slow stretch
    # A cache that never filled (the two-replica runs: 82%) leaves the record as the run made it.
    roomy = {**record, "engine_stats": {"running_median": 1929.0, "kv_cache_usage_pct_max": 82.4}}
    assert bench_vision.apply_kv_bound(roomy, lines) == roomy
    # A full cache that still ran every sequence let in: the configured wave stands.
    full = {**record, "engine_stats": {"running_median": 2048.0, "kv_cache_usage_pct_max": 99.9}}
    assert bench_vision.apply_kv_bound(full, lines) == full


# A run of 30,000 images drew image i + 19,200 identical to image i (colour and square repeat
# with periods 256 and 150), and a repeated image can hit vLLM's processor and prefix caches.
def test_bench_images_stay_distinct_past_the_colour_and_square_period(tmp_path):
    from PIL import Image, ImageChops

    def image(first):
        (row,) = bench_vision.read_rows(bench_vision.make_shards(tmp_path / str(first), 1, first=first))
        return row["id"], Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")

    (id_a, a), (id_b, b) = image(0), image(19_200)
    assert (id_a, id_b) == ("00000000.jpg", "00019200.jpg")
    assert ImageChops.difference(a, b).getbbox() is not None  # some pixel differs
    rows = bench_vision.read_rows(bench_vision.make_shards(tmp_path / "range", 3, per_shard=2, first=5))
    assert sorted(r["id"] for r in rows) == ["00000005.jpg", "00000006.jpg", "00000007.jpg"]


def test_first_wave_is_what_the_engines_run_at_once():
    gpu = get_preset(False)
    # The GPU preset: 3 replicas of max_num_seqs 2,048; Ray Data lets 4,096 in (max_pending_requests).
    assert gpu.concurrency == 3 and gpu.engine_kwargs["max_num_seqs"] == 2048
    preset = dict(
        batch_size=gpu.batch_size,
        max_concurrent_batches=gpu.max_concurrent_batches,
        max_pending_requests=gpu.max_pending_requests,
        tasks_in_flight=gpu.replica_tasks_in_flight(rows=30_000),
        rows_per_task=gpu.rows_per_block,
    )
    assert bench_vision.first_wave_rows(2048, replicas=3, **preset) == 6144
    assert bench_vision.first_wave_rows(2048, replicas=2, **preset) == 4096
    # A smaller Ray Data cap binds: 64 rows x 16 batches per replica.
    assert bench_vision.first_wave_rows(2048, replicas=2, **{**preset, "max_concurrent_batches": 16}) == 2048
    # The original tutorial's settings: vLLM's default max_num_seqs, batch 16 x 8 in flight.
    assert bench_vision.first_wave_rows(None, replicas=1, batch_size=16, max_concurrent_batches=8) == 128


def test_benchmark_smoke_measures_engine_pipeline_and_original_side_by_side(tmp_path, cluster):
    out = tmp_path / "results.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_vision.py"),
        "--smoke",
        "-n",
        "6",
        "--max-tokens",
        "4",
        "--runs",
        "engine,engine_async,pipeline,original",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        # The flag behind h200_x2.sh's two replicas per GPU (there {"GPU": 0.5, "CPU": 1}).
        "--placement-group-config",
        '{"bundle_per_worker": {"CPU": 2}}',
        # The flag behind h200_x2.sh's per-variant environment (mmgraph: VLLM_USE_V2_MODEL_RUNNER=0).
        "--env",
        "BENCH_ENV_MARK=1",
        # The flag behind h200_x2.sh's pend2048 and seqs2048 (Ray Data LLM's max_pending_requests).
        "--max-pending-requests",
        "12",
        # h200_x2.sh's variants name only the compilation_config keys they change.
        "--engine-kwargs",
        '{"limit_mm_per_prompt": {"image": 1}}',
        # The GPU preset's output path with the tiny model: Ray Data LLM tokenizes and detokenizes
        # in its own stages, and the engine returns each request once, finished, not detokenized.
        "--separate-tokenizer-stages",
        # The lever of images prepared in the CPU stage (on the patch grid, named by their pixels'
        # hash): the engine must take them as they come, without its resize.
        "--prepared-images",
    ]
    # The Ray runs connect to the session's running cluster, as h200_x2.sh's runs share one.
    _, env = cluster
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in records] == ["engine", "engine_async", "pipeline", "original"]
    for r in records:
        assert r["images"] == 6 and r["tokens_ok"] is True, r
        assert r["e2e_images_per_s"] > 0 and r["startup_s"] > 0
        assert r["versions"]["ray"]
    # Each pipeline run measured the configuration it is named for (the README table's rows).
    pipeline, original = (r["settings"] for r in records[2:])
    assert pipeline["batch_size"] == 8 and pipeline["final_only"] is True
    # The engine didn't detokenize, and every caption has text: Ray's detokenize stage made it
    # (with that stage off the captions come back empty: the engine honours detokenize=False).
    assert pipeline["separate_tokenizer_stages"] is True and pipeline["detokenize"] is False
    assert records[2]["empty_captions"] == 0 and records[3]["empty_captions"] == 0
    assert original["batch_size"] == 16 and original["final_only"] is False and original["detokenize"] is True
    assert "max_num_seqs" in pipeline["engine_kwargs"] and "max_num_seqs" not in original["engine_kwargs"]
    assert pipeline["placement_group_config"] == {"bundle_per_worker": {"CPU": 2}}
    assert pipeline["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 1, "video": 0}  # merged key by key
    assert original["placement_group_config"] == {"bundle_per_worker": {"CPU": 1}}  # the tutorial's
    assert pipeline["env_vars"]["BENCH_ENV_MARK"] == "1"  # recorded with the run it changed
    for r in records[:3]:  # prepared, and so recorded; the tutorial's settings not
        assert r["settings"]["engine_kwargs"]["mm_processor_kwargs"]["do_resize"] is False, r["run"]
    assert pipeline["prepared_images"] is True and pipeline["image_size"] == 224
    assert original["prepared_images"] is False and original["image_size"] == 225
    # Recorded, and what the engine actor used (its own log line); the original keeps Ray's default.
    assert pipeline["max_pending_requests"] == 12 and original["max_pending_requests"] is None
    assert pipeline["ray_address"] == original["ray_address"] == env["RAY_ADDRESS"]
    # The preset caps it (here at the run's share: its 6 rows are one block of 8, one task); the
    # tutorial left Ray's default.
    in_flight = "max_tasks_in_flight_per_actor"
    assert pipeline[in_flight] == 1 and original[in_flight] is None
    assert pipeline["rows_per_block"] == original["rows_per_block"] == 8  # a cap's task is a block
    # The start-up's phases in the order they happen, the driver's processor build among them.
    phases = records[2]["startup_breakdown"]
    assert (
        phases["ray_up"] <= phases["processor_built"] <= phases["dataset_started"] <= phases["first_output"]
    )
    log = (tmp_path / "work" / "logs" / "pipeline-0.log").read_text()
    assert "Max pending requests is set to 12" in log


# The renderer benchmark's variants must differ only in where the work is done: each gives vLLM's
# real processor (the tiny model's, with the GPU preset's image settings) the same prompt, and an
# undecodable row's placeholder passes each, as bench_render.py's figures assume. Its warm-up mode
# times the warm-up on the preset's image settings too: a 224x224 dummy, 64 tokens.
def test_render_bench_variants_give_the_engine_the_same_prompt(tmp_path):
    out = tmp_path / "render.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_render.py"), "--smoke"]
    cmd += ["--modes", "inputs,warmup", "--rounds", "1", "--per-round", "2", "--out", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record, warmup = [json.loads(line) for line in out.read_text().splitlines()]
    assert warmup["mode"] == "warmup" and len(warmup["first_s"]) == len(warmup["second_s"]) == 1
    assert warmup["first_s"][0] >= warmup["second_s"][0] > 0
    assert warmup["patches"]["pixel_values"] == [64 * 4, 1176]  # 4 patches of 14x14 make a token
    assert set(record["variants"]) == {"preset", "resized", "named", "prepared"}
    assert all(v["ms_per_request"] > 0 and len(v["rounds"]) == 1 for v in record["variants"].values())
    tokens, placeholder = record["prompt_tokens"], record["placeholder_prompt_tokens"]
    assert len(set(tokens.values())) == 1, tokens
    # The placeholder: vLLM's resize takes it up to the processor's minimum, 56x56 (4 image tokens);
    # left on the grid at 28x28 it is one. The image: 64.
    assert [tokens[v] - placeholder[v] for v in ("preset", "named")] == [60, 60], placeholder
    assert [tokens[v] - placeholder[v] for v in ("resized", "prepared")] == [63, 63], placeholder


def test_serve_prototype_rows_cross_to_the_deployment_as_plain_dicts(tmp_path):
    # The Serve stage's client actors start afresh for every dataset; a pydantic request class in
    # the row (its dtype_mapping) imports vLLM and torch in each of them. The request is a dict for
    # the deployment's chat_dict, the image a data URL, and an ErrorResponse becomes an error row.
    import base64

    import serve_prototype
    from PIL import Image

    from helpers.pipeline import row_kwargs

    preset = get_preset(smoke_test=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    row = {"id": "a", "image_bytes": buf.getvalue()}
    req = serve_prototype.serve_request(row, model_id="tiny", **row_kwargs(preset, max_tokens=7))
    assert req["method"] == serve_prototype.DICT_METHOD and req["dtype"] is None
    assert hasattr(serve_prototype.caption_server_cls(), serve_prototype.DICT_METHOD)
    body = req["request_kwargs"]
    assert body["max_tokens"] == 7 and body["model"] == "tiny" and req["image_id"] == "a"
    url = body["messages"][1]["content"][0]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.format == "JPEG" and image.size[0] > 0
    json.dumps(req)  # nothing in it needs pickling

    ok = {
        "image_id": "a",
        "decode_error": None,
        "choices": [{"message": {"content": "a red square"}}],
        "usage": {"prompt_tokens": 90, "completion_tokens": 4},
    }
    out = serve_prototype.serve_response(ok, model="tiny")
    assert (out["id"], out["caption"], out["error"], out["num_generated_tokens"]) == (
        "a",
        "a red square",
        None,
        4,
    )
    failed = {"image_id": "b", "decode_error": None, "error": {"message": "prompt too long", "code": 400}}
    out = serve_prototype.serve_response(failed, model="tiny")
    assert out["id"] == "b" and out["caption"] is None and "prompt too long" in out["error"]


# The bench runs the engines the notebook and the job would run on the GPU it finds: the preset's
# three replicas with their fixed KV caches need more than an H100's 80 GB (they ran out of memory
# there: results/2026-12-05-h100-replicas.jsonl), so an H100 gets two with smaller caches, unless
# --replicas-per-gpu says.
@pytest.mark.parametrize(
    ("gpus", "options", "replicas"),
    [
        ("143771, Disabled", [], 3),
        ("81559, Disabled", [], 2),
        ("81559, Disabled", ["--replicas-per-gpu", "1"], 1),
    ],
    ids=["H200", "H100", "H100-told-1"],
)
def test_the_bench_runs_as_many_engines_per_gpu_as_the_gpu_holds(
    tmp_path, monkeypatch, gpus, options, replicas
):
    monkeypatch.setenv("PATH", gpus_reporting(tmp_path, gpus))
    preset, _, concurrency = bench_vision.settings(bench_vision.parse_args(options), "pipeline")
    assert (preset.replicas_per_gpu, concurrency) == (replicas, replicas)
    # The original tutorial's settings are their own: one engine on a whole GPU, whatever the GPU.
    original, _, concurrency = bench_vision.settings(bench_vision.parse_args(options), "original")
    assert (original.placement_group_config, concurrency) == (None, 1)
