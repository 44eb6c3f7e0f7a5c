"""Data sources: each yields one `{"id", "image_bytes"}` row per input, with stable ids."""

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import bad_and_odd_images, write_mixed_folder

from helpers.data import SAMPLE_SHARDS, read_images, read_webdataset_images
from helpers.rows import decode_image
from helpers.samples import IMAGES_PER_SHARD, NUM_SHARDS, write_sample_shards


def test_bundled_shards_equal_a_fresh_generation(tmp_path):
    for fresh in write_sample_shards(str(tmp_path)):
        committed = Path(SAMPLE_SHARDS) / Path(fresh).name
        assert committed.read_bytes() == Path(fresh).read_bytes(), "run: python -m helpers.samples"


def test_webdataset_shards_read_in_parallel(ray_local):
    ds = read_images(f"{SAMPLE_SHARDS}/*.tar")
    rows = ds.take_all()
    assert len(rows) == NUM_SHARDS * IMAGES_PER_SHARD
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(decode_image(r["image_bytes"]).size == (320, 240) for r in rows)


def test_webdataset_through_an_fsspec_filesystem(ray_local):
    # The Hugging Face path hands read_webdataset an fsspec filesystem (HfFileSystem);
    # a local fsspec filesystem exercises the same code path offline.
    from fsspec.implementations.local import LocalFileSystem

    paths = sorted(glob.glob(f"{SAMPLE_SHARDS}/*.tar"))
    assert read_webdataset_images(paths, filesystem=LocalFileSystem()).count() == 24


def test_image_folder_is_read_recursively_with_relative_ids(ray_local, tmp_path):
    files = write_mixed_folder(tmp_path)
    rows = read_images(str(tmp_path)).take_all()
    assert sorted(r["id"] for r in rows) == sorted(files)
    assert all(r["image_bytes"] == files[r["id"]] for r in rows)


def test_parquet_with_hf_style_image_structs(ray_local, tmp_path):
    data = bad_and_odd_images()["good"]
    table = pa.table(
        {
            "id": list(data),
            "image": [{"bytes": b, "path": n} for n, b in data.items()],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    rows = read_images(str(tmp_path)).take_all()
    assert {r["id"]: r["image_bytes"] for r in rows} == data
    assert read_images(os.path.join(tmp_path, "*.parquet")).count() == len(data)
