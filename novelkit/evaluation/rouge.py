"""ROUGE-1/2/L precision, recall and F for Chinese, on jieba words or characters.

Two named definitions:
- "rouge-chinese": what rouge_chinese 1.0.3 returns for Rouge().get_scores(" ".join(hyp), " ".join(ref)),
  the seeds' and LLaMA-Factory's call: unique (set) n-grams for ROUGE-N, ROUGE-L from the LCS of the
  whole word sequences after its cut_sent sentence splitting, F = 2PR / (P + R + 1e-8).
- "standard": ROUGE-1.5.5 style, as rouge_score 0.1.2 with a whitespace tokenizer: clipped n-gram counts,
  ROUGE-L (not Lsum) from the LCS of the token sequences, F = 2PR / (P + R).
Under both an empty hypothesis or reference scores 0, and the LCS is bit-parallel, so long texts are cheap.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter

DEFINITIONS = ("rouge-chinese", "standard")
LEVELS = ("word", "char")
METRICS = ("rouge-1", "rouge-2", "rouge-l")

# rouge_chinese's Rouge.cut_sent, pattern for pattern: a newline goes after each sentence end.
_CUT_SENT_PATTERNS = [
    re.compile(r"([。！？\?])([^”’])"),
    re.compile(r"(\.{6})([^”’])"),
    re.compile(r"(…{2})([^”’])"),
    re.compile(r"([。！？\?][”’])([^，。！？\?])"),
]


@functools.lru_cache(maxsize=None)
def _jieba():
    # Imported and initialised on first use: loading the dictionary takes about a second.
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str, level: str = "word") -> list[str]:
    """Split text into jieba words ("word") or characters ("char"); whitespace never makes a token."""
    if level == "word":
        return [token for token in _jieba().lcut(text) if token.strip()]
    if level == "char":
        return [char for char in text if not char.isspace()]
    raise ValueError(f"unknown tokenisation level {level!r}; expected one of {LEVELS}")


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison-Dix / Hyyro): the longer list is a Python int with one bit per position, and
    each token of the shorter list updates it with a few whole-int operations.
    """
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    match_masks: dict = {}
    bit = 1
    for token in a:
        match_masks[token] = match_masks.get(token, 0) | bit
        bit <<= 1
    full = v = bit - 1
    get_mask = match_masks.get
    for token in b:
        mask = get_mask(token)
        if mask:  # tokens absent from `a` leave v unchanged
            u = v & mask
            v = ((v + u) | (v - u)) & full
    # Each zero bit of v marks one position of `a` used by the LCS.
    return len(a) - v.bit_count()


def rouge_l_f(a: list, b: list) -> float:
    """ROUGE-L F of two token lists, 2 LCS / (|a| + |b|) (the standard definition's F); 0 when either is empty."""
    return 2 * lcs_length(a, b) / (len(a) + len(b)) if a and b else 0.0


def _rouge_chinese_words(tokens: list[str]) -> list[str]:
    """The word list rouge_chinese scores for " ".join(tokens).

    It cuts the text into sentences (which can split a token such as "?a" or add an empty word for a
    whitespace-only sentence), collapses whitespace in each sentence and joins the sentences' words.
    """
    text = " ".join(tokens)
    has_newline = "\n" in text
    for pattern in _CUT_SENT_PATTERNS:
        text = pattern.sub(r"\1\n\2", text)
    if not has_newline:
        # Every newline cut_sent adds follows a non-space character, so no sentence is whitespace-only
        # and the sentences' words are just the text's words.
        return text.split()
    words: list[str] = []
    for sentence in text.rstrip().split("\n"):
        if sentence:
            words += " ".join(sentence.split()).split(" ")
    return words


def _rouge_chinese_prf(overlap: int, hyp_count: int, ref_count: int) -> dict:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    f = 2.0 * ((precision * recall) / (precision + recall + 1e-8))
    return {"p": precision, "r": recall, "f": f}


