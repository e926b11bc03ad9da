"""LoRA supervised fine-tuning: load a base model, format the data with a chat template, train an adapter, save it.

Flags: ours (novelkit.training.sft_training DataArguments, LoraArguments) plus every transformers TrainingArguments flag
(--learning_rate, --num_train_epochs, --per_device_train_batch_size, --deepspeed, --bf16, --eval_steps …). Run
through ds_finetune.sh, or directly:
    python Baichuan-Finetune-Lora/finetune.py --output_dir output/lora --data data_examples/sft/train.jsonl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.data.templates import default_template_name, get_template
from novelkit.errors import exit_on_error
from novelkit.models.loading import load_model, load_tokenizer, resolve_model_path
from novelkit.training.sft_training import (LoraArguments, load_sft_data, lora_targets, make_trainer, parse_args,
                                            save_trained, train_resuming)

from peft import LoraConfig, get_peft_model


@exit_on_error
def main():
    args, lora_args, targs = parse_args(LoraArguments)
    model_path = resolve_model_path(args.model_path)

    # 1. load the base model and its tokenizer
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype="bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32",
                       device="cpu")  # the Trainer moves it to the GPU(s)
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)
    print(f"[lora] base {model_path}  template {template_name}", flush=True)

    # 2. format the data: prompt tokens masked, responses learned
    data = load_sft_data(tokenizer, template, args)

    # 3. wrap the model with LoRA
    if targs.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings must still pass gradients to checkpointed layers
    lora = LoraConfig(task_type="CAUSAL_LM", r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                      lora_dropout=lora_args.lora_dropout, target_modules=lora_targets(lora_args.lora_target, model))
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    # 4. train, evaluating every eval_steps (dev loss + ROUGE of generated responses), resuming after a kill
    trainer = make_trainer(model, tokenizer, template, targs, data, args)
    train_resuming(trainer, "lora")

    # 5. save the adapter (PEFT format) with the tokenizer and a record of the base it belongs to
    save_trained(trainer, tokenizer, "lora", verify=args.verify_save)


if __name__ == "__main__":
    main()
