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

from .cache import default_cache_dir
from .dataset import CLASS_NAMES, IMAGE_SIDE, N_PIXELS, USAGES, DataError, FERDataset
from .loader import load_fer2013

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
