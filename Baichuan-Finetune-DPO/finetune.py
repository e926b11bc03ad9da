"""Preference tuning (DPO, or SimPO without a reference) on top of an SFT model or LoRA adapter: load, format the
pairs with the model's chat template, compute the starting model's log-probs, train, save.

Flags: ours (novelkit.training.preference.PreferenceArguments, LoraArguments) plus every transformers
TrainingArguments flag. Run through ds_finetune.sh, or directly:
    python Baichuan-Finetune-DPO/finetune.py --output_dir output/dpo --data data_examples/preference/train.jsonl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.training.preference_data import load_preference_pairs
from novelkit.data.templates import default_template_name, get_template
from novelkit.errors import exit_on_error
from novelkit.models.loading import attach_adapter, load_model, load_tokenizer, resolve_model_path
from novelkit.models.quantization import load_4bit_model, prepare_4bit_for_training, require_bitsandbytes
from novelkit.training.best_checkpoint import best_metric_name, keep_best_checkpoint
from novelkit.training.preference import (PreferenceArguments, PreferenceCollator, PreferenceTrainer,
                                          attach_reference_logps, encode_pairs)
from novelkit.training.sft_training import LoraArguments, lora_targets, parse_args, save_trained, train_resuming

from peft import LoraConfig, get_peft_model
from transformers.trainer_utils import IntervalStrategy


@exit_on_error
def main():
    args, lora_args, targs = parse_args(LoraArguments, data=PreferenceArguments)
    args.check()
    model_path = resolve_model_path(args.model_path)

    # 1. load the starting model (the SFT model, or the base of the SFT adapter) and its tokenizer
    tokenizer = load_tokenizer(model_path)
    if args.finetuning == "qlora":
        require_bitsandbytes()
        model = load_4bit_model(model_path)
        prepare_4bit_for_training(model, gradient_checkpointing=targs.gradient_checkpointing)
    else:
        model = load_model(model_path, dtype="bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32",
                           device="cpu")  # the Trainer moves it to the GPU(s)
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)
    print(f"[dpo] {args.loss} ({args.finetuning}{' in NF4' if args.finetuning == 'qlora' else ''}) on {model_path}{' + ' + args.adapter if args.adapter else ''}  "
          f"template {template_name}", flush=True)

    # 2. format the pairs: the same prompt with the chosen and with the rejected response
    train = encode_pairs(tokenizer, template, load_preference_pairs(args.data, args.by), args.max_length, "training")
    dev = encode_pairs(tokenizer, template, load_preference_pairs(args.dev, args.by), args.max_length, "dev") \
        if args.dev else None
    print(f"[dpo] {len(train)} training pairs, {len(dev) if dev else 0} dev pairs", flush=True)

    # 3. what trains: the SFT adapter continued, a new adapter, or every weight
    if args.finetuning != "full":
        if targs.gradient_checkpointing and args.finetuning == "lora":
            model.enable_input_require_grads()  # frozen embeddings must still pass gradients to checkpointed layers
        if args.adapter:
            model = attach_adapter(model, args.adapter, trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                task_type="CAUSAL_LM", r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha,
                lora_dropout=lora_args.lora_dropout, target_modules=lora_targets(lora_args.lora_target, model)))
        model.print_trainable_parameters()

    # 4. the reference: the starting model's log-probs of every response, once (DPO); then train, keeping the
    #    checkpoint with the lowest dev loss, resuming after a kill
    if dev is None:
        targs.eval_strategy = IntervalStrategy.NO
    callbacks = keep_best_checkpoint(targs, best_metric_name(args.best_metric, ("loss",)), args.patience,
                                     asked=args.best_metric != "auto")
    trainer = PreferenceTrainer(model=model, args=targs, train_dataset=train, eval_dataset=dev,
                                data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                                callbacks=callbacks, loss=args.loss, beta=args.beta, gamma=args.simpo_gamma)
    if args.loss == "dpo":
        attach_reference_logps(trainer, {"train": train, "dev": dev or []})
    train_resuming(trainer, "dpo")

    # 5. save the adapter (or the whole model) with the tokenizer
    save_trained(trainer, tokenizer, "dpo", verify=args.verify_save)


if __name__ == "__main__":
    main()
