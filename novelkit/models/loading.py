"""Loading models, tokenizers and PEFT adapters from local folders, with errors that say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError

FINGERPRINT_FILE = "novelkit_base.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
FINGERPRINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads")


def resolve_model_path(path: str | None) -> str:
    """A model folder to load: the given one, checked, or the embedded default when none is given."""
    if not path:
        from .default_model import ensure_default_model

        return str(ensure_default_model())
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"model folder not found: {path} (give a local folder; nothing is downloaded)")
    if not folder.is_dir():
        raise ModelError(f"{path} is a file, not a model folder")
    if not (folder / "config.json").exists():
        hint = " (it looks like a PEFT adapter: pass it as the adapter)" if (folder / "adapter_config.json").exists() else ""
        raise ModelError(f"{path} is not a model folder: it has no config.json{hint}")
    return str(folder)


def _tokenizer_config(path: str) -> dict:
    f = Path(path) / "tokenizer_config.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def load_tokenizer(path: str | None):
    """The folder's tokenizer; Baichuan's SentencePiece tokenizer is ours (no remote code). A pad token is always set
    (unk, else eos) because batching needs one."""
    from transformers import AutoTokenizer

    from .baichuan.tokenization_baichuan import BaichuanTokenizer

    if not path:
        path = resolve_model_path(path)
    elif not Path(path).is_dir():
        raise ModelError(f"tokenizer folder not found: {path}")
    if not any(Path(path, f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)} missing)")
    if _tokenizer_config(path).get("tokenizer_class") == "BaichuanTokenizer":
        tokenizer = BaichuanTokenizer.from_pretrained(path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load a tokenizer: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, else fp32 (CPU half precision is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def max_positions(config) -> int:
    """Longest sequence the model was built for (ALiBi Baichuan configs carry model_max_length instead)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "model_max_length", None) or 2048


def base_fingerprint(config) -> dict:
    return {k: getattr(config, k, None) for k in FINGERPRINT_FIELDS}


def write_base_fingerprint(adapter_dir: str, config) -> None:
    """Recorded next to a saved adapter so that loading it on another base fails with a clear message."""
    Path(adapter_dir, FINGERPRINT_FILE).write_text(json.dumps(base_fingerprint(config), indent=2) + "\n")


def check_adapter(adapter_dir: str, config) -> None:
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir} is not a PEFT adapter folder: it has no adapter_config.json")
    f = folder / FINGERPRINT_FILE
    if f.exists():
        made_for = json.loads(f.read_text())
        ours = base_fingerprint(config)
        diff = [f"{k} {made_for[k]} vs {ours.get(k)}" for k in made_for if made_for[k] != ours.get(k)]
        if diff:
            raise ModelError(f"adapter {adapter_dir} was made for another base model ({'; '.join(diff)})")


def load_model(path: str | None, *, dtype="auto", device: str | None = None, device_map=None, adapter: str | None = None,
               trainable_adapter: bool = False, **kwargs):
    """A causal LM from a local folder (the embedded default when `path` is empty), optionally with a PEFT adapter.

    `device_map` (e.g. "auto") is passed to from_pretrained for multi-GPU or offloaded loading; otherwise the model
    is moved to `device` (default: cuda when available)."""
    from transformers import AutoModelForCausalLM

    from .baichuan import register

    register()  # Baichuan folders load through our own classes, never their remote code
    path = resolve_model_path(path)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot load the model: {e}") from e
    if device_map is None and "quantization_config" not in kwargs:
        model.to(device)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    return model


def adapter_base_path(adapter_dir: str) -> str:
    """The base model folder an adapter was trained on, when PEFT recorded a local one that still exists."""
    cfg = Path(adapter_dir, "adapter_config.json")
    base = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.exists() else None
    return base if base and Path(base).is_dir() else ""


def attach_adapter(model, adapter_dir: str, trainable: bool = False):
    from peft import PeftModel

    check_adapter(adapter_dir, model.config)
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (RuntimeError, ValueError) as e:
        # an adapter of another base without our fingerprint: size mismatches, or target modules this base lacks
        raise ModelError(f"adapter {adapter_dir} does not fit this base model: {str(e).splitlines()[0]}") from e
