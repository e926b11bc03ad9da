"""Read JSON lines, JSON arrays, TSV and plain-text novels in UTF-8 (with or without BOM), GB18030/GBK, or UTF-16 /
UTF-32 with a BOM (Windows Notepad's "Unicode" is UTF-16 LE with a BOM).

Text is decoded with the detected encoding and newlines (CRLF, lone CR) become LF, so line numbers in
errors are the ones an editor shows. JSON lines and TSV are streamed line by line.
"""

from __future__ import annotations

import codecs
import io
import json
import re
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from novelkit.errors import DataError

# Detection decodes this much of the file; a whole file up to this size is checked completely.
SNIFF_BYTES = 4 << 20
_BLOCK_BYTES = 1 << 20
# Tried in this order: valid UTF-8 is almost never also meant as GB18030, the reverse is common.
_ENCODINGS = ("utf-8", "gb18030")
_ENCODING_NAMES = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8", "gb18030": "GB18030", "utf-16": "UTF-16",
                   "utf-32": "UTF-32"}
# A byte-order mark names the encoding. UTF-32 LE's mark starts with UTF-16 LE's, so it is looked for first. Python's
# utf-16 / utf-32 codecs read the mark, take the byte order from it and drop it.
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))

CSL_TS_COLUMNS = ["task", "abstract", "title"]
PAIR_COLUMNS = ["title", "text"]
CSL_TS_TAG = "to title"


@dataclass
class Record:
    """One raw record with where it came from."""

    data: dict
    path: str
    line: int  # 1-based line where the record starts


@dataclass
class Book:
    name: str  # file stem
    text: str
    path: str


# ---------------------------------------------------------------- encoding


def detect_encoding(path) -> str:
    """The encoding a byte-order mark names ("utf-8-sig", "utf-16", "utf-32"), else "utf-8" if the start decodes
    strictly, else "gb18030"."""
    if not Path(path).exists():
        raise DataError(path, None, "file not found")
    if Path(path).is_dir():
        raise DataError(path, None, "is a folder; expected a file")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    whole_file = len(head) < SNIFF_BYTES
    failures = {}
    for encoding in _ENCODINGS:
        bad = _first_bad_byte(head, encoding, final=whole_file)
        if bad is None:
            return encoding
        failures[encoding] = bad
    # The encoding that got further is the one the file was most likely meant to be in.
    encoding, offset = max(failures.items(), key=lambda item: item[1])
    raise _undecodable(path, encoding, offset, head[offset], tried_both=True)


def _first_bad_byte(data: bytes, encoding: str, final: bool) -> int | None:
    """Offset of the first byte `encoding` cannot decode, None if all decode."""
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final)
    except UnicodeDecodeError as e:
        return e.start
    return None


def _first_bad_byte_in_file(path, encoding: str) -> tuple[int, int]:
    """(offset, byte value) of the first undecodable byte, streaming the file block by block."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                # e.object may start with bytes buffered from the previous block.
                bad = offset + len(block) - len(e.object) + e.start
                return bad, e.object[e.start]
            if not block:
                raise ValueError(f"{path} decodes as {encoding}")
            offset += len(block)


def _line_at(path, offset: int, encoding: str = "utf-8") -> int:
    """1-based line of byte `offset`, counting LF, CRLF and lone CR as one line break each."""
    if encoding in ("utf-16", "utf-32"):  # newline bytes are not single bytes: count in the decoded text before it
        with open(path, "rb") as f:
            text = f.read(offset).decode(encoding, errors="replace")
        return 1 + text.count("\n") + text.count("\r") - text.count("\r\n")
    line, remaining, previous_cr = 1, offset, False
    with open(path, "rb") as f:
        while remaining > 0:
            block = f.read(min(_BLOCK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            line += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
            if previous_cr and block.startswith(b"\n"):
                line -= 1  # a CRLF split between two blocks
            previous_cr = block.endswith(b"\r")
    return line


def _undecodable(path, encoding: str, offset: int, byte: int, tried_both: bool) -> DataError:
    name = _ENCODING_NAMES[encoding]
    if tried_both:
        how = f"is not valid {name} (tried UTF-8 and GB18030)"
    else:
        how = f"is not valid {name} (the encoding was detected from the start of the file)"
    return DataError(
        path,
        _line_at(path, offset, encoding),
        f"cannot decode: byte 0x{byte:02x} at offset {offset} {how}; save the file as UTF-8",
    )


def _open_text(path, encoding: str) -> io.TextIOWrapper:
    # newline=None turns CRLF and lone CR into LF, also across read boundaries.
    return io.TextIOWrapper(open(path, "rb"), encoding=encoding, errors="strict", newline=None)


def read_text(path) -> str:
    """The whole file decoded, newlines normalised to LF."""
    encoding = detect_encoding(path)
    with _open_text(path, encoding) as f:
        try:
            return f.read()
        except UnicodeDecodeError:
            raise _undecodable(path, encoding, *_first_bad_byte_in_file(path, encoding), tried_both=False) from None


def _iter_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline), decoded incrementally."""
    encoding = detect_encoding(path)
    with _open_text(path, encoding) as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\n")
        except UnicodeDecodeError:
            raise _undecodable(path, encoding, *_first_bad_byte_in_file(path, encoding), tried_both=False) from None


