"""Load FER2013 from any of its common distributions into one in-memory layout.

``load_fer2013(source)`` accepts, auto-detected from the path and the contents:

* the challenge CSV ``fer2013.csv`` (``emotion,pixels,Usage``), plain or gzip-compressed, with or
  without ``PrivateTest`` rows;
* Kaggle's ``icml_face_data.csv`` (``emotion, Usage, pixels``, spaces around names and values);
* the course CSVs ``train.csv`` (``label,feature``) and ``test.csv`` (``id,feature``: no labels, so
  labels are -1 and usage is ``PrivateTest``); a directory holding ``train.csv`` (and optionally
  ``test.csv``) loads both;
* the image-folder layout ``<root>/train/<class>/*.png|jpg`` and ``<root>/test/<class>/...``
  (``<class>`` a class name, any case; ``<root>/<class>/...`` also works and counts as train/).
  File names ``Training_<id>``, ``PublicTest_<id>``, ``PrivateTest_<id>`` give the usage; other
  files in train/ are ``Training`` and in test/ ``PublicTest``;
* any of these at ``s3://bucket/key`` (one file) or ``s3://bucket/prefix/`` (a folder), read with
  boto3 against ``$AWS_ENDPOINT_URL``, else ``$MLFLOW_S3_ENDPOINT_URL``, else AWS.

A directory is searched in this order: ``train.csv[.gz]`` (+ ``test.csv[.gz]``), then
``fer2013.csv[.gz]``, then ``icml_face_data.csv[.gz]``, then the image folders.

The result is the same whatever the format: ``images`` uint8 (N, 48, 48, 1), ``labels`` int64
0..6 (-1 where the source has no labels), ``usage`` one of ``USAGES`` per row, in file order (image
folders: by usage, then numeric id, then path).

Hashing and caching: ``sha256`` is the SHA-256 of the file's bytes (as ``sha256sum`` prints it,
compressed bytes for a ``.gz``); for a folder it is a SHA-256 over the sorted relative paths of the
files that were loaded, each followed by its size and bytes, so a local folder and the same
folder uploaded to S3 hash alike. Parsed arrays are cached as an uncompressed ``.npz`` in
``cache_dir``, else ``$FER2013_CACHE_DIR``, else ``~/.cache/fer2013``, keyed by that hash and the
parse options, written atomically and only after a successful parse. S3 sources are keyed by the
URI and each object's ETag and size instead (S3 changes the ETag whenever an object's bytes
change), so a warm S3 load lists or HEADs the objects but downloads nothing; the content hash
recorded at the first download is returned.
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import os
import queue
import re
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "USAGES",
    "IMAGE_SIDE",
    "N_PIXELS",
    "DataError",
    "FERDataset",
    "load_fer2013",
    "default_cache_dir",
]

CLASS_NAMES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
USAGES: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
IMAGE_SIDE = 48
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE

logger = logging.getLogger(__name__)

_TRAINING, _PUBLIC, _PRIVATE = 0, 1, 2
_NO_SPLIT = -1  # usage code of rows whose source has no split column (validation split later)
_CACHE_VERSION = 1  # bump when the parse result for the same bytes changes
_BLOCK_BYTES = 2 << 20  # CSV text handed from the inflating thread to the parser at a time
_PIXEL_BATCH_ROWS = 64  # rows per vectorised pixel parse: ~600 KB of text, stays in CPU cache
_INFLATE_IN_BYTES = 256 << 10  # compressed bytes fed to zlib per call
_GZIP_MAGIC = b"\x1f\x8b"
_STRIP_BYTES = b' \t\r"'  # stripped around every CSV field (icml pads, CRLF, quotes)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_USAGE_NAME = re.compile(r"(Training|PublicTest|PrivateTest)_(\d*)")
_MAX_REPORTED = 5  # bad locations named in a skip warning


class DataError(ValueError):
    """Bad or unreadable FER2013 input; the message names the file, the line and what was wrong."""


@dataclass(frozen=True, eq=False, repr=False)
class FERDataset:
    """FER2013 rows in memory; see the module docstring for the meaning of each field."""

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    source: str
    sha256: str
    skipped_rows: int = 0

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"FERDataset.images: expected a uint8 numpy array, found "
                f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}"
            )
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1):
            raise ValueError(
                f"FERDataset.images: expected shape (N, 48, 48, 1), found {images.shape}"
            )
        n = images.shape[0]
        labels = np.asarray(self.labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"FERDataset.labels: expected an integer array of shape ({n},), found "
                f"{labels.dtype} {labels.shape}"
            )
        if n and (labels.min() < -1 or labels.max() > len(CLASS_NAMES) - 1):
            raise ValueError(
                f"FERDataset.labels: expected values -1..6, found {labels.min()}..{labels.max()}"
            )
        usage = np.asarray(self.usage).astype(str)
        if usage.shape != (n,):
            raise ValueError(f"FERDataset.usage: expected shape ({n},), found {usage.shape}")
        unknown = sorted(set(np.unique(usage).tolist()) - set(USAGES))
        if unknown:
            raise ValueError(f"FERDataset.usage: expected values in {USAGES}, found {unknown}")
        # Frozen, so normalise through object.__setattr__ (callers may pass int32 labels, lists).
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "usage", usage)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"FERDataset(rows={len(self)}, counts={self.counts()}, source={self.source!r}, "
            f"sha256={self.sha256[:12]}..., skipped_rows={self.skipped_rows})"
        )

    def counts(self) -> dict[str, int]:
        """Rows per usage, every name in USAGES present (0 where the source has none)."""
        return {name: int(np.count_nonzero(self.usage == name)) for name in USAGES}

    def split(self, usage: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the rows of one usage (copies)."""
        if usage not in USAGES:
            raise ValueError(
                f"unknown usage {usage!r}: expected one of {', '.join(USAGES)} "
                f"(rows per usage in {self.source}: {self._available()})"
            )
        mask = self.usage == usage
        if not mask.any():
            raise ValueError(
                f"no {usage!r} rows in {self.source}: available usages {self._available()}"
            )
        return self.images[mask], self.labels[mask]

    def subset(self, fraction: float, seed: int) -> FERDataset:
        """A stratified sample: ``round(fraction * n)`` rows (at least 1) of every non-empty
        (usage, label) group, chosen by ``seed``, in the original row order."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"subset fraction: expected a number in (0, 1], found {fraction!r}")
        if fraction == 1.0:
            return self
        n = len(self)
        codes = _usage_codes(self.usage)
        strata = codes * (len(CLASS_NAMES) + 1) + (self.labels + 1)
        rng = np.random.default_rng(seed)
        # A random permutation, then a stable sort by stratum: each stratum's rows end up
        # contiguous and randomly ordered, so keeping each stratum's first k rows samples it.
        order = rng.permutation(n)
        order = order[np.argsort(strata[order], kind="stable")]
        _, first, sizes = np.unique(strata[order], return_index=True, return_counts=True)
        keep_n = np.maximum(1, np.floor(fraction * sizes + 0.5).astype(np.int64))
        rank = np.arange(n) - np.repeat(first, sizes)
        chosen = np.sort(order[rank < np.repeat(keep_n, sizes)])
        return FERDataset(
            images=self.images[chosen],
            labels=self.labels[chosen],
            usage=self.usage[chosen],
            source=self.source,
            sha256=self.sha256,
            skipped_rows=self.skipped_rows,
        )

    def _available(self) -> str:
        found = {k: v for k, v in self.counts().items() if v}
        return ", ".join(f"{k}={v}" for k, v in found.items()) or "none (empty dataset)"


def default_cache_dir() -> Path:
    """Where parsed arrays are cached when no cache_dir is given."""
    env = os.environ.get("FER2013_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fer2013"


def load_fer2013(
    source: str | os.PathLike[str],
    *,
    resize: bool = False,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    val_fraction: float = 0.1,
    seed: int = 2017,
) -> FERDataset:
    """Load FER2013 from a file, a directory or an ``s3://`` URI (formats: module docstring).

    Args:
        source: path to a CSV (``.gz`` allowed) or a directory, or ``s3://bucket/key`` /
            ``s3://bucket/prefix/``.
        resize: resize images that are not 48x48 (image folders) instead of raising.
        skip_bad_rows: skip bad rows / images, count them in ``skipped_rows`` and log a warning
            naming the first few, instead of raising ``DataError``.
        cache_dir: cache folder (default ``$FER2013_CACHE_DIR`` or ``~/.cache/fer2013``).
        use_cache: read and write the parsed-array cache.
        val_fraction: where the source has no split (``train.csv``; image folders with neither
            ``Training_``/``PublicTest_``/``PrivateTest_`` names nor a test/ folder), this share
            of each class's labelled rows becomes ``PublicTest`` and the rest ``Training``:
            ``round(val_fraction * n)`` rows per class, at least 1 and at most n-1 for a class
            of n >= 2 rows (none for a single-row class or val_fraction 0), chosen with ``seed``.
            Sources with a Usage column or named files keep their own split.
        seed: seed of that validation split.

    Raises:
        DataError: bad input, naming the file, the 1-based line (header = line 1) or image, and
            what was expected and found. Nothing is returned or cached in that case.
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in [0, 1), found {val_fraction!r}")
    text = os.fspath(source)
    origin: _Origin = _S3Origin(text) if text.startswith("s3://") else _LocalOrigin(text)
    plan = origin.plan()
    cache = _Cache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    options = f"v{_CACHE_VERSION}|{plan.signature}|resize={resize}|skip={skip_bad_rows}"

    def content_key(sha: str) -> str:
        return f"{sha}-{_digest(options)[:16]}"

    quick = origin.quick_key(plan) if use_cache else None
    quick_key = f"s3-{_digest(quick + options)}" if quick is not None else None
    if quick_key is not None:
        hit = cache.get(quick_key)
        if hit is not None:
            return _finish(hit, origin.display, val_fraction, seed)
    elif use_cache:
        hit = cache.get(content_key(origin.sha256(plan)))
        if hit is not None:
            return _finish(hit, origin.display, val_fraction, seed)

    contents = origin.read(plan)
    sha = _content_sha256(plan, contents)  # of the bytes parsed, should the file just change
    if quick_key is not None:
        hit = cache.get(content_key(sha))  # the same bytes, cached from another source
        if hit is not None:
            cache.put(quick_key, hit)
            return _finish(hit, origin.display, val_fraction, seed)

    parsed = _parse_plan(plan, contents, origin, resize=resize, skip_bad_rows=skip_bad_rows)
    parsed.sha256 = sha
    if use_cache:
        cache.put(quick_key or content_key(sha), parsed)
    return _finish(parsed, origin.display, val_fraction, seed)


