"""Pre-training corpora: Hub data sets, local files and folders, and an embedded default.

Every source yields plain documents (one string each). `load_documents` returns a map-style `datasets.Dataset` with a
single `text` column, or an `IterableDataset` when a source is streamed; `shard_stream` gives each process its share
of a stream (and `restore_stream` resumes it). `corpus_fingerprint` names the content for the tokenization cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import datasets

from pofa.recipe import CorpusSource

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES


class CorpusError(ValueError):
    """A corpus source cannot be read; the message names the source, the file or the column."""


def python_docs_documents() -> list[str]:
    """CPython's documentation topics (about 465 KB of English prose), shipped with every Python: the offline default."""
    from pydoc_data.topics import topics

    # Topic pages are long; split on blank lines into paragraphs, then regroup into documents of a few paragraphs
    # so that document boundaries ([SEP]) occur at a realistic rate.
    documents = []
    for name in sorted(topics):
        paragraphs = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
        for start in range(0, len(paragraphs), 8):
            documents.append("\n\n".join(paragraphs[start : start + 8]))
    return documents


EMBEDDED = {"python-docs": python_docs_documents}


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """Resolve files and folders (recursively) to a sorted list of readable corpus files; errors name the path."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES)
            if not found:
                raise CorpusError(f"corpus folder {path} holds no {sorted(KNOWN_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in KNOWN_SUFFIXES:
                raise CorpusError(f"corpus file {path}: unsupported extension (use one of {sorted(KNOWN_SUFFIXES)})")
            files.append(path)
        else:
            raise CorpusError(f"corpus file not found: {path}")
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        raise CorpusError(f"one source mixes {sorted(kinds)} files; list each kind as its own source")
    return files


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return "text" if suffix in TEXT_SUFFIXES else "json" if suffix in JSON_SUFFIXES else "parquet"


def _read_source(source: CorpusSource, cache_dir: str | None) -> datasets.Dataset | datasets.IterableDataset:
    if source.embedded is not None:
        ds = datasets.Dataset.from_dict({"text": EMBEDDED[source.embedded]()})
        where = f"embedded corpus {source.embedded}"
    elif source.files:
        files = expand_files(source.files)
        kind = _kind(files[0])
        kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
        where = f"files {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}"
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir,
                                       streaming=source.streaming, **kwargs)
        except ValueError as exc:  # datasets says "corresponds to no data" for empty files
            if "no data" in str(exc):
                raise CorpusError(f"the corpus is empty: no documents in {where}") from None
            raise CorpusError(f"cannot read {where}: {exc}") from None
    else:
        try:
            ds = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=source.streaming,
                                       cache_dir=cache_dir, revision=source.revision)
        except (ConnectionError, OSError) as exc:
            raise CorpusError(
                f"cannot load Hub data set {source.hub!r} (config {source.config!r}, split {source.split!r}): {exc}. "
                "Without network access, download it elsewhere and point `files:` at the local "
                "text/jsonl/parquet files instead of `hub:`"
            ) from None
        except RuntimeError as exc:  # datasets >= 4 runs no loading script: "Dataset scripts are no longer supported"
            if "script" not in str(exc):
                raise
            raise CorpusError(
                f"Hub data set {source.hub!r} is a loading script, which datasets >= 4 does not run ({exc}); download "
                "its Parquet export (the Hub branch refs/convert/parquet) or its raw files and point `files:` at them"
            ) from None
        where = f"Hub data set {source.hub}"
    columns = ds.column_names or (list(ds.features) if ds.features else None)
    if columns is not None and source.text_field not in columns:
        raise CorpusError(f"{where}: no column {source.text_field!r} (columns: {columns}); set text_field")
    if columns is not None and columns != [source.text_field]:
        ds = ds.select_columns([source.text_field])
    if source.text_field != "text":
        ds = ds.rename_column(source.text_field, "text")
    if source.max_documents is not None:
        ds = ds.take(source.max_documents) if isinstance(ds, datasets.IterableDataset) else ds.select(
            range(min(source.max_documents, len(ds))))
    return ds


def load_documents(sources: Sequence[CorpusSource], cache_dir: str | None = None):
    """Concatenate the sources into one dataset with a `text` column (iterable when any source streams)."""
    parts = [_read_source(s, cache_dir) for s in sources]
    if any(isinstance(p, datasets.IterableDataset) for p in parts):
        parts = [p if isinstance(p, datasets.IterableDataset) else p.to_iterable_dataset() for p in parts]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise CorpusError("the corpus is empty: no documents in " + ", ".join(describe_source(s) for s in sources))
    return ds


def describe_source(source: CorpusSource) -> str:
    if source.embedded:
        return f"embedded:{source.embedded}"
    if source.files:
        return "files:" + ",".join(source.files)
    return f"hub:{source.hub}/{source.config or ''}[{source.split}]"


def corpus_fingerprint(sources: Sequence[CorpusSource]) -> str:
    """A hash that changes when the corpus content may have changed (files: path, size and mtime)."""
    h = hashlib.sha256()
    for source in sources:
        h.update(repr((source.hub, source.config, source.split, source.embedded, source.text_field,
                       source.max_documents)).encode())
        if source.revision:  # only when set: the keys of existing caches stay as they were
            h.update(f"revision:{source.revision}".encode())
        if source.embedded:
            h.update(sys.version.encode())
        for path in expand_files(source.files) if source.files else []:
            stat = path.stat()
            h.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("POFA_CACHE", Path.home() / ".cache" / "pofa"))


def shard_stream(documents: datasets.IterableDataset, *, rank: int, world_size: int, seed: int
                 ) -> datasets.IterableDataset:
    """Process `rank`'s share of a streamed corpus, its shards (files) in a seeded order that `set_epoch` changes.

    `split_dataset_by_node` gives each of the `world_size` processes whole shards when their number is a multiple of
    `world_size`, else every `world_size`-th document: the shares are disjoint and together are the stream. The
    shard order is shuffled with the same seed on every process, as split_dataset_by_node requires. Documents are
    not buffered here (`buffer_size=1`): datasets' shuffle buffer is not part of `state_dict()`, so a resumed stream
    would lose what it held; pofa shuffles documents itself, in windows it can re-read
    (`pofa.data.mlm.StreamingMLMBatcher`).
    """
    from datasets.distributed import split_dataset_by_node

    shuffled = documents.shuffle(seed=seed, buffer_size=1)
    return split_dataset_by_node(shuffled, rank=rank, world_size=world_size) if world_size > 1 else shuffled


def restore_stream(documents: datasets.IterableDataset, state: dict) -> None:
    """`documents.load_state_dict(state)`, without datasets' warning that a shuffle buffer's content is lost:
    `shard_stream`'s buffer holds nothing between two documents."""
    logger = logging.getLogger("datasets.iterable_dataset")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        documents.load_state_dict(state)
    finally:
        logger.setLevel(level)


def iter_texts(ds) -> Iterator[str]:
    for row in ds:
        yield row["text"]
