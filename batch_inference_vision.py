"""Caption images at scale with Ray Data LLM + vLLM: the notebook's pipeline as a production job.

    python batch_inference_vision.py --output outputs/job              # GPU preset, BLIP3o shards
    python batch_inference_vision.py --smoke --output outputs/job      # offline: tiny model, CPU
    python batch_inference_vision.py --smoke --input photos/ --output outputs/photos

Output: Parquet files directly under --output (one row per input image: id, caption, error,
num_input_tokens, num_generated_tokens, model), plus _summary.json and, optionally,
_contact_sheet.png. Bad images become error rows; nothing is dropped. A folder input yields a row
for every regular file under it, whatever its name (`_DSC0001.JPG` too); hidden files such as
.DS_Store are skipped and counted in the summary (files_found, skipped_files, rows_in). Rerunning
with the same --output skips the ids already written, so a crashed or preempted job resumes where
it stopped. Rows are written and resumed by id, so every input row needs its own: local Parquet
or shards that repeat an id are refused before the run (exit 2); for remote inputs, and within
--limit, the job counts rows that share one (rows_with_a_repeated_id) and then exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import sys
import time
import traceback
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from helpers.cli import non_negative, positive
from helpers.data import (
    FileListing,
    list_input,
    listing_rows,
    local_data_files,
    read_images,
    repeated_ids,
    repeated_shard_keys,
)
from helpers.output import (
    AtomicParquetDatasink,
    dedupe_output,
    package_versions,
    read_output,
    remove_temporaries,
    summarize_output,
    write_bytes,
)
from helpers.pipeline import build_caption_processor, caption, processor_config, row_kwargs
from helpers.presets import Preset, get_preset, init_ray, local_gpu_memory_bytes, resolve_model
from helpers.show import contact_sheet

# A leading underscore keeps these out of `pyarrow.parquet.read_table(OUTPUT)`, which skips
# names starting with "_" or "." and would otherwise try to read them as Parquet.
SUMMARY_NAME = "_summary.json"
CONTACT_SHEET_NAME = "_contact_sheet.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="offline preset: tiny local model on CPU")
    p.add_argument(
        "--input",
        help="HF dataset id, WebDataset shards (.tar path/glob, local or remote), "
        "Parquet with an image column, or a folder of image files (default: the preset's)",
    )
    p.add_argument("--output", required=True, help="folder or s3:// URI: Parquet files + _summary.json")
    p.add_argument("--limit", type=non_negative, help="caption at most this many input images (the first N)")
    p.add_argument("--model", help="HF model id or local folder ('tiny' = the local test model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--concurrency", type=int, help="engine replicas (per GPU: --replicas-per-gpu)")
    p.add_argument(
        "--replicas-per-gpu",
        type=positive,
        help="engine replicas on each GPU (GPU preset: 3 where the driver's machine has GPUs of 120 GiB "
        "or more, 2 from 75 GiB, else 1)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="the GPU memory of the nodes the engines run on, where the driver's machine has no GPU "
        "to measure (a CPU head node): picks the replicas per GPU and their KV caches for it",
    )
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--rows-per-block", type=int, help="rows per block of the streaming repartition")
    p.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default={},
        help="JSON merged into the preset's engine_kwargs (a dict such as compilation_config key by key)",
    )
    p.add_argument("--image-column", default="image", help="Parquet input: the image column")
    p.add_argument("--id-column", default="id", help="Parquet input: the key column")
    p.add_argument(
        "--contact-sheet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write _contact_sheet.png of the first images (default: on with --smoke)",
    )
    p.add_argument("--contact-sheet-size", type=int, default=16, help="images on the contact sheet")
    return p.parse_args(argv)


class SkipDone:
    """Drop the rows whose id is already in the output (the resume filter)."""

    def __init__(self, done_ids: pa.Array):
        self.done_ids = done_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=self.done_ids)))


def open_input(
    args: argparse.Namespace, preset: Preset, listing: FileListing | None = None
) -> ray.data.Dataset:
    return read_images(
        args.input or preset.dataset,
        image_column=args.image_column,
        id_column=args.id_column,
        listing=listing,
    )


def rows_to_caption(listing: FileListing | None, limit: int | None) -> int | None:
    """The rows the output must hold once the run is done, where the input tells without being
    read (a folder of images or of Parquet files); None for other inputs."""
    rows = listing_rows(listing) if listing is not None else None
    return rows if rows is None or limit is None else min(limit, rows)


def describe_input(listing: FileListing | None) -> dict[str, Any]:
    """What went in, for the summary: for a local folder, the regular files found under it and
    those skipped on purpose, by reason (for a folder of images, rows in = files found - files skipped)."""
    if listing is None:
        return {"files_found": None, "skipped_files": {}}
    return {"files_found": listing.files_found, "skipped_files": listing.skipped_counts()}


def write_contact_sheet(
    args: argparse.Namespace,
    preset: Preset,
    output: pa.Table,
    name: str,
    title: str = "",
    listing: FileListing | None = None,
) -> None:
    """The first images of the input with their captions (or errors), as one PNG."""
    first = open_input(args, preset, listing).limit(args.contact_sheet_size).take_all()
    text_by_id = {
        i: c if c is not None else f"[error] {e}"
        for i, c, e in zip(*(output.column(n).to_pylist() for n in ("id", "caption", "error")), strict=True)
    }
    items = [
        (row["image_bytes"], f"{row['id']}: {text_by_id.get(row['id'], '(not captioned)')}") for row in first
    ]
    buf = io.BytesIO()
    contact_sheet(items, columns=4, title=title).save(buf, format="PNG")
    write_bytes(args.output, name, buf.getvalue())


def job_preset(args: argparse.Namespace) -> Preset:
    """The preset with the job's settings. --replicas-per-gpu unset: the preset's replicas per GPU
    where this machine's GPUs (or --gpu-memory-gib) hold them, else one (as the notebook does; a
    driver on a CPU head node sees no GPU)."""
    preset = get_preset(args.smoke)
    preset = dataclasses.replace(
        preset,
        max_tokens=args.max_tokens or preset.max_tokens,
        rows_per_block=args.rows_per_block or preset.rows_per_block,
    )
    return preset.for_gpu(local_gpu_memory_bytes(args.gpu_memory_gib), args.replicas_per_gpu)


def main(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    preset = job_preset(args)
    model_name = args.model or preset.model
    model_path = resolve_model(model_name)
    where = f"{preset.replicas_per_gpu} engine replica(s) per GPU" if preset.gpu_share else "engines on CPU"
    print(f"[job] preset {preset.name}: {where}", flush=True)

    init_ray(preset)  # a Ray Job connects to its cluster; elsewhere a local one starts
    ctx = ray.data.DataContext.get_current()
    if args.limit is not None:
        # Take the same first N images on every run, so a resumed run completes the same set.
        ctx.execution_options.preserve_order = True

    removed = remove_temporaries(args.output)
    done_ids, repeats = dedupe_output(args.output)
    print(
        f"[job] {len(done_ids)} ids already in {args.output}; {removed} partial files and "
        f"{repeats} repeated rows removed",
        flush=True,
    )

    listing = list_input(args.input or preset.dataset)
    rows_in = rows_to_caption(listing, args.limit)
    if listing is not None:
        skipped = ", ".join(f"{n} {reason}" for reason, n in listing.skipped_counts().items())
        print(
            f"[job] {listing.files_found} files found under {listing.root}; {len(listing.files)} to read"
            + (f", skipped: {skipped}" if skipped else ""),
            flush=True,
        )
    if args.limit is None:  # with --limit, only the rows taken count, after the run
        check_ids_unique(*local_data_files(args.input or preset.dataset, listing), args.id_column)
    ds = open_input(args, preset, listing)
    if args.limit is not None:
        ds = ds.limit(args.limit)
    if len(done_ids):
        ds = ds.map_batches(
            SkipDone, fn_constructor_kwargs={"done_ids": done_ids}, batch_format="pyarrow", concurrency=1
        )
    # Streaming repartition: small blocks keep every stage busy without a barrier.
    ds = ds.repartition(target_num_rows_per_block=preset.rows_per_block)

    cluster = dict(ray.cluster_resources())
    if len(done_ids):
        cluster["CPU"] = cluster.get("CPU", 0) - 1  # SkipDone's actor holds one
    config = processor_config(
        preset,
        model_path,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        engine_kwargs=args.engine_kwargs,
        # The run's size, where --limit says: each replica takes in an even share of it at most. Not
        # less the ids already done: an output filled by another run may hold ids beyond the limit,
        # and a share too small would starve the engines (too large only splits less evenly).
        rows=args.limit,
        cluster=cluster,  # the CPU stages' actors leave a CPU to read with
    )
    stage_pool = config.chat_template_stage["concurrency"]
    if stage_pool:
        print(f"[job] {cluster.get('CPU', 0):g} CPUs: {stage_pool[0]} actor(s) per CPU stage", flush=True)
    processor = build_caption_processor(config, model_name=model_name, **row_kwargs(preset))
    t_run = time.time()
    sink = AtomicParquetDatasink(args.output)
    try:
        caption(ds, processor, model_name=model_name).write_datasink(sink)
    except Exception as e:
        traceback.print_exc()
        # Count only: rewriting files here could fail again (a full disk); the rerun dedupes.
        committed = pc.count_distinct(read_output(args.output, columns=["id"]).column("id")).as_py()
        print(
            f"[job] FAILED: {type(e).__name__}: {failure_reason(e)}\n"
            f"[job] {committed} rows are committed in {args.output}; run the same command again "
            "to caption the rest.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from e
    run_s = time.time() - t_run
    # A killed earlier run's last write can land while this one runs: keep every id once.
    repeats += dedupe_output(args.output)[1]

    output = read_output(args.output)
    summary = summarize_output(output)
    written = summary["rows_in_output"] - len(done_ids)
    summary.update(
        {
            "rows_skipped_already_done": len(done_ids),
            "rows_in": rows_in,
            **describe_input(listing),
            "rows_written_this_run": written,
            # Rows are written and resumed by id (a file is named by its ids, and an id repeated
            # across files is kept once): rows handed to the sink beyond the new ids shared one.
            "rows_with_a_repeated_id": max(0, sink.rows_delivered - (summary["unique_ids"] - len(done_ids))),
            "repeated_rows_removed": repeats,
            "images_per_s": round(written / run_s, 3) if run_s else None,
            "pipeline_s": round(run_s, 1),
            "wall_s": round(time.time() - t_start, 1),
            "model": model_name,
            "input": args.input or preset.dataset,
            "preset": preset.name,
            "limit": args.limit,
            "versions": package_versions(),
        }
    )
    if args.contact_sheet if args.contact_sheet is not None else args.smoke:
        title = "Tiny random-weight test model: these captions are meaningless." if args.smoke else ""
        write_contact_sheet(args, preset, output, CONTACT_SHEET_NAME, title=title, listing=listing)
        summary["contact_sheet"] = f"{args.output}/{CONTACT_SHEET_NAME}"
    write_bytes(args.output, SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    print("[job] summary:\n" + json.dumps(summary, indent=2), flush=True)
    if rows_in is not None and rows_in != summary["rows_in_output"]:
        print(
            f"[job] WARNING: {rows_in} input rows to caption, but {summary['rows_in_output']} rows "
            f"in {args.output}",
            file=sys.stderr,
            flush=True,
        )
    if summary["rows_with_a_repeated_id"]:
        print(
            f"[job] WARNING: {summary['rows_with_a_repeated_id']} rows had the id of another row: "
            "rows are written and resumed by id, so such rows can replace each other's caption and a "
            "rerun skips them. Give every input row its own id (a Parquet --id-column with repeats "
            "or nulls, WebDataset keys repeated across shards)",
            file=sys.stderr,
            flush=True,
        )
    return summary


def check_ids_unique(data_format: str, files: list[str], id_column: str) -> None:
    """Refuse local Parquet or shards that repeat an id, before any image is captioned: rows are
    written and resumed by id, so rows that share one would replace each other."""
    if data_format == "parquet":
        extra, examples = repeated_ids(files, id_column)
        where = f"the id column {id_column!r} (a null id is 'None')"
        fix = "name another --id-column, or add one"
    elif data_format == "tar":
        extra, examples = repeated_shard_keys(files)
        where = "the keys of another shard"
        fix = "rename the samples of one shard, or key them by shard"
    else:  # not local Parquet or shards: the count after the run applies
        return
    if extra:
        print(
            f"[job] ERROR: {extra} input rows repeat an id of another row, in {where}; such as "
            f"{', '.join(map(repr, examples))}. Rows are written and resumed by id, so give every row "
            f"its own: {fix}. Nothing was captioned.",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(2)


def failure_reason(error: BaseException) -> str:
    """The line that names what failed: a Ray task's error carries the original exception's
    traceback above Ray's own lines (which end with retry advice), so its first exception line."""
    lines = str(error).strip().splitlines() or [""]
    named = (line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b.*:", line))
    return next(named, lines[-1])[:500]


def complete(summary: dict[str, Any]) -> bool:
    """Every id once, no input row without its row out, and no row kept under another's id."""
    rows_in = summary["rows_in"]
    missing = rows_in is not None and summary["rows_in_output"] < rows_in
    repeated = summary["rows_with_a_repeated_id"] or summary["unique_ids"] != summary["rows_in_output"]
    return not (missing or repeated)


if __name__ == "__main__":
    sys.exit(0 if complete(main(parse_args())) else 1)