# --------------------------------------------------------------------------------------------
# Parse results and the final dataset


@dataclass
class _Parsed:
    images: np.ndarray  # uint8 (N, 48, 48, 1)
    labels: np.ndarray  # int64 (N,)
    usage: np.ndarray  # int8 codes into USAGES, _NO_SPLIT where a validation split is due
    skipped_rows: int = 0
    skipped_where: tuple[str, ...] = ()  # the first few bad locations, for the warning
    sha256: str = ""

    @staticmethod
    def concat(parts: Sequence[_Parsed]) -> _Parsed:
        return _Parsed(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            usage=np.concatenate([p.usage for p in parts]),
            skipped_rows=sum(p.skipped_rows for p in parts),
            skipped_where=tuple(w for p in parts for w in p.skipped_where)[:_MAX_REPORTED],
        )


def _finish(parsed: _Parsed, display: str, val_fraction: float, seed: int) -> FERDataset:
    if parsed.skipped_rows:
        logger.warning(
            "%s: skipped %d bad row(s)/image(s); first at: %s",
            display,
            parsed.skipped_rows,
            ", ".join(parsed.skipped_where),
        )
    codes = _assign_validation(parsed.usage, parsed.labels, val_fraction, seed)
    return FERDataset(
        images=parsed.images,
        labels=parsed.labels,
        usage=np.asarray(USAGES)[codes],
        source=display,
        sha256=parsed.sha256,
        skipped_rows=parsed.skipped_rows,
    )


