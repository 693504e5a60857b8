"""The vectorised CSV parser: challenge, icml and course CSVs, plain or gzip, to parse results."""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .dataset import (
    _MAX_REPORTED,
    _NO_SPLIT,
    _PRIVATE,
    CLASS_NAMES,
    IMAGE_SIDE,
    N_PIXELS,
    USAGES,
    DataError,
    _Parsed,
)

# CSV parsing: stream line-aligned blocks (gzip inflated in a helper thread), then parse each
# block with a handful of numpy passes; Python only touches rows to slice out their fields.

_BLOCK_BYTES = 2 << 20  # CSV text handed from the inflating thread to the parser at a time
_PIXEL_BATCH_ROWS = 64  # rows per vectorised pixel parse: ~600 KB of text, stays in CPU cache
_INFLATE_IN_BYTES = 256 << 10  # compressed bytes fed to zlib per call
_GZIP_MAGIC = b"\x1f\x8b"
_STRIP_BYTES = b' \t\r"'  # stripped around every CSV field (icml pads, CRLF, quotes)


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


def _line_spans(
    a: np.ndarray, block: bytes, first_line: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Start, end and line number of each non-blank line of `block`, and its line count."""
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
    return starts, ends, line_no, n_lines


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
    starts, ends, line_no, n_lines = _line_spans(a, block, first_line)
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
