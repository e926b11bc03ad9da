"""Convert a Baichuan-7B or Baichuan2-7B folder (the RoPE models) into a standard LlamaForCausalLM folder.

    python -m novelkit.models.baichuan.convert_to_llama SRC DST [--dtype bfloat16]

What changes:
- `W_pack` is split into `q_proj`, `k_proj`, `v_proj` (its output rows 0..H-1, H..2H-1, 2H..3H-1). Baichuan's rotary
  layout is already Llama's (rotate-half, base 10000), so no permutation is needed.
- Baichuan 2's NormHead is folded in: lm_head rows are L2-normalised once, and a plain lm_head then gives the same
  logits. (z-loss, a training-only term, has no place in a Llama config and is dropped.)
- The per-layer `rotary_emb.inv_freq` buffers of Baichuan-7B checkpoints are dropped.
- Tokenizer: `tokenizer.model` and `special_tokens_map.json` are copied; `tokenizer_config.json` is written with
  `tokenizer_class: "BaichuanTokenizer"` and without `auto_map` (the remote tokenizer file is not copied). It is read by
  novelkit's BaichuanTokenizer, directly or through AutoTokenizer after `novelkit.models.baichuan.register()`. No Llama
  tokenizer config is written: transformers' LlamaTokenizer rebuilds its own normaliser and dummy-prefix rule from the
  SentencePiece file and tokenises Baichuan 1 text differently (NFKC, leading spaces).
- `generation_config.json` (chat models keep their user/assistant token ids there) is copied as is.

ALiBi models (Baichuan-13B, Baichuan2-13B) cannot be converted: Llama has no ALiBi.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ...errors import ModelError, exit_on_error
from . import is_baichuan_folder
from .configuration_baichuan import BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM

TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json")


def llama_config_from(config: BaichuanConfig, dtype: torch.dtype) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=getattr(config, "max_position_embeddings", None) or 4096,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
        dtype=dtype,  # RoPE left at Llama's default, base 10000, which is Baichuan's
    )


def llama_state_dict(model: BaichuanForCausalLM) -> dict[str, torch.Tensor]:
    """Baichuan weights under Llama's names: W_pack split, NormHead folded in."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("self_attn.W_pack.weight"):
            prefix = name.removesuffix("W_pack.weight")
            query, key, value = tensor.chunk(3, dim=0)
            state[prefix + "q_proj.weight"] = query.clone()
            state[prefix + "k_proj.weight"] = key.clone()
            state[prefix + "v_proj.weight"] = value.clone()
        elif name == "lm_head.weight" and model.config.use_norm_head:
            state[name] = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        else:
            state[name] = tensor
    return state


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config_file = src / "tokenizer_config.json"
    if config_file.is_file():
        tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        tokenizer_config.pop("auto_map", None)
        tokenizer_config["tokenizer_class"] = "BaichuanTokenizer"
        (dst / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def convert_to_llama(src, dst, dtype: torch.dtype | None = None) -> Path:
    """Write the Llama version of the Baichuan folder `src` to `dst`. `dtype`: output dtype (default: as stored)."""
    src, dst = Path(src), Path(dst)
    if not is_baichuan_folder(src):
        raise ModelError(f"{src}: not a Baichuan model folder (no config.json with model_type 'baichuan')")
    config = BaichuanConfig.from_pretrained(src)
    if config.use_alibi:
        raise ModelError(
            f"{src}: ALiBi model (Baichuan-13B / Baichuan2-13B kind); Llama has no ALiBi, so it cannot be converted. "
            "Only the RoPE models (Baichuan-7B, Baichuan2-7B) can."
        )
    model = BaichuanForCausalLM.from_pretrained(src, dtype=dtype if dtype is not None else "auto")
    state = llama_state_dict(model)

    # Build the Llama model without allocating memory, then take the converted tensors as its parameters.
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config_from(config, model.dtype))
    llama.load_state_dict(state, strict=True, assign=True)
    dst.mkdir(parents=True, exist_ok=True)
    llama.save_pretrained(dst)

    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    copy_tokenizer(src, dst)
    return dst


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@exit_on_error
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m novelkit.models.baichuan.convert_to_llama",
        description="Convert a Baichuan-7B / Baichuan2-7B folder into a LlamaForCausalLM folder.",
    )
    parser.add_argument("src", help="Baichuan model folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: as stored)")
    args = parser.parse_args(argv)
    dst = convert_to_llama(args.src, args.dst, DTYPES.get(args.dtype))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
