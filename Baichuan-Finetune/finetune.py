"""Full-parameter supervised fine-tuning: load a model, format the data with a chat template, train every weight, save.

Flags: ours (novelkit.training.sft_training.DataArguments) plus every transformers TrainingArguments flag
(--learning_rate, --bf16, --gradient_checkpointing, --deepspeed, --eval_steps …). Run through ds_finetune.sh, or directly:
    python Baichuan-Finetune/finetune.py --output_dir output/full --data data/csl/train.json --dev data/csl/dev.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.data.templates import default_template_name, get_template
from novelkit.errors import exit_on_error
from novelkit.models.loading import load_model, load_tokenizer, resolve_model_path
from novelkit.training.sft_training import load_sft_data, make_trainer, parse_args, save_trained, train_resuming


@exit_on_error
def main():
    args, targs = parse_args()
    model_path = resolve_model_path(args.model_path)

    # 1. load the model and its tokenizer. Without DeepSpeed the weights stay fp32 and --bf16 autocasts, so AdamW
    #    updates fp32 weights; DeepSpeed keeps its own fp32 master copy, so there the model loads in bf16/fp16.
    tokenizer = load_tokenizer(model_path)
    half = "bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32"
    model = load_model(model_path, dtype=half if targs.deepspeed else "fp32", device="cpu")  # the Trainer places it
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)
    print(f"[full] model {model_path}  template {template_name}", flush=True)

    # 2. format the data: prompt tokens masked, responses learned
    data = load_sft_data(tokenizer, template, args)

    # 3. nothing to wrap: every weight trains (--gradient_checkpointing trades recomputation for activation memory)
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves p empty: ds_numel
    print(f"[full] {count / 1e6:.1f}M trainable parameters", flush=True)

    # 4. train, evaluating every eval_steps (dev loss + ROUGE of generated responses), resuming after a kill
    trainer = make_trainer(model, tokenizer, template, targs, data, args)
    train_resuming(trainer, "full")

    # 5. save the weights (a plain transformers folder) with the tokenizer
    save_trained(trainer, tokenizer, "full", verify=args.verify_save)


if __name__ == "__main__":
    main()