# ---------------------------------------------------------------- records


def iter_records(path, *, skip_bad: bool = False, tsv_columns: list[str] | None = None) -> RecordStream:
    """Records of a .jsonl, .json (array or JSON lines) or .tsv file, streamed.

    Bad records raise DataError; with skip_bad they are left out, counted in the returned stream's
    `skipped`, and a warning with the count goes to stderr once the stream is used up.
    """
    return RecordStream(path, skip_bad=skip_bad, tsv_columns=tsv_columns)


class RecordStream:
    """An iterator of Records that counts the bad records it skipped (only with skip_bad)."""

    def __init__(self, path, *, skip_bad: bool = False, tsv_columns: list[str] | None = None, warn: bool = True):
        self.path = str(path)
        self.skip_bad = skip_bad
        self.skipped = 0
        self.first_error: DataError | None = None
        self._warn = warn
        self._records = self._counted(self._reader(tsv_columns))

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> Record:
        return next(self._records)

    def reject(self, error: DataError) -> None:
        """Raise a bad record's error, or count it when skipping bad records."""
        if not self.skip_bad:
            raise error
        self.skipped += 1
        if self.first_error is None:
            self.first_error = error

    def _counted(self, records: Iterator[Record]) -> Iterator[Record]:
        count = 0
        for record in records:
            count += 1
            yield record
        if self._warn:
            report_skipped(self.path, self.skipped, self.first_error)
        if count == 0:
            skipped = f" ({self.skipped} bad records skipped)" if self.skipped else ""
            raise DataError(self.path, 1, f"empty file: no records{skipped}")

    def _reader(self, tsv_columns) -> Iterator[Record]:
        suffix = Path(self.path).suffix.lower()
        if suffix == ".jsonl":
            return _read_json_lines(self.path, self.reject)
        if suffix == ".json":
            if _first_char(self.path) == "[":
                return _read_json_array(self.path, self.reject)
            hint = " (a .json file not starting with '[' is read as JSON lines)"
            return _read_json_lines(self.path, self.reject, hint)
        if suffix == ".tsv":
            return _read_tsv(self.path, self.reject, tsv_columns)
        raise DataError(self.path, None, f"unknown file type '{suffix}': expected .jsonl, .json or .tsv")


def report_skipped(path, skipped: int, first_error: DataError | None) -> None:
    """The stderr warning for records left out by skip_bad."""
    if skipped:
        print(f"warning: {path}: skipped {skipped} bad record(s); first: {first_error}", file=sys.stderr)


def _first_char(path) -> str:
    """The first non-whitespace character of a text file ("" when there is none)."""
    with closing(_iter_lines(path)) as lines:
        for _, line in lines:
            if stripped := line.lstrip(" \t\r"):
                return stripped[0]
    return ""


