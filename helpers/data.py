"""Data sources: every reader returns a Ray Dataset of `{"id": str, "image_bytes": bytes}` rows.

Images stay encoded until preprocess, so a corrupt file becomes an error row there instead of
failing a read task. Ids are stable across runs (the WebDataset key, the path relative to the
input folder, or a key column), which is what resuming an interrupted job relies on.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import ray

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SAMPLE_SHARDS = str(Path(__file__).resolve().parent.parent / "data" / "sample_shards")


def webdataset_row(row: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample -> `{"id", "image_bytes"}`: key as id, its first image file as bytes."""
    image = next((row[s] for s in IMAGE_SUFFIXES if row.get(s) is not None), None)
    return {"id": str(row["__key__"]), "image_bytes": image}


def file_row(row: dict[str, Any], *, root: str) -> dict[str, Any]:
    """A `read_binary_files` row -> `{"id", "image_bytes"}`, with the path relative to root."""
    return {"id": os.path.relpath(row["path"], root), "image_bytes": row["bytes"]}


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


def read_image_folder(folder: str, **read_kwargs) -> ray.data.Dataset:
    """Read every file under folder (recursively, any extension): non-images become error rows."""
    root = os.path.abspath(folder)
    ds = ray.data.read_binary_files(root, include_paths=True, **read_kwargs)
    return ds.map(file_row, fn_kwargs={"root": root})


def read_parquet_images(
    paths: str | list[str], image_column: str = "image", id_column: str = "id", **read_kwargs
) -> ray.data.Dataset:
    """Read Parquet files with an image column (bytes or {"bytes", "path"}) and a key column."""
    ds = ray.data.read_parquet(paths, **read_kwargs).select_columns([id_column, image_column])
    return ds.map(parquet_row, fn_kwargs={"image_column": image_column, "id_column": id_column})


def read_images(
    source: str, image_column: str = "image", id_column: str = "id", **read_kwargs
) -> ray.data.Dataset:
    """Open any supported input as `{"id", "image_bytes"}` rows.

    - a Hugging Face dataset id (`owner/name`) of WebDataset shards, e.g. the BLIP3o shards
    - WebDataset shards: a `.tar` path or glob, local or remote (`s3://...`)
    - Parquet: a `.parquet` path or glob, or a folder of them, with image_column and id_column
    - a local folder of image files, read recursively
    """
    columns = {"image_column": image_column, "id_column": id_column}
    local = os.path.expanduser(source)
    if "://" not in source and glob.has_magic(local):
        matches = sorted(glob.glob(local, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no files match {source!r}")
        if all(m.endswith(".tar") for m in matches):
            return read_webdataset_images(matches, **read_kwargs)
        if all(m.endswith(".parquet") for m in matches):
            return read_parquet_images(matches, **columns, **read_kwargs)
        raise ValueError(f"{source!r} matches files that are neither all .tar nor all .parquet")
    if source.endswith(".tar"):
        return read_webdataset_images(source, **read_kwargs)
    if source.endswith(".parquet"):
        return read_parquet_images(source, **columns, **read_kwargs)
    if os.path.isdir(local):
        names = os.listdir(local)
        if names and all(n.endswith(".parquet") for n in names):
            return read_parquet_images(local, **columns, **read_kwargs)
        if names and all(n.endswith(".tar") for n in names):
            return read_webdataset_images(local, **read_kwargs)
        return read_image_folder(local, **read_kwargs)
    if "://" not in source and source.count("/") == 1 and not os.path.exists(local):
        paths, fs = hf_dataset_shards(source)
        return read_webdataset_images(paths, filesystem=fs, **read_kwargs)
    raise FileNotFoundError(f"can't open {source!r}: not a dataset id, shard, Parquet file or folder")
