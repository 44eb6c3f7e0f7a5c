"""The job's output bookkeeping: a killed run's late writes never leave an id twice."""

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from helpers.output import OUTPUT_SCHEMA, AtomicParquetDatasink, dedupe_output, read_output


def rows(ids: list[str], run: str) -> pa.Table:
    n = len(ids)
    columns = {
        "id": ids,
        "caption": [f"{run}:{i}" for i in ids],
        "error": [None] * n,
        "num_input_tokens": [1] * n,
        "num_generated_tokens": [2] * n,
        "model": ["m"] * n,
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def test_dedupe_keeps_every_id_once_and_every_other_row(tmp_path):
    pq.write_table(rows(["a", "b"], "old"), tmp_path / "part-1.parquet")  # the killed run
    pq.write_table(rows(["c"], "old"), tmp_path / "part-2.parquet")  # its late write
    pq.write_table(rows(["b", "c", "d"], "new"), tmp_path / "part-3.parquet")  # the rerun repeats b, c
    pq.write_table(rows(["c"], "new"), tmp_path / "part-4.parquet")  # a file of repeats only
    (tmp_path / "_summary.json").write_text("{}")

    unique, removed = dedupe_output(str(tmp_path))

    assert sorted(unique.to_pylist()) == ["a", "b", "c", "d"] and removed == 3
    table = read_output(str(tmp_path))
    captions = dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist(), strict=True))
    assert table.num_rows == 4
    assert captions == {"a": "old:a", "b": "old:b", "c": "old:c", "d": "new:d"}
    assert not (tmp_path / "part-4.parquet").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert dedupe_output(str(tmp_path))[1] == 0  # nothing left to remove


def test_dedupe_of_an_output_not_written_yet(tmp_path):
    unique, removed = dedupe_output(str(tmp_path / "nothing"))
    assert len(unique) == 0 and removed == 0


def test_the_output_is_its_parquet_files_only(tmp_path):
    pq.write_table(rows(["a", "b"], "run"), tmp_path / "part-1.parquet")
    (tmp_path / "notes.txt").write_text("a user's notes beside the captions")
    (tmp_path / "earlier").mkdir()
    pq.write_table(rows(["c"], "earlier"), tmp_path / "earlier" / "part-2.parquet")
    assert read_output(str(tmp_path)).column("id").to_pylist() == ["a", "b"]
    assert sorted(dedupe_output(str(tmp_path))[0].to_pylist()) == ["a", "b"]


def test_the_sink_counts_the_rows_it_was_handed_where_ids_repeat(ray_local, tmp_path):
    # Files are named by their ids, and repeats across files are removed: a repeated id keeps one
    # row. The count of rows handed to the sink is what shows the job that rows shared an id.
    ids = ["k", "k", "None", "None", "u"]
    ds = ray.data.from_arrow(rows(ids, "run")).repartition(target_num_rows_per_block=1)
    sink = AtomicParquetDatasink(str(tmp_path))
    ds.write_datasink(sink)
    unique, _ = dedupe_output(str(tmp_path))
    assert sink.rows_delivered == 5 and sorted(unique.to_pylist()) == ["None", "k", "u"]
