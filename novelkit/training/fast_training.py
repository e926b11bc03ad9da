"""The training fast path the fine-tuning and pretraining recipes switch on (docs/performance.md has the measurements):

- `use_chunked_loss`: the loss straight from the hidden states, a chunk of tokens at a time
  (novelkit.models.chunked_loss, through Liger-Kernel's fused kernel on a GPU where it is installed): no
  [batch, seq, vocab] float32 logits, which frees gigabytes at a 125k-151k vocabulary;
- `checkpoint_some_layers`: gradient checkpointing of the first N decoder layers only, so memory that the chunked loss
  freed buys back recomputation;
- `compile_layers`: torch.compile of each decoder layer on the GPU (fuses RMSNorm, RoPE, SwiGLU and LoRA's elementwise
  work into a few kernels); one compiled graph serves every layer;
- packing (novelkit.data.packing) for samples of mixed lengths.

Each is a no-op where it does not apply (CPU, DeepSpeed ZeRO-3, unknown architectures), so the recipes call them
unconditionally and stay correct everywhere.
"""

from __future__ import annotations

import sys

import torch

from ..compile_cache import use_compile_cache
from ..models.chunked_loss import (IGNORE_INDEX, gpu_loss_kernel, is_partitioned, linear_cross_entropy,
                                   shift_for_next_token)


def base_model(model):
    """The transformers model under PEFT and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks (model.model.layers in Llama, Qwen2, Baichuan and most causal LMs)."""
    inner = getattr(base_model(model), "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def use_chunked_loss(model) -> bool:
    """In training with labels, compute the causal-LM loss from the hidden states chunk by chunk. Returns whether it
    is on. Our Baichuan does it natively; other transformers models get it by keeping their lm_head from running in
    training (its forward then passes the hidden states through) and a loss function that applies the head itself.
    The state dict, saving and evaluation are untouched: in eval mode or without gradients the head runs as always."""
    model = base_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or is_partitioned(head.weight):
        return False
    if getattr(model.config, "model_type", None) == "baichuan":
        model.chunked_loss = True
        return True
    if getattr(head, "bias", None) is not None or type(head) is not torch.nn.Linear:
        return False
    original_forward, original_loss = head.forward, model.loss_function

    def head_forward(hidden_states):
        if head.training and torch.is_grad_enabled():
            return hidden_states  # the loss function below applies the head, a chunk at a time
        return original_forward(hidden_states)

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                      shift_labels=None, **kwargs):
        if logits.shape[-1] != head.in_features or logits.shape[-1] == head.out_features:
            return original_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        targets = shift_labels if shift_labels is not None else shift_for_next_token(labels)
        return linear_cross_entropy(logits, head.weight, targets, num_items_in_batch=num_items_in_batch)

    head.forward = head_forward
    model.loss_function = loss_function
    return True


def checkpoint_some_layers(model, count: int) -> None:
    """With gradient checkpointing on, keep it for the first `count` decoder layers only (-1: all)."""
    layers = decoder_layers(model)
    if count < 0 or not layers:
        return
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count


def compile_layers(model) -> bool:
    """torch.compile each decoder layer when there is a CUDA GPU (compilation happens at the first forward, on
    whatever device the model is then); returns whether it did."""
    layers = decoder_layers(model)
    if not layers or not torch.cuda.is_available():
        return False
    use_compile_cache()
    for layer in layers:
        layer.compile()
    return True


def prepare_fast_training(model, *, compile: bool | None = None, checkpoint_layers: int = -1,
                          tag: str = "train") -> dict:
    """Everything above that applies to `model` (on its final device), with one log line saying what is on."""
    on = {"chunked_loss": use_chunked_loss(model)}
    if on["chunked_loss"]:  # which kernel computes it on the GPU (the model may still be on the CPU here)
        on["loss_kernel"] = gpu_loss_kernel()
    checkpoint_some_layers(model, checkpoint_layers)
    if checkpoint_layers >= 0:
        on["checkpoint_layers"] = checkpoint_layers
    on["compiled_layers"] = compile_layers(model) if compile is not False else False
    print(f"[{tag}] fast path: " + ", ".join(f"{k}={v}" for k, v in on.items()), file=sys.stderr, flush=True)
    return on
