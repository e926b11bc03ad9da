"""Merge a LoRA adapter into its base model and save a plain transformers folder (no PEFT needed to load it).

    python Baichuan-Finetune-Lora/merge_lora.py --lora_model output/lora --output_dir output/lora-merged
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.errors import exit_on_error
from novelkit.models.loading import adapter_base_path, load_model, load_tokenizer


@exit_on_error
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="base model folder; empty = the adapter's recorded base")
    p.add_argument("--lora_model", required=True, help="PEFT adapter folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", default="fp32", help="dtype the merged weights are saved in (fp32, bf16, fp16)")
    args = p.parse_args()

    model_path = args.model_path or adapter_base_path(args.lora_model)
    model = load_model(model_path, dtype=args.dtype, device="cpu", adapter=args.lora_model)
    merged = model.merge_and_unload()  # W + (alpha/r)·B·A folded into each target weight
    merged.save_pretrained(args.output_dir)
    load_tokenizer(model_path).save_pretrained(args.output_dir)
    print(f"merged model saved to {args.output_dir}")


if __name__ == "__main__":
    main()
