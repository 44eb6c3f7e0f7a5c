"""Data sources: each yields one `{"id", "image_bytes"}` row per input, with stable ids."""

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MIXED_FOLDER_SKIPS, bad_and_odd_images, write_mixed_folder

from helpers.data import (
    SAMPLE_SHARDS,
    SKIP_NOT_DATA,
    list_input,
    listing_rows,
    local_data_files,
    read_images,
    read_webdataset_images,
    repeated_ids,
    repeated_shard_keys,
)
from helpers.rows import decode_image, preprocess
from helpers.samples import IMAGES_PER_SHARD, NUM_SHARDS, write_sample_shards


def test_bundled_shards_equal_a_fresh_generation(tmp_path):
    for fresh in write_sample_shards(str(tmp_path)):
        committed = Path(SAMPLE_SHARDS) / Path(fresh).name
        assert committed.read_bytes() == Path(fresh).read_bytes(), "run: python -m helpers.samples"


def read_tasks(ds) -> int:
    """How many tasks ran the read (its operator's line in the stats of a materialized dataset)."""
    line = next(x for x in ds.stats().splitlines() if "ReadWebDataset" in x and "tasks executed" in x)
    return int(re.search(r"(\d+) tasks executed", line).group(1))


def test_webdataset_shards_read_in_parallel(ray_local):
    ds = read_images(f"{SAMPLE_SHARDS}/*.tar").materialize()
    assert read_tasks(ds) >= NUM_SHARDS  # one read task per shard at least, not one reader
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
    listing = list_input(str(tmp_path))
    # Every regular file is a row or a counted skip; `_DSC0001.JPG` is read, not skipped.
    assert listing.skipped_counts() == MIXED_FOLDER_SKIPS
    assert listing.files_found == len(files) + sum(MIXED_FOLDER_SKIPS.values())
    rows = read_images(str(tmp_path)).take_all()
    assert sorted(r["id"] for r in rows) == sorted(files)
    assert all(r["image_bytes"] == files[r["id"]] and r["read_error"] is None for r in rows)


def test_a_file_gone_after_listing_becomes_an_error_row(ray_local, tmp_path):
    files = write_mixed_folder(tmp_path)
    listing = list_input(str(tmp_path))
    (tmp_path / "_DSC0001.JPG").unlink()  # a file that changes while the job runs
    rows = {r["id"]: r for r in read_images(str(tmp_path), listing=listing).take_all()}
    assert sorted(rows) == sorted(files)
    assert rows["_DSC0001.JPG"]["image_bytes"] is None
    assert rows["_DSC0001.JPG"]["read_error"] == "unreadable file: No such file or directory"
    request = preprocess(rows["_DSC0001.JPG"], final_only=False)
    assert request["decode_error"] == "unreadable file: No such file or directory"


def test_a_file_name_that_is_not_utf8_keeps_its_row(ray_local, tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/IMG_\xff\xfe.jpg"
    with open(name, "wb") as f:
        f.write(bad_and_odd_images()["good"]["rgb.jpg"])
    (row,) = read_images(str(tmp_path)).take_all()
    assert row["id"] == "IMG_\\xff\\xfe.jpg" and decode_image(row["image_bytes"]).size == (64, 48)


def test_shard_and_parquet_folders_read_underscore_names_and_count_the_rest(ray_local, tmp_path):
    for shard in glob.glob(f"{SAMPLE_SHARDS}/*.tar"):
        name = Path(shard).name
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / ("_" + name if name.endswith("0.tar") else name)).write_bytes(
            Path(shard).read_bytes()
        )
    (tmp_path / "shards" / ".DS_Store").write_bytes(b"Bud1")
    assert read_images(str(tmp_path / "shards")).count() == NUM_SHARDS * IMAGES_PER_SHARD
    data = bad_and_odd_images()["good"]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(data), "image": list(data.values())}), tmp_path / "pq" / "_0.parquet")
    (tmp_path / "pq" / "_SUCCESS").write_bytes(b"")
    listing = list_input(str(tmp_path / "pq"))
    assert listing.skipped_counts() == {SKIP_NOT_DATA: 1}
    assert read_images(str(tmp_path / "pq"), listing=listing).count() == len(data)


def test_a_link_back_up_the_tree_is_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "a" / "back").symlink_to("..")  # a loop: a/back/a/back/...
    listing = list_input(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in listing.files] == ["a/x.jpg"]
    assert listing.files_found == 1


