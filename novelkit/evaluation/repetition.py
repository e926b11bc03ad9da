"""Repetition metrics for generated text: distinct-n and the repeated-n-gram rate.

A text given as a str is scored on its non-whitespace characters; give a list of tokens (e.g. from
novelkit.evaluation.rouge.tokenize) to score words instead. N-grams never span two texts. A text with no n-grams
(empty, or shorter than n) scores 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence


def units(text: str | Sequence[str]) -> list[str]:
    """The units a text is scored on: its non-whitespace characters, or the tokens it already is."""
    if isinstance(text, str):
        return [char for char in text if not char.isspace()]
    return list(text)


def ngrams(text: str | Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of one text, in order, repeats included."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    items = units(text)
    return list(zip(*(items[i:] for i in range(n))))


def distinct_n(text: str | Sequence[str], n: int = 1) -> float:
    """Distinct-n of one text: unique n-grams / all n-grams."""
    return corpus_distinct_n([text], n)


def corpus_distinct_n(texts: Sequence[str | Sequence[str]], n: int = 1) -> float:
    """Distinct-n of several texts pooled: unique n-grams over all texts / all n-grams of all texts."""
    if isinstance(texts, str):
        # A lone str would be read as one text per character; distinct_n is the one-text call.
        raise TypeError("corpus_distinct_n takes a list of texts; use distinct_n for one text")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(text, n)
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def repeated_ngram_rate(text: str | Sequence[str], n: int = 4) -> float:
    """Share of the text's n-grams that already occurred earlier in the same text."""
    grams = ngrams(text, n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for gram in grams:
        if gram in seen:
            repeated += 1
        else:
            seen.add(gram)
    return repeated / len(grams)
