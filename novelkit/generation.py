"""Batched generation with transformers' `generate`: prompts sorted by length, left padding, results in input order."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .features import left_pad
from .templates import encode_prompt, stop_token_ids


def generation_kwargs(model, max_new_tokens=None, do_sample=None, temperature=None, top_p=None, top_k=None,
                      repetition_penalty=None) -> dict:
    """The model's generation_config.json settings, overridden by whichever flags are given."""
    given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                 top_k=top_k, repetition_penalty=repetition_penalty)
    cfg = getattr(model, "generation_config", None)
    out = {k: getattr(cfg, k, None) for k in given}
    out.update({k: v for k, v in given.items() if v is not None})
    if not out.get("do_sample"):
        out.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return {k: v for k, v in out.items() if v is not None}


@torch.inference_mode()
def generate_responses(model, tokenizer, template, samples, *, batch_size=8, progress=True,
                       **gen_kwargs) -> list[str]:
    """One response per sample (decoded, special tokens dropped), in the order of `samples`."""
    prompts = [encode_prompt(tokenizer, template, s) for s in samples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    stops = stop_token_ids(tokenizer, template)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx], tokenizer.pad_token_id).items()}
        generated = model.generate(**batch, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        for row, i in enumerate(idx):
            new = generated[row, batch["input_ids"].shape[1]:].tolist()
            cut = next((n for n, t in enumerate(new) if t in stops), len(new))
            out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    model.train(was_training)
    return out