def _assign_validation(
    codes: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> np.ndarray:
    """Replace _NO_SPLIT codes by a stratified, seeded Training/PublicTest split."""
    pending = codes == _NO_SPLIT
    if not pending.any():
        return codes
    assert (labels[pending] >= 0).all(), "rows without a split must be labelled"
    out = codes.copy()
    out[pending] = _TRAINING
    if val_fraction == 0.0:
        return out
    rng = np.random.default_rng(seed)
    for label in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(pending & (labels == label))
        if len(rows) < 2:
            continue
        n_val = min(len(rows) - 1, max(1, int(np.floor(val_fraction * len(rows) + 0.5))))
        out[rng.choice(rows, size=n_val, replace=False)] = _PUBLIC
    return out


def _usage_codes(usage: np.ndarray) -> np.ndarray:
    codes = np.full(usage.shape, -1, dtype=np.int64)
    for code, name in enumerate(USAGES):
        codes[usage == name] = code
    return codes


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Sources: what to read (the plan), reading it, and its content hash


@dataclass(frozen=True)
class _Plan:
    kind: str  # "csv" or "images"
    files: tuple[str, ...]  # relative POSIX paths ("" for a single-file source)
    roles: tuple[str, ...] = ()  # csv only: "challenge" | "train" | "test" per file
    is_dir: bool = False

    @property
    def signature(self) -> str:
        # The role changes how the same bytes parse (a test.csv has no labels), so it keys caches.
        return f"{self.kind}:{','.join(self.roles)}:dir={self.is_dir}"


def _csv_role(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    if base.startswith("train"):
        return "train"
    if base.startswith("test"):
        return "test"
    return "challenge"


def _plan_directory(display: str, rels: Sequence[str]) -> _Plan:
    """Pick the files of a folder to load (order documented in the module docstring)."""
    top = {rel.lower(): rel for rel in rels if "/" not in rel}
    for train in ("train.csv", "train.csv.gz"):
        if train in top:
            files = [top[train]]
            test = top.get("test.csv") or top.get("test.csv.gz")
            if test:
                files.append(test)
            return _Plan("csv", tuple(files), tuple(_csv_role(f) for f in files), is_dir=True)
    for name in ("fer2013.csv", "fer2013.csv.gz", "icml_face_data.csv", "icml_face_data.csv.gz"):
        if name in top:
            return _Plan("csv", (top[name],), ("challenge",), is_dir=True)
    images = _image_files(display, rels)
    if images:
        return _Plan("images", tuple(images), is_dir=True)
    shown = ", ".join(sorted(rels)[:8]) or "nothing"
    raise DataError(
        f"{display}: no FER2013 data found: expected train.csv, fer2013.csv[.gz], "
        f"icml_face_data.csv or train|test/<class>/*.png|jpg; found {shown}"
    )


def _image_files(display: str, rels: Sequence[str]) -> list[str]:
    """Image paths of the train|test/<class>/ layout (or <class>/ directly under the root)."""
    classes = {c.lower() for c in CLASS_NAMES}
    split_level: list[str] = []
    class_level: list[str] = []
    for rel in rels:
        parts = rel.split("/")
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        if not parts[-1].lower().endswith(_IMAGE_SUFFIXES):
            continue
        if len(parts) == 3 and parts[0].lower() in ("train", "test"):
            if parts[1].lower() not in classes:
                raise DataError(
                    f"{_join(display, parts[0] + '/' + parts[1])}: unknown class folder "
                    f"{parts[1]!r}: expected one of {', '.join(sorted(classes))} (any case)"
                )
            split_level.append(rel)
        elif len(parts) == 2 and parts[0].lower() in classes:
            class_level.append(rel)
    return split_level or class_level


def _join(display: str, rel: str) -> str:
    if not rel:
        return display
    return display + rel if display.endswith("/") else f"{display}/{rel}"


def _content_sha256(plan: _Plan, contents: dict[str, bytes]) -> str:
    if not plan.is_dir:
        return hashlib.sha256(contents[plan.files[0]]).hexdigest()
    h = hashlib.sha256()
    for rel in sorted(plan.files):
        data = contents[rel]
        h.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _Origin(abc.ABC):
    display: str

    @abc.abstractmethod
    def plan(self) -> _Plan:
        """Which files make up the source, and how to parse them."""

    @abc.abstractmethod
    def read(self, plan: _Plan) -> dict[str, bytes]:
        """The bytes of every planned file."""

    def quick_key(self, plan: _Plan) -> str | None:
        """A cache key that is cheaper than the content hash, where the store has one."""
        return None

    def sha256(self, plan: _Plan) -> str:
        """The content hash of the planned files (see _content_sha256)."""
        return _content_sha256(plan, self.read(plan))

    def name(self, rel: str) -> str:
        """How to name one file of the source in messages."""
        return _join(self.display, rel)


class _LocalOrigin(_Origin):
    def __init__(self, text: str) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(text)))
        self.display = str(self.path)
        self._contents: dict[str, bytes] | None = None
        if not self.path.exists():
            raise DataError(f"{self.display}: no such file or directory")

    def plan(self) -> _Plan:
        if not self.path.is_dir():
            return _Plan("csv", ("",), (_csv_role(self.path.name),))
        rels = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.path).as_posix()
            for f in filenames:
                rels.append(f if rel_dir == "." else f"{rel_dir}/{f}")
        return _plan_directory(self.display, rels)

    def sha256(self, plan: _Plan) -> str:
        if plan.is_dir:
            return super().sha256(plan)
        # Streamed: a warm load of a single file never holds its bytes.
        try:
            with open(self.path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise DataError(f"{self.display}: cannot read: {exc}") from exc

    def read(self, plan: _Plan) -> dict[str, bytes]:
        if self._contents is None:  # folders are read once, for the hash and the parse
            self._contents = {}
            for rel in plan.files:
                try:
                    data = (self.path / rel).read_bytes() if rel else self.path.read_bytes()
                except OSError as exc:
                    raise DataError(f"{self.name(rel)}: cannot read: {exc}") from exc
                self._contents[rel] = data
        return self._contents


class _S3Origin(_Origin):
    def __init__(self, uri: str) -> None:
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise DataError(f"{uri}: expected s3://bucket/key or s3://bucket/prefix/")
        self.bucket, self.key, self.uri, self.display = bucket, key, uri, uri
        self._client = None
        self._meta: dict[str, tuple[str, int]] = {}  # rel -> (ETag, size)
        self._prefix = key

    @property
    def client(self):  # botocore generates the client class at run time: no useful type
        if self._client is None:
            import boto3  # lazily: only S3 sources pay for importing boto3

            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get(
                "MLFLOW_S3_ENDPOINT_URL"
            )
            self._client = boto3.client("s3", endpoint_url=endpoint or None)
        return self._client

    def _error(self, exc: Exception, what: str) -> DataError:
        return DataError(f"{what}: cannot read from S3: {exc}")

    def plan(self) -> _Plan:
        from botocore.exceptions import ClientError

        if self.key and not self.key.endswith("/"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchKey", "NotFound"):
                    raise self._error(exc, self.uri) from exc
                # Not an object: maybe a folder given without its trailing slash.
                self._prefix = self.key + "/"
            else:
                self._meta[""] = (str(head.get("ETag", "")), int(head.get("ContentLength", -1)))
                return _Plan("csv", ("",), (_csv_role(self.key),))
        rels = self._list()
        if not rels:
            raise DataError(f"{self.uri}: no such S3 object or prefix (or it is empty)")
        self.display = f"s3://{self.bucket}/{self._prefix}"
        return _plan_directory(self.display, rels)

    def _list(self) -> list[str]:
        from botocore.exceptions import ClientError

        rels = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self._prefix) :]
                    if rel and not rel.endswith("/"):
                        rels.append(rel)
                        self._meta[rel] = (str(obj.get("ETag", "")), int(obj.get("Size", -1)))
        except ClientError as exc:
            raise self._error(exc, self.uri) from exc
        return rels

    def quick_key(self, plan: _Plan) -> str | None:
        lines = [f"{rel}\t{self._meta[rel][0]}\t{self._meta[rel][1]}" for rel in sorted(plan.files)]
        return "\n".join([f"s3://{self.bucket}/{self._prefix}", *lines])

    def read(self, plan: _Plan) -> dict[str, bytes]:
        from botocore.exceptions import ClientError

        def fetch(rel: str) -> bytes:
            key = self._prefix + rel if rel else self.key
            # If-Match: the bytes must be those of the ETag that keys the cache entry.
            etag = self._meta[rel][0]
            match = {"IfMatch": etag} if etag else {}
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key, **match)["Body"].read()
            except ClientError as exc:
                raise self._error(exc, self.name(rel)) from exc

        if len(plan.files) == 1:
            return {plan.files[0]: fetch(plan.files[0])}
        # Many small objects: overlap the round trips (boto3 clients are thread-safe).
        with ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(plan.files, pool.map(fetch, plan.files), strict=True))


