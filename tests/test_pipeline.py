"""The GPU preset's engine output settings, run for real on CPU with the tiny model.

The GPU preset tokenizes and detokenizes in Ray Data LLM's own stages and tells the engine not to
detokenize (detokenize=False) and to return each request once, finished (FINAL_ONLY). If the
detokenize stage were off, or the settings didn't reach the engine, captions would come back empty
or token counts would be wrong: this runs that configuration on the smoke preset's engine.
"""

import dataclasses

import ray

from helpers.data import read_images
from helpers.pipeline import build_caption_processor, caption, processor_config, row_kwargs
from helpers.presets import get_preset, resolve_model

MAX_TOKENS = 6


def test_separate_detokenize_stage_with_final_only_output_gives_full_captions():
    preset = dataclasses.replace(get_preset(smoke_test=True), separate_tokenizer_stages=True)
    kwargs = {**row_kwargs(preset, max_tokens=MAX_TOKENS), "ignore_eos": True}
    assert kwargs["detokenize"] is False and kwargs["final_only"] is True

    ray.init(runtime_env=preset.runtime_env(), **preset.ray_init_kwargs)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = processor_config(preset, resolve_model(preset.model))
        processor = build_caption_processor(config, model_name=preset.model, **kwargs)
        ds = read_images(preset.dataset).limit(4)
        rows = caption(ds, processor, model_name=preset.model).take_all()
    finally:
        ray.shutdown()

    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    for r in rows:
        assert r["error"] is None, r
        assert r["num_generated_tokens"] == MAX_TOKENS, r
        assert isinstance(r["caption"], str) and r["caption"].strip(), r  # text from Ray's stage


def test_engine_replicas_are_a_fixed_pool_started_at_once():
    config = processor_config(get_preset(smoke_test=False), "Qwen/Qwen2.5-VL-3B-Instruct", concurrency=3)
    pool = config.get_concurrency(autoscaling_enabled=True)  # what Ray Data LLM asks of Ray Data
    assert pool.get("size", pool.get("min_size")) == 3 and pool.get("max_size", 3) == 3, pool
