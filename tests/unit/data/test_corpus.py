import json

import pytest

from pofa.data.corpus import CorpusError, load_documents, python_docs_documents
from pofa.recipe import CorpusSource


def test_embedded_corpus_is_real_prose():
    docs = python_docs_documents()
    assert len(docs) > 100 and sum(map(len, docs)) > 400_000


def test_local_text_jsonl_parquet_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first paragraph.\n\nsecond paragraph.\n")
    (tmp_path / "a" / "two.md").write_text("third.\n")
    docs = load_documents([CorpusSource(files=[str(tmp_path / "a")])])
    assert sorted(t.strip() for t in docs["text"]) == sorted(["first paragraph.", "second paragraph.", "third."])

    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}", "x": i}) for i in range(3)))
    docs = load_documents([CorpusSource(files=[str(tmp_path / "b.jsonl")], text_field="body")])
    assert docs.column_names == ["text"] and docs["text"] == ["doc 0", "doc 1", "doc 2"]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "c.parquet")
    both = load_documents([CorpusSource(files=[str(tmp_path / "c.parquet")]), CorpusSource(embedded="python-docs")])
    assert both["text"][:2] == ["p1", "p2"] and len(both) > 100


def test_errors_name_the_file_or_column(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found: .*missing.txt"):
        load_documents([CorpusSource(files=[str(tmp_path / "missing.txt")])])
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match="no column 'text'.*body"):
        load_documents([CorpusSource(files=[str(tmp_path / "d.jsonl")])])
    (tmp_path / "e.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="unsupported extension"):
        load_documents([CorpusSource(files=[str(tmp_path / "e.csv")])])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        load_documents([CorpusSource(files=[str(tmp_path / "empty")])])


def test_hub_source_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="point `files:` at the local"):
        load_documents([CorpusSource(hub="no-such-user/no-such-corpus")])


# ---------------------------------------------------------------------------------------------------------------------
# Streamed corpora: each process's share
# ---------------------------------------------------------------------------------------------------------------------


def _jsonl_files(folder, files: int, per_file: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for f in range(files):
        path = folder / f"part-{f}.jsonl"
        path.write_text("\n".join(json.dumps({"text": f"file {f} document {i}", "n": i}) for i in range(per_file)))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("files, world_size, whole_files", [(4, 2, True), (1, 2, False), (4, 3, False)])
def test_stream_shares_are_disjoint_and_together_are_the_stream(tmp_path, files, world_size, whole_files):
    """4 files over 2 processes: whole files each (split_dataset_by_node assigns shards); 1 file, or 4 over 3: every
    n-th document (it falls back to examples)."""
    from pofa.data.corpus import shard_stream

    paths = _jsonl_files(tmp_path / "corpus", files, 30)
    stream = load_documents([CorpusSource(files=paths, streaming=True)])
    everything = [row["text"] for row in stream]
    for epoch in (0, 1):
        shares = []
        for rank in range(world_size):
            share = shard_stream(stream, rank=rank, world_size=world_size, seed=5)
            share.set_epoch(epoch)
            shares.append([row["text"] for row in share])
        assert sorted(text for share in shares for text in share) == sorted(everything)  # disjoint, complete
        assert all(shares)
        files_of = [{text.split(" document")[0] for text in share} for share in shares]
        assert (sum(map(len, files_of)) == files) == whole_files  # no file read by two processes


def test_a_stream_resumes_from_its_state_without_rereading(tmp_path):
    from pofa.data.corpus import restore_stream, shard_stream

    stream = load_documents([CorpusSource(files=_jsonl_files(tmp_path / "corpus", 4, 30), streaming=True)])

    def share():
        ds = shard_stream(stream, rank=1, world_size=2, seed=5)
        ds.set_epoch(3)
        return ds

    whole = [row["text"] for row in share()]
    first = share()
    rows = iter(first)
    head = [next(rows)["text"] for _ in range(17)]
    state = json.loads(json.dumps(first.state_dict()))  # it travels in trainer_state.json
    resumed = share()
    restore_stream(resumed, state)
    assert head + [row["text"] for row in resumed] == whole


def test_a_loading_script_on_the_hub_says_what_to_do(monkeypatch):
    import datasets

    def script(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found bookcorpus.py")

    monkeypatch.setattr(datasets, "load_dataset", script)
    with pytest.raises(CorpusError, match="loading script.*refs/convert/parquet.*`files:`"):
        load_documents([CorpusSource(hub="bookcorpus/bookcorpus")])