def _parse_plan(
    plan: _Plan, contents: dict[str, bytes], origin: _Origin, *, resize: bool, skip_bad_rows: bool
) -> _Parsed:
    if plan.kind == "images":
        return _parse_image_folder(plan.files, contents, origin, resize, skip_bad_rows)
    parts = [
        _parse_csv(contents[rel], origin.name(rel), role, skip_bad_rows)
        for rel, role in zip(plan.files, plan.roles, strict=True)
    ]
    return parts[0] if len(parts) == 1 else _Parsed.concat(parts)


# --------------------------------------------------------------------------------------------
# CSV parsing: stream line-aligned blocks (gzip inflated in a helper thread), then parse each
# block with a handful of numpy passes; Python only touches rows to slice out their fields.


@dataclass(frozen=True)
class _Columns:
    header: str
    count: int
    pixels: int
    label: int | None
    usage: int | None
    default_usage: int  # code for rows of a file without a Usage column


_PIXEL_NAMES = ("pixels", "feature")
_LABEL_NAMES = ("emotion", "label")


def _columns(header_line: bytes, name: str, role: str) -> _Columns:
    header = header_line.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    names = [n.strip().strip('"').strip().lower() for n in header.split(",")]

    def find(options: Sequence[str]) -> int | None:
        hits = [i for i, n in enumerate(names) if n in options]
        return hits[0] if hits else None

    def missing(column: str, example: str) -> DataError:
        return DataError(
            f"{name}, line 1: missing column {column}: expected a header like {example!r}, "
            f"found {header!r}"
        )

    example = {
        "train": "label,feature",
        "test": "id,feature",
        "challenge": "emotion,pixels,Usage",
    }[role]
    pixels = find(_PIXEL_NAMES)
    if pixels is None:
        raise missing("'pixels' (or 'feature')", example)
    label = find(_LABEL_NAMES)
    if label is None and role != "test":
        raise missing("'emotion' (or 'label')", example)
    usage = find(("usage",))
    if usage is None and role == "challenge":
        raise missing("'Usage'", example)
    default = _PRIVATE if role == "test" else _NO_SPLIT
    return _Columns(header, len(names), pixels, label, usage, default)


