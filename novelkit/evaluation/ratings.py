"""Human A/B ratings of two models' continuations, kept in SQLite; a per-model summary and a CSV export.

    store = RatingStore("output/ratings.sqlite")
    store.add(Rating(rater="li", prompt=p, output_a=x, output_b=y, model_a="base", model_b="lora",
                     scores_a=(4, 3, 5), scores_b=(3, 3, 4), winner="A"))
    rows = store.summary()          # one row per model: mean 逻辑性/背景知识/文风, wins/losses/ties, win rate
    store.export_csv("ratings.csv")
    pairs, counts = preference_pairs(store.rows(), by="overall")   # {prompt, chosen, rejected} for preference tuning

A and B are the sides the rater saw; model_a/model_b record which model was shown on each side (the demo shuffles
them), so the summary is per model, whatever side it was shown on. Every rating is committed when it is added.
"""

from __future__ import annotations

import csv
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

AXES = ("逻辑性", "背景知识", "文风")  # story logic, consistency with earlier chapters, the book's style
AXIS_COLUMNS = dict(zip(AXES, ("logic", "knowledge", "style")))
WINNERS = ("A", "B", "tie")
COLUMNS = ("id", "rater", "time", "prompt", "output_a", "output_b", "model_a", "model_b",
           "logic_a", "knowledge_a", "style_a", "logic_b", "knowledge_b", "style_b", "winner")
SUMMARY_HEADERS = ["模型", "评分数", *(f"{a}均分" for a in AXES), "胜", "负", "平", "胜率", "胜率95%区间"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT NOT NULL, time TEXT NOT NULL, prompt TEXT NOT NULL,
    output_a TEXT NOT NULL, output_b TEXT NOT NULL, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
    logic_a INTEGER NOT NULL, knowledge_a INTEGER NOT NULL, style_a INTEGER NOT NULL,
    logic_b INTEGER NOT NULL, knowledge_b INTEGER NOT NULL, style_b INTEGER NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('A', 'B', 'tie')))"""


@dataclass
class Rating:
    rater: str
    prompt: str
    output_a: str
    output_b: str
    model_a: str  # the model shown as A
    model_b: str
    scores_a: tuple[int, int, int]  # 逻辑性, 背景知识, 文风, each 1..5
    scores_b: tuple[int, int, int]
    winner: str  # "A", "B" or "tie"
    time: str = ""  # ISO 8601 UTC; empty = now


def _check(r: Rating) -> None:
    if not r.rater.strip():
        raise ConfigError("a rating needs the rater's name")
    if r.winner not in WINNERS:
        raise ConfigError(f"winner must be one of {', '.join(WINNERS)}, not {r.winner!r}")
    for side, scores in (("A", r.scores_a), ("B", r.scores_b)):
        if len(scores) != len(AXES) or any(int(s) != s or not 1 <= s <= 5 for s in scores):
            raise ConfigError(f"scores for {side} must be three whole numbers from 1 to 5 ({'/'.join(AXES)}), "
                              f"not {list(scores)}")


class RatingStore:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # one short connection per call: Gradio handlers run on several threads
        return sqlite3.connect(self.path, timeout=30)

    def add(self, r: Rating) -> int:
        """Stores one rating (committed before returning); returns its id."""
        _check(r)
        when = r.time or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        values = (r.rater.strip(), when, r.prompt, r.output_a, r.output_b, r.model_a, r.model_b,
                  *map(int, r.scores_a), *map(int, r.scores_b), r.winner)
        with self._connect() as db:
            cur = db.execute(f"INSERT INTO ratings ({', '.join(COLUMNS[1:])}) VALUES "
                             f"({', '.join('?' * len(values))})", values)
            return cur.lastrowid

    def rows(self) -> list[dict]:
        with self._connect() as db:
            return [dict(zip(COLUMNS, row)) for row in db.execute(f"SELECT {', '.join(COLUMNS)} FROM ratings "
                                                                  "ORDER BY id")]

    def summary(self) -> list[list]:
        """One row per model (SUMMARY_HEADERS): ratings, mean score per axis (2 decimals), wins, losses, ties, the
        win rate (wins plus half the ties, over all its ratings) as a percentage, and that rate's 95% Wilson interval:
        whether a new model really beats the old one, or 20 ratings cannot tell yet."""
        stats: dict[str, dict] = {}
        for row in self.rows():
            for side, other in (("a", "b"), ("b", "a")):
                s = stats.setdefault(row[f"model_{side}"], {"n": 0, "sums": [0, 0, 0], "win": 0, "loss": 0,
                                                             "tie": 0})
                s["n"] += 1
                for i, axis in enumerate(("logic", "knowledge", "style")):
                    s["sums"][i] += row[f"{axis}_{side}"]
                outcome = "tie" if row["winner"] == "tie" else "win" if row["winner"] == side.upper() else "loss"
                s[outcome] += 1
        table = []
        for model, s in sorted(stats.items()):
            rate = (s["win"] + 0.5 * s["tie"]) / s["n"] * 100
            low, high = wilson_interval(rate / 100, s["n"])
            table.append([model, s["n"], *(round(x / s["n"], 2) for x in s["sums"]), s["win"], s["loss"],
                          s["tie"], f"{rate:.1f}%", f"{low * 100:.1f}–{high * 100:.1f}%"])
        return table

    def export_csv(self, path) -> Path:
        """All ratings as CSV (UTF-8 with BOM so spreadsheet programs read the Chinese), written atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8-sig", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows())
        tmp.replace(path)
        return path


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `rate` observed over `n` trials (95% with z = 1.96); it stays
    inside [0, 1] and is honest for small n and rates near 0 or 1, where the normal approximation is not."""
    if n <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _preferred_side(row: dict, by: str) -> str:
    """"A", "B" or "tie" for one rating: the rater's overall choice, or the higher score on one axis."""
    if by == "overall":
        return row["winner"]
    column = AXIS_COLUMNS[by]
    a, b = row[f"{column}_a"], row[f"{column}_b"]
    return "A" if a > b else "B" if b > a else "tie"


