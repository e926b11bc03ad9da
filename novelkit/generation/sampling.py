"""Next-token choice for a batch of sequences with per-row settings, the same numbers as transformers' processors.

Order as `generate`: the prompt's bias (`encoder_repetition_penalty`: above 1 it favours the prompt's tokens, a copy
bias that leaves the generated tokens alone), the repetition penalty (on the prompt's and the generated tokens, or
with `penalize_prompt=False` on the generated ones only, as HF's `prompt_ignore_length`; both also when greedy), then
for sampled rows temperature, top-k, top-p, then a draw. A row whose setting is neutral (penalties 1, temperature 1,
top_k 0, top_p 1) is left unchanged, as `generate` leaves out that processor. Rows with a seed draw from their own
generator.

Two ways to draw, one distribution. `warp` + a draw is transformers' way: sort the vocabulary, cumulative sum, cut.
`draw_nucleus` needs no sort, which costs more than a 1.5B model's decode step over a 152k vocabulary at batch 64:
it takes the first CANDIDATES tokens of a Gumbel ordering (argmax of probs / Exp(1) noise is a draw from probs;
the order continues it without replacement) and keeps the first one inside the top-p nucleus. The first token of
that order that lies in a set is a draw from probs restricted to the set, so this is exact. A token is in the
nucleus when the probability mass at or below its own is more than 1 - top_p (HF drops the ascending prefix
whose cumulative sum is <= 1 - top_p). When no candidate is inside (probability about (1 - top_p) ** CANDIDATES),
the row gets -1 and the caller draws it again the sorting way (`Sampler.redraw`); tokens tied with the nucleus's
smallest are all kept, where HF's sort keeps some of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compile_cache import use_compile_cache


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0
    penalize_prompt: bool = True  # False: the repetition penalty counts generated tokens only
    seed: int | None = None

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0 or self.encoder_repetition_penalty != 1.0


def resolve_sampling(model, seed=None, **given) -> SamplingParams:
    """As `generate` resolves them: the given values, else the model's generation_config, else transformers'
    global defaults (top_k 50 when sampling)."""
    cfg = getattr(model, "generation_config", None)
    defaults = dict(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
                    encoder_repetition_penalty=1.0)
    values = {"penalize_prompt": given.get("penalize_prompt", True) is not False}
    for name, default in defaults.items():
        value = given.get(name)
        if value is None:
            value = getattr(cfg, name, None)
        values[name] = default if value is None else value
    return SamplingParams(do_sample=bool(values["do_sample"]), temperature=float(values["temperature"]),
                          top_k=int(values["top_k"]), top_p=float(values["top_p"]),
                          repetition_penalty=float(values["repetition_penalty"]),
                          encoder_repetition_penalty=float(values["encoder_repetition_penalty"]),
                          penalize_prompt=values["penalize_prompt"], seed=seed)


def hf_generate_kwargs(gen: dict, prompt_length: int) -> dict:
    """`generate`'s keywords for these settings: `penalize_prompt=False` has no keyword there, it becomes HF's
    RepetitionPenaltyLogitsProcessor with `prompt_ignore_length` (the prompt's length, left padding included).
    `generate` runs a processor given this way after its own ones: the same tokens when greedy."""
    gen = dict(gen)
    if gen.pop("penalize_prompt", True) is False and gen.get("repetition_penalty", 1.0) != 1.0:
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        gen["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
            float(gen.pop("repetition_penalty")), prompt_ignore_length=prompt_length)])
    return gen


def penalize_repetition(logits, seen, penalty, in_prompt=None, prompt_factor=None):
    """HF EncoderRepetitionPenaltyLogitsProcessor, then RepetitionPenaltyLogitsProcessor, per row: logits
    (b, vocab), seen and in_prompt (b, vocab) bool, penalty and prompt_factor (b, 1); prompt_factor is
    1 / encoder_repetition_penalty as HF applies it (a factor of 1 leaves the logits exactly as they are)."""
    if in_prompt is not None:
        favoured = torch.where(logits < 0, logits * prompt_factor, logits / prompt_factor)
        logits = torch.where(in_prompt, favoured, logits)
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


CANDIDATES = 4  # Gumbel-order candidates per row and step: a miss costs one sorting redraw of that row
FAST_TOP_K = 64  # top-k filters up to this size are applied without a sort
# A reduction over a whole row (150k entries) runs as one thread block per row: ~100 us on an H200 at 1 to 64 rows,
# as long as two layers of a 1.5B model. Split into chunks of the vocabulary, each reduction runs on rows x chunks.
SPLIT = 64  # chunks at most
MIN_CHUNK = 1024  # entries per chunk at least


def _chunked(x):
    """x (b, vocab) viewed as (b, chunks, vocab / chunks): the most chunks (up to SPLIT, of MIN_CHUNK or more
    entries) that divide the vocabulary evenly; 1 chunk for a small vocabulary."""
    b, vocab = x.shape
    chunks = next((c for c in range(min(SPLIT, vocab // MIN_CHUNK), 1, -1) if vocab % c == 0), 1)
    return x.view(b, chunks, vocab // chunks)


def row_max(x):
    """(b, 1): the largest entry of each row, reduced chunk by chunk."""
    return _chunked(x).amax(dim=-1).amax(dim=-1, keepdim=True)


def row_sum(x):
    """(b, 1): the sum of each row, reduced chunk by chunk."""
    return _chunked(x).sum(dim=-1).sum(dim=-1, keepdim=True)


def row_softmax(x):
    """softmax over each row of float32 x, its two reductions chunked."""
    e = (x - row_max(x)).exp()
    return e / row_sum(e)


def row_argmax(x):
    """(b,): x.argmax(dim=-1), reduced chunk by chunk: the same index (the first of tied maxima, as each chunk's
    max and the choice among chunks keep the first)."""
    parts = _chunked(x)
    best, where = parts.max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (chunk * parts.shape[-1] + where.gather(-1, chunk))[:, 0]


def row_topk(x, k: int):
    """(values, indices) (b, k) of the k largest of each row, best first: each chunk's k largest, then the k
    largest of those (every row's k largest are among its chunks' own)."""
    parts = _chunked(x)
    chunks, size = parts.shape[1], parts.shape[2]
    if chunks == 1:
        return x.topk(k, dim=-1)
    values, where = parts.topk(min(k, size), dim=-1)
    where = where + torch.arange(chunks, device=x.device)[:, None] * size
    top = values.flatten(1).topk(k, dim=-1)
    return top.values, where.flatten(1).gather(-1, top.indices)


def draw_nucleus(logits, noise, temperature, top_k, top_p, use_top_k: bool):
    """A token per row from temperature / top-k / top-p filtered `logits` (b, vocab) float32, without sorting the
    vocabulary (see the module docstring); -1 where none of the candidates is inside the nucleus. noise (b, vocab):
    Exp(1) draws. temperature, top_p (b, 1) float, top_k (b, 1) long <= FAST_TOP_K (0 = off)."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if use_top_k:  # as TopKLogitsWarper: keep logits >= the k-th largest
        k = min(FAST_TOP_K, vocab)
        kth = row_topk(logits, k)[0].gather(-1, top_k.clamp(1, k) - 1)
        logits = logits.masked_fill((top_k > 0) & (logits < kth), -float("inf"))
    probs = row_softmax(logits)
    count = min(CANDIDATES, vocab)
    candidates = row_topk(probs / noise, count)[1]  # Gumbel order, best first
    chances = probs.gather(-1, candidates)
    mass_at_or_below = torch.cat([row_sum(torch.where(probs <= chances[:, i, None], probs, 0.0))
                                  for i in range(count)], dim=-1)
    inside = ((mass_at_or_below > 1 - top_p) | (top_p >= 1.0)) & (chances > 0)
    first = inside.int().argmax(dim=-1, keepdim=True)  # the first True
    token = candidates.gather(-1, first)[:, 0]
    return torch.where(inside.any(dim=-1), token, -1)


def pick(logits, noise, do_sample, temperature, top_k, top_p, mode: str | None):
    """Next tokens from (b, vocab) logits: argmax where do_sample is False, else `draw_nucleus` (-1 on a miss).
    noise None: Exp(1) noise made here, inside the one compiled function (no [b, vocab] noise tensor in memory)."""
    logits = logits.float()
    greedy = row_argmax(logits)
    if mode is None:
        return greedy
    if noise is None:
        # Exp(1) = -log(U); rand may give 0, whose noise would be +inf (that token never drawn): clamped
        noise = -torch.rand_like(logits).clamp(min=torch.finfo(torch.float32).tiny).log()
    drawn = draw_nucleus(logits, noise, temperature, top_k, top_p, mode == "nucleus_top_k")
    return torch.where(do_sample[:, 0], drawn, greedy)


def _compiled_pick():
    use_compile_cache()
    compiled = torch.compile(pick)

    def call(logits, noise, *rows, mode):
        for t in (logits, noise, *rows):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)  # one compilation for every batch size >= 2
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            return compiled(logits, noise, *rows, mode)

    return call


