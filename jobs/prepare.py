"""Parse and cache FER2013 once (so later jobs start fast); optionally copy the source to S3.

python -m jobs.prepare --data fer2013.csv.gz [--upload s3://bucket/fer2013.csv.gz]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from jobs.settings import PrepareSettings, add_arguments, from_namespace


def upload_to_s3(path: str, uri: str) -> str:
    """Copy a local file to `s3://bucket/key` (endpoint from AWS_ENDPOINT_URL or
    MLFLOW_S3_ENDPOINT_URL, so MinIO and other S3-compatible stores work)."""
    import os

    import boto3

    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"upload: expected s3://bucket/key, got {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    boto3.client("s3", endpoint_url=endpoint).upload_file(path, bucket, key)
    return uri


def prepare(settings: PrepareSettings) -> dict[str, Any]:
    from jobs.data import resolve_data
    from model.data import load_fer2013

    source = resolve_data(settings.data)
    started = time.perf_counter()
    dataset = load_fer2013(source)
    summary: dict[str, Any] = {
        "source": source,
        "sha256": dataset.sha256,
        "rows": int(len(dataset.labels)),
        "rows_per_usage": dataset.counts(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if settings.upload:
        if source.startswith("s3://"):
            raise ValueError("upload: the source is already on S3")
        summary["uploaded_to"] = upload_to_s3(source, settings.upload)
    return summary


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, PrepareSettings)
    settings = from_namespace(PrepareSettings, parser.parse_args(argv))

    def work() -> int:
        print(json.dumps(prepare(settings), indent=2))
        return 0

    return run_cli(work, tensorflow=False)


if __name__ == "__main__":
    sys.exit(main())
