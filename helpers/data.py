"""Data sources: every reader returns a Ray Dataset of `{"id": str, "image_bytes": bytes}` rows.

Images stay encoded until preprocess, so a corrupt file becomes an error row there instead of
failing a read task. Ids are stable across runs (the WebDataset key, the path relative to the
input folder, or a key column), which is what resuming an interrupted job relies on.

Local folders are listed here, not by Ray: Ray's directory listing skips names that start with
`_` or `.` (meant for `_SUCCESS` files), and cameras name photos `_DSC0001.JPG`. `list_files`
returns every regular file, and each file it leaves out on purpose with its reason, so a caller
can check that rows in = files found - files skipped.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SAMPLE_SHARDS = str(Path(__file__).resolve().parent.parent / "data" / "sample_shards")

SKIP_HIDDEN = "hidden (name starts with '.')"
SKIP_BROKEN_LINK = "broken symbolic link"
SKIP_NOT_REGULAR = "not a regular file (pipe, socket or device)"
SKIP_NOT_DATA = "not a data file of the folder's format"
SKIP_UNREADABLE_FOLDER = "folder can't be listed"


@dataclass
class FileListing:
    """The files of a local input: those to read, and those skipped on purpose with the reason.

    `skipped` maps a reason to relative paths; a folder that can't be listed counts as one entry.
    A folder reached again through a symbolic link (a loop) is not walked twice.
    """

    root: str
    files: list[str] = field(default_factory=list)  # absolute paths, sorted
    skipped: dict[str, list[str]] = field(default_factory=dict)
    format: str = "images"  # or "parquet" or "tar": how read_images reads `files` (list_input)

    @property
    def files_found(self) -> int:
        return len(self.files) + sum(len(v) for v in self.skipped.values())

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(relative_id(path, self.root))

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter({r: len(p) for r, p in self.skipped.items()}).most_common())


def relative_id(path: str, root: str) -> str:
    """The path relative to root as a valid string: bytes that aren't UTF-8 appear escaped."""
    rel = os.path.relpath(path, root)
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_files(root: str) -> FileListing:
    """Every regular file under root, recursively, following symbolic links.

    Hidden files (and everything under hidden folders) are skipped and counted, as are broken
    links, pipes, sockets and devices. Walks iteratively, so any depth of tree is fine.
    """
    listing = FileListing(root=os.path.abspath(root))
    seen_dirs: set[tuple[int, int]] = set()
    stack = [(listing.root, False)]
    while stack:
        folder, hidden = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            listing.skip(SKIP_UNREADABLE_FOLDER, folder)
            continue
        for entry in entries:
            is_hidden = hidden or entry.name.startswith(".")
            try:
                mode = os.stat(entry.path).st_mode  # follows links
            except OSError:
                listing.skip(SKIP_BROKEN_LINK, entry.path)
                continue
            if stat.S_ISDIR(mode):
                stack.append((entry.path, is_hidden))
            elif is_hidden:
                listing.skip(SKIP_HIDDEN, entry.path)
            elif stat.S_ISREG(mode):
                listing.files.append(entry.path)
            else:
                listing.skip(SKIP_NOT_REGULAR, entry.path)
    listing.files.sort()
    for paths in listing.skipped.values():
        paths.sort()
    return listing


def webdataset_row(row: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample -> `{"id", "image_bytes"}`: key as id, its first image file as bytes."""
    image = next((row[s] for s in IMAGE_SUFFIXES if row.get(s) is not None), None)
    return {"id": str(row["__key__"]), "image_bytes": image}


def file_row(row: dict[str, Any], *, root: str) -> dict[str, Any]:
    """A file path -> `{"id", "image_bytes", "read_error"}`, with the path relative to root.

    A file that can't be read (gone since it was listed, no permission) keeps its row, with the
    reason in `read_error`: preprocess turns it into an error row.
    """
    path = os.fsdecode(row["path"])
    try:
        with open(path, "rb") as f:
            data, error = f.read(), None
    except OSError as e:
        data, error = None, f"unreadable file: {e.strerror or type(e).__name__}"
    return {"id": relative_id(path, root), "image_bytes": data, "read_error": error}


def parquet_row(row: dict[str, Any], *, image_column: str, id_column: str) -> dict[str, Any]:
    """A Parquet row -> `{"id", "image_bytes"}`; accepts raw bytes or HF's {"bytes", "path"}."""
    image = row.get(image_column)
    if isinstance(image, dict):
        image = image.get("bytes")
    return {"id": str(row[id_column]), "image_bytes": image}


def hf_dataset_shards(dataset_id: str, pattern: str = "**/*.tar", revision: str = "main"):
    """List the WebDataset shards of a Hugging Face dataset repo.

    Returns (paths, filesystem) for `read_webdataset`: the shards are read in parallel by Ray
    tasks through the Hugging Face filesystem, not by one streaming iterator on the driver.
    """
    from huggingface_hub import HfFileSystem, constants

    # The driver's endpoint (HF_ENDPOINT, a mirror say), explicitly and in a fresh instance: only
    # then is it in the storage options that travel to the read tasks, which don't see the
    # driver's environment. A cached instance (huggingface_hub's own `hffs`) has none.
    fs = HfFileSystem(endpoint=constants.ENDPOINT, skip_instance_cache=True)
    paths = sorted(fs.glob(f"datasets/{dataset_id}@{revision}/{pattern}"))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r} in the dataset {dataset_id!r}")
    return paths, fs