class Sampler:
    """Per-row settings as device tensors (one row per cache slot) and the choice of next tokens. `choose` has no
    host sync and fixed shapes, so the engine captures it in the decode step's CUDA graph (rows without a seed).
    compile=True: `pick` through torch.compile for the compiled decode step (its dozen passes over the logits fuse
    into a few, noise included)."""

    def __init__(self, rows: int, vocab: int, device, compile: bool = False):
        self.device = device
        self.compiled_pick = _compiled_pick() if compile else None
        self.do_sample = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        self.temperature = torch.ones(rows, 1, device=device)
        self.top_k = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, 1, device=device)
        self.penalty = torch.ones(rows, 1, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.prompt_factor = torch.ones(rows, 1, device=device)
        self.in_prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.params: list[SamplingParams | None] = [None] * rows
        self.generators: list[torch.Generator | None] = [None] * rows

    def set_row(self, row: int, params: SamplingParams, prompt: list[int]):
        self.params[row] = params
        self.do_sample[row] = params.do_sample
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.penalty[row] = params.repetition_penalty
        self.prompt_factor[row] = 1 / params.encoder_repetition_penalty
        self.in_prompt[row] = False
        if params.penalizes:
            self.in_prompt[row, torch.tensor(prompt, device=self.device)] = True
        self.reset_seen(row, prompt, [])
        self.generators[row] = None
        if params.seed is not None and params.do_sample:
            self.generators[row] = torch.Generator(self.device).manual_seed(params.seed)

    def reset_seen(self, row: int, prompt: list[int], generated: list[int]):
        """Sets a row's repetition marks from its tokens: those it generated, and its prompt's where the prompt
        counts (the engine, after a step that marked a token the row then did not keep)."""
        self.seen[row] = False
        params = self.params[row]
        ids = (list(prompt) if params is not None and params.penalize_prompt else []) + list(generated)
        if params is not None and params.penalizes and ids:
            self.seen[row, torch.tensor(ids, device=self.device)] = True

    def needs(self, rows) -> tuple[str | None, bool, bool]:
        """(how sampling rows draw: None (all greedy), "nucleus", "nucleus_top_k" or "sort" (a top_k over
        FAST_TOP_K); any row penalises repetition; any sampling row has its own generator)."""
        params = [self.params[r] for r in rows if self.params[r] is not None]
        sampled = [p for p in params if p.do_sample]
        mode = None
        if sampled:
            k = max(p.top_k for p in sampled)
            mode = "nucleus" if k <= 0 else "nucleus_top_k" if k <= FAST_TOP_K else "sort"
        return (mode, any(p.penalizes for p in params),
                bool(sampled) and any(self.generators[r] is not None for r in rows))

    def _noise(self, logits, rows, seeded: bool):
        """Exp(1) float32 noise of the logits' shape; rows with their own generator draw theirs from it."""
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_()
        if seeded:
            slots = range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()
            for i, slot in enumerate(slots):
                if self.generators[slot] is not None:
                    noise[i].exponential_(generator=self.generators[slot])
        return noise

    def choose(self, logits, rows, mode: str | None, penalty: bool, seeded: bool = False,
               compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(next token for each row of `logits`, `logits` as given); `rows` (slice or index tensor) says which
        slots they are. A token is -1 where the nucleus draw missed: the caller passes the row and the returned
        logits to `redraw` before the token is used. A draw is argmax(probs / Exp(1) noise): the same distribution
        as torch.multinomial, and graph-capturable. compiled: through the compiled `pick`."""
        raw = logits
        if penalty:
            logits = penalize_repetition(logits.float(), self.seen[rows], self.penalty[rows], self.in_prompt[rows],
                                         self.prompt_factor[rows])
        settings = self.do_sample[rows], self.temperature[rows], self.top_k[rows], self.top_p[rows]
        if mode == "sort":
            logits = logits.float()
            drawn = (warp(logits, *settings[1:]).softmax(dim=-1) / self._noise(logits, rows, seeded)).argmax(dim=-1)
            chosen = torch.where(settings[0][:, 0], drawn, logits.argmax(dim=-1))
        elif compiled and self.compiled_pick is not None:
            noise = self._noise(logits, rows, seeded) if mode and seeded else None
            chosen = self.compiled_pick(logits, noise, *settings, mode=mode)
        else:
            chosen = pick(logits, self._noise(logits, rows, seeded) if mode else None, *settings, mode)
        if penalty:
            self._mark_seen(rows, chosen)
        return chosen, raw

    def redraw(self, logits, slots: list[int]) -> torch.Tensor:
        """Tokens for `slots` whose nucleus draw missed, drawn the sorting way from their rows of the logits
        `choose` returned (their repetition marks are still those `choose` saw: a miss marks nothing)."""
        index = torch.tensor(slots, device=self.device)
        logits = logits.float()
        penalty = any(self.params[s].penalizes for s in slots)
        if penalty:
            logits = penalize_repetition(logits, self.seen[index], self.penalty[index], self.in_prompt[index],
                                         self.prompt_factor[index])
        noise = self._noise(logits, index, seeded=any(self.generators[s] is not None for s in slots))
        probs = warp(logits, self.temperature[index], self.top_k[index], self.top_p[index]).softmax(dim=-1)
        chosen = (probs / noise).argmax(dim=-1)
        if penalty:
            self._mark_seen(index, chosen)
        return chosen

    def _mark_seen(self, rows, chosen):
        index = torch.arange(rows.start, rows.stop, device=self.device) if isinstance(rows, slice) else rows
        token = chosen.clamp(min=0)  # a missed draw (-1) marks nothing; its redraw marks its token
        self.seen[index, token] = self.seen[index, token] | (chosen >= 0)
