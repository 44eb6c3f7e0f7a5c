"""The captioning processor, built from a preset: shared by the job script and the benchmark.

The notebook writes the same configuration out field by field, to teach it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from helpers.presets import Preset, merge_engine_kwargs
from helpers.rows import finalize, postprocess, preprocess


def processor_config(
    preset: Preset,
    model: str,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    rows: int | None = None,
    cluster: Mapping[str, float] | None = None,
) -> vLLMEngineProcessorConfig:
    """The engine stage's configuration. `rows`: the run's size where it is known (the job's
    --limit), so each replica takes in at most an even share of it. `cluster`: the resources of
    the cluster it runs on (`ray.cluster_resources()`), so that the CPU stages' actors leave a CPU
    to read with (`Preset.cpu_stage_pool`)."""
    separate = preset.separate_tokenizer_stages
    replicas = concurrency or preset.concurrency
    batch = batch_size or preset.batch_size
    stage_pool = preset.cpu_stage_pool((replicas, replicas), cluster)
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=merge_engine_kwargs(preset.engine_kwargs, engine_kwargs),
        batch_size=batch,
        # (n, n): a fixed pool that starts every replica at once. A plain n gives an autoscaling
        # pool of 1..n, which on 2 H200s added the second replica 92 s after the first.
        concurrency=(replicas, replicas),
        max_concurrent_batches=preset.max_concurrent_batches,
        # Ray Data hands a replica up to this many tasks (blocks) before the next replica gets any;
        # its default, 2 x max_concurrent_batches, let the first replica up take every row of a
        # two-replica run, and Ray Data shut the second down, idle.
        max_tasks_in_flight_per_actor=preset.replica_tasks_in_flight(batch, rows=rows, replicas=replicas),
        max_pending_requests=preset.max_pending_requests,
        accelerator_type=preset.accelerator_type,
        placement_group_config=preset.placement_group_config,
        prepare_multimodal_stage={"enabled": True, "concurrency": stage_pool},
        chat_template_stage={"enabled": True, "concurrency": stage_pool},
        tokenize_stage={"enabled": separate, "concurrency": stage_pool},
        detokenize_stage={"enabled": separate, "concurrency": stage_pool},
        should_continue_on_error=True,
        log_engine_metrics=False,
    )


def row_kwargs(preset: Preset, *, max_tokens: int | None = None) -> dict[str, Any]:
    """The preprocess settings of a preset. With separate tokenizer stages, Ray Data LLM
    detokenizes the output itself, so the engine doesn't (detokenize=False)."""
    return {
        "image_size": preset.image_size,
        "temperature": preset.temperature,
        "max_tokens": max_tokens or preset.max_tokens,
        "final_only": True,
        "detokenize": not preset.separate_tokenizer_stages,
        "image_uuid": preset.prepared_images,
    }


# Two deprecation warnings in the engine's log are upstream's, not ours: "Passing raw prompts to
# InputProcessor is deprecated" comes from how Ray Data LLM's engine stage (Ray 2.60) hands each
# request to vLLM, and "The `use_fast` parameter is deprecated" from vLLM 0.29's Qwen2.5-VL
# processor, which passes use_fast=True to transformers 5.
def build_caption_processor(config: vLLMEngineProcessorConfig, *, model_name: str, **preprocess_kwargs: Any):
    """build_processor with the project's row functions bound to their settings."""
    return build_processor(
        config,
        preprocess=partial(preprocess, **preprocess_kwargs),
        postprocess=partial(postprocess, model=model_name),
    )


def caption(ds: ray.data.Dataset, processor, *, model_name: str) -> ray.data.Dataset:
    """Run the processor and give every row, engine rejections included, the output schema."""
    return processor(ds).map(finalize, fn_kwargs={"model": model_name})
