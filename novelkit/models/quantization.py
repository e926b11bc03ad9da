"""QLoRA pieces: bitsandbytes NF4 loading, and keeping 4-bit layers trainable on CPUs with AVX512-BF16.

Why `keep_4bit_layers_trainable` exists (seen in bitsandbytes 0.50, CPU only): `Linear4bit.forward` repacks its weight
into an AVX512-BF16 inference layout the first time it runs in eval mode on an input that needs no gradient (an eval
loss pass or `generate`), when `support_avx512bf16_for_cpu` is set, which it is on such CPUs. The repacking is
permanent: it rewrites `weight.data` and marks the quant state `packing_format_for_cpu`. From then on `matmul_4bit`
routes every call, also in training, to the `gemv_4bit` kernel, which has no autograd formula: no gradient flows
back through a 4-bit layer to its input. An adapter whose output reaches the loss only through 4-bit layers (on
q/v/W_pack always: attention output passes through o_proj) gets no gradient at all, so training goes on, the loss is
computed, and the adapter silently stops changing. (The repacking also fails outright on layers whose input size is
not a multiple of the 64-value quantisation block.) Clearing the flag keeps the training layout; inference then uses the
ordinary dequantise-and-matmul path, which is exact and differentiable.
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError


def require_bitsandbytes():
    """The bitsandbytes module, or a ConfigError that says how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:  # also raised for a broken install (missing native library)
        raise ConfigError(f"QLoRA needs bitsandbytes, which cannot be imported ({e}); install it with "
                          "pip install 'bitsandbytes>=0.50,<0.51', or train with LoRA instead") from e
    return bitsandbytes


def compute_dtype(device: str) -> torch.dtype:
    """bf16 where it is supported (any CPU, Ampere and later GPUs), else fp16."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def nf4_config(dtype: torch.dtype, storage: torch.dtype | None = None):
    """NF4 with double quantisation (the quantisation constants quantised too), computing in `dtype`.

    `storage` is the dtype the packed 4-bit weights are stored in: DeepSpeed ZeRO-3 and FSDP shard them like any
    parameter and need it to match the model's dtype."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage or torch.uint8)


def this_process_device() -> str:
    """This process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def load_4bit_model(path: str | None, *, device: str | None = None, adapter: str | None = None,
                    trainable_adapter: bool = False, zero3: bool = False):
    """A causal LM with its linear layers quantised to NF4 while loading (lm_head and embeddings are not),
    optionally with an adapter, for training or inference on CPU or GPU.

    Under DeepSpeed ZeRO-3 the packed weights are stored in the compute dtype and DeepSpeed places and shards them
    (no device_map); otherwise the model is placed on `device` (default: this process's GPU, else the CPU)."""
    from .loading import load_model

    device = device or this_process_device()
    dtype = compute_dtype(device)
    quantization = nf4_config(dtype, storage=dtype if zero3 else None)
    model = load_model(path, dtype=dtype if device.startswith("cuda") else torch.float32, device=device,
                       device_map=None if zero3 else {"": device}, adapter=adapter,
                       trainable_adapter=trainable_adapter, quantization_config=quantization)
    keep_4bit_layers_trainable(model)
    return model


def prepare_4bit_for_training(model, gradient_checkpointing: bool) -> None:
    """Freeze the 4-bit base for LoRA, leaving every other weight in the compute dtype.

    PEFT's prepare_model_for_kbit_training casts all non-quantised weights to float32: the embeddings and lm_head
    (4.1 GB instead of 2.1 GB at Baichuan 2's 125,696-entry vocabulary, alone breaking an 8 GB budget for 7B) and the
    norms, whose float32 outputs then carry the whole residual stream in float32 (twice the activation memory). None
    of them is trained under LoRA, so their precision stays as loaded. With gradient checkpointing the frozen
    embeddings must still pass gradients on to the checkpointed layers."""
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout (see the module docstring).
    Returns the number of 4-bit layers."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_repacked_for_cpu(model) -> bool:
    """True when some 4-bit layer has been repacked into the CPU inference layout (no gradients through it)."""
    import bitsandbytes as bnb

    return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state is not None)


def choose_optimizer(targs, on_gpu: bool) -> str:
    """Paged AdamW on a GPU (optimizer states page out to CPU memory instead of failing on a memory spike); plain
    AdamW on the CPU, where bitsandbytes' paged optimizers do not run. An --optim given on the command line wins."""
    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    if targs.optim == TrainingArguments.__dataclass_fields__["optim"].default:
        targs.optim = OptimizerNames("paged_adamw_32bit" if on_gpu else "adamw_torch")
    return OptimizerNames(targs.optim).value