def _parse_csv(data: bytes, name: str, role: str, skip_bad_rows: bool) -> _Parsed:
    blocks = _Blocks(data, name)
    scratch = _Scratch()
    try:
        columns: _Columns | None = None
        next_line = 1
        parts: list[_Parsed] = []
        saw_text = False
        for block in blocks:
            if columns is None:
                if not saw_text and not block.strip():
                    next_line += block.count(b"\n")
                    continue
                saw_text = True
                end = block.find(b"\n")
                header, block = (block, b"") if end < 0 else (block[:end], block[end + 1 :])
                if next_line != 1 or not header.strip():
                    raise DataError(
                        f"{name}, line 1: expected a header like 'emotion,pixels,Usage', "
                        f"found a blank line"
                    )
                columns = _columns(header, name, role)
                next_line = 2
                if not block:
                    continue
            part, n_lines = _parse_block(block, next_line, columns, name, skip_bad_rows, scratch)
            next_line += n_lines
            if len(part.labels) or part.skipped_rows:
                parts.append(part)
    finally:
        blocks.close()
    if columns is None:
        raise DataError(
            f"{name}: empty file: expected a header line such as 'emotion,pixels,Usage' and "
            f"data rows, found no text"
        )
    result = _Parsed.concat(parts) if parts else _empty_parsed()
    if not len(result.labels):
        if result.skipped_rows:
            raise DataError(
                f"{name}: all {result.skipped_rows} data rows are bad (first at "
                f"{', '.join(result.skipped_where)}): expected at least one good row"
            )
        raise DataError(
            f"{name}: header only: expected data rows after line 1 ({columns.header!r}), found none"
        )
    return result


_Pieces = list[bytes | memoryview]


