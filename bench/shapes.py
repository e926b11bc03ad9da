"""Random-initialised models of real shapes for the GPU benchmarks (no weights can be downloaded).

    build_model("baichuan2-7b", device="cuda", dtype=torch.bfloat16)        # BaichuanForCausalLM, 7.5 B parameters
    build_model("qwen2-1.5b", device="cuda", num_hidden_layers=4)           # any config field can be overridden
    python bench/shapes.py baichuan2-7b /tmp/b7 [--layers N]                # a from_pretrained folder (+ tokenizer)

Weights are drawn on the target device, so a 7B model is ready in seconds. The Baichuan 2 shapes are the published
configs (Baichuan-Analysis/configs); Baichuan-7B, Qwen2-1.5B, Qwen3-1.7B / 8B and Llama 3 8B are written out below
from their published config.json files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643, "initializer_range": 0.02,
    "use_sliding_window": False,
}
# Baichuan-7B (Baichuan 1: RoPE, plain lm_head, 64k vocabulary) from its published config.json
BAICHUAN_7B = {
    "architectures": ["BaiChuanForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 4096, "vocab_size": 64000,
    "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
# Llama 3 8B (GQA, 128k vocabulary, rope_theta 500000) from its published config.json
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02,
}
# Qwen3 dense (per-head q/k RMSNorm, head_dim 128, no qkv bias) from the published config.json files of Qwen3-1.7B
# and Qwen3-8B
QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645,
    "attention_bias": False, "initializer_range": 0.02, "use_sliding_window": False,
}
QWEN3_8B = {**QWEN3_1_7B, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "tie_word_embeddings": False}
# Baichuan2-7B's sizes (Baichuan-Analysis/configs/baichuan2-7b.json) on a Llama model: for comparisons with
# libraries that patch transformers' own classes (Liger-Kernel), which our Baichuan class is not
LLAMA_BAICHUAN2_7B = {**LLAMA3_8B, "hidden_size": 4096, "intermediate_size": 11008, "num_key_value_heads": 32,
                      "vocab_size": 125696, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                      "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# --tiny: the same kind of model, small enough for a CPU dry run of the GPU suite (the vocabulary stays: tokenizers)
TINY = {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4}
SHAPES = ("baichuan-7b", "baichuan2-7b", "baichuan2-13b", "qwen2-1.5b", "qwen3-1.7b", "qwen3-8b", "llama3-8b",
          "llama-baichuan2-7b")


def model_config(shape: str, **overrides):
    if shape == "qwen2-1.5b":
        from transformers import Qwen2Config

        return Qwen2Config(**{**QWEN2_1_5B, **overrides})
    if shape in ("qwen3-1.7b", "qwen3-8b"):
        from transformers import Qwen3Config

        return Qwen3Config(**{**(QWEN3_1_7B if shape == "qwen3-1.7b" else QWEN3_8B), **overrides})
    if shape in ("llama3-8b", "llama-baichuan2-7b"):
        from transformers import LlamaConfig

        return LlamaConfig(**{**(LLAMA3_8B if shape == "llama3-8b" else LLAMA_BAICHUAN2_7B), **overrides})
    if shape == "baichuan-7b":
        from novelkit.models.baichuan import BaichuanConfig

        return BaichuanConfig(**{**BAICHUAN_7B, **overrides})
    if shape in ("baichuan2-7b", "baichuan2-13b"):
        from novelkit.models.baichuan import BaichuanConfig

        fields = json.loads((ROOT / "Baichuan-Analysis" / "configs" / f"{shape}.json").read_text())
        return BaichuanConfig(**{**fields, **overrides})
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def build_model(shape: str, device="cuda", dtype=torch.bfloat16, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `shape` (initializer_range normal weights), in eval mode."""
    from transformers import AutoModelForCausalLM

    from novelkit.models.baichuan import BaichuanForCausalLM, register

    register()
    config = model_config(shape, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if config.model_type == "baichuan":
                model = BaichuanForCausalLM(config)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=0, help="num_hidden_layers (0: the shape's own)")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder copied beside the weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="hidden size 64 (vocabulary kept): CPU dry runs")
    parser.add_argument("--vocab_size", type=int, default=0, help="0: the shape's own; the tokenizer's size when "
                                                                   "another model's tokenizer stands in for its own")
    args = parser.parse_args()
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    if args.tiny:
        overrides.update(TINY)
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if args.tiny and args.shape in ("qwen2-1.5b", "llama3-8b", "llama-baichuan2-7b"):
        overrides["num_key_value_heads"] = 2
    model = build_model(args.shape, device=args.device, **overrides)
    model.save_pretrained(args.out)
    if args.tokenizer:
        for f in Path(args.tokenizer).iterdir():
            if f.is_file():
                shutil.copy(f, Path(args.out) / f.name)
    print(f"{args.shape}: {parameter_count(model) / 1e9:.2f} B parameters saved to {args.out}")


if __name__ == "__main__":
    main()
