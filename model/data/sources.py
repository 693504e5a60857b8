"""Where the data comes from: the load plan, local files and folders, S3 (_S3Origin), hashes."""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .dataset import CLASS_NAMES, DataError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    """Pick the files of a folder to load (order documented in the package docstring)."""
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