def read_webdataset_images(paths: str | list[str], filesystem=None, **read_kwargs) -> ray.data.Dataset:
    """Read WebDataset tar shards (local, cloud or `hf://`) into `{"id", "image_bytes"}` rows."""
    ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None, **read_kwargs)
    return ds.map(webdataset_row)


def read_image_folder(folder: str, listing: FileListing | None = None, **read_kwargs) -> ray.data.Dataset:
    """One row per regular file under folder (recursively, any extension or name): files that
    aren't images, or can't be read, become error rows further on. Pass the folder's listing to
    read exactly the files it holds."""
    listing = listing or list_files(folder)
    # Paths as bytes: a file name need not be valid UTF-8, and Arrow strings must be.
    paths = [{"path": os.fsencode(p)} for p in listing.files]
    ds = ray.data.from_items(paths, **read_kwargs)
    return ds.map(file_row, fn_kwargs={"root": listing.root})


def read_parquet_images(
    paths: str | list[str], image_column: str = "image", id_column: str = "id", **read_kwargs
) -> ray.data.Dataset:
    """Read Parquet files with an image column (bytes or {"bytes", "path"}) and a key column."""
    ds = ray.data.read_parquet(paths, **read_kwargs)
    columns = ds.schema().names  # from the files' footers: checked before any image is read
    if missing := [c for c in (id_column, image_column) if c not in columns]:
        raise ValueError(
            f"the Parquet input has no column {', '.join(map(repr, missing))}; its columns: {columns}. "
            "Name the image and id columns (the job: --image-column, --id-column)"
        )
    ds = ds.select_columns([id_column, image_column])
    return ds.map(parquet_row, fn_kwargs={"image_column": image_column, "id_column": id_column})


def suffix(path: str) -> str:
    """A file's extension, lower case, without the dot ("" for none)."""
    return os.path.splitext(path)[1][1:].lower()


def folder_format(listing: FileListing) -> str:
    """ "parquet" or "tar" when the folder holds files of that format and no images, else "images".

    Other files beside Parquet files or shards (`_SUCCESS`, a dataset card's `README.md`) don't
    count. A folder of images and Parquet files or shards, or of both data formats, is refused:
    which of them to caption is the user's to say.
    """
    kinds = Counter(map(suffix, listing.files))
    data = {s: kinds[s] for s in ("parquet", "tar") if kinds[s]}
    if not data:
        return "images"
    images = sum(kinds[s] for s in IMAGE_SUFFIXES)
    if len(data) > 1 or images:
        found = " and ".join(
            [f"{n} .{s}" for s, n in sorted(data.items())] + [f"{images} image"] * bool(images)
        )
        raise ValueError(
            f"{listing.root} holds files of more than one kind ({found} files): pass a glob of one "
            f"kind instead, such as '{listing.root}/**/*.{next(iter(data))}', or a folder of one kind"
        )
    return next(iter(data))


def listing_rows(listing: FileListing) -> int | None:
    """The rows a folder input holds, where that is known without reading its data: one per file
    of an image folder, each Parquet file's row count from its footer; None for shards."""
    if listing.format == "images":
        return len(listing.files)
    if listing.format == "parquet":
        return sum(pq.ParquetFile(p).metadata.num_rows for p in listing.files)
    return None


def local_data_files(source: str, listing: FileListing | None = None) -> tuple[str, list[str]]:
    """The format ("parquet" or "tar") and local files of an input that names local Parquet files
    or WebDataset shards (a folder of them, a glob or a file), as `read_images` resolves it;
    ("", []) for any other input, remote ones included."""
    if listing is not None:
        return (listing.format, list(listing.files)) if listing.format in ("parquet", "tar") else ("", [])
    local = os.path.expanduser(source)
    if "://" in source:
        return "", []
    if glob.has_magic(local) and not os.path.exists(local):
        matches = sorted(glob.glob(local, recursive=True))
        kinds = {suffix(m) for m in matches}
        return (kinds.pop(), matches) if len(kinds) == 1 and kinds <= {"parquet", "tar"} else ("", [])
    if suffix(source) in ("parquet", "tar") and os.path.isfile(local):
        return suffix(source), [local]
    return "", []


