"""Causal-LM cross-entropy straight from hidden states, a chunk of tokens at a time: the [tokens, vocab] float32 logits
never exist whole.

With Baichuan 2's 125,696-entry vocabulary, 4 × 2048 tokens make 4 GB of float32 logits, and the usual
`logits.float()` → cross_entropy → backward keeps three such buffers alive at the peak. Here each chunk's logits are
made, turned into the loss and into the gradients of the hidden states (and of the head's weight when it is trained),
and freed, all in the forward pass; backward only scales the stored gradients. Same matmuls as the plain way, so no
extra compute, and the numbers match it (tests/test_fast_training.py).

On a CUDA GPU with Liger-Kernel installed (`requirements-gpu.txt`), the same loss runs through Liger's fused linear
cross-entropy instead: one Triton kernel per chunk turns the logits into the loss and their gradient in place, where
the PyTorch version below makes about ten passes over float32 logits (docs/performance.md measures both). The
PyTorch version stays for the CPU, for Baichuan 2's max-z loss (Liger's z-loss is a different one), and where Liger
is missing.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from ..data.features import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk (the peak holds about two such buffers)
# Liger's chunk: about LIGER_CHUNK × tokens × hidden logits at a time (its default 1 makes 128-token chunks at a
# 152k vocabulary and hidden size 1536, re-reading the float32 head gradient 64 times per step)
LIGER_CHUNK = 4
# the head's gradient summed over Liger's chunks in float32 (False: in the weight's dtype, as Liger's own models do)
LIGER_FLOAT32_SUM = False


@functools.cache
def liger_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy function, or None when it is not installed or does not import."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as error:  # not installed, or no Triton / GPU build behind it
        if not isinstance(error, ModuleNotFoundError):
            print(f"[train] liger-kernel did not import ({type(error).__name__}: {error}); the PyTorch loss is used",
                  file=sys.stderr, flush=True)
        return None
    return liger_fused_linear_cross_entropy


def gpu_loss_kernel() -> str:
    """Which kernel computes the loss here on a GPU: "liger", or "torch" (no GPU or no Liger)."""
    return "liger" if torch.cuda.is_available() and liger_linear_cross_entropy() is not None else "torch"


def uses_liger(hidden, z_loss_weight: float = 0.0) -> bool:
    """Whether linear_cross_entropy takes Liger's kernel for these inputs."""
    return hidden.is_cuda and not z_loss_weight and liger_linear_cross_entropy() is not None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, z_loss_weight, z_normalizer):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_BYTES // (4 * vocab))
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            logits = (h @ weight.t()).float()
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum() / normalizer
            if z_loss_weight:
                # Baichuan 2's z-loss: weight × mean over all positions of the squared largest logit
                top, index = logits.max(dim=-1)
                total += z_loss_weight * top.pow(2).sum() / z_normalizer
            # d loss / d logits = (softmax - one_hot) / normalizer on learned tokens, 0 elsewhere; in place, so the
            # chunk's float32 logits buffer becomes its gradient
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
            grad *= (valid.float() / normalizer)[:, None]
            if z_loss_weight:
                grad.scatter_add_(1, index[:, None], (2 * z_loss_weight / z_normalizer * top)[:, None])
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                if grad_weight.is_cuda and grad.dtype != torch.float32:  # accumulate in float32 inside the GEMM
                    torch.addmm(grad_weight, grad.t(), h.to(grad.dtype), out_dtype=torch.float32, out=grad_weight)
                else:
                    grad_weight.add_(grad.t() @ h)  # promoted to float32 inside the add: no float32 product copy
            del logits, grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, *, num_items_in_batch=None, z_loss_weight: float = 0.0):
    """Cross-entropy of `hidden @ weight.T` against `labels` (already aligned: labels[i] is the target of hidden[i],
    IGNORE_INDEX to skip), summed over learned tokens and divided by `num_items_in_batch` when given (the Trainer's
    count across gradient accumulation), else by this batch's learned-token count (a mean, as F.cross_entropy).
    `z_loss_weight` adds Baichuan 2's z-loss (mean over all positions of the squared largest logit)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        normalizer = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    if uses_liger(hidden, z_loss_weight):
        total = liger_linear_cross_entropy()(
            hidden.contiguous(), weight, labels.contiguous(), ignore_index=IGNORE_INDEX, reduction="sum",
            accum_dtype=torch.float32 if weight.requires_grad and LIGER_FLOAT32_SUM else None,
            chunk_mem_const=LIGER_CHUNK)
        return total / normalizer
    return _LinearCrossEntropy.apply(hidden, weight, labels, normalizer, float(z_loss_weight or 0.0),
                                     float(max(labels.numel(), 1)))


def shift_for_next_token(labels):
    """labels[:, 1:] padded with IGNORE_INDEX at the end: position t learns token t+1, as the models' own losses."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def is_partitioned(weight) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its data lives sharded elsewhere and is gathered only inside module calls."""
    return hasattr(weight, "ds_id")