def preference_pairs(rows: list[dict], by: str = "overall") -> tuple[list[dict], dict]:
    """Preference pairs from stored ratings (RatingStore.rows()): for each prompt and pair of outputs, the output the
    raters preferred as `chosen`, the other as `rejected` (with the models that wrote them and the vote count).
    `by`: "overall" (the rater's choice) or an axis (逻辑性, 背景知识, 文风: the higher score on it). The same two
    outputs rated more than once (by several raters, or again, on either side) count as one pair decided by the
    majority of the non-tied votes; ties and pairs whose votes split evenly give no pair. Returns the pairs, in the
    order first rated, and counts of what went where."""
    if by != "overall" and by not in AXIS_COLUMNS:
        raise ConfigError(f"preferences by 'overall' or one of {', '.join(AXES)}, not {by!r}")
    groups: dict[tuple, dict] = {}
    counts = {"ratings": len(rows), "ties": 0, "repeats": 0, "split": 0, "pairs": 0}
    for row in rows:
        side = _preferred_side(row, by)
        if side == "tie":
            counts["ties"] += 1
            continue
        winner, loser = ("a", "b") if side == "A" else ("b", "a")
        key = (row["prompt"], frozenset((row["output_a"], row["output_b"])))
        group = groups.get(key)
        if group is None:
            groups[key] = group = {"prompt": row["prompt"], "votes": {}, "models": {}}
        else:
            counts["repeats"] += 1
        chosen = row[f"output_{winner}"]
        group["votes"][chosen] = group["votes"].get(chosen, 0) + 1
        group["models"][row[f"output_{winner}"]] = row[f"model_{winner}"]
        group["models"][row[f"output_{loser}"]] = row[f"model_{loser}"]
    pairs = []
    for (_, outputs), group in groups.items():
        votes = group["votes"]
        ranked = sorted(outputs, key=lambda o: -votes.get(o, 0))
        if len(ranked) < 2 or votes.get(ranked[0], 0) == votes.get(ranked[1], 0):
            counts["split"] += 1  # an even split, or the same text on both sides: nothing to learn
            continue
        chosen, rejected = ranked
        pairs.append({"prompt": group["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_model": group["models"][chosen], "rejected_model": group["models"][rejected],
                      "votes": [votes.get(chosen, 0), votes.get(rejected, 0)]})
    counts["pairs"] = len(pairs)
    return pairs, counts
