"""Next-token choice for a batch of sequences with per-row settings, the same numbers as transformers' processors.

Order as `generate`: repetition penalty (also when greedy), then for sampled rows temperature, top-k, top-p, then a
draw. A row whose setting is neutral (penalty 1, temperature 1, top_k 0, top_p 1) is left unchanged,
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
    0 = off. Filtered logits become -inf. One sort serves both filters: top-k only turns the lowest entries of the
    ascending order into -inf, so that order stays the order top-p needs."""
    vocab = logits.shape[-1]
    logits = logits / temperature
    sorted_asc, order = logits.sort(dim=-1)
    kth = sorted_asc.gather(-1, vocab - top_k.clamp(min=1, max=vocab))  # as TopKLogitsWarper: ties with it stay
    use_k = top_k > 0
    logits = logits.masked_fill(use_k & (logits < kth), -float("inf"))
    sorted_asc = sorted_asc.masked_fill(use_k & (sorted_asc < kth), -float("inf"))
    # as TopPLogitsWarper: drop the ascending prefix whose cumulative probability is <= 1 - top_p, keep the best
    cumulative = sorted_asc.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted) & (top_p < 1.0)
    return logits.masked_fill(remove, -float("inf"))


class Sampler:
    """Per-row settings as device tensors (one row per cache slot) and the choice of next tokens. `choose` has no
    host sync and fixed shapes, so the engine captures it in the decode step's CUDA graph (rows without a seed)."""

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
        if params.seed is not None and params.do_sample:
            self.generators[row] = torch.Generator(self.device).manual_seed(params.seed)

    def needs(self, rows) -> tuple[bool, bool, bool]:
        """(any row samples, any row penalises repetition, any sampling row has its own generator)."""
        params = [self.params[r] for r in rows if self.params[r] is not None]
        sample = any(p.do_sample for p in params)
        return (sample, any(p.repetition_penalty != 1.0 for p in params),
                sample and any(self.generators[r] is not None for r in rows))

    def choose(self, logits, rows, sample: bool, penalty: bool, seeded: bool = False) -> torch.Tensor:
        """Next token for each row of `logits`; `rows` (slice or index tensor) says which slots they are.
        A draw is argmax(probs / Exp(1) noise): the same distribution as torch.multinomial, and graph-capturable."""
        logits = logits.float()
        if penalty:
            logits = penalize_repetition(logits, self.seen[rows], self.penalty[rows])
        chosen = logits.argmax(dim=-1)
        if sample:
            probs = warp(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows]).softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            if seeded:
                slots = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
                for i, slot in enumerate(slots):
                    if self.generators[slot] is not None:
                        noise[i].exponential_(generator=self.generators[slot])
            drawn = (probs / noise).argmax(dim=-1)
            chosen = torch.where(self.do_sample[rows][:, 0], drawn, chosen)
        if penalty:
            index = torch.arange(rows.start, rows.stop, device=self.device) if isinstance(rows, slice) else rows
            self.seen[index, chosen] = True
        return chosen