def test_a_folder_is_read_as_the_one_kind_of_data_it_holds(ray_local, tmp_path):
    data = bad_and_odd_images()["good"]
    # A Hugging Face dataset as `hf download` leaves it: Parquet under data/, beside its card.
    (tmp_path / "hf" / "data").mkdir(parents=True)
    for i in range(2):
        table = pa.table({"id": [f"{i}-{n}" for n in data], "image": list(data.values())})
        pq.write_table(table, tmp_path / "hf" / "data" / f"train-{i}-of-2.PARQUET")
    (tmp_path / "hf" / "README.md").write_text("---\nlicense: cc\n---\n")
    listing = list_input(str(tmp_path / "hf"))
    assert listing.format == "parquet" and listing.skipped_counts() == {SKIP_NOT_DATA: 1}
    rows = read_images(str(tmp_path / "hf"), listing=listing).count()
    assert listing_rows(listing) == rows == 2 * len(data)
    # Photos beside a shard: which to caption is not the reader's guess.
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "_DSC0001.JPG").write_bytes(data["rgb.jpg"])
    shard = sorted(Path(SAMPLE_SHARDS).glob("*.tar"))[0]
    (tmp_path / "photos" / "backup.tar").write_bytes(shard.read_bytes())
    with pytest.raises(ValueError, match=r"more than one kind \(1 \.tar and 1 image files\)"):
        list_input(str(tmp_path / "photos"))
    # Glob characters in a folder's name: still that folder.
    (tmp_path / "Trip [2023]").mkdir()
    (tmp_path / "Trip [2023]" / "a.jpg").write_bytes(data["rgb.jpg"])
    assert [r["id"] for r in read_images(str(tmp_path / "Trip [2023]")).take_all()] == ["a.jpg"]


