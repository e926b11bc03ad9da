"""Tiny Baichuan models for tests, with weights drawn like the reference fixtures'."""

import torch
from torch import nn

from novelkit.models.baichuan import BaichuanForCausalLM, tiny_config
from novelkit.models.baichuan.modeling_baichuan import BaichuanRMSNorm


def random_model(variant, seed=0, **overrides):
    """Tiny model of `variant` with weights drawn like the fixtures' (std 0.15), so positions and heads matter.
    Returned in eval mode; training tests switch it with .train() or through the Trainer."""
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(tiny_config(variant, **overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaichuanRMSNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(0.15 * torch.randn(module.weight.shape, generator=generator))
    return model.eval()
