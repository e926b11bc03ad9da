"""Time novelkit.evaluation.rouge against rouge_chinese (and rouge_score) on 1,000 pairs of ~800-character texts.

References are LCSTS and CSL texts from <shared>/data concatenated to --chars characters; each hypothesis
keeps most reference sentences in order and swaps the rest for sentences of another text, like a model
paraphrasing. Tokenisation is timed apart from scoring. The reference libraries are far slower, so they
run on the first --library-pairs pairs and their time is extrapolated to all pairs.

Run from the repo root: python bench/rouge_speed.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from novelkit.evaluation.rouge import METRICS, rouge_scores, tokenize  # noqa: E402

TOLERANCE = 1e-9
SCORING_GOAL_S = 3.0
RATIO_GOAL = 50.0


def read_column(path: Path, column: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t")[column] for line in f if line.strip()]


def load_texts(shared: Path) -> list[str]:
    data = shared / "data"
    lcsts = read_column(data / "lcsts" / "val.tsv", 1)
    csl = read_column(data / "csl" / "clge_val.tsv", 1)
    # Alternate the two sources so each reference mixes news and scientific prose.
    return [text for pair in zip(lcsts, csl) for text in pair]


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[。！？；])", text) if s]


def build_pairs(texts: list[str], count: int, chars: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        reference, j = "", i
        while len(reference) < chars:
            reference += texts[j % len(texts)]
            j += 1
        reference = reference[:chars]
        other = texts[(i + len(texts) // 2) % len(texts)]
        other_sentences = split_sentences(other)
        pieces = [s if rng.random() < 0.6 else rng.choice(other_sentences) for s in split_sentences(reference)]
        hypothesis = ("".join(pieces) + other)[:chars]
        pairs.append((hypothesis, reference))
    return pairs


def time_tokenisation(pairs: list[tuple[str, str]]) -> dict:
    texts = [text for pair in pairs for text in pair]
    start = time.perf_counter()
    tokenize("预热", "word")  # loads the jieba dictionary
    print(f"jieba dictionary load: {time.perf_counter() - start:.2f} s")
    tokenised = {}
    for level in ("word", "char"):
        start = time.perf_counter()
        tokens = [tokenize(text, level) for text in texts]
        seconds = time.perf_counter() - start
        tokenised[level] = list(zip(tokens[0::2], tokens[1::2]))
        mean_len = sum(map(len, tokens)) / len(tokens)
        print(
            f"tokenise {len(texts)} texts ({sum(map(len, texts)):,} chars), {level}: {seconds:.2f} s "
            f"(mean {mean_len:.0f} tokens/text)"
        )
    return tokenised


def time_ours(token_pairs, definition: str) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    scores = [rouge_scores(hyp, ref, definition) for hyp, ref in token_pairs]
    return time.perf_counter() - start, scores


def time_rouge_chinese(token_pairs) -> tuple[float, list[dict]]:
    from rouge_chinese import Rouge

    rouge = Rouge()
    start = time.perf_counter()
    scores = [rouge.get_scores(" ".join(hyp), " ".join(ref))[0] for hyp, ref in token_pairs]
    return time.perf_counter() - start, scores


class WhitespaceTokenizer:
    """rouge_score's default tokenizer drops every non-latin character; this keeps Chinese tokens."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def time_rouge_score(token_pairs) -> tuple[float, list[dict]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=WhitespaceTokenizer())
    start = time.perf_counter()
    raw = [scorer.score(" ".join(ref), " ".join(hyp)) for hyp, ref in token_pairs]
    seconds = time.perf_counter() - start
    names = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
    scores = [
        {m: {"p": s[names[m]].precision, "r": s[names[m]].recall, "f": s[names[m]].fmeasure} for m in METRICS}
        for s in raw
    ]
    return seconds, scores


def max_difference(ours: list[dict], theirs: list[dict]) -> float:
    return max(abs(a[m][s] - b[m][s]) for a, b in zip(ours, theirs) for m in METRICS for s in "prf")


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU core {core}"
    return "not pinned (no sched_setaffinity here)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder holding data/")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--chars", type=int, default=800)
    parser.add_argument("--library-pairs", type=int, default=20, help="pairs scored by the slow libraries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, {pin_to_one_core()}")
    pairs = build_pairs(load_texts(args.shared), args.pairs, args.chars, args.seed)
    print(f"{len(pairs)} pairs of {args.chars}-character texts from {args.shared / 'data'}")
    tokenised = time_tokenisation(pairs)

    all_agree, all_fast = True, True
    libraries = {"rouge-chinese": ("rouge_chinese", time_rouge_chinese), "standard": ("rouge_score", time_rouge_score)}
    for level in ("word", "char"):
        for definition, (library, time_library) in libraries.items():
            token_pairs = tokenised[level]
            ours_s, ours = time_ours(token_pairs, definition)
            subset = token_pairs[: args.library_pairs]
            library_s, theirs = time_library(subset)
            extrapolated_s = library_s * len(token_pairs) / len(subset)
            difference = max_difference(ours[: len(subset)], theirs)
            agree = difference <= TOLERANCE
            all_agree &= agree
            all_fast &= ours_s <= SCORING_GOAL_S
            print(
                f"\n[{level}, {definition}] ours: {ours_s:.2f} s for {len(token_pairs)} pairs "
                f"({ours_s / len(token_pairs) * 1e3:.2f} ms/pair; goal <= {SCORING_GOAL_S:.0f} s: "
                f"{'met' if ours_s <= SCORING_GOAL_S else 'NOT met'})"
            )
            print(
                f"  {library}: {library_s:.2f} s for the first {len(subset)} pairs, "
                f"extrapolated {extrapolated_s:.1f} s for {len(token_pairs)}; "
                f"speed-up {extrapolated_s / ours_s:.0f}x (goal >= {RATIO_GOAL:.0f}x)"
            )
            print(f"  values agree on those {len(subset)} pairs: {agree} (max |difference| {difference:.1e})")

    print(f"\nall values agree: {all_agree}; all scoring within {SCORING_GOAL_S:.0f} s: {all_fast}")
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
