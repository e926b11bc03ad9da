"""Packing SFT samples of mixed lengths into full rows, instead of padding each batch to its longest sample.

A packed row holds several samples one after another; its `position_ids` restart at 0 at each sample, which tells the
model where samples begin: our Baichuan then attends only within each sample (variable-length flash attention on the
GPU, a block-diagonal mask elsewhere), and transformers' Llama/Qwen2 build the same block-diagonal mask themselves when
there is no attention_mask. So no token sees another sample, and every position carries a real token.
"""

from __future__ import annotations

import bisect
import dataclasses

import torch

from .features import IGNORE_INDEX


def pack_rows(samples: list[dict], capacity: int) -> list[dict]:
    """First-fit decreasing: each sample (input_ids, labels; at most `capacity` tokens) goes into the fullest row it
    still fits in. Returns rows with input_ids, labels and position_ids; no token is dropped or duplicated."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]), reverse=True)
    rows: list[list[int]] = []  # sample indices per row
    free: list[tuple[int, int]] = []  # (free space, row), sorted
    for i in order:
        n = len(samples[i]["input_ids"])
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit rows of {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            row["input_ids"] += samples[i]["input_ids"]
            row["labels"] += samples[i]["labels"]
            row["position_ids"] += list(range(len(samples[i]["input_ids"])))
        packed.append(row)
    return packed


@dataclasses.dataclass
class PackedCollator:
    """Right-pads packed rows to `width` tokens (the packing capacity), and a batch of packed rows to `rows` rows with
    empty ones (an epoch's last batch is usually short): every training batch has the same shape, so compiled layers
    never recompile (a recompile costs seconds; an empty row, one row of compute once an epoch, adds nothing to the
    loss). Unpacked rows (eval) pad to the batch's longest. The padding is a sample of its own (positions from 0,
    labels ignored); there is no attention_mask, so the models read the sample boundaries from position_ids. A row
    without position_ids (an unpacked eval sample) is one sample. `use_cache=False` goes with the batch: transformers
    models look for packed samples only when no cache is being filled."""

    pad_token_id: int
    width: int = 0
    rows: int = 0

    def __call__(self, rows: list[dict]) -> dict:
        packed = any("position_ids" in r for r in rows)
        width = max(self.width if packed else 0, *(len(r["input_ids"]) for r in rows))
        if packed and len(rows) < self.rows:
            rows = list(rows) + [{"input_ids": [], "labels": [], "position_ids": []}] * (self.rows - len(rows))
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            positions = r.get("position_ids") or list(range(len(r["input_ids"])))
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(positions) + list(range(pad)))
        return {**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}, "use_cache": False}