class _Blocks:
    """Line-aligned text blocks of a CSV's bytes; gzip is inflated by a helper thread so that
    inflating (zlib releases the GIL) overlaps parsing the previous blocks."""

    def __init__(self, data: bytes, name: str) -> None:
        self._data, self._name = data, name
        self._stop = threading.Event()
        self._queue: queue.Queue[_Pieces | BaseException | None] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        if data[:2] == _GZIP_MAGIC:
            self._thread = threading.Thread(target=self._inflate, name="fer2013-gunzip")
            self._thread.daemon = True
            self._thread.start()

    def __iter__(self) -> Iterator[bytes]:
        if self._thread is None:
            yield from _cut_lines(self._data)
            return
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise DataError(f"{self._name}: not a readable gzip file: {item}") from item
            # Joined here, not in the inflating thread: multi-megabyte blocks allocated by one
            # thread and freed by the other churned glibc's heaps (pages faulted in again).
            yield b"".join(item)

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _put(self, item: _Pieces | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _inflate(self) -> None:
        try:
            view = memoryview(self._data)
            inflater = zlib.decompressobj(wbits=31)
            pending: _Pieces = []
            size = 0
            for pos in range(0, len(view), _INFLATE_IN_BYTES):
                if self._stop.is_set():
                    return
                piece = inflater.decompress(view[pos : pos + _INFLATE_IN_BYTES])
                while inflater.eof and inflater.unused_data:  # concatenated gzip members
                    rest = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                    piece += inflater.decompress(rest)
                pending.append(piece)
                size += len(piece)
                cut = piece.rfind(b"\n") + 1 if size >= _BLOCK_BYTES else 0
                if cut:
                    # Hand over the pieces up to the last newline; the reader joins them.
                    pending[-1] = memoryview(piece)[:cut]
                    if not self._put(pending):
                        return
                    pending = [piece[cut:]]
                    size = len(pending[0])
            if not inflater.eof:
                raise zlib.error("truncated gzip stream (ends before its end-of-stream marker)")
            if size and not self._put(pending):
                return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - forwarded to and raised by the reader
            self._put(exc)


def _cut_lines(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos + _BLOCK_BYTES)
        end = len(data) if end < 0 else end + 1
        yield data[pos:end]
        pos = end


_WS_LUT = np.zeros(256, dtype=bool)
_WS_LUT[list(_STRIP_BYTES)] = True
_USAGE_BYTES = tuple(u.encode() for u in USAGES)
_LABEL_BYTES = tuple(str(i).encode() for i in range(len(CLASS_NAMES)))


def _strip_spans(a: np.ndarray, s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Narrow [s, e) spans of ``a`` past _STRIP_BYTES at both ends (vectorised over rows)."""
    last = len(a) - 1
    while True:
        move = (s < e) & _WS_LUT[a[np.minimum(s, last)]]
        if not move.any():
            break
        s = s + move
    while True:
        move = (e > s) & _WS_LUT[a[np.maximum(e - 1, 0)]]
        if not move.any():
            break
        e = e - move
    return s, e


def _parse_block(
    block: bytes,
    first_line: int,
    cols: _Columns,
    name: str,
    skip_bad_rows: bool,
    scratch: _Scratch,
) -> tuple[_Parsed, int]:
    """Parse the complete lines of one block; returns the rows and the block's line count."""
    if not block.endswith(b"\n"):
        block += b"\n"
    a = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(a == 10)
    n_lines = len(newlines)
    starts = np.empty(n_lines, dtype=np.int64)
    starts[0] = 0
    starts[1:] = newlines[:-1] + 1
    ends = newlines.astype(np.int64)
    line_no = first_line + np.arange(n_lines)

    # Blank lines (a trailing newline, padding) are not rows.
    lengths = ends - starts
    blank = lengths == 0
    for i in np.flatnonzero((lengths > 0) & (lengths <= 16)).tolist():
        blank[i] = not block[starts[i] : ends[i]].strip()
    if blank.any():
        keep = ~blank
        starts, ends, line_no = starts[keep], ends[keep], line_no[keep]
    n = len(starts)
    if n == 0:
        return _empty_parsed(), n_lines

    commas = np.flatnonzero(a == 44)
    lo = np.searchsorted(commas, starts)
    fields_ok = np.searchsorted(commas, ends) - lo + 1 == cols.count
    padded = np.append(commas, len(a) - 1)  # safe indexing for rows with too few commas

    def span(k: int) -> tuple[np.ndarray, np.ndarray]:
        s = starts if k == 0 else padded[np.minimum(lo + k - 1, len(commas))] + 1
        e = ends if k == cols.count - 1 else padded[np.minimum(lo + k, len(commas))]
        s, e = np.where(fields_ok, s, starts), np.where(fields_ok, e, starts)
        return _strip_spans(a, s, e)

    ok = fields_ok.copy()
    labels = np.full(n, -1, dtype=np.int64)
    if cols.label is not None:
        s, e = span(cols.label)
        first = a[np.minimum(s, len(a) - 1)].astype(np.int64) - ord("0")
        good = (e - s == 1) & (first >= 0) & (first < len(CLASS_NAMES))
        labels[good] = first[good]
        ok &= good
    usage = np.full(n, cols.default_usage, dtype=np.int8)
    if cols.usage is not None:
        s, e = span(cols.usage)
        found = np.array([block[i:j] for i, j in zip(s.tolist(), e.tolist(), strict=True)])
        good = np.zeros(n, dtype=bool)
        for code, value in enumerate(_USAGE_BYTES):
            match = found == value
            usage[match] = code
            good |= match
        ok &= good
    s, e = span(cols.pixels)
    view = memoryview(block)
    fields = [view[i:j] for i, j in zip(s.tolist(), e.tolist(), strict=True)]
    pixels, pixels_ok = _parse_pixel_rows(fields, e - s, scratch)
    ok &= pixels_ok

    skipped: tuple[str, ...] = ()
    if not ok.all():
        bad = np.flatnonzero(~ok)
        if not skip_bad_rows:
            i = int(bad[0])
            line = block[starts[i] : ends[i]]
            raise DataError(f"{name}, line {line_no[i]}: {_row_problem(line, cols)}")
        skipped = tuple(f"{name} line {line_no[i]}" for i in bad[:_MAX_REPORTED])
        pixels, labels, usage = pixels[ok], labels[ok], usage[ok]
    part = _Parsed(
        images=pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1),
        labels=labels,
        usage=usage,
        skipped_rows=int(n - np.count_nonzero(ok)),
        skipped_where=skipped,
    )
    return part, n_lines


def _empty_parsed() -> _Parsed:
    return _Parsed(
        np.empty((0, IMAGE_SIDE, IMAGE_SIDE, 1), np.uint8),
        np.empty(0, np.int64),
        np.empty(0, np.int8),
    )


def _parse_pixel_rows(
    fields: Sequence[bytes | memoryview], lengths: np.ndarray, scratch: _Scratch
) -> tuple[np.ndarray, np.ndarray]:
    """Parse pixel fields (each 2304 space-separated integers) into uint8 (n, 2304) and a
    per-row ok mask, in batches of rows small enough for the CPU cache. A clean batch takes a
    few numpy passes over its joined text; a batch with anything unusual (bad values, tabs,
    double spaces) is re-parsed row by row, which also finds exactly which rows are bad."""
    n = len(fields)
    out = np.zeros((n, N_PIXELS), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    for lo in range(0, n, _PIXEL_BATCH_ROWS):
        batch = fields[lo : lo + _PIXEL_BATCH_ROWS]
        rows = slice(lo, lo + len(batch))
        if _parse_clean_pixels(batch, lengths[rows], out[rows], scratch):
            ok[rows] = True
            continue
        for i, field in enumerate(batch, start=lo):
            values, problem = _parse_pixel_field(bytes(field))
            if problem is None:
                out[i] = values
                ok[i] = True
    return out, ok


class _Scratch:
    """Buffers reused across pixel batches. Fresh multi-megabyte temporaries per batch made
    glibc hand pages back to the OS and fault them in again, costing more system time than
    the parse itself."""

    def __init__(self) -> None:
        self.capacity = 0

    def ensure(self, n_bytes: int) -> None:
        if n_bytes <= self.capacity:
            return
        self.capacity = max(n_bytes, 2 * self.capacity)
        self.text = bytearray(self.capacity + 8)
        self.mask = np.empty(self.capacity, dtype=bool)
        tokens = self.capacity // 2 + 1  # a token and its space take at least 2 bytes
        self.words, self.a, self.b, self.c = (np.empty(tokens, np.uint32) for _ in range(4))


def _parse_clean_pixels(
    fields: Sequence[bytes | memoryview], lengths: np.ndarray, out: np.ndarray, scratch: _Scratch
) -> bool:
    """Vectorised parse of well-formed pixel fields into ``out``; False (``out`` undefined) if
    any field is not exactly 2304 single-space-separated integers 0..255 of at most 3 digits."""
    n = len(fields)
    # 4 leading spaces so every token has 4 readable bytes before its end; 1 space after each
    # field so every token, the last of a row included, is followed by a space.
    size = 4 + int(lengths.sum()) + n
    scratch.ensure(size)
    text = scratch.text
    text[:4] = b"    "
    pos = 4
    for field, length in zip(fields, lengths.tolist(), strict=True):
        text[pos : pos + length] = field
        text[pos + length] = 32
        pos += length + 1
    a = np.frombuffer(text, dtype=np.uint8, count=size)
    body = a[4:]
    mask = scratch.mask[: len(body)]
    spaces = np.flatnonzero(np.equal(body, 32, out=mask))
    # Only digits and spaces: nothing above '9', and every byte below '0' is a space.
    if body.max() > ord("9") or np.count_nonzero(np.less(body, 48, out=mask)) != len(spaces):
        return False
    counts = np.diff(np.searchsorted(spaces, np.cumsum(lengths + 1) - 1, side="right"), prepend=0)
    if not (counts == N_PIXELS).all():
        return False
    k = len(spaces)
    # words[k]: the 4 bytes before the k-th space (little-endian: the last digit is the top
    # byte), read through an unaligned uint32 view so that one gather fetches a whole token.
    window = np.ndarray((size - 3,), dtype="<u4", buffer=text, offset=0, strides=(1,))
    words = np.take(window, spaces, out=scratch.words[:k], mode="clip")
    # Bit 4 of each byte: set for a digit, clear for a space.
    flags = np.bitwise_and(words, np.uint32(0x10101010), out=scratch.a[:k])
    if flags.min() < 0x10000000:
        # A space before a space: an empty field or doubled, leading or trailing spaces, so
        # the space counts above are not token counts.
        return False
    if flags.max() == 0x10101010:
        return False  # a token of 4+ digits
    # Digit values by nibble (a space's low nibble is 0): keep the units and tens bytes, and the
    # hundreds byte only where the tens byte is a digit (else it ends the token before).
    keep = np.right_shift(flags, np.uint32(20), out=flags)
    keep &= np.uint32(1)
    keep *= np.uint32(0x0F00)
    keep |= np.uint32(0x0F0F0000)
    digits = np.bitwise_and(words, keep, out=scratch.b[:k])
    # SWAR: byte 1 becomes 10*hundreds + tens; then 10 * that + units.
    values = np.multiply(digits, np.uint32(10), out=scratch.c[:k])
    values += np.right_shift(digits, np.uint32(8), out=keep)
    values >>= np.uint32(8)
    values &= np.uint32(0xFF)
    values *= np.uint32(10)
    values += np.right_shift(digits, np.uint32(24), out=keep)
    if values.max() > 255:
        return False
    out[:] = values.reshape(n, N_PIXELS)
    return True


def _parse_pixel_field(field: bytes) -> tuple[np.ndarray | None, str | None]:
    """One pixel field, the slow exact way: values or a description of the first problem."""
    tokens = field.split()
    if not tokens:
        return None, f"pixels: expected {N_PIXELS} values (48x48), found none"
    arr = np.array(tokens)
    digits = np.strings.isdigit(arr)
    if not digits.all():
        i = int(np.argmin(digits))
        return None, (f"pixels: value #{i + 1} is not an integer 0..255: found {_show(tokens[i])}")
    values = np.zeros(len(tokens), dtype=np.int64)
    long = np.strings.str_len(arr) > 3
    values[~long] = arr[~long].astype(np.int64)
    for i in np.flatnonzero(long).tolist():  # leading zeros, or too large for int64
        values[i] = min(int(tokens[i]), 1 << 32)
    high = values > 255
    if high.any():
        i = int(np.argmax(high))
        return None, f"pixels: value #{i + 1} outside 0..255: found {_show(tokens[i])}"
    if len(tokens) != N_PIXELS:
        return None, f"pixels: expected {N_PIXELS} values (48x48), found {len(tokens)}"
    return values.astype(np.uint8), None


def _row_problem(line: bytes, cols: _Columns) -> str:
    """Why one CSV line is bad (the vectorised checks only say that it is)."""
    fields = line.split(b",")
    if len(fields) != cols.count:
        return (
            f"expected {cols.count} comma-separated fields ({cols.header!r}), found {len(fields)}"
        )
    if cols.label is not None:
        raw = fields[cols.label].strip(_STRIP_BYTES)
        if raw not in _LABEL_BYTES:
            return f"label: expected an integer 0..6, found {_show(raw)}"
    if cols.usage is not None:
        raw = fields[cols.usage].strip(_STRIP_BYTES)
        if raw not in _USAGE_BYTES:
            return f"Usage: expected one of {', '.join(USAGES)}, found {_show(raw)}"
    _, problem = _parse_pixel_field(fields[cols.pixels].strip(_STRIP_BYTES))
    assert problem is not None, f"row flagged bad but no problem found: {line[:80]!r}"
    return problem


def _show(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= 24 else text[:24] + "...")


# --------------------------------------------------------------------------------------------
# Image folders


def _parse_image_folder(
    rels: Sequence[str],
    contents: dict[str, bytes],
    origin: _Origin,
    resize: bool,
    skip_bad_rows: bool,
) -> _Parsed:
    from PIL import Image  # lazily: CSV users never need Pillow

    class_index = {c.lower(): i for i, c in enumerate(CLASS_NAMES)}
    entries = []
    has_split = False
    for rel in rels:
        parts = rel.split("/")
        split = parts[0].lower() if len(parts) == 3 else "train"
        stem = parts[-1].rsplit(".", 1)[0]
        named = _USAGE_NAME.match(stem)
        if named:
            code = USAGES.index(named.group(1))
            ident = int(named.group(2)) if named.group(2) else -1
        else:
            code = _PUBLIC if split == "test" else _TRAINING
            ident = -1
        has_split = has_split or bool(named) or split == "test"
        entries.append((code, ident < 0, ident, rel, class_index[parts[-2].lower()]))
    entries.sort()

    images = np.empty((len(entries), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    ok = np.zeros(len(entries), dtype=bool)
    bad: list[str] = []
    for i, (*_, rel, _label) in enumerate(entries):
        where = origin.name(rel)
        try:
            with Image.open(io.BytesIO(contents[rel])) as im:
                im.load()
                if im.size != (IMAGE_SIDE, IMAGE_SIDE) and not resize:
                    raise DataError(
                        f"{where}: image is {im.size[0]}x{im.size[1]} pixels, expected 48x48 "
                        f"(pass resize=True to resize)"
                    )
                grey = im.convert("L")
                if grey.size != (IMAGE_SIDE, IMAGE_SIDE):
                    grey = grey.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
                images[i] = np.asarray(grey, dtype=np.uint8)
                ok[i] = True
        except DataError:
            if not skip_bad_rows:
                raise
            bad.append(where)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if not skip_bad_rows:
                raise DataError(
                    f"{where}: unreadable image: expected a PNG or JPEG, found {exc}"
                ) from exc
            bad.append(where)
    if not ok.any():
        raise DataError(f"{origin.display}: no readable images (first bad: {', '.join(bad[:3])})")
    codes = np.array([e[0] for e in entries], dtype=np.int8)
    if not has_split:
        codes[:] = _NO_SPLIT
    labels = np.array([e[4] for e in entries], dtype=np.int64)
    return _Parsed(
        images=images[ok][..., None],
        labels=labels[ok],
        usage=codes[ok],
        skipped_rows=len(bad),
        skipped_where=tuple(bad[:_MAX_REPORTED]),
    )


# --------------------------------------------------------------------------------------------
# Cache of parsed arrays


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> _Parsed | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                parsed = _Parsed(
                    images=z["images"],
                    labels=z["labels"],
                    usage=z["usage"],
                    skipped_rows=int(z["skipped_rows"]),
                    skipped_where=tuple(z["skipped_where"].tolist()),
                    sha256=str(z["sha256"]),
                )
            n = len(parsed.images)
            if (
                parsed.images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1)
                or parsed.images.dtype != np.uint8
                or parsed.labels.shape != (n,)
                or parsed.usage.shape != (n,)
            ):
                raise ValueError("inconsistent array shapes")
            return parsed
        except Exception as exc:  # noqa: BLE001 - a bad cache entry must only cost a re-parse
            logger.warning("ignoring unreadable cache file %s (%s); re-parsing", path, exc)
            return None

    def put(self, key: str, parsed: _Parsed) -> None:
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    images=parsed.images,
                    labels=parsed.labels,
                    usage=parsed.usage,
                    skipped_rows=np.int64(parsed.skipped_rows),
                    skipped_where=np.array(parsed.skipped_where, dtype=str),
                    sha256=np.array(parsed.sha256),
                )
            os.replace(tmp, self._path(key))  # atomic: readers see the old entry or the new
            tmp = None
        except OSError as exc:
            logger.warning("could not write FER2013 cache in %s: %s", self.root, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
