"""Novels of any size, chapter by chapter, without reading a whole file: the streaming twin of read_books +
split_chapters.

A .txt file is decoded incrementally and cut into blocks of whole lines; chapter headings are found with
split_chapters in each block (a heading is one line, so no heading straddles two blocks). A chapter longer than
`max_chars` comes out in several parts cut at line ends, each under 3 * max_chars, so memory stays bounded whatever
the file size. Joined, the parts of each chapter are exactly the chapters split_chapters gives for the whole text
(only a line longer than max_chars is cut before its end, so max_chars must exceed the longest heading line, ~70).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError
from .chunking import split_chapters
from .readers import SNIFF_BYTES, _book_from_record, detect_encoding, iter_records

BLOCK_CHARS = 1 << 20


@dataclass
class ChapterPart:
    book: str  # file stem, or the record's name for {name, text} JSON lines
    path: str
    chapter: int  # index of the chapter in its book, as in split_chapters
    title: str  # heading line ("" for text before the first heading)
    text: str  # this part of the chapter body
    part: int  # 0 for the first (or only) part of a chapter
    bytes_read: int  # how far into the file reading has got, for progress bars


def book_files(path) -> list[Path]:
    """The .txt files read_books would read: the file itself, or every .txt under a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise DataError(path, None, "no .txt files in this folder")
        return files
    if not path.exists():
        raise DataError(path, None, "file not found")
    return [path]


def stream_chapters(path, max_chars: int = BLOCK_CHARS, errors: str = "strict") -> Iterator[ChapterPart]:
    """Chapter parts of every book under `path` (.txt file, folder of .txt, or {name, text} JSON lines).
    errors="replace" turns undecodable bytes into U+FFFD instead of raising, so they can be counted."""
    for file in book_files(path):
        if file.suffix.lower() == ".txt":
            yield from _chapters(file.stem, str(file), _line_blocks(file, max_chars, errors), max_chars)
        else:
            for record in iter_records(file):
                book = _book_from_record(record)
                yield from _chapters(book.name, str(file), [(book.text, 0)], max_chars)


def file_encoding(path, errors: str = "strict") -> str:
    """detect_encoding's answer; with errors="replace", a file that is valid in neither UTF-8 nor GB18030 is read in
    the one that leaves fewer undecodable bytes in its first SNIFF_BYTES, instead of raising."""
    try:
        return detect_encoding(path)
    except DataError:
        if errors == "strict" or not Path(path).is_file():
            raise
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        return min(("utf-8", "gb18030"), key=lambda enc: head.decode(enc, "replace").count("\ufffd"))


def _line_blocks(path: Path, max_chars: int, errors: str) -> Iterator[tuple[str, int]]:
    """(block of whole lines, bytes read so far), newlines normalised to LF. A block holds less than 2 * max_chars
    characters; a line longer than max_chars is the one thing cut (the rest of it starts the next block)."""
    encoding = file_encoding(path, errors)
    with open(path, "rb") as raw, io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline=None) as f:
        rest = ""
        try:
            while chunk := f.read(max_chars):
                text = rest + chunk
                cut = text.rfind("\n") + 1 or len(text)
                rest = text[cut:]
                yield text[:cut], raw.tell()
        except UnicodeDecodeError as e:
            raise DataError(path, None, f"cannot decode as {encoding}: {e.reason}; save the file as UTF-8") from None
        if rest:
            yield rest, raw.tell()


def _chapters(book: str, path: str, blocks, max_chars: int) -> Iterator[ChapterPart]:
    title, part, pending, position = None, 0, [], 0  # title None: the text before the first heading
    index = -1  # of the chapter in progress, given when its first part comes out

    def flush(final: bool):
        nonlocal index, part, pending
        text = "".join(pending)
        if title is None and part == 0 and not text.strip():
            return  # text before the first heading is a chapter only when it is not blank (as in split_chapters)
        if final or len(text) >= max_chars:
            if part == 0:
                index += 1
            yield ChapterPart(book, path, index, title or "", text, part, position)
            part, pending = part + 1, []

    for block, position in blocks:
        headed = [c for c in split_chapters(block) if c.title]
        # the block's text up to the first heading line continues the chapter in progress
        cut = block.rfind("\n", 0, headed[0].start) + 1 if headed else len(block)
        pending.append(block[:cut])
        yield from flush(final=False)
        for c in headed:
            yield from flush(final=True)
            title, part, pending = c.title, 0, [c.text]
            yield from flush(final=False)
    yield from flush(final=True)
