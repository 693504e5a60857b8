"""model.data: every FER2013 layout loads to the same arrays; bad input fails loudly; caching."""

from __future__ import annotations

import gzip
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import model.data.csv_parser as csv_parser_mod
import model.data.loader as loader_mod
import model.data.sources as sources_mod
from model.data import CLASS_NAMES, USAGES, DataError, FERDataset, load_fer2013

ROWS_PER_USAGE = {"Training": 21, "PublicTest": 7, "PrivateTest": 7}


@dataclass(frozen=True)
class Sample:
    images: np.ndarray  # uint8 (N, 48, 48)
    labels: np.ndarray  # int64 (N,)
    usage: np.ndarray  # str (N,), grouped Training, PublicTest, PrivateTest (the files' order)


@pytest.fixture(scope="module")
def sample() -> Sample:
    rng = np.random.default_rng(7)
    usage = np.concatenate([[u] * n for u, n in ROWS_PER_USAGE.items()])
    images = rng.integers(0, 256, size=(len(usage), 48, 48), dtype=np.uint8)
    images[0, 0, :4] = (0, 9, 99, 255)  # 1-, 2- and 3-digit values and both extremes
    labels = np.arange(len(usage), dtype=np.int64) % len(CLASS_NAMES)
    return Sample(images, labels, usage)


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never touch ~/.cache: every test gets an empty default cache dir."""
    monkeypatch.setenv("FER2013_CACHE_DIR", str(tmp_path_factory.mktemp("fer-cache")))


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a 35-row file span many text blocks, inflate calls and pixel batches."""
    monkeypatch.setattr(csv_parser_mod, "_BLOCK_BYTES", 30_000)
    monkeypatch.setattr(csv_parser_mod, "_INFLATE_IN_BYTES", 4_000)
    monkeypatch.setattr(csv_parser_mod, "_PIXEL_BATCH_ROWS", 3)


def pixel_text(image: np.ndarray, sep: str = " ") -> str:
    return sep.join(map(str, image.ravel().tolist()))


def challenge_lines(s: Sample) -> list[str]:
    return ["emotion,pixels,Usage"] + [
        f"{lab},{pixel_text(img)},{use}"
        for img, lab, use in zip(s.images, s.labels, s.usage, strict=True)
    ]


def write_text(path: Path, lines: list[str], *, gz: bool = False, newline: str = "\n") -> Path:
    body = (newline.join(lines) + newline).encode()
    path.write_bytes(gzip.compress(body) if gz else body)
    return path


def write_icml(path: Path, s: Sample) -> Path:
    lines = ["emotion, Usage, pixels"] + [
        f"{lab}, {use}, {pixel_text(img)}"
        for img, lab, use in zip(s.images, s.labels, s.usage, strict=True)
    ]
    return write_text(path, lines)


def write_course(folder: Path, s: Sample) -> Path:
    folder.mkdir()
    labelled = s.usage != "PrivateTest"
    train = ["label,feature"] + [
        f"{lab},{pixel_text(img)}"
        for img, lab in zip(s.images[labelled], s.labels[labelled], strict=True)
    ]
    test = ["id,feature"] + [f"{i},{pixel_text(img)}" for i, img in enumerate(s.images[~labelled])]
    write_text(folder / "train.csv", train)
    write_text(folder / "test.csv", test)
    return folder


def write_image_folder(root: Path, s: Sample, *, named: bool = True, ext: str = "png") -> Path:
    for i, (img, lab, use) in enumerate(zip(s.images, s.labels, s.usage, strict=True)):
        split = "train" if use == "Training" else "test"
        # One class folder in title case: class folders match case-insensitively.
        cls = CLASS_NAMES[lab] if lab == 3 else CLASS_NAMES[lab].lower()
        name = f"{use}_{i}.{ext}" if named else f"img{i:03d}.{ext}"
        path = root / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return root


def assert_same(ds: FERDataset, s: Sample) -> None:
    assert ds.images.dtype == np.uint8 and ds.images.shape == (len(s.labels), 48, 48, 1)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images[..., 0], s.images)
    np.testing.assert_array_equal(ds.labels, s.labels)
    np.testing.assert_array_equal(ds.usage, s.usage)


# ------------------------------------------------------------------------------------------
# Formats


