"""Split novels into chapters, and chapters into chunks of at most max_chars characters cut at sentence ends.

Chunks are stripped slices of the text: nothing but whitespace between them is dropped, nothing is repeated.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

_NUMBER = "[0-9０-９零〇一二三四五六七八九十百千万两]+"
_UNIT = "[章回卷节集部篇]"
_SPACE = "[ \t\u3000]"
_SEPARATOR = r"[ \t\u3000:：、.．·\-—]"
# A heading line: 第X章 followed by a separator and a title, or by a short title with no sentence
# punctuation (so body lines such as "第四回中既将……，此回……" are not headings); or a named section.
_HEADING = re.compile(
    rf"^{_SPACE}*("
    rf"第{_NUMBER}{_UNIT}(?:{_SEPARATOR}[^\n]{{0,60}}|[^\n，。,.；;！!？?…—\"“”]{{0,30}})"
    rf"|(?:楔子|序章|引子|尾声)(?:{_SEPARATOR}[^\n]{{0,60}})?"
    rf")[ \t\u3000\r]*$",
    re.MULTILINE,
)

_CLOSERS = "”’」』）)》】\"'"
_SENTENCE_END = re.compile(rf"(?:[。！？!?…．]+|\.+(?=\s))[{_CLOSERS}]*")
_CLAUSE_END = re.compile(rf"[，；：、,;:]+[{_CLOSERS}]*")
# A newline that ends a paragraph: after a sentence end / closing quote, or before a blank line.
_PARAGRAPH_END = re.compile(rf"(?:(?<=[。！？!?…．{_CLOSERS}])|(?<=\n)){_SPACE}*\n")
_NEWLINE = re.compile("\n")
_WHITESPACE = re.compile(r"\s")
_NON_WHITESPACE = re.compile(r"\S")
# A chunk this full may end at a paragraph end rather than take in part of the next paragraph.
_PARAGRAPH_FILL = 0.5


@dataclass
class Chapter:
    title: str  # the heading line ("" for text before the first heading)
    text: str  # body after the heading
    start: int  # character offset of the chapter (heading) in the book text


@dataclass
class Chunk:
    text: str
    chapter_title: str
    chapter_index: int  # index into split_chapters(book)
    start: int  # character offset of the chunk in the book text


def split_chapters(text: str) -> list[Chapter]:
    """Chapters at heading lines (第一章, 第12章, 第一百二十回, 第三卷, 楔子, ...). Text before the first heading
    is a chapter titled "" when it is not blank, so a book with no headings is one chapter titled ""."""
    return [Chapter(title, text[body:end], start) for title, start, body, end in _chapter_spans(text)]


def _chapter_spans(text: str) -> list[tuple[str, int, int, int]]:
    """(title, heading offset, body start, body end) of each chapter."""
    headings = list(_HEADING.finditer(text))
    first = headings[0].start() if headings else len(text)
    spans = [("", 0, 0, first)] if text[:first].strip() else []
    for i, heading in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        body_start = min(heading.end() + 1, end)  # the body starts after the heading's newline
        spans.append((heading.group(1).strip(), heading.start(1), body_start, end))
    return spans


def chunk_text(text: str, max_chars: int = 800) -> list[str]:
    """The text cut into stripped chunks of at most max_chars characters."""
    return [text[start:end] for start, end in _chunk_spans(text, max_chars)]


def chunk_book(text: str, max_chars: int = 800) -> list[Chunk]:
    """Each chapter's body chunked on its own (headings are not in chunks), with offsets in the book."""
    chunks = []
    for index, (title, _, body_start, body_end) in enumerate(_chapter_spans(text)):
        body = text[body_start:body_end]
        for start, end in _chunk_spans(body, max_chars):
            chunks.append(Chunk(body[start:end], title, index, body_start + start))
    return chunks


class _Boundaries:
    """Sorted cut positions of one text, from the most to the least preferred kind."""

    def __init__(self, text: str):
        self.paragraph = [m.end() - 1 for m in _PARAGRAPH_END.finditer(text)]  # cut before the newline
        self.sentence = [m.end() for m in _SENTENCE_END.finditer(text)]
        clause = [m.end() for m in _CLAUSE_END.finditer(text)]
        self.clause = sorted(set(clause + [m.start() for m in _NEWLINE.finditer(text)]))
        self.whitespace = [m.start() for m in _WHITESPACE.finditer(text)]


def _last_between(positions: list[int], low: int, high: int) -> int | None:
    """The largest position p with low <= p <= high, or None."""
    i = bisect_right(positions, high) - 1
    return positions[i] if i >= 0 and positions[i] >= low else None


def _chunk_spans(text: str, max_chars: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: greedy packing, cutting at the best boundary that keeps within max_chars."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    boundaries = _Boundaries(text)
    text_end = len(text.rstrip())
    spans = []
    pos = 0
    while (found := _NON_WHITESPACE.search(text, pos, text_end)) is not None:
        start = found.start()
        if text_end - start <= max_chars:
            spans.append((start, text_end))
            break
        pos = _cut(boundaries, start, max_chars)
        spans.append((start, start + len(text[start:pos].rstrip())))
    return spans


def _cut(boundaries: _Boundaries, start: int, max_chars: int) -> int:
    """Where the chunk starting at `start` ends: a paragraph end if the chunk is full enough, else the last
    sentence end, clause end (，；：、 or newline), whitespace, or a hard cut at max_chars."""
    limit = start + max_chars
    paragraph = _last_between(boundaries.paragraph, start + max(1, int(max_chars * _PARAGRAPH_FILL)), limit)
    if paragraph is not None:
        return paragraph
    for positions in (boundaries.sentence, boundaries.clause, boundaries.whitespace):
        cut = _last_between(positions, start + 1, limit)
        if cut is not None:
            return cut
    return limit
