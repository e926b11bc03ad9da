"""LoRA supervised fine-tuning: load a base model, format the data with a chat template, train an adapter, save it.

Flags: our few below, plus every transformers TrainingArguments flag (--learning_rate, --num_train_epochs,
--per_device_train_batch_size, --deepspeed, --bf16 …). Run through ds_finetune.sh, or directly:
    python Baichuan-Finetune-Lora/finetune.py --output_dir output/lora --data data_examples/sft/train.jsonl
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from novelkit.errors import exit_on_error
from novelkit.features import SFTCollator, encode_sft_dataset
from novelkit.formats import load_samples
from novelkit.loading import load_model, load_tokenizer, resolve_model_path, write_base_fingerprint
from novelkit.templates import default_template_name, get_template


@dataclass
class ScriptArguments:
    model_path: str = field(default="", metadata={"help": "local base model folder; empty = the embedded default"})
    data: str = field(default="data_examples/sft/train.jsonl", metadata={"help": "training file (any format)"})
    dev: str = field(default="", metadata={"help": "dev file for eval loss; empty = none"})
    format: str = field(default="", metadata={"help": "data format; empty = detected from the fields"})
    template: str = field(default="", metadata={"help": "chat template; empty = the model's own"})
    max_length: int = field(default=512, metadata={"help": "tokens per sample, prompt + response"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = field(default="auto", metadata={"help": "'auto' (W_pack on Baichuan, q_proj,v_proj "
                                                                "elsewhere), 'all' (all linear layers), or a list"})


def lora_targets(spec: str, model) -> list[str] | str:
    if spec == "all":
        return "all-linear"
    if spec != "auto":
        return [m.strip() for m in spec.split(",") if m.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["W_pack"] if "W_pack" in names else ["q_proj", "v_proj"]


@exit_on_error
def main():
    args, targs = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    model_path = resolve_model_path(args.model_path)

    # 1. load the base model and its tokenizer
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype="bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32",
                       device="cpu")  # the Trainer moves it to the GPU(s)
    template_name = args.template or default_template_name(tokenizer, model.config)
    template = get_template(template_name)
    print(f"[lora] base {model_path}  template {template_name}", flush=True)

    # 2. format the data: prompt tokens masked, responses learned
    train = encode_sft_dataset(tokenizer, template, load_samples(args.data, args.format or None), args.max_length)
    dev = encode_sft_dataset(tokenizer, template, load_samples(args.dev, args.format or None),
                             args.max_length) if args.dev else None
    if dev is None:
        targs.eval_strategy = "no"

    # 3. wrap the model with LoRA
    if targs.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings must still pass gradients to checkpointed layers
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=lora_targets(args.lora_target, model))
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    # 4. train, resuming from the last checkpoint in output_dir if a previous run was interrupted
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=dev,
                      data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    last = get_last_checkpoint(targs.output_dir) if Path(targs.output_dir).is_dir() else None
    if last:
        print(f"[lora] resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)

    # 5. save the adapter (PEFT format) with the tokenizer and a record of the base it belongs to
    trainer.save_model(targs.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(targs.output_dir)
        write_base_fingerprint(targs.output_dir, model.get_base_model().config)
        print(f"[lora] adapter saved to {targs.output_dir}", flush=True)


if __name__ == "__main__":
    main()
