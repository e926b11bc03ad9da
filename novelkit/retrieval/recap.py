"""Retrieval-augmented continuation: the earlier passages most related to the current context, as a 前情提要 block.

    retriever = Retriever("output/embedding")                      # loads the model that built the index
    block = recap_for(retriever, context, tokenizer, book="xiyouji", before=context_start, k=4, token_budget=512)
    prompt = block + context

With a book, only that book's passages ending at or before character `before` are candidates (continuing chapter N
never sees chapter N+1). The block is measured with the generating model's tokenizer and never exceeds the budget.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError, DataError
from .embedding import Embedder
from .vector_store import Passage, VectorStore

RECAP_HEADER = "前情提要：\n"
RECAP_END = "\n\n"
QUERY_CHARS = 800  # the query is the end of the context: what is being continued
MIN_CUT_CHARS = 20  # a passage cut shorter than this to fit the budget is left out instead


class Retriever:
    """An index opened for searching with the model that built it (or `embedder`, checked against it)."""

    def __init__(self, index_dir, model_path: str = "", *, embedder: Embedder | None = None, dtype="auto",
                 device=None):
        self.store = VectorStore.open(index_dir)
        self.store.load_checked()
        if embedder is None:
            embedder = Embedder.for_index(self.store.embedding, str(index_dir), model_path, dtype=dtype, device=device)
        else:
            embedder.check_against(self.store.embedding, str(index_dir))
        self.embedder = embedder

    def search(self, query: str, k: int = 5, book: str | None = None, before: int | None = None) -> list[Passage]:
        """The k passages nearest to `query`, best first; with `book`, only that book's ending at or before
        character `before`."""
        if not query.strip():
            raise ConfigError("empty query")
        vector = self.embedder.embed_batch([query])[0]
        if book is None:
            if before is not None:
                raise ConfigError("a position (before) needs a book")
            return self.store.search(vector, k)
        return self.store.search_book(vector, k, book, before)


def recap_block(passages: list[Passage], tokenizer, token_budget: int) -> str:
    """A 前情提要 block of at most token_budget tokens: the best-scored passages that fit, in book order; the first
    one that does not fit is cut to fill what is left. "" when not even a short piece fits."""
    def render(items):
        lines = [f"（{p.chapter}）{text}" if p.chapter else text for p, text in sorted(items, key=lambda x: x[0].start)]
        return RECAP_HEADER + "\n".join(lines) + RECAP_END

    def fits(items):
        return len(tokenizer.encode(render(items), add_special_tokens=False)) <= token_budget

    chosen = []
    for passage in passages:
        if fits(chosen + [(passage, passage.text)]):
            chosen.append((passage, passage.text))
            continue
        low, high = 0, len(passage.text)  # the longest start of the passage that still fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(chosen + [(passage, passage.text[:mid] + "…")]) else (low, mid - 1)
        if low >= MIN_CUT_CHARS:
            chosen.append((passage, passage.text[:low] + "…"))
        break
    return render(chosen) if chosen else ""


def recap_for(retriever: Retriever, context: str, tokenizer, *, k: int = 4, token_budget: int = 512,
              book: str | None = None, before: int | None = None) -> str:
    """The 前情提要 block for continuing `context` ("" when the context is empty)."""
    if not context.strip():
        return ""
    return recap_block(retriever.search(context[-QUERY_CHARS:], k, book, before), tokenizer, token_budget)


def add_recaps(samples, records, retriever: Retriever, tokenizer, *, k: int = 4, token_budget: int = 512) -> list:
    """Each sample with a 前情提要 block before its prompt. A record's optional `book` and `position` fields (the
    character offset in that book where the prompt's text starts) keep later passages out of the block."""
    out = []
    for sample, record in zip(samples, records):
        book, position = record.data.get("book"), record.data.get("position")
        if book is not None and not isinstance(book, str):
            raise DataError(record.path, record.line, "field 'book' must be a string (a book name in the index)")
        if position is not None and (book is None or not isinstance(position, int) or position < 0):
            raise DataError(record.path, record.line, "field 'position' must be a character offset (a whole number "
                                                      ">= 0) in the record's 'book'")
        block = recap_for(retriever, sample.prompt, tokenizer, k=k, token_budget=token_budget, book=book,
                          before=position)
        out.append(dataclasses.replace(sample, prompt=block + sample.prompt))
    return out
