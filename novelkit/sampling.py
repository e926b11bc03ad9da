"""Next-token choice for a batch of sequences with per-row settings, the same numbers as transformers' processors.

Order as `generate`: repetition penalty (also when greedy), then for sampled rows temperature, top-k, top-p, then a
multinomial draw. A row whose setting is neutral (penalty 1, temperature 1, top_k 0, top_p 1) is left unchanged,
as `generate` leaves out that processor. Rows with a seed draw from their own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


def resolve_sampling(model, seed=None, **given) -> SamplingParams:
    """As `generate` resolves them: the given values, else the model's generation_config, else transformers'
    global defaults (top_k 50 when sampling)."""
    cfg = getattr(model, "generation_config", None)
    defaults = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
    values = {}
    for name, default in defaults.items():
        value = given.get(name)
        if value is None:
            value = getattr(cfg, name, None)
        values[name] = default if value is None else value
    return SamplingParams(do_sample=bool(values["do_sample"]), temperature=float(values["temperature"]),
                          top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                          repetition_penalty=float(values["repetition_penalty"]), seed=seed)


def penalize_repetition(logits, seen, penalty):
    """HF RepetitionPenaltyLogitsProcessor per row: logits (b, vocab), seen (b, vocab) bool, penalty (b, 1)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def warp(logits, temperature, top_k, top_p):
    """HF temperature, top-k and top-p warpers per row. temperature, top_p (b, 1) float; top_k (b, 1) long,
    0 = off. Filtered logits become -inf."""
    vocab = logits.shape[-1]
    logits = logits / temperature
    sorted_desc = logits.sort(dim=-1, descending=True).values
    k = top_k.clamp(min=1, max=vocab)
    kth = sorted_desc.gather(-1, k - 1)
    keep_k = (top_k <= 0) | (logits >= kth)
    logits = logits.masked_fill(~keep_k, -float("inf"))
    # top-p exactly as TopPLogitsWarper: ascending sort of the top-k-filtered scores, cumulative probabilities.
    sorted_asc, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted) & (top_p < 1.0)
    return logits.masked_fill(remove, -float("inf"))


class Sampler:
    """Per-row settings as device tensors (one row per cache slot) and the choice of next tokens."""

    def __init__(self, rows: int, vocab: int, device):
        self.device = device
        self.do_sample = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        self.temperature = torch.ones(rows, 1, device=device)
        self.top_k = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, 1, device=device)
        self.penalty = torch.ones(rows, 1, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.params: list[SamplingParams | None] = [None] * rows
        self.generators: list[torch.Generator | None] = [None] * rows

    def set_row(self, row: int, params: SamplingParams, prompt: list[int]):
        self.params[row] = params
        self.do_sample[row] = params.do_sample
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.penalty[row] = params.repetition_penalty
        self.seen[row] = False
        if params.repetition_penalty != 1.0:
            self.seen[row, torch.tensor(prompt, device=self.device)] = True
        self.generators[row] = None
        if params.seed is not None:
            self.generators[row] = torch.Generator(self.device).manual_seed(params.seed)

    def choose(self, logits, rows: list[int]) -> torch.Tensor:
        """Next token for each of `rows` (the logits' rows, in that order). Returns (len(rows),) long on device."""
        params = [self.params[r] for r in rows]
        index = torch.tensor(rows, device=self.device) if rows != list(range(len(rows))) else slice(0, len(rows))
        logits = logits.float()
        if any(p.repetition_penalty != 1.0 for p in params):
            logits = penalize_repetition(logits, self.seen[index], self.penalty[index])
        chosen = logits.argmax(dim=-1)
        if any(p.do_sample for p in params):
            warped = warp(logits, self.temperature[index], self.top_k[index], self.top_p[index])
            probs = warped.softmax(dim=-1)
            shared = [i for i, p in enumerate(params) if p.do_sample and self.generators[rows[i]] is None]
            if len(shared) == len(rows):
                drawn = torch.multinomial(probs, 1)[:, 0]
            else:
                drawn = chosen.clone()
                if shared:
                    pick = torch.tensor(shared, device=self.device)
                    drawn[pick] = torch.multinomial(probs[pick], 1)[:, 0]
                for i, p in enumerate(params):
                    if p.do_sample and self.generators[rows[i]] is not None:
                        drawn[i] = torch.multinomial(probs[i], 1, generator=self.generators[rows[i]])[0]
            chosen = torch.where(self.do_sample[index][:, 0], drawn, chosen)
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen[torch.tensor(rows, device=self.device), chosen] = True
        return chosen