def test_challenge_csv_plain_and_gz(tmp_path: Path, sample: Sample) -> None:
    plain = write_text(tmp_path / "fer2013.csv", challenge_lines(sample))
    packed = write_text(tmp_path / "fer2013.csv.gz", challenge_lines(sample), gz=True)
    for path in (plain, packed):
        ds = load_fer2013(path)
        assert_same(ds, sample)
        assert ds.source == str(path.resolve())
        assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert ds.skipped_rows == 0
        assert ds.counts() == ROWS_PER_USAGE


def test_relative_path_is_reported_absolute(
    tmp_path: Path, sample: Sample, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_text(tmp_path / "fer2013.csv", challenge_lines(sample))
    monkeypatch.chdir(tmp_path)
    assert load_fer2013("fer2013.csv").source == str(tmp_path / "fer2013.csv")


@pytest.mark.parametrize("kind", ["gz-multiblock", "icml", "images-png", "crlf-quoted"])
def test_formats_load_the_same_arrays(
    tmp_path: Path, sample: Sample, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "gz-multiblock":
        request.getfixturevalue("small_blocks")
        source = write_text(tmp_path / "fer2013.csv.gz", challenge_lines(sample), gz=True)
    elif kind == "icml":
        source = write_icml(tmp_path / "icml_face_data.csv", sample)
    elif kind == "images-png":
        source = write_image_folder(tmp_path / "faces", sample)
    else:
        lines = ["emotion,pixels,Usage"] + [
            f'"{lab}","{pixel_text(img)}","{use}"'
            for img, lab, use in zip(sample.images, sample.labels, sample.usage, strict=True)
        ]
        source = write_text(tmp_path / "quoted.csv", lines, newline="\r\n")
    assert_same(load_fer2013(source), sample)


def test_irregular_whitespace_takes_the_slow_path_to_the_same_values(
    tmp_path: Path, sample: Sample
) -> None:
    lines = challenge_lines(sample)
    # Double spaces, a tab, and a zero-padded value that is still in range.
    lines[2] = f"{sample.labels[1]},{pixel_text(sample.images[1], '  ')},{sample.usage[1]}"
    lines[3] = f"{sample.labels[2]},{pixel_text(sample.images[2], chr(9))},{sample.usage[2]}"
    padded = sample.images[3].ravel().tolist()
    first = f"{padded[0]:04d}"
    lines[4] = f"{sample.labels[3]},{first} {' '.join(map(str, padded[1:]))},{sample.usage[3]}"
    lines.insert(5, "   ")  # a whitespace-only line is not a row
    assert_same(load_fer2013(write_text(tmp_path / "odd.csv", lines)), sample)


def test_course_csv_folder(tmp_path: Path, sample: Sample) -> None:
    folder = write_course(tmp_path / "course", sample)
    ds = load_fer2013(folder, val_fraction=0.25, seed=3)
    np.testing.assert_array_equal(ds.images[..., 0], sample.images)
    labelled = sample.usage != "PrivateTest"
    np.testing.assert_array_equal(ds.labels[labelled], sample.labels[labelled])
    assert (ds.labels[~labelled] == -1).all()
    assert (ds.usage[~labelled] == "PrivateTest").all()
    # No split column in train.csv: a stratified validation split of its rows.
    assert set(ds.usage[labelled]) == {"Training", "PublicTest"}
    for label in range(7):
        rows = labelled & (ds.labels == label)
        n_val = int(np.count_nonzero(ds.usage[rows] == "PublicTest"))
        assert n_val == min(rows.sum() - 1, max(1, int(np.floor(0.25 * rows.sum() + 0.5))))
    # The folder's hash covers the files' names and bytes: any edit changes it.
    before = ds.sha256
    (folder / "test.csv").write_bytes((folder / "test.csv").read_bytes() + b"\n")
    assert load_fer2013(folder).sha256 != before


def test_single_course_files(tmp_path: Path, sample: Sample) -> None:
    folder = write_course(tmp_path / "course", sample)
    test = load_fer2013(folder / "test.csv")
    assert (test.labels == -1).all() and set(test.usage) == {"PrivateTest"}
    np.testing.assert_array_equal(test.images[..., 0], sample.images[sample.usage == "PrivateTest"])
    train = load_fer2013(folder / "train.csv", val_fraction=0.0)
    assert set(train.usage) == {"Training"}
    with pytest.raises(ValueError, match="no 'PublicTest' rows"):
        train.split("PublicTest")


def test_validation_split_is_seeded(tmp_path: Path, sample: Sample) -> None:
    path = write_course(tmp_path / "course", sample) / "train.csv"
    a = load_fer2013(path, seed=1, val_fraction=0.3)
    b = load_fer2013(path, seed=1, val_fraction=0.3)
    np.testing.assert_array_equal(a.usage, b.usage)
    others = [load_fer2013(path, seed=s, val_fraction=0.3).usage for s in range(2, 8)]
    assert any((u != a.usage).any() for u in others)
    with pytest.raises(ValueError, match="val_fraction"):
        load_fer2013(path, val_fraction=1.0)


def test_image_folder_without_names_uses_folders(tmp_path: Path, sample: Sample) -> None:
    root = write_image_folder(tmp_path / "faces", sample, named=False)
    ds = load_fer2013(root)
    # train/ -> Training, test/ -> PublicTest; the test/ folder holds PublicTest+PrivateTest.
    assert ds.counts() == {"Training": 21, "PublicTest": 14, "PrivateTest": 0}
    images, labels = ds.split("Training")
    found = {img.tobytes(): lab for img, lab in zip(images[..., 0], labels, strict=True)}
    assert found == {
        img.tobytes(): lab for img, lab in zip(sample.images[:21], sample.labels[:21], strict=True)
    }


def test_image_folder_train_only_gets_a_validation_split(tmp_path: Path, sample: Sample) -> None:
    root = tmp_path / "faces"
    for i, (img, lab) in enumerate(zip(sample.images, sample.labels, strict=True)):
        path = root / "train" / CLASS_NAMES[lab].upper() / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    ds = load_fer2013(root, val_fraction=0.2, seed=5)
    assert ds.counts()["PrivateTest"] == 0
    for label in range(7):
        usage = ds.usage[ds.labels == label]
        assert np.count_nonzero(usage == "PublicTest") == 1  # round(0.2 * 5)
    again = load_fer2013(root, val_fraction=0.2, seed=5)
    np.testing.assert_array_equal(ds.usage, again.usage)


def test_colour_and_jpeg_images_become_grey(tmp_path: Path, sample: Sample) -> None:
    root = write_image_folder(tmp_path / "faces", sample)
    grey_rgb = root / "train" / "angry" / "Training_0.png"
    Image.fromarray(np.repeat(sample.images[0][..., None], 3, axis=2)).save(grey_rgb)
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "train" / "disgust" / "Training_1.png")
    jpeg = root / "train" / "fear" / "Training_2.jpg"
    (root / "train" / "fear" / "Training_2.png").unlink()
    Image.fromarray(sample.images[2]).save(jpeg, quality=90)
    ds = load_fer2013(root)
    np.testing.assert_array_equal(ds.images[0, ..., 0], sample.images[0])  # R=G=B: exact
    expected = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_array_equal(ds.images[1, ..., 0], expected)
    np.testing.assert_array_equal(ds.images[2, ..., 0], np.asarray(Image.open(jpeg)))


def test_wrong_size_image_fails_unless_resize(tmp_path: Path, sample: Sample) -> None:
    root = write_image_folder(tmp_path / "faces", sample)
    big = root / "train" / "sad" / "Training_4.png"
    wide = np.random.default_rng(2).integers(0, 256, size=(40, 50), dtype=np.uint8)
    Image.fromarray(wide).save(big)
    with pytest.raises(DataError, match=r"Training_4\.png: image is 50x40 pixels, expected 48x48"):
        load_fer2013(root)
    ds = load_fer2013(root, resize=True)
    expected = np.asarray(Image.fromarray(wide).resize((48, 48), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.images[4, ..., 0], expected)
    skipped = load_fer2013(root, skip_bad_rows=True)
    assert skipped.skipped_rows == 1 and len(skipped) == len(sample.labels) - 1


def test_unreadable_image(tmp_path: Path, sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    root = write_image_folder(tmp_path / "faces", sample)
    bad = root / "test" / "Happy" / "PublicTest_24.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"PublicTest_24\.png: unreadable image"):
        load_fer2013(root)
    with caplog.at_level(logging.WARNING, logger="model.data"):
        ds = load_fer2013(root, skip_bad_rows=True)
    assert ds.skipped_rows == 1 and len(ds) == len(sample.labels) - 1
    assert "skipped 1 bad" in caplog.text and "PublicTest_24.png" in caplog.text


def test_unknown_class_folder_and_empty_folder(tmp_path: Path, sample: Sample) -> None:
    root = write_image_folder(tmp_path / "faces", sample)
    (root / "train" / "contempt").mkdir()
    Image.fromarray(sample.images[0]).save(root / "train" / "contempt" / "x.png")
    with pytest.raises(DataError, match=r"train/contempt: unknown class folder 'contempt'"):
        load_fer2013(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no FER2013 data found"):
        load_fer2013(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file or directory"):
        load_fer2013(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------
# Bad CSV input


def _replace_pixel(line: str, index: int, value: str) -> str:
    label, pixels, usage = line.split(",")
    values = pixels.split(" ")
    values[index] = value
    return f"{label},{' '.join(values)},{usage}"


BAD_ROWS = {
    # name: (edit of data line 20 -> file line 21, message fragments)
    "too few pixels": (
        lambda line: line[: line.rfind(" ")] + line[line.rfind(",") :],
        ["expected 2304 values (48x48), found 2303"],
    ),
    "too many pixels": (
        lambda line: line.replace(",", ",7 ", 1),
        ["expected 2304 values (48x48), found 2305"],
    ),
    "non-numeric pixel": (
        lambda line: _replace_pixel(line, 9, "1x"),
        ["value #10 is not an integer 0..255", "'1x'"],
    ),
    "negative pixel": (
        lambda line: _replace_pixel(line, 0, "-3"),
        ["value #1 is not an integer 0..255", "'-3'"],
    ),
    "pixel above 255": (
        lambda line: _replace_pixel(line, 2303, "256"),
        ["value #2304 outside 0..255", "'256'"],
    ),
    "long pixel": (
        lambda line: _replace_pixel(line, 5, "12345"),
        ["value #6 outside 0..255", "'12345'"],
    ),
    "label 7": (lambda line: "7" + line[line.find(",") :], ["label", "0..6", "'7'"]),
    "label not integer": (lambda line: "2.0" + line[line.find(",") :], ["label", "'2.0'"]),
    "unknown usage": (
        lambda line: line[: line.rfind(",")] + ",Validation",
        ["Usage: expected one of Training, PublicTest, PrivateTest", "'Validation'"],
    ),
    "extra field": (lambda line: line + ",x", ["expected 3 comma-separated fields", "found 4"]),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_names_file_line_and_problem(
    tmp_path: Path, sample: Sample, kind: str, gz: bool, small_blocks: None
) -> None:
    edit, fragments = BAD_ROWS[kind]
    lines = challenge_lines(sample)
    lines[20] = edit(lines[20])
    path = write_text(tmp_path / ("bad.csv.gz" if gz else "bad.csv"), lines, gz=gz)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_fer2013(path, cache_dir=cache)
    message = str(info.value)
    assert message.startswith(f"{path}, line 21: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached for bad data


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("emotion,Usage", "'pixels' (or 'feature')"),
        ("pixels,Usage", "'emotion' (or 'label')"),
        ("emotion,pixels", "'Usage'"),
    ],
)
def test_missing_column(tmp_path: Path, sample: Sample, header: str, missing: str) -> None:
    path = write_text(tmp_path / "fer2013.csv", [header, "3,1 2 3"])
    with pytest.raises(DataError) as info:
        load_fer2013(path)
    message = str(info.value)
    assert f"{path}, line 1: missing column {missing}" in message
    assert f"found {header!r}" in message


def test_empty_and_header_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        load_fer2013(empty)
    empty_gz = tmp_path / "empty.csv.gz"
    empty_gz.write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(DataError, match=r"empty\.csv\.gz: empty file"):
        load_fer2013(empty_gz)
    header = write_text(tmp_path / "header.csv", ["emotion,pixels,Usage", ""])
    with pytest.raises(DataError, match=r"header\.csv: header only"):
        load_fer2013(header)


def test_corrupt_gzip(tmp_path: Path, sample: Sample) -> None:
    path = write_text(tmp_path / "cut.csv.gz", challenge_lines(sample), gz=True)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(DataError, match=r"cut\.csv\.gz: not a readable gzip file"):
        load_fer2013(path)


def test_icml_bad_usage_line_number(tmp_path: Path, sample: Sample) -> None:
    path = write_icml(tmp_path / "icml_face_data.csv", sample)
    lines = path.read_text().splitlines()
    lines[6] = lines[6].replace("Training", "Trainin")
    write_text(path, lines)
    with pytest.raises(DataError, match=r"icml_face_data\.csv, line 7: Usage: .* 'Trainin'"):
        load_fer2013(path)


def test_skip_bad_rows(
    tmp_path: Path, sample: Sample, caplog: pytest.LogCaptureFixture, small_blocks: None
) -> None:
    lines = challenge_lines(sample)
    bad = [2, 9, 30]  # data rows; file lines 3, 10, 31
    lines[2] = _replace_pixel(lines[2], 0, "abc")
    lines[9] = "9" + lines[9][1:]
    lines[30] = lines[30][: lines[30].rfind(" ")] + lines[30][lines[30].rfind(",") :]
    path = write_text(tmp_path / "bad.csv.gz", lines, gz=True)
    with caplog.at_level(logging.WARNING, logger="model.data"):
        ds = load_fer2013(path, skip_bad_rows=True)
    keep = np.setdiff1d(np.arange(len(sample.labels)), np.array(bad) - 1)
    assert ds.skipped_rows == 3 and len(ds) == len(keep)
    np.testing.assert_array_equal(ds.images[..., 0], sample.images[keep])
    np.testing.assert_array_equal(ds.labels, sample.labels[keep])
    assert "skipped 3 bad" in caplog.text
    for line in (3, 10, 31):
        assert f"line {line}" in caplog.text
    # A cached load of the same data still reports and warns.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.data"):
        again = load_fer2013(path, skip_bad_rows=True)
    assert again.skipped_rows == 3 and "skipped 3 bad" in caplog.text
    lines = ["emotion,pixels,Usage", "9,1 2,Training"]
    with pytest.raises(DataError, match="all 1 data rows are bad"):
        load_fer2013(write_text(tmp_path / "all_bad.csv", lines), skip_bad_rows=True)


# ------------------------------------------------------------------------------------------
# Cache


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz")) if folder.exists() else []


def test_cache_hit_skips_parsing_and_change_invalidates(
    tmp_path: Path, sample: Sample, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_text(tmp_path / "fer2013.csv.gz", challenge_lines(sample), gz=True)
    cache = tmp_path / "cache"
    first = load_fer2013(path, cache_dir=cache)
    assert len(_cache_files(cache)) == 1
    assert not list(cache.glob(".tmp-*"))

    real_parse = loader_mod._parse_plan
    calls = []

    def counting_parse(*args, **kwargs):
        calls.append(args)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(loader_mod, "_parse_plan", counting_parse)
    cached = load_fer2013(path, cache_dir=cache)
    assert calls == []
    assert_same(cached, sample)
    assert cached.sha256 == first.sha256 and cached.source == first.source

    changed = sample.images.copy()
    changed[5, 10, 10] ^= 1
    write_text(path, challenge_lines(Sample(changed, sample.labels, sample.usage)), gz=True)
    fresh = load_fer2013(path, cache_dir=cache)
    assert len(calls) == 1
    assert fresh.sha256 != first.sha256
    np.testing.assert_array_equal(fresh.images[..., 0], changed)
    # Options that change the parse get their own entry; the validation seed does not.
    load_fer2013(path, cache_dir=cache, skip_bad_rows=True)
    assert len(calls) == 2


def test_cache_dir_env_use_cache_false_and_corrupt_entries(
    tmp_path: Path,
    sample: Sample,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_text(tmp_path / "fer2013.csv", challenge_lines(sample))
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("FER2013_CACHE_DIR", str(env_cache))
    load_fer2013(path, use_cache=False)
    assert _cache_files(env_cache) == []
    load_fer2013(path)
    (entry,) = _cache_files(env_cache)
    entry.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="model.data"):
        ds = load_fer2013(path)
    assert_same(ds, sample)
    assert "ignoring unreadable cache file" in caplog.text
    np.load(entry)  # rewritten whole


def test_validation_split_applies_after_the_cache(
    tmp_path: Path, sample: Sample, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_course(tmp_path / "course", sample) / "train.csv"
    a = load_fer2013(path, seed=1, val_fraction=0.3)
    monkeypatch.setattr(loader_mod, "_parse_plan", lambda *a, **k: pytest.fail("re-parsed"))
    b = load_fer2013(path, seed=2, val_fraction=0.3)
    c = load_fer2013(path, seed=1, val_fraction=0.3)
    np.testing.assert_array_equal(a.usage, c.usage)
    assert (a.usage != b.usage).any()
    assert np.count_nonzero(b.usage == "PublicTest") == np.count_nonzero(a.usage == "PublicTest")


# ------------------------------------------------------------------------------------------
# FERDataset


def _dataset(n: int = 700, seed: int = 0) -> FERDataset:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 48, 48, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # row id, to check order
    images[:, 0, 1, 0] = np.arange(n) // 256
    labels = rng.integers(0, 7, size=n)
    usage = rng.choice(np.array(USAGES), size=n, p=[0.8, 0.15, 0.05])
    return FERDataset(images, labels, usage, source="mem", sha256="0" * 64)


def _row_ids(ds: FERDataset) -> np.ndarray:
    return ds.images[:, 0, 0, 0].astype(int) + 256 * ds.images[:, 0, 1, 0].astype(int)


def test_subset_is_stratified_deterministic_and_ordered() -> None:
    ds = _dataset()
    sub = ds.subset(0.1, seed=4)
    for usage in USAGES:
        for label in range(7):
            n = np.count_nonzero((ds.usage == usage) & (ds.labels == label))
            k = np.count_nonzero((sub.usage == usage) & (sub.labels == label))
            assert k == (max(1, int(np.floor(0.1 * n + 0.5))) if n else 0), (usage, label)
    ids = _row_ids(sub)
    assert (np.diff(ids) > 0).all()  # original order
    np.testing.assert_array_equal(ds.labels[ids], sub.labels)
    np.testing.assert_array_equal(_row_ids(ds.subset(0.1, seed=4)), ids)
    assert not np.array_equal(_row_ids(ds.subset(0.1, seed=5)), ids)
    assert sub.sha256 == ds.sha256 and sub.source == ds.source
    tiny = ds.subset(0.0001, seed=1)  # at least one row per non-empty stratum
    assert len(tiny) == len({(u, lab) for u, lab in zip(ds.usage, ds.labels, strict=True)})
    assert ds.subset(1.0, seed=1) is ds
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"expected a number in \(0, 1\]"):
            ds.subset(bad, seed=1)


def test_split_and_counts() -> None:
    ds = _dataset()
    images, labels = ds.split("PublicTest")
    mask = ds.usage == "PublicTest"
    np.testing.assert_array_equal(images, ds.images[mask])
    np.testing.assert_array_equal(labels, ds.labels[mask])
    assert ds.counts() == {u: int(np.count_nonzero(ds.usage == u)) for u in USAGES}
    assert sum(ds.counts().values()) == len(ds)
    with pytest.raises(ValueError, match="unknown usage 'Validation'.*Training="):
        ds.split("Validation")
    only_train = FERDataset(ds.images[:3], ds.labels[:3], ["Training"] * 3, "mem", "x")
    with pytest.raises(ValueError, match="no 'PrivateTest' rows in mem: available usages Train"):
        only_train.split("PrivateTest")


def test_dataset_validates_its_fields() -> None:
    images = np.zeros((2, 48, 48, 1), np.uint8)
    with pytest.raises(ValueError, match=r"expected shape \(N, 48, 48, 1\), found \(2, 48, 48\)"):
        FERDataset(images[..., 0], np.zeros(2), ["Training"] * 2, "m", "x")
    with pytest.raises(ValueError, match="uint8"):
        FERDataset(images.astype(np.float32), np.zeros(2, int), ["Training"] * 2, "m", "x")
    with pytest.raises(ValueError, match=r"values -1\.\.6, found 0\.\.7"):
        FERDataset(images, np.array([0, 7]), ["Training"] * 2, "m", "x")
    with pytest.raises(ValueError, match="Valid"):
        FERDataset(images, np.array([0, 1]), ["Training", "Valid"], "m", "x")
    ok = FERDataset(
        images, np.array([0, 1], np.int32), np.array(["Training", "PublicTest"]), "m", "x"
    )
    assert ok.labels.dtype == np.int64 and "rows=2" in repr(ok)


# ------------------------------------------------------------------------------------------
# S3


def test_s3_round_trip(
    tmp_path: Path, sample: Sample, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="fer")
    local = write_text(tmp_path / "fer2013.csv.gz", challenge_lines(sample), gz=True)
    client.upload_file(str(local), "fer", "data/fer2013.csv.gz")
    faces = write_image_folder(tmp_path / "faces", sample)
    for path in sorted(faces.rglob("*.png")):
        client.upload_file(str(path), "fer", f"faces/{path.relative_to(faces).as_posix()}")

    from_file = load_fer2013("s3://fer/data/fer2013.csv.gz")
    assert_same(from_file, sample)
    assert from_file.source == "s3://fer/data/fer2013.csv.gz"
    assert from_file.sha256 == load_fer2013(local).sha256  # same bytes, same hash

    from_folder = load_fer2013("s3://fer/faces/")
    assert_same(from_folder, sample)
    assert from_folder.sha256 == load_fer2013(faces).sha256
    assert_same(load_fer2013("s3://fer/faces"), sample)  # a folder without its slash

    # Warm: keyed by ETag + size, so nothing is downloaded again.
    with monkeypatch.context() as patch:
        patch.setattr(sources_mod._S3Origin, "read", lambda *a: pytest.fail("downloaded again"))
        assert load_fer2013("s3://fer/data/fer2013.csv.gz").sha256 == from_file.sha256
        assert_same(load_fer2013("s3://fer/faces/"), sample)
    # A changed object changes its ETag: re-read.
    client.put_object(Bucket="fer", Key="data/fer2013.csv.gz", Body=gzip.compress(b""))
    with pytest.raises(DataError, match=r"s3://fer/data/fer2013\.csv\.gz: empty file"):
        load_fer2013("s3://fer/data/fer2013.csv.gz")
    with pytest.raises(DataError, match="s3://fer/nothing/here.csv: no such S3 object"):
        load_fer2013("s3://fer/nothing/here.csv")
    with pytest.raises(DataError, match="s3://missing-bucket/x.csv"):
        load_fer2013("s3://missing-bucket/x.csv")


def test_s3_endpoint_falls_back_to_mlflow_variable(
    tmp_path: Path, sample: Sample, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="fer")
    local = write_text(tmp_path / "fer2013.csv", challenge_lines(sample))
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(local), "fer", "fer2013.csv")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert_same(load_fer2013("s3://fer/fer2013.csv", use_cache=False), sample)


# ------------------------------------------------------------------------------------------
# The real file


def test_real_fer2013(fer2013_path: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    ds = load_fer2013(fer2013_path, cache_dir=tmp_path)
    cold = time.perf_counter() - started
    assert len(ds) == 32_298
    assert ds.counts() == {"Training": 28_709, "PublicTest": 3_589, "PrivateTest": 0}
    assert ds.images.shape == (32_298, 48, 48, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.labels.min() == 0 and ds.labels.max() == 6
    assert ds.sha256 == hashlib.sha256(fer2013_path.read_bytes()).hexdigest()
    # Spot-check the first rows against a plain Python parse of the file.
    with gzip.open(fer2013_path, "rt") as f:
        lines = [f.readline() for _ in range(3)]
    for index, line in enumerate(lines[1:]):
        label, pixels, usage = line.strip().split(",")
        expected = np.array(pixels.split(), dtype=np.uint8).reshape(48, 48)
        np.testing.assert_array_equal(ds.images[index, ..., 0], expected)
        assert ds.labels[index] == int(label) and ds.usage[index] == usage
    started = time.perf_counter()
    warm = load_fer2013(fer2013_path, cache_dir=tmp_path)
    logging.getLogger(__name__).info(
        "cold %.2f s, warm %.2f s", cold, time.perf_counter() - started
    )
    np.testing.assert_array_equal(warm.images, ds.images)
