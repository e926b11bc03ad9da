"""Baichuan 1 and 2 without remote code: config, model, tokenizer, loading helpers.

    from novelkit.models.baichuan import load_baichuan, BaichuanTokenizer
    model = load_baichuan("path/to/Baichuan2-7B-Chat", dtype=torch.bfloat16, device_map="auto")
    tokenizer = BaichuanTokenizer.from_pretrained("path/to/Baichuan2-7B-Chat")

After `register()`, `AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(folder)` also work on
real Baichuan folders: their `auto_map` is then served by these local classes and the folder's code is never run
(with `trust_remote_code` unset or even True).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ...errors import ModelError
from .configuration_baichuan import VARIANTS, BaichuanConfig, tiny_config
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel
from .tokenization_baichuan import BaichuanTokenizer

__all__ = [
    "VARIANTS",
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanTokenizer",
    "is_baichuan_folder",
    "load_baichuan",
    "register",
    "tiny_config",
]


def register() -> None:
    """Register the Baichuan classes with the transformers Auto classes. Safe to call any number of times."""
    AutoConfig.register(BaichuanConfig.model_type, BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    # Second positional argument: the tokenizer class in transformers 5 (the slow tokenizer class in 4.x).
    AutoTokenizer.register(BaichuanConfig, BaichuanTokenizer, exist_ok=True)


def is_baichuan_folder(path) -> bool:
    """True when `path` is a folder whose config.json is a Baichuan one (model_type "baichuan")."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == BaichuanConfig.model_type


def load_baichuan(folder, **kwargs) -> BaichuanForCausalLM:
    """Load a Baichuan checkpoint folder (original or saved by us) as a BaichuanForCausalLM.

    `kwargs` go to `from_pretrained` (dtype, device_map, quantization_config, ...). The folder's remote code is never
    used, so `trust_remote_code` is dropped.
    """
    if not is_baichuan_folder(folder):
        raise ModelError(f"{folder}: not a Baichuan model folder (no config.json with model_type 'baichuan')")
    register()
    kwargs.pop("trust_remote_code", None)
    return BaichuanForCausalLM.from_pretrained(folder, **kwargs)
