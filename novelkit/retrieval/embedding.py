"""Text vectors from any local causal LM: hidden states of one layer, pooled over the tokens, L2-normalised.

Pooling is a masked mean over the text's tokens (default: near-duplicate texts get near-identical vectors even from a
model that was never trained for embeddings) or the last token's state. The LM head is never run: only the
transformer body, so a 125k-token vocabulary costs nothing. On a GPU the model runs in bf16; vectors are float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelError
from ..models.loading import base_fingerprint, load_model, load_tokenizer, resolve_model_path

POOLINGS = ("mean", "last")
# Embedded at build time and again whenever the index is opened with a model: same-shaped models with other weights
# give a different vector, so they are caught too.
PROBE_TEXT = "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。"
PROBE_MIN_COSINE = 0.98  # bf16 against fp32 stays well above this; another model is near 0


class Embedder:
    """Turns texts into unit vectors with one model and one pooling setting."""

    def __init__(self, model, tokenizer, *, model_path: str = "", pooling: str = "mean", layer: int = -1,
                 max_length: int = 1024, batch_size: int = 16):
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        layers = model.config.num_hidden_layers
        if not -(layers + 1) <= layer <= layers:
            raise ConfigError(f"layer {layer} does not exist: the model has hidden states 0 (embeddings) to {layers} "
                              f"(or -1 = the last, ..., -{layers + 1})")
        if max_length < 1 or batch_size < 1:
            raise ConfigError(f"max_length and batch_size must be at least 1, got {max_length} and {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.model_path, self.pooling, self.layer = model_path, pooling, layer
        self.max_length, self.batch_size = max_length, batch_size
        self.dim = model.config.hidden_size

    @classmethod
    def load(cls, model_path: str | None, *, dtype="auto", device=None, **settings) -> Embedder:
        """Load a model folder (empty: the embedded default) as an embedder; bf16 on a GPU with dtype "auto"."""
        path = resolve_model_path(model_path)
        return cls(load_model(path, dtype=dtype, device=device), load_tokenizer(path), model_path=path, **settings)

    @classmethod
    def for_index(cls, recorded: dict, where: str, model_path: str = "", *, dtype="auto", device=None,
                  batch_size: int = 16, **overrides) -> Embedder:
        """An embedder making the same vectors as the one `recorded` by an index: the index's model and settings
        unless others are given, checked (another model, pooling or layer is a clear error)."""
        path = model_path or recorded["model"]
        if not model_path and not Path(path).is_dir():
            raise ModelError(f"{where} was built by {path}, which is not there any more: pass --model_path")
        settings = {k: recorded[k] if overrides.get(k) is None else overrides[k]
                    for k in ("pooling", "layer", "max_length")}
        embedder = cls.load(path, dtype=dtype, device=device, batch_size=batch_size, **settings)
        embedder.check_against(recorded, where)
        return embedder

    def describe(self) -> dict:
        """What the vectors depend on, recorded in an index so that it is only ever used with the same setting."""
        return {"model": self.model_path, "fingerprint": base_fingerprint(self.model.config), "dim": self.dim,
                "pooling": self.pooling, "layer": self.layer, "max_length": self.max_length,
                "probe": self.embed_batch([PROBE_TEXT])[0].tolist()}

    def check_against(self, recorded: dict, where: str) -> None:
        """ModelError unless this embedder makes the same vectors as the one `recorded` by describe()."""
        built_by = f"{where} was built by {recorded['model']} ({_shape(recorded['fingerprint'])})"
        ours = base_fingerprint(self.model.config)
        if ours != recorded["fingerprint"] or self.dim != recorded["dim"]:
            raise ModelError(f"{built_by}; {self.model_path or 'this model'} is {_shape(ours)}: "
                             f"use the index's model (--model_path) or another index folder")
        for key in ("pooling", "layer", "max_length"):
            if getattr(self, key) != recorded[key]:
                raise ConfigError(f"{where} was built with {key} {recorded[key]}, not {getattr(self, key)}: "
                                  f"leave {key} unset to use the index's, or use another index folder")
        cosine = float(np.dot(self.embed_batch([PROBE_TEXT])[0], np.asarray(recorded["probe"], dtype=np.float32)))
        if cosine < PROBE_MIN_COSINE:
            raise ModelError(f"{built_by}; {self.model_path or 'this model'} has the same shape but other weights "
                             f"(cosine {cosine:.3f} on a probe text): use the index's model or another index folder")

    @torch.inference_mode()
    def embed_batch(self, texts: list[str]) -> np.ndarray:
        """One float32 unit vector per text (texts are cut to max_length tokens), as a (len(texts), dim) array."""
        encoded = [self.tokenizer(t, truncation=True, max_length=self.max_length)["input_ids"] for t in texts]
        if not all(encoded):
            raise ConfigError("cannot embed an empty text")
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, seq in enumerate(encoded):  # right padding: a text's tokens start at position 0 in every batch
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        body = self.model.base_model  # the transformer without the LM head
        if self.layer == -1:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = body(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[self.layer]
        hidden = hidden.float()
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        else:
            pooled = hidden[torch.arange(len(encoded), device=device), mask.sum(1) - 1]
        return F.normalize(pooled, dim=-1).cpu().numpy()

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Vectors for any number of texts in input order, batched longest first so padding stays small."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in tqdm(range(0, len(order), self.batch_size), desc="embed", disable=not progress):
            idx = order[start:start + self.batch_size]
            out[idx] = self.embed_batch([texts[i] for i in idx])
        return out


def _shape(fingerprint: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in fingerprint.items() if v is not None)
