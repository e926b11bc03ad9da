"""QLoRA supervised fine-tuning: the base model frozen in 4-bit NF4 (bitsandbytes, double quantisation, bf16 compute),
LoRA adapters trained on top of it, paged AdamW on a GPU. Saves the adapter.

Flags: ours (novelkit.training.sft_training DataArguments, LoraArguments) plus every transformers TrainingArguments flag
(--learning_rate, --gradient_checkpointing, --deepspeed, --eval_steps …). Run through ds_finetune.sh, or directly:
    python Baichuan-Finetune-QLora/finetune.py --output_dir output/qlora --data data/csl/train.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.data.templates import default_template_name, get_template
from novelkit.errors import exit_on_error
from novelkit.models.loading import load_tokenizer, resolve_model_path
from novelkit.models.quantization import (choose_optimizer, load_4bit_model, prepare_4bit_for_training,
                                          require_bitsandbytes)
from novelkit.training.sft_training import (LoraArguments, load_sft_data, lora_targets, make_trainer, parse_args,
                                            save_trained, train_resuming)

import torch
from peft import LoraConfig, get_peft_model
from transformers.integrations import is_deepspeed_zero3_enabled


@exit_on_error
def main():
    args, lora_args, targs = parse_args(LoraArguments)
    model_path = resolve_model_path(args.model_path)
    require_bitsandbytes()  # say so now, not after a long load

    # 1. load the base with its linear layers quantised to NF4 while loading (lm_head and embeddings are not).
    #    On CPUs with AVX512-BF16 the 4-bit layers are kept in the layout gradients flow through: see
    #    novelkit/models/quantization.py for why an evaluation pass would otherwise silently stop the training.
    tokenizer = load_tokenizer(model_path)
    model = load_4bit_model(model_path, zero3=is_deepspeed_zero3_enabled())
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)
    print(f"[qlora] base {model_path} in NF4  template {template_name}", flush=True)

    # 2. format the data: prompt tokens masked, responses learned
    data = load_sft_data(tokenizer, template, args)

    # 3. wrap: freeze the 4-bit base in its compute dtype (with gradient checkpointing, gradients must still reach
    #    the checkpointed layers), then add the LoRA adapters
    prepare_4bit_for_training(model, gradient_checkpointing=targs.gradient_checkpointing)
    lora = LoraConfig(task_type="CAUSAL_LM", r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                      lora_dropout=lora_args.lora_dropout, target_modules=lora_targets(lora_args.lora_target, model))
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    print(f"[qlora] optimizer {choose_optimizer(targs, on_gpu=torch.cuda.is_available())}", flush=True)

    # 4. train, evaluating every eval_steps (dev loss + ROUGE of generated responses), resuming after a kill
    trainer = make_trainer(model, tokenizer, template, targs, data, args)
    train_resuming(trainer, "qlora")

    # 5. save the adapter (PEFT format) with the tokenizer and a record of the base it belongs to
    save_trained(trainer, tokenizer, "qlora", verify=args.verify_save)


if __name__ == "__main__":
    main()
