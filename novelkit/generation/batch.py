"""Batched generation for prediction, evaluation and the pretraining evaluation: through the engine (engine.py:
continuous batching over a static KV cache, CUDA graphs on GPU), prompts longest first, results in input order.
Models the engine cannot run go through transformers' `generate` in left-padded batches, as before."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..compile_cache import compiled_before
from ..data.features import left_pad
from ..data.templates import encode_prompt, stop_token_ids
from .engine import Engine, Request, engine_step_key, without_partial_character
from .engine_model import fast_path_problem, unwrap
from .sampling import hf_generate_kwargs, resolve_sampling


def generation_kwargs(model, max_new_tokens=None, do_sample=None, temperature=None, top_p=None, top_k=None,
                      repetition_penalty=None, encoder_repetition_penalty=None, penalize_prompt=None) -> dict:
    """The model's generation_config.json settings, overridden by whichever flags are given."""
    given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                 top_k=top_k, repetition_penalty=repetition_penalty,
                 encoder_repetition_penalty=encoder_repetition_penalty, penalize_prompt=penalize_prompt)
    cfg = getattr(model, "generation_config", None)
    out = {k: getattr(cfg, k, None) for k in given}
    out.update({k: v for k, v in given.items() if v is not None})
    if not out.get("do_sample"):
        out.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return {k: v for k, v in out.items() if v is not None}


def generate_responses(model, tokenizer, template, samples, *, batch_size=8, progress=True, in_training=False,
                       **gen_kwargs) -> list[str]:
    """One response per sample (decoded, special tokens dropped), in the order of `samples`."""
    out: list[str] = [""] * len(samples)

    def keep(i, text):
        out[i] = text

    generate_each(model, tokenizer, template, samples, keep, batch_size=batch_size, progress=progress,
                  in_training=in_training, **gen_kwargs)
    return out


# Compiling the decode step costs 1-2 minutes on a GPU the first time for a model shape, seconds once its kernels
# are in the compile cache (novelkit/compile_cache.py), and saves ~1-7 ms per decode step (1.5B-7B models on an
# H200): decode steps a job needs before compiling pays, cold and cached.
COMPILE_MIN_STEPS = {"cold": 20_000, "cached": 2_000}


def worth_compiling(prompts: int, batch_size: int, max_new_tokens: int, cached: bool) -> bool:
    """Whether a job of `prompts` prompts decoded `batch_size` at a time makes enough decode steps to win back the
    compilation: a 100-record prediction (~3,000 steps at batch 8) only when the step's kernels are cached; 1,000
    prompts of 800 new tokens at batch 64 (12,800 steps) likewise; a 10-record one never."""
    steps = -(-prompts // batch_size) * max_new_tokens
    return steps >= COMPILE_MIN_STEPS["cached" if cached else "cold"]


@torch.inference_mode()
def generate_each(model, tokenizer, template, samples, on_response, *, batch_size=8, progress=True,
                  in_training=False, **gen_kwargs) -> None:
    """Calls on_response(index, response) for every sample as soon as its response is finished. `batch_size`:
    sequences decoded together (the engine's slots; a finished one's slot takes the next prompt at once).

    `in_training`: the model is being trained (evaluation during training). The engine then leaves it exactly as it
    was: no frozen (fused) weights, which would turn parameters into inference tensors that the next backward cannot
    use, and no compilation, which each evaluation would pay again. Said by the caller, not read from the model: the
    Trainer puts the model in eval mode before it evaluates. Otherwise a GPU engine compiles its decode step when the
    job is long enough to win the compilation back (`worth_compiling`)."""

    prompts = [encode_prompt(tokenizer, template, s) for s in samples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    stops = stop_token_ids(tokenizer, template)
    if not prompts:
        return
    was_training = model.training
    in_training = in_training or was_training
    model.eval()
    try:
        if fast_path_problem(model):
            _generate_with_hf(model, tokenizer, prompts, order, stops, on_response, batch_size, progress,
                              **gen_kwargs)
            return
        gen = dict(gen_kwargs)
        max_new = gen.pop("max_new_tokens", None) or getattr(model.generation_config, "max_new_tokens", None) or 20
        params = resolve_sampling(model, **gen)
        on_gpu = unwrap(model).get_input_embeddings().weight.is_cuda
        compile = on_gpu and not in_training and worth_compiling(len(prompts), batch_size, max_new,
                                                                 compiled_before(engine_step_key(model)))
        engine = Engine(model, max_batch=min(batch_size, len(prompts)), max_len=len(prompts[order[0]]) + max_new,
                        compile=compile, frozen=False if in_training else None)
        index = {}
        for i in order:
            index[id(engine.add(Request(prompts[i], max_new, params, stop_ids=stops)))] = i
        with tqdm(total=len(prompts), desc="generate", disable=not progress) as bar:
            while engine.busy:
                for r in engine.step():
                    on_response(index[id(r)], _response_text(tokenizer, r.tokens, stops))
                    bar.update(1)
    finally:
        model.train(was_training)


def _response_text(tokenizer, tokens, stops) -> str:
    cut = next((n for n, t in enumerate(tokens) if t in stops), len(tokens))
    return without_partial_character(tokenizer.decode(tokens[:cut], skip_special_tokens=True)).strip()


def _generate_with_hf(model, tokenizer, prompts, order, stops, on_response, batch_size, progress, **gen_kwargs):
    device = next(model.parameters()).device
    if gen_kwargs.get("encoder_repetition_penalty", 1.0) != 1.0:
        batch_size = 1  # `generate` counts the left padding as part of the prompt and would favour the pad token
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx], tokenizer.pad_token_id).items()}
        generated = model.generate(**batch, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                   **hf_generate_kwargs(gen_kwargs, batch["input_ids"].shape[1]))
        for row, i in enumerate(idx):
            on_response(i, _response_text(tokenizer, generated[row, batch["input_ids"].shape[1]:].tolist(), stops))