def _rouge_chinese_scores(hyp: list[str], ref: list[str]) -> dict:
    # Unique n-grams: a repeated n-gram counts once on each side.
    hyp_bigrams, ref_bigrams = set(zip(hyp, hyp[1:])), set(zip(ref, ref[1:]))
    hyp_unigrams, ref_unigrams = set(hyp), set(ref)
    return {
        "rouge-1": _rouge_chinese_prf(len(hyp_unigrams & ref_unigrams), len(hyp_unigrams), len(ref_unigrams)),
        "rouge-2": _rouge_chinese_prf(len(hyp_bigrams & ref_bigrams), len(hyp_bigrams), len(ref_bigrams)),
        "rouge-l": _rouge_chinese_prf(lcs_length(hyp, ref), len(hyp), len(ref)),
    }


def _standard_prf(overlap: int, hyp_count: int, ref_count: int) -> dict:
    precision = overlap / max(hyp_count, 1)
    recall = overlap / max(ref_count, 1)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"p": precision, "r": recall, "f": f}


def _clipped_overlap(hyp_counts: Counter, ref_counts: Counter) -> int:
    return sum(min(count, hyp_counts[gram]) for gram, count in ref_counts.items() if gram in hyp_counts)


def _standard_scores(hyp: list[str], ref: list[str]) -> dict:
    hyp_unigrams, ref_unigrams = Counter(hyp), Counter(ref)
    hyp_bigrams, ref_bigrams = Counter(zip(hyp, hyp[1:])), Counter(zip(ref, ref[1:]))
    return {
        "rouge-1": _standard_prf(_clipped_overlap(hyp_unigrams, ref_unigrams), len(hyp), len(ref)),
        "rouge-2": _standard_prf(
            _clipped_overlap(hyp_bigrams, ref_bigrams), max(len(hyp) - 1, 0), max(len(ref) - 1, 0)
        ),
        "rouge-l": _standard_prf(lcs_length(hyp, ref), len(hyp), len(ref)),
    }


def _zero_scores() -> dict:
    return {metric: {"p": 0.0, "r": 0.0, "f": 0.0} for metric in METRICS}


def rouge_scores(hyp_tokens: list[str], ref_tokens: list[str], definition: str = "rouge-chinese") -> dict:
    """ROUGE-1/2/L of one hypothesis against one reference, both already tokenised.

    Returns {"rouge-1": {"p", "r", "f"}, "rouge-2": ..., "rouge-l": ...} with fractions in [0, 1].
    """
    if definition == "rouge-chinese":
        hyp, ref = _rouge_chinese_words(hyp_tokens), _rouge_chinese_words(ref_tokens)
        score = _rouge_chinese_scores
    elif definition == "standard":
        # rouge_score with a whitespace tokenizer sees the tokens re-split on whitespace.
        hyp, ref = " ".join(hyp_tokens).split(), " ".join(ref_tokens).split()
        score = _standard_scores
    else:
        raise ValueError(f"unknown ROUGE definition {definition!r}; expected one of {DEFINITIONS}")
    if not hyp or not ref:
        return _zero_scores()
    return score(hyp, ref)


def corpus_rouge(
    hyps: list[str], refs: list[str], level: str = "word", definition: str = "rouge-chinese"
) -> dict:
    """Mean over hypothesis/reference pairs of each ROUGE precision, recall and F."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no hypothesis/reference pairs to score")
    totals = _zero_scores()
    for hyp, ref in zip(hyps, refs):
        scores = rouge_scores(tokenize(hyp, level), tokenize(ref, level), definition)
        for metric in METRICS:
            for stat, value in scores[metric].items():
                totals[metric][stat] += value
    return {metric: {stat: value / len(hyps) for stat, value in stats.items()} for metric, stats in totals.items()}


def rouge_table(metrics: dict) -> str:
    """A markdown table of ROUGE scores: rows rouge-1/2/l, columns P/R/F as percentages."""
    lines = ["| metric | P | R | F |", "|---|---:|---:|---:|"]
    for metric in METRICS:
        stats = metrics[metric]
        lines.append(f"| {metric} | {stats['p'] * 100:.2f} | {stats['r'] * 100:.2f} | {stats['f'] * 100:.2f} |")
    return "\n".join(lines)