def repeated_ids(paths: list[str], id_column: str) -> tuple[int, list[str]]:
    """Rows of these Parquet files whose id another row already has, and up to three such ids.

    Reads only the id column. Ids compare as the rows will carry them, `str(value)`: within one
    column type Arrow's cast to text matches that (every null as "None"), and so across files of
    text and integer ids. (0, []) where the ids can't be compared so, and the job's count after
    the run catches repeats instead: a path that isn't a file (a folder a glob matched), a file
    that can't be read or lacks the column (the reader names that error), other types that differ
    between files (1 and 1.0 are "1" and "1.0" in the rows), binary ids that aren't UTF-8."""
    ids, types = [], set()
    for path in paths:
        try:
            with pq.ParquetFile(path) as parquet:  # one open: the footer, then the id column alone
                if id_column not in parquet.schema_arrow.names:
                    return 0, []
                column = parquet.read(columns=[id_column]).column(id_column)
            types.add(column.type)
            ids.append(column.cast(pa.string()))
        except (OSError, pa.ArrowException):
            return 0, []
    textlike = all(
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) for t in types
    )
    if not ids or (len(types) > 1 and not textlike):
        return 0, []
    column = pa.chunked_array([c for chunked in ids for c in chunked.chunks], type=pa.string())
    counts = pc.value_counts(column.fill_null("None"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    extra = pc.sum(pc.subtract(repeated.field("counts"), 1)).as_py() or 0
    return extra, repeated.field("values").to_pylist()[:3]


# A WebDataset sample's key: the member's path up to the first "." of its file name (the pattern
# of Ray's `read_webdataset`).
SHARD_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def repeated_shard_keys(paths: list[str]) -> tuple[int, list[str]]:
    """Samples of these WebDataset shards whose key another shard's sample already has, and up
    to three such keys. Reads only the members' headers (Ray's reader refuses a key repeated
    within one shard itself). (0, []) where a path isn't a file (a folder a glob matched) or
    isn't a readable tar: the reader names that error, and the count after the run applies."""
    shards_with = Counter()
    for path in paths:
        try:
            with tarfile.open(path, "r:*") as tar:
                keys = {m[1] for m in (SHARD_KEY.match(i.name) for i in tar if i.isreg()) if m}
        except (OSError, tarfile.TarError):
            return 0, []
        shards_with.update(keys)
    repeated = [key for key, n in shards_with.items() if n > 1]
    return sum(shards_with[key] - 1 for key in repeated), sorted(repeated)[:3]


def list_input(source: str) -> FileListing | None:
    """The listing of a local folder input, with the files its reader will read; None for other
    inputs (a glob, a file, a remote path or a dataset id: what they name is read as given).

    For a folder of Parquet files or shards, the other files (`_SUCCESS`, say) are skipped."""
    local = os.path.expanduser(source)
    if "://" in source or not os.path.isdir(local):  # a folder named `Trip [2023]` is a folder
        return None
    listing = list_files(local)
    listing.format = folder_format(listing)
    if listing.format != "images":
        data = [p for p in listing.files if suffix(p) == listing.format]
        for p in sorted(set(listing.files) - set(data)):
            listing.skip(SKIP_NOT_DATA, p)
        listing.files = data
    return listing


def read_images(
    source: str,
    image_column: str = "image",
    id_column: str = "id",
    listing: FileListing | None = None,
    **read_kwargs,
) -> ray.data.Dataset:
    """Open any supported input as `{"id", "image_bytes"}` rows (a folder's rows add `read_error`).

    - a Hugging Face dataset id (`owner/name`) of WebDataset shards, e.g. the BLIP3o shards
    - WebDataset shards: a `.tar` path or glob, local or remote (`s3://...`)
    - Parquet: a `.parquet` path or glob, or a folder of them, with image_column and id_column
    - a local folder of image files, read recursively: every regular file but hidden ones

    For a folder, pass `list_input(source)` as listing to read exactly the files it counted.
    """
    columns = {"image_column": image_column, "id_column": id_column}
    local = os.path.expanduser(source)
    listing = listing or list_input(source)
    if listing is not None and listing.format == "images":
        return read_image_folder(local, listing=listing, **read_kwargs)
    data_format, files = local_data_files(source, listing)
    if data_format == "parquet":
        return read_parquet_images(files, **columns, **read_kwargs)
    if data_format == "tar":
        return read_webdataset_images(files, **read_kwargs)
    if "://" not in source and glob.has_magic(local) and not os.path.exists(local):
        if not glob.glob(local, recursive=True):
            raise FileNotFoundError(f"no files match {source!r}")
        raise ValueError(f"{source!r} matches files that are neither all .tar nor all .parquet")
    if suffix(source) == "tar":  # remote, or a local path that isn't there: the reader says so
        return read_webdataset_images(source, **read_kwargs)
    if suffix(source) == "parquet":
        return read_parquet_images(source, **columns, **read_kwargs)
    if "://" not in source and source.count("/") == 1 and not os.path.exists(local):
        paths, fs = hf_dataset_shards(source)
        return read_webdataset_images(paths, filesystem=fs, **read_kwargs)
    raise FileNotFoundError(f"can't open {source!r}: not a dataset id, shard, Parquet file or folder")