def test_inputs_that_cant_be_read_as_one_kind_are_refused_with_the_reason(tmp_path):
    shard = sorted(Path(SAMPLE_SHARDS).glob("*.tar"))[0].read_bytes()
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "a.tar").write_bytes(shard)
    pq.write_table(pa.table({"id": ["x"], "image": [b""]}), tmp_path / "both" / "b.parquet")
    with pytest.raises(ValueError, match=r"more than one kind \(1 \.parquet and 1 \.tar files\)"):
        list_input(str(tmp_path / "both"))
    with pytest.raises(ValueError, match="neither all .tar nor all .parquet"):
        read_images(str(tmp_path / "both" / "*"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        read_images(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError, match="can't open"):
        read_images(str(tmp_path / "missing" / "photos"))


def test_parquet_without_the_named_columns_is_refused_before_reading(ray_local, tmp_path):
    data = bad_and_odd_images()["good"]
    pq.write_table(pa.table({"key": list(data), "jpg": list(data.values())}), tmp_path / "part-0.parquet")
    with pytest.raises(ValueError, match=r"no column 'id', 'image'; its columns: \['key', 'jpg'\]"):
        read_images(str(tmp_path / "part-0.parquet"))
    rows = read_images(str(tmp_path), image_column="jpg", id_column="key").take_all()
    assert {r["id"]: r["image_bytes"] for r in rows} == data


def test_repeated_ids_of_local_parquet_are_counted_as_the_rows_will_carry_them(tmp_path):
    pq.write_table(pa.table({"id": ["a", "a", "b", None, None]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"id": [1, 2, 3]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"id": ["1", "c"]}), tmp_path / "part-2.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    data_format, folder = local_data_files(str(tmp_path), list_input(str(tmp_path)))
    assert data_format == "parquet"
    assert [Path(p).name for p in folder] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert local_data_files(str(tmp_path / "part-*.parquet")) == ("parquet", folder)
    assert local_data_files("s3://bucket/part-0.parquet") == ("", [])
    # Two nulls are one id ("None"), as the rows carry them; 1 in one file and "1" in another too.
    assert repeated_ids(folder[:1], "id") == (2, ["a", "None"])
    assert repeated_ids(folder[1:], "id") == (1, ["1"])
    assert repeated_ids(folder[1:2], "id") == (0, [])
    assert repeated_ids(folder, "key") == (0, [])  # the reader names a missing column
    # 1 and 1.0 are "1" and "1.0" in the rows: types that differ so are left to the count after
    # the run, as are a folder a glob matched and a file that isn't Parquet.
    pq.write_table(pa.table({"id": [1.0, 5.0]}), tmp_path / "floats.parquet")
    assert repeated_ids([folder[1], str(tmp_path / "floats.parquet")], "id") == (0, [])
    (tmp_path / "dir.parquet").mkdir()
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert repeated_ids([*folder, str(tmp_path / "dir.parquet")], "id") == (0, [])
    assert repeated_ids([*folder, str(tmp_path / "empty.parquet")], "id") == (0, [])


def test_shard_keys_repeated_across_shards_are_counted_from_the_headers(tmp_path):
    def shard(name, members):
        with tarfile.open(tmp_path / name, "w") as tar:
            for member in members:
                info = tarfile.TarInfo(member)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))

    shard("a-0.tar", ["000.jpg", "000.txt", "001.jpg", "sub/002.jpg"])
    shard("a-1.tar", ["000.jpg", "001.png", "003.jpg", "sub/002.jpg"])
    shard("a-2.tar", ["000.jpg", "a.b/004.jpg"])
    data_format, shards = local_data_files(str(tmp_path / "*.tar"))
    assert data_format == "tar" and len(shards) == 3
    # A key is the path up to the first "." of the file name: "000.jpg" and "000.txt" are one
    # sample; "000" is in three shards (two repeats), "001" and "sub/002" in two.
    assert repeated_shard_keys(shards) == (4, ["000", "001", "sub/002"])
    assert repeated_shard_keys(shards[:1]) == (0, [])
    assert repeated_shard_keys(write_sample_shards(str(tmp_path / "samples"))) == (0, [])
    (tmp_path / "dir.tar").mkdir()
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    for unreadable in ("dir.tar", "junk.tar"):  # left to the reader, which names the error
        assert repeated_shard_keys([*shards, str(tmp_path / unreadable)]) == (0, [])


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


class StandInHub(BaseHTTPRequestHandler):
    """The few Hub endpoints HfFileSystem calls to glob and read a dataset repo, served locally:
    repo info, the file tree, and file downloads (with byte ranges). Never the real Hub."""

    files: dict[str, bytes] = {}  # path in the repo -> bytes
    downloads: list[str] = []

    def do_GET(self):
        url = urlsplit(self.path)
        api = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", url.path)
        resolve = re.fullmatch(r"/datasets/[^/]+/[^/]+/resolve/[^/]+/(.+)", url.path)
        if api and api.group(2) == "revision":
            self.send(json.dumps({"id": api.group(1), "sha": "0" * 40, "private": False}).encode())
        elif api:  # the tree, always recursive: enough for glob
            prefix = unquote((api.group(4) or "/")[1:])
            tree = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in self.files.items()
                if p.startswith(prefix)
            ]
            folders = {p.rsplit("/", 1)[0] for p in self.files if "/" in p and p.startswith(prefix)}
            tree += [{"type": "directory", "path": f, "oid": "0" * 40} for f in folders - {prefix}]
            self.send(json.dumps(tree).encode())
        elif resolve and unquote(resolve.group(1)) in self.files:
            data = self.files[unquote(resolve.group(1))]
            self.downloads.append(unquote(resolve.group(1)))
            start, end = 0, len(data) - 1
            if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", "")):
                start, end = int(rng.group(1)), min(int(rng.group(2) or end), end)
            self.send(data[start : end + 1], 206 if self.headers.get("range") else 200)
        else:
            self.send(b"{}", 404)

    def send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_hugging_face_dataset_id_is_read_by_ray_tasks_through_hf_filesystem(ray_local, monkeypatch):
    import huggingface_hub.constants

    shards = sorted(Path(SAMPLE_SHARDS).glob("*.tar"))
    StandInHub.files = {f"data/{p.name}": p.read_bytes() for p in shards} | {"README.md": b"# x"}
    StandInHub.downloads = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    # The driver talks to the stand-in (as HF_ENDPOINT would make it); offline mode blocks all HTTP.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    template = f"{endpoint}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # The read tasks get a dead default endpoint: they must use the one the filesystem carries.
    worker_env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    try:
        ds = read_images("someone/blip3o-stand-in", runtime_env={"env_vars": worker_env}).materialize()
    finally:
        server.shutdown()
        server.server_close()
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == sorted(
        r["id"] for r in read_images(f"{SAMPLE_SHARDS}/*.tar").take_all()
    )
    assert all(decode_image(r["image_bytes"]).size == (320, 240) for r in rows)
    # Read by Ray tasks, a shard each at least, from the stand-in: not streamed through the driver.
    assert read_tasks(ds) >= NUM_SHARDS and set(StandInHub.downloads) == set(StandInHub.files) - {"README.md"}
