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
