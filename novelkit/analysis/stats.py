"""Streaming statistics of a corpus in bounded memory: length distributions, exact duplicates, text problems.

Nothing here keeps the texts: a length distribution is a count per distinct length, a duplicate check keeps 16 bytes
per item, so a multi-GB corpus is described in a few MB.
"""

from __future__ import annotations

import hashlib
import math
import re
from array import array
from collections import Counter

import numpy as np

PERCENTILES = (50, 90, 95, 99)
DEFAULT_MAX_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)


class LengthStats:
    """The exact distribution of integer lengths, kept as a count per distinct length."""

    def __init__(self):
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.total = 0

    def add(self, length: int) -> None:
        self.counts[length] += 1
        self.n += 1
        self.total += length

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile: the smallest length that at least q% of the items do not exceed."""
        if not self.n:
            return 0
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= rank:
                break
        return length

    def share_over(self, limit: int) -> float:
        """The fraction of items longer than `limit` (truncated at that maximum length)."""
        return sum(c for length, c in self.counts.items() if length > limit) / self.n if self.n else 0.0

    def summary(self) -> dict:
        out = {"count": self.n, "total": self.total, "mean": round(self.total / self.n, 2) if self.n else 0,
               "min": min(self.counts, default=0)}
        out.update({f"p{q}": self.percentile(q) for q in PERCENTILES})
        out["max"] = max(self.counts, default=0)
        return out


def truncation_table(stats: LengthStats, max_lengths, max_share: float = 0.01) -> tuple[dict[int, float], int | None]:
    """The share truncated at each candidate maximum length, and the recommended one: the smallest candidate that
    truncates at most `max_share` of the items (None when every candidate truncates more)."""
    shares = {length: stats.share_over(length) for length in sorted(max_lengths)}
    fitting = [length for length, share in shares.items() if share <= max_share]
    return shares, (fitting[0] if fitting else None)


_WHITESPACE = re.compile(r"\s+")


class Fingerprint:
    """A running 64-bit BLAKE2b digest of a text fed in pieces: how the text is cut does not change it. With
    ignore_whitespace, texts that differ only in spacing and line breaks get the same digest."""

    def __init__(self, ignore_whitespace: bool = False):
        self._hash = hashlib.blake2b(digest_size=8)
        self._ignore_whitespace = ignore_whitespace
        self.empty = True  # nothing (or, ignoring whitespace, nothing but whitespace) fed yet

    def update(self, text: str) -> None:
        if self._ignore_whitespace:
            text = _WHITESPACE.sub("", text)
        if text:
            self.empty = False
            self._hash.update(text.encode("utf-8", "surrogatepass"))

    def value(self) -> int:
        return int.from_bytes(self._hash.digest(), "little")

    @classmethod
    def of(cls, text: str) -> int:
        fp = cls()
        fp.update(text)
        return fp.value()


class DuplicateFinder:
    """Exact duplicates among many items in 16 bytes per item: a 64-bit fingerprint and a caller's id, compared by
    sorting at the end. Two different texts share a fingerprint with probability ~n^2 / 2^65 (1e-6 for 6M items)."""

    def __init__(self):
        self._hashes = array("Q")
        self._ids = array("q")

    def add(self, digest: int, item_id: int) -> None:
        self._hashes.append(digest)
        self._ids.append(item_id)

    def __len__(self) -> int:
        return len(self._hashes)

    def duplicates(self, examples: int = 5) -> tuple[int, list[tuple[int, int]]]:
        """How many items repeat an earlier one, and up to `examples` (id of the first, id of the repeat) pairs in
        the order the repeats were added."""
        if not self._hashes:
            return 0, []
        hashes = np.frombuffer(self._hashes, dtype=np.uint64)
        ids = np.frombuffer(self._ids, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")  # stable: within a group, the earliest added comes first
        ordered = hashes[order]
        repeat = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
        if not len(repeat):
            return 0, []
        group_start = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        first = group_start[np.searchsorted(group_start, repeat, side="right") - 1]
        pairs = sorted(zip(order[repeat].tolist(), order[first].tolist()))[:examples]
        return len(repeat), [(int(ids[f]), int(ids[r])) for r, f in pairs]


# Signs of a text that went through a wrong encoding: U+FFFD (an undecodable byte replaced), "锟斤拷" (U+FFFD's
# UTF-8 bytes read as GBK, the classic Chinese mojibake), C0/C1 control characters other than tab and newline.
TEXT_PROBLEMS = {
    "replacement_chars": re.compile("\ufffd"),
    "mojibake_kunjinkao": re.compile("锟斤拷"),
    "control_chars": re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"),
}


def text_problems(text: str) -> Counter:
    """How often each of TEXT_PROBLEMS occurs in `text` (only the non-zero ones)."""
    found = Counter()
    for name, pattern in TEXT_PROBLEMS.items():
        if n := len(pattern.findall(text)):
            found[name] = n
    return found