def _parse_object(path, number: int, text: str, reject: Callable, hint: str = "") -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        reject(DataError(path, number, f"bad JSON: {e.msg} (column {e.colno}){hint}"))
        return None
    if not isinstance(value, dict):
        reject(DataError(path, number, f"expected a JSON object, got {_json_type(value)}"))
        return None
    return value


def _read_json_lines(path, reject: Callable, hint: str = "") -> Iterator[Record]:
    for number, line in _iter_lines(path):
        if not line.strip():
            continue  # blank lines separate nothing and hold no data
        data = _parse_object(path, number, line, reject, hint)
        if data is not None:
            yield Record(data, path, number)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json_array(path, reject: Callable) -> Iterator[Record]:
    """Elements of a top-level JSON array, each with the line where it starts."""
    text = read_text(path)
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _JSON_SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise DataError(path, lines.line_of(pos), "bad JSON: expected '[' to start the array")
    pos = _JSON_SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                # A broken array cannot be resynchronised, so this is fatal even with skip_bad.
                raise DataError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
            line = lines.line_of(pos)
            if isinstance(value, dict):
                yield Record(value, path, line)
            else:
                reject(DataError(path, line, f"expected a JSON object, got {_json_type(value)}"))
            pos = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            elif pos == len(text):
                raise DataError(path, lines.line_of(pos), "bad JSON: the array is not closed with ']'")
            else:
                raise DataError(path, lines.line_of(pos), f"bad JSON: expected ',' or ']', got {text[pos]!r}")
    pos = _JSON_SPACE.match(text, pos).end()
    if pos < len(text):
        raise DataError(path, lines.line_of(pos), "bad JSON: extra data after the array")


class _LineCounter:
    """Line numbers of increasing offsets in a text, in one pass overall."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def line_of(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_tsv(path, reject: Callable, columns: list[str] | None) -> Iterator[Record]:
    for number, line in _iter_lines(path):
        if not line.strip():
            continue
        values = line.split("\t")
        if columns is None:
            columns = _guess_tsv_columns(path, number, values)
        if len(values) != len(columns):
            reject(DataError(path, number, f"expected {len(columns)} columns, got {len(values)}"))
            continue
        yield Record(dict(zip(columns, values)), path, number)


def _guess_tsv_columns(path, number: int, values: list[str]) -> list[str]:
    """Column names from the first data line: CSL ts (3 columns tagged `to title`) or a 2-column pair."""
    if len(values) == 3 and values[0] == CSL_TS_TAG:
        return list(CSL_TS_COLUMNS)
    if len(values) == 2:
        return list(PAIR_COLUMNS)
    raise DataError(
        path, number, f"cannot tell the columns of a {len(values)}-column TSV: name them (tsv_columns / --tsv-columns)"
    )


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# ---------------------------------------------------------------- books


def read_books(path) -> list[Book]:
    """Books from a .txt file, a folder of .txt files (recursive, sorted) or JSON lines of {name, text} / {text}."""
    return list(iter_books(path))


def iter_books(path) -> Iterator[Book]:
    """read_books one book at a time, so a corpus of hundreds of novels never sits in memory whole."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise DataError(path, None, "no .txt files in this folder")
        yield from (_read_book_file(p) for p in files)
    elif path.suffix.lower() == ".txt":
        yield _read_book_file(path)
    else:
        yield from (_book_from_record(record) for record in iter_records(path))


def _read_book_file(path: Path) -> Book:
    text = read_text(path)
    if not text.strip():
        raise DataError(path, 1, "empty file")
    return Book(name=path.stem, text=text, path=str(path))


def _book_from_record(record: Record) -> Book:
    text = record.data.get("text")
    if "text" not in record.data:
        raise DataError(record.path, record.line, "missing field 'text'")
    if not isinstance(text, str):
        raise DataError(record.path, record.line, f"field 'text' must be a string, got {_json_type(text)}")
    if not text.strip():
        raise DataError(record.path, record.line, "field 'text' is empty")
    name = record.data.get("name", f"{Path(record.path).stem}-{record.line}")
    if not isinstance(name, str) or not name:
        raise DataError(record.path, record.line, "field 'name' must be a non-empty string")
    return Book(name=name, text=text, path=record.path)
