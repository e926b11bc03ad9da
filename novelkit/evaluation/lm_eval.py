"""Language-model evaluation on long texts: sliding-window perplexity, and continuation prompts cut from a book."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def sliding_window_perplexity(model, token_ids: list[int], window: int, stride: int | None = None,
                              batch_size: int = 4, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Perplexity of a token sequence longer than the model's window.

    Windows of `window` tokens start every `stride` tokens; each scores only the tokens the previous window did not,
    so every token after the first is predicted exactly once, with up to `window - stride` tokens of context beyond
    those it shares with its own window (stride = window // 2 by default). `shard` = (rank, world): score only the
    windows i with i % world == rank; `merge_perplexity` adds the processes' parts up."""
    stride = stride or max(1, window // 2)
    ids = torch.tensor(token_ids, dtype=torch.long)
    spans = []  # (start, end, first scored position)
    scored_until = 1  # position 0 has no context: never scored
    for start in range(0, max(1, len(ids) - 1), stride):
        end = min(start + window, len(ids))
        if end <= scored_until:
            break
        spans.append((start, end, max(scored_until, start + 1)))
        scored_until = end
        if end == len(ids):
            break
    rank, world = shard
    spans = spans[rank::world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=not progress):
        batch = spans[i:i + batch_size]
        width = max(end - start for start, end, _ in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (start, end, _) in enumerate(batch):
            inputs[row, : end - start], mask[row, : end - start] = ids[start:end], 1
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float()
        for row, (start, end, first) in enumerate(batch):
            # logits at position p predict token p + 1
            pred = logits[row, first - start - 1: end - start - 1]
            nll += F.cross_entropy(pred, ids[first:end].to(device), reduction="sum").item()
            count += end - first
    model.train(was_training)
    return {"perplexity": math.exp(nll / count) if count else float("nan"), "nll": nll, "tokens": count,
            "window": window, "stride": stride}


def merge_perplexity(parts: list[dict]) -> dict:
    """One result from the processes' `sliding_window_perplexity` parts: their sums of NLL and tokens added."""
    nll, count = sum(p["nll"] for p in parts), sum(p["tokens"] for p in parts)
    return {**parts[0], "perplexity": math.exp(nll / count) if count else float("nan"), "nll": nll, "tokens": count}


def continuation_points(n_tokens: int, context: int, new: int, count: int) -> list[int]:
    """`count` evenly spaced positions with `context` tokens before and `new` after them."""
    first, last = context, n_tokens - new
    if last < first:
        return []
    if count <= 1 or last == first:
        return [first]
    step = (last - first) / (count - 1)
    return sorted({first + round(i * step) for i in range(count)})
