"""The two presets of the tutorial and the job, in one table.

- `gpu` is the real run: Qwen2.5-VL-3B-Instruct over the BLIP3o WebDataset shards on GPUs.
- `smoke` is the offline run: a tiny random Qwen2.5-VL built locally, the bundled sample
  shards, a handful of images, vLLM's CPU backend. Its captions are meaningless.

Environment variables don't reach Ray workers by themselves, so the engine settings a preset
needs on the workers travel in `runtime_env["env_vars"]`.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import helpers
from helpers.data import SAMPLE_SHARDS
from helpers.rows import PATCH_GRID

# The GPU memory that n engine replicas of the GPU preset sharing one GPU need, by n: on an H200
# (141 GB, 140 GiB) three together peaked at 95-96 GiB; on an 80 GB H100 (79.6 GiB) two with 22 GiB
# KV caches peaked at 71.3 GiB. 94 and 96 GB GPUs are untried. A smaller GPU runs one
# (replicas_per_gpu_for), whose KV cache vLLM sizes from the GPU's memory.
SHARED_GPU_MIN_BYTES = {2: 75 * 2**30, 3: 120 * 2**30}
# What each replica holds beside its KV cache (weights, activations, CUDA graphs): 13.6 GiB for each
# of two on the H100 above, about 13.2 for each of three on the H200. The replicas on a GPU keep all
# they hold within GPU_MEMORY_FRACTION of it (vLLM's default gpu_memory_utilization): their KV caches
# get what is left, up to the preset's own (Preset.sharing_gpus).
REPLICA_BYTES = 14 * 2**30
GPU_MEMORY_FRACTION = 0.9

# CPUs kept free for the tasks that read the images and write the captions, beside the actors of the
# engine and its CPU stages (Preset.cpu_stage_pool). One was enough on an H200's 16 CPUs: three
# replicas and their stages held the other 15.
READ_CPUS = 1

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # a Hugging Face id or a local folder; "tiny" = the locally built test model
    dataset: str  # a Hugging Face dataset id, a shard glob, a Parquet path or an image folder
    num_images: int  # the first run's size
    num_blocks: int  # blocks after repartition: units of parallel work for the CPU stages
    # The streaming repartition of large runs (no barrier). Ray Data hands an engine replica whole
    # blocks, so this is also the rows of one engine task: keep it at batch_size (see
    # replica_tasks_in_flight).
    rows_per_block: int
    batch_size: int  # rows per engine call
    concurrency: int  # engine replicas (the GPU preset: three per GPU of 120 GiB, placement_group_config)
    max_tokens: int
    scale_up_images: int  # the "scale up" section's size
    scale_up_concurrency: int
    temperature: float = 0.3
    image_size: int = 225
    accelerator_type: str | None = None
    max_concurrent_batches: int = 8
    # Requests an engine replica holds at once, running and queued (Ray Data LLM's default, None,
    # is 1.1 x max_num_seqs). vLLM prepares each image when its request enters the engine, so
    # this is also how many images are ready when a wave of requests finishes.
    max_pending_requests: int | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where the engine runs: None = one GPU per replica (Ray Data LLM's default).
    placement_group_config: dict[str, Any] | None = None
    # Run tokenization in their own CPU stages (helps GPUs) or inside vLLM (fewer actors).
    separate_tokenizer_stages: bool = True
    ray_init_kwargs: dict[str, Any] = field(default_factory=dict)  # for a local start only
    env_vars: dict[str, str] = field(default_factory=dict)
    # The CPU stage hands the engine each image ready for the vision tower's patch grid, and named
    # by a hash of its pixels: vLLM's processor then neither resizes nor hashes it on the engine
    # actor's thread, where it prepares every request. Set by `preparing_images`.
    prepared_images: bool = False

    def __post_init__(self):
        if self.prepared_images and (self.image_size % PATCH_GRID or self.image_size < PATCH_GRID):
            raise ValueError(
                f"prepared images must be a multiple of {PATCH_GRID} pixels on a side (the patch grid), "
                f"not {self.image_size}: vLLM's processor no longer resizes them"
            )

    def preparing_images(self, image_size: int | None = None) -> Preset:
        """This preset with its images prepared in the CPU stage (`prepared_images`): resized to
        `image_size` (default: the preset's, rounded down to the patch grid, 225 -> 224, the
        same 64 image tokens), named by `rows.pixel_uuid`, and `do_resize: False` for vLLM's
        processor."""
        size = image_size or self.image_size // PATCH_GRID * PATCH_GRID
        mm_kwargs = {**self.engine_kwargs.get("mm_processor_kwargs", {}), "do_resize": False}
        return replace(
            self,
            image_size=size,
            prepared_images=True,
            engine_kwargs={**self.engine_kwargs, "mm_processor_kwargs": mm_kwargs},
        )

    def replica_tasks_in_flight(
        self,
        batch_size: int | None = None,
        *,
        rows: int | None = None,
        blocks: int | None = None,
        replicas: int | None = None,
    ) -> int:
        """Ray Data's `max_tasks_in_flight_per_actor` for the engine stage: the tasks a replica
        takes in at once, so that it holds only the `max_concurrent_batches` batches it runs and,
        in a run of `rows` rows over `replicas` replicas, no more than an even share of the run.

        Ray Data hands an actor up to this many tasks before another actor gets any, and a task is
        a block of at least `batch_size` rows: the repartition's `rows_per_block`, or `rows` over
        `blocks` for a repartition into a number of blocks. So the cap counts rows, not tasks: with
        Ray Data's default (2 x `max_concurrent_batches` tasks) the replica that is up first can
        take every row of a run, and Ray Data then shuts the others down, idle. The notebook's
        first run on the GPU preset (10,000 images in 64 blocks of 157 rows, three replicas) gets 21
        tasks per replica; the last block goes to whichever finishes first. The share rounds
        down, so that with more replicas none is left without a block. `replicas` defaults to
        `concurrency`.
        """
        batch = batch_size or self.batch_size
        rows_per_task = max(batch, -(-rows // blocks) if rows and blocks else self.rows_per_block)
        tasks = -(-batch * self.max_concurrent_batches // rows_per_task)  # the batches it runs at once
        if rows:
            share = -(-rows // (replicas or self.concurrency))
            tasks = min(tasks, share // rows_per_task)
        return max(1, tasks)

    @property
    def bundle(self) -> dict[str, float]:
        """Each engine replica's resources: placement_group_config's bundle, or a whole GPU where
        there is no placement_group_config (Ray Data LLM's default)."""
        if self.placement_group_config is None:
            return {"GPU": 1}
        return dict(self.placement_group_config.get("bundle_per_worker") or {})

    @property
    def gpu_share(self) -> float:
        """Each engine replica's share of a GPU: placement_group_config's bundle's, a whole GPU where
        there is no placement_group_config (Ray Data LLM's default), 0 where the bundle names no
        GPU (the offline preset, on CPU)."""
        return self.bundle.get("GPU") or 0

    @property
    def replicas_per_gpu(self) -> int:
        """Engine replicas that share one GPU: 1 / gpu_share (1 on CPU: one GPU per replica where
        the preset runs on a GPU at all)."""
        return max(1, round(1 / (self.gpu_share or 1)))

    def sharing_gpus(self, replicas_per_gpu: int, gpu_bytes: int | None = None) -> Preset:
        """This GPU preset with `replicas_per_gpu` engine replicas on each GPU, on as many GPUs
        as before (`concurrency` and `scale_up_concurrency` count replicas). One per GPU: vLLM
        sizes the KV cache itself from GPU_MEMORY_FRACTION of the GPU, as on a GPU under 75 GiB.
        More: each replica gets a fixed KV cache (sized by a fraction of the GPU, engines that
        start together each count the other's memory as their own, and the last finds none left
        for its cache), the preset's KV cache per GPU split between them: the GPU holds the same
        KV cache however many replicas share it. On a GPU of `gpu_bytes` that can't hold it
        beside them, they split what is left of GPU_MEMORY_FRACTION of the GPU after
        REPLICA_BYTES each, and more replicas than that leaves room for are refused (None: the
        size is unknown, and the preset's cache is kept)."""
        if replicas_per_gpu < 1:
            raise ValueError(f"replicas_per_gpu must be 1 or more, not {replicas_per_gpu}")
        bundle = self.bundle or {"GPU": 1}  # an empty bundle is taken as a whole GPU
        if not bundle.get("GPU"):
            raise ValueError(f"the {self.name} preset runs on CPU: it has no GPU to share")
        bundle.update(GPU=1 / replicas_per_gpu, CPU=bundle.get("CPU", 1))
        engine_kwargs = {k: v for k, v in self.engine_kwargs.items() if k != "kv_cache_memory_bytes"}
        engine_kwargs["gpu_memory_utilization"] = round(GPU_MEMORY_FRACTION / replicas_per_gpu, 3)
        if replicas_per_gpu > 1:
            if "kv_cache_memory_bytes" not in self.engine_kwargs:
                raise ValueError(
                    "replicas that share a GPU need a fixed kv_cache_memory_bytes in engine_kwargs"
                )
            per_gpu = self.engine_kwargs["kv_cache_memory_bytes"] * self.replicas_per_gpu
            if gpu_bytes is not None:
                room = int(GPU_MEMORY_FRACTION * gpu_bytes) - replicas_per_gpu * REPLICA_BYTES
                if room < replicas_per_gpu * 2**30:
                    raise ValueError(
                        f"{replicas_per_gpu} engine replicas do not fit a GPU of "
                        f"{gpu_bytes / 2**30:.1f} GiB: each holds about {REPLICA_BYTES // 2**30} GiB "
                        "beside its KV cache. Run fewer (REPLICAS_PER_GPU; the job's --replicas-per-gpu)."
                    )
                per_gpu = min(per_gpu, room)
            engine_kwargs["kv_cache_memory_bytes"] = per_gpu // replicas_per_gpu
        gpus, scale_up_gpus = (
            max(1, round(r / self.replicas_per_gpu)) for r in (self.concurrency, self.scale_up_concurrency)
        )
        return replace(
            self,
            engine_kwargs=engine_kwargs,
            placement_group_config={"bundle_per_worker": bundle},
            concurrency=gpus * replicas_per_gpu,
            scale_up_concurrency=scale_up_gpus * replicas_per_gpu,
        )

    @property
    def cpu_stages(self) -> int:
        """Ray Data LLM's CPU stages around the engine: prepare_multimodal and chat_template, and
        tokenize and detokenize where they run apart from the engine."""
        return 4 if self.separate_tokenizer_stages else 2

    def cpu_stage_pool(
        self, engine_pool: int | tuple[int, int], cluster: Mapping[str, float] | None
    ) -> tuple[int, int] | None:
        """The actor pool of each CPU stage for an engine pool of `engine_pool` replicas on a
        cluster of `cluster` resources (`ray.cluster_resources()`), or None for Ray Data LLM's
        default: the engine's pool.

        Each stage actor and each engine replica holds one CPU (the replica its bundle's) for as
        long as it lives, and the tasks that read the images need one more. Ray Data starts every
        actor of a fixed pool whether the CPUs hold it or not, and then waits for ever for a CPU to
        read with: four replicas and four stages of four actors take 20 CPUs, and on a 16-CPU
        machine no row ever reaches the engines. So where the cluster is short, each stage gets as
        many actors as fit (a fixed pool, at most the engines' starting replicas); where not even
        one each fits, a ValueError says what to change. A cluster without the GPUs the engines
        start on (an autoscaling cluster still at its head node) or unknown (`None`) keeps the
        default: the nodes that bring the GPUs bring CPUs.
        """
        low = engine_pool if isinstance(engine_pool, int) else engine_pool[0]  # the replicas that start
        if cluster is None or cluster.get("GPU", 0) < low * self.gpu_share - 1e-6:  # shares are floats
            return None
        cpus = cluster.get("CPU", 0)
        engine_cpus = low * self.bundle.get("CPU", 1)
        fits = int((cpus - engine_cpus - READ_CPUS) // self.cpu_stages)
        if fits < 1:
            need = engine_cpus + self.cpu_stages + READ_CPUS
            raise ValueError(
                f"{low} engine replica(s) and {self.cpu_stages} CPU stages need at least {need:g} CPUs (one "
                f"per replica, one per stage actor, {READ_CPUS} to read images); this cluster has {cpus:g}. "
                "Run fewer engine replicas (REPLICAS_PER_GPU or CONCURRENCY; the job's --replicas-per-gpu "
                "or --concurrency) or use a machine with more CPUs."
            )
        return None if fits >= low else (fits, fits)

    def replicas_per_gpu_for(self, gpu_bytes: int | None) -> int:
        """The engine replicas per GPU that a GPU of `gpu_bytes` holds: the most, up to the
        preset's, whose `SHARED_GPU_MIN_BYTES` it has (the GPU preset: 3 from 120 GiB, 2 from 75
        GiB; never more than it lists), else one; one where the size is unknown (`None`: no GPU
        on this machine, such as a cluster's CPU head node), as one always fits."""
        if gpu_bytes is None:
            return 1
        fits = [
            n for n, need in SHARED_GPU_MIN_BYTES.items() if n <= self.replicas_per_gpu and gpu_bytes >= need
        ]
        return max(fits, default=1)

    def for_gpu(self, gpu_bytes: int | None, replicas_per_gpu: int | None = None) -> Preset:
        """This preset with `replicas_per_gpu` engine replicas per GPU, or where that is None the
        most a GPU of `gpu_bytes` holds (`replicas_per_gpu_for`), with the memory settings that go
        with them (`sharing_gpus`); a CPU preset unchanged, unless told to share a GPU (then
        `sharing_gpus`' error). What the job and the benchmarks run on the GPU they find (the
        notebook spells out the same two steps): the preset's three, with their fixed KV caches,
        run out of memory on an 80 GB GPU."""
        if not self.gpu_share and replicas_per_gpu is None:
            return self
        per_gpu = replicas_per_gpu or self.replicas_per_gpu_for(gpu_bytes)
        if per_gpu == self.replicas_per_gpu == 1:  # one replica per GPU, or the CPU preset: no sharing
            return self
        return self.sharing_gpus(per_gpu, gpu_bytes)  # equal to this preset where it fits as it is

    def runtime_env(self) -> dict[str, Any]:
        """For `ray.init`: ship `helpers` and the preset's environment to every Ray worker."""
        return {"py_modules": [helpers.__path__[0]], "env_vars": dict(self.env_vars)}


PRESETS: dict[str, Preset] = {
    "gpu": Preset(
        name="gpu",
        model="Qwen/Qwen2.5-VL-3B-Instruct",
        dataset="BLIP3o/BLIP3o-Pretrain-Short-Caption",
        num_images=10_000,
        num_blocks=64,
        # One batch per block: a replica then takes in exactly the batches it runs at once
        # (replica_tasks_in_flight; with blocks of 256, four batches each, one replica of two took
        # every row of a 12,288-image run).
        rows_per_block=64,
        batch_size=64,
        # Three engine replicas per GPU (placement_group_config), each with its own engine actor and
        # engine-core process: the threads of one or two engines can't keep an H200 busy at short
        # captions. At long ones (256 tokens) their KV caches fill and two do as well
        # (benchmarks/README.md has the runs).
        concurrency=3,
        max_tokens=256,
        # 6,144 rows in each replica's engine stage, 4,096 of them inside its engine: 2,048 running
        # and up to 2,048 prepared and queued, so images are ready when a wave of requests
        # finishes (Ray Data LLM's default, 1.1 x max_num_seqs, runs dry; benchmarks/README.md).
        max_concurrent_batches=96,
        max_pending_requests=4096,
        scale_up_images=1_000_000,
        scale_up_concurrency=12,  # 4 GPUs
        # Tuned on one H200, each step side by side with the one before (benchmarks/README.md).
        engine_kwargs={
            "max_model_len": 4096,
            "max_num_seqs": 2048,
            "max_num_batched_tokens": 16384,
            # CUDA graphs up to the full decode batch (vLLM's default stops at 512), for 19 batch
            # sizes instead of vLLM's 83: a shorter capture at start-up, the same throughput.
            "compilation_config": {
                "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896]
                + [1024, 1280, 1536, 1792, 2048]
            },
            "enable_prefix_caching": True,  # every request shares the system prompt
            # Engines that share a GPU each get a fixed KV cache, a third of 56 GiB. Sized by a
            # fraction of the GPU instead, the engines measure their memory at once, each counts
            # the others' as its own, and the last finds none left for its cache. The three
            # together peak at about 96 GiB; a GPU under 120 GiB runs fewer (replicas_per_gpu_for), and
            # one that can't hold their caches with them splits a smaller one (sharing_gpus).
            "gpu_memory_utilization": 0.3,
            "kv_cache_memory_bytes": 56 * 2**30 // 3,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            # 225x225 rounds to 224x224: at most 64 image tokens, whatever the input size.
            "mm_processor_kwargs": {"max_pixels": 224 * 224},
        },
        placement_group_config={"bundle_per_worker": {"GPU": 1 / 3, "CPU": 1}},
        # vLLM's compile cache (torch.compile and Triton kernels) where every node of the cluster
        # finds it: on Anyscale /mnt/cluster_storage, so a new node starts warm (about 45 s less
        # start-up on an H200; benchmarks/README.md). Elsewhere vLLM keeps it in
        # ~/.cache/vllm on each node: warm from the second start on that node.
        env_vars=(
            {
                "VLLM_CACHE_ROOT": "/mnt/cluster_storage/cache/vllm",
                "TRITON_CACHE_DIR": "/mnt/cluster_storage/cache/triton",
            }
            if os.path.isdir("/mnt/cluster_storage")
            else {}
        ),
    ),
    "smoke": Preset(
        name="smoke",
        model="tiny",
        dataset=f"{SAMPLE_SHARDS}/*.tar",
        num_images=16,
        num_blocks=2,
        rows_per_block=8,
        batch_size=8,
        concurrency=1,
        max_tokens=16,
        scale_up_images=24,
        scale_up_concurrency=1,
        max_concurrent_batches=2,
        engine_kwargs={
            "dtype": "bfloat16",
            "max_model_len": 1024,
            "max_num_seqs": 8,
            "enforce_eager": True,  # no graph capture on CPU: starts in seconds
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "seed": 0,
        },
        # No GPU: the engine replica asks Ray for a CPU instead.
        placement_group_config={"bundle_per_worker": {"CPU": 1}},
        separate_tokenizer_stages=False,
        # Logical CPU slots, not cores: lets the read tasks, the CPU stages and the engine
        # be scheduled side by side on a 2-core machine (with 2 slots Ray Data waits forever).
        # No dashboard: its processes would take CPU time from the engine on 2 cores.
        ray_init_kwargs={"num_cpus": 8, "include_dashboard": False},
        env_vars={
            **OFFLINE_ENV,
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache for vLLM's CPU backend
            # On CPU, vLLM otherwise runs the model in a worker process of its own beside the
            # engine core; "0" runs it inside the engine core: one vLLM import and model load fewer
            # per engine (measured in benchmarks/README.md, "The offline preset on 2 cores").
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": "WARNING",  # keep the notebook's output readable
        },
    ),
}


def merge_engine_kwargs(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """A preset's engine_kwargs with override's keys on top, one level deep: a dict such as
    compilation_config is merged key by key, so an override that names one of its keys keeps the
    preset's others (its CUDA graph sizes, say)."""
    merged = dict(base)
    for key, value in (override or {}).items():
        both_dicts = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = {**merged[key], **value} if both_dicts else value
    return merged


def local_gpu_memory_bytes(stated_gib: float | None = None) -> int | None:
    """The memory of this machine's smallest GPU, from `nvidia-smi`; None where it has none (or
    no `nvidia-smi`), where a GPU doesn't say, or where one is split into MIG slices (nvidia-smi
    reports the whole GPU). A notebook's kernel or a job's driver on a GPU node sees the GPUs its
    engines will run on; one on a CPU head node sees none, so there the GPU memory of the nodes
    the engines run on, in GiB, stands for it: `stated_gib` (the job's --gpu-memory-gib), else
    `GPU_MEMORY_GIB`."""
    if stated_gib is None and (given := os.environ.get("GPU_MEMORY_GIB")):
        try:
            stated_gib = float(given)
        except ValueError:
            raise ValueError(f"GPU_MEMORY_GIB must be a number of GiB such as 80, not {given!r}") from None
    if stated_gib is not None:
        return int(stated_gib * 2**30)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,mig.mode.current", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]
    if not gpus or any(not g[0].isdigit() or "Enabled" in g[1:] for g in gpus):
        return None
    return min(int(g[0]) for g in gpus) * 2**20


# Tries at starting a local Ray cluster (init_ray).
LOCAL_START_ATTEMPTS = 3


def get_preset(smoke_test: bool) -> Preset:
    return PRESETS["smoke" if smoke_test else "gpu"]


def init_ray(preset: Preset, runtime_env: dict[str, Any] | None = None, **kwargs: Any) -> bool:
    """Connect to the running Ray cluster if there is one, else start a local one.

    `ray.init()` connects when RAY_ADDRESS is set (the driver of a Ray Job, a notebook on a
    cluster) or when `ray start` runs on this machine, and Ray refuses local-cluster settings
    such as `num_cpus` when it connects. So the preset's `ray_init_kwargs` go only to a local
    start. `runtime_env` replaces the preset's (the benchmark's experiments add to it). Returns
    True when it started a local cluster.
    """
    from ray._private.services import canonicalize_bootstrap_address  # ray.init's own rule

    local = canonicalize_bootstrap_address(None) is None
    start_ray(
        attempts=LOCAL_START_ATTEMPTS if local else 1,
        runtime_env=runtime_env or preset.runtime_env(),
        ignore_reinit_error=True,
        **(preset.ray_init_kwargs if local else {}),
        **kwargs,
    )
    return local


def start_ray(attempts: int = LOCAL_START_ATTEMPTS, **kwargs: Any) -> None:
    """`ray.init(**kwargs)`, made again (up to `attempts` in all, a warning each) where a local
    start fails Ray's fixed start-up wait. A local start's raylet waits a fixed 15 s for its agents
    to report their ports, and on a busy machine they can miss it: "The current node timed out
    during startup". Another start usually makes it (their imports are cached by then). Without
    one, the next Ray call would start a default cluster without the caller's settings. Any other
    error is raised at once."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:
            if attempt == attempts or "timed out during startup" not in str(e):
                raise
            warnings.warn(f"Ray's local start failed ({e}); trying again ({attempt + 1})", stacklevel=3)
            ray.shutdown()


def resolve_model(model: str) -> str:
    """`tiny` -> the path of the locally built test model (built on first use); else unchanged."""
    if model == "tiny":
        from helpers.tiny_model import ensure_tiny_model

        return ensure_tiny_model()
    return model
