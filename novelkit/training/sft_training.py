"""What the Full, LoRA and QLoRA fine-tuning recipes share: their flags, the data step, LoRA target choice, the
Trainer (with generation-based evaluation), resuming after a kill, and saving."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import IntervalStrategy

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from ..data.features import SFTCollator, encode_sft_dataset
from ..data.formats import Sample, load_samples
from ..data.packing import PackedCollator, pack_rows
from ..errors import ConfigError, DataError
from ..evaluation.generation_eval import GenerationEvalTrainer, GenerationEvaluator
from ..models.loading import write_base_fingerprint
from .best_checkpoint import BestCheckpointArguments, best_metric_name, keep_best_checkpoint, report_best
from .fast_training import prepare_fast_training
from .zero import check_saved_matches_live, join_cpu_processes, prepare_resume


@dataclass
class DataArguments(BestCheckpointArguments):
    model_path: str = field(default="", metadata={"help": "local base model folder; empty = the embedded default"})
    data: str = field(default="data_examples/sft/train.jsonl", metadata={"help": "training file (any format)"})
    dev: str = field(default="", metadata={"help": "dev file (same format) for evaluation; empty = none"})
    format: str = field(default="", metadata={"help": "data format; empty = detected from the fields"})
    template: str = field(default="", metadata={"help": "chat template; empty = the model's own"})
    max_length: int = field(default=512, metadata={"help": "tokens per sample, prompt + response"})
    eval_samples: int = field(default=16, metadata={"help": "dev samples generated for ROUGE at each evaluation; "
                                                            "0 = eval loss only"})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "token limit of those generations"})
    packing: str = field(default="auto", metadata={"help": "pack several samples into each row of max_length tokens "
                                                           "(attention stays within each sample): true, false, or "
                                                           "auto = on a GPU"})
    compile_layers: str = field(default="auto", metadata={"help": "torch.compile each decoder layer: true, false, "
                                                                  "or auto = on a GPU without DeepSpeed"})
    checkpoint_layers: int = field(default=-1, metadata={"help": "with --gradient_checkpointing, checkpoint only the "
                                                                 "first N decoder layers (-1: all)"})
    verify_save: bool = field(default=False, metadata={"help": "after saving, reload the saved model the ordinary "
                                                                "way and check its logits equal the trained model's"})


def _switch(value: str, auto: bool) -> bool:
    value = str(value).lower()
    if value not in ("auto", "true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"expected true, false or auto, got {value!r}")
    return auto if value == "auto" else value in ("true", "1", "yes")


@dataclass
class LoraArguments:
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = field(default="auto", metadata={"help": "'auto' (W_pack on Baichuan, q_proj,v_proj "
                                                                "elsewhere), 'all' (all linear layers), or a list"})


def parse_args(*groups, data=DataArguments):
    """(data, *groups, TrainingArguments) from the command line; unknown flags are an error."""
    parsed = HfArgumentParser((data, *groups, TrainingArguments)).parse_args_into_dataclasses()
    join_cpu_processes(parsed[-1])
    set_seed(parsed[-1].seed)  # before the model exists: LoRA's initial adapters come from this seed, as the rest
    return parsed


@dataclass
class SFTData:
    train: list[dict]  # encoded; packed rows (with position_ids) when packing is on
    dev: list[dict] | None  # encoded, for the eval loss
    dev_samples: list[Sample]  # as text, for generation
    packed: bool = False


def load_sft_data(tokenizer, template, args: DataArguments) -> SFTData:
    """Encode the training and dev files: prompt tokens masked (-100), responses and their end learned."""
    fmt = args.format or None
    train = load_samples(args.data, fmt)
    dev = load_samples(args.dev, fmt) if args.dev else []
    if dev and dev.format != train.format:
        raise DataError(args.dev, None, f"dev file is in format '{dev.format}' but the training file {args.data} is "
                                        f"in '{train.format}'; convert one so both are in the same format")
    rows = encode_sft_dataset(tokenizer, template, train, args.max_length, "training")
    packed = _switch(args.packing, auto=torch.cuda.is_available())
    if packed:
        count = len(rows)
        rows = pack_rows(rows, args.max_length)
        print(f"packing: {count} samples in {len(rows)} rows of up to {args.max_length} tokens", flush=True)
    return SFTData(train=rows,
                   dev=encode_sft_dataset(tokenizer, template, dev, args.max_length, "dev") if dev else None,
                   dev_samples=list(dev), packed=packed)


def lora_targets(spec: str, model) -> list[str] | str:
    """Module names to put adapters on: Baichuan's fused W_pack (q, k, v in one) or q_proj/v_proj by default."""
    if spec == "all":
        return "all-linear"
    if spec != "auto":
        return [m.strip() for m in spec.split(",") if m.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["W_pack"] if "W_pack" in names else ["q_proj", "v_proj"]


def make_trainer(model, tokenizer, template, targs: TrainingArguments, data: SFTData,
                 args: DataArguments) -> GenerationEvalTrainer:
    """A Trainer over the encoded data. At each evaluation it computes the dev loss (holding no logits) and, when
    eval_samples > 0, ROUGE of generated responses, all logged to TensorBoard."""
    if data.dev is None:
        targs.eval_strategy = IntervalStrategy.NO
    metric = best_metric_name(args.best_metric, ("loss", "rouge-1", "rouge-2", "rouge-l", "ner_f1"),
                              generation_eval=args.eval_samples > 0)
    callbacks = keep_best_checkpoint(targs, metric, args.patience, asked=args.best_metric != "auto")
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 shards the head: its loss keeps the plain path
        compile_auto = torch.cuda.is_available() and not targs.deepspeed
        prepare_fast_training(model, compile=_switch(args.compile_layers, auto=compile_auto),
                              checkpoint_layers=args.checkpoint_layers if targs.gradient_checkpointing else -1)
    collator = PackedCollator(tokenizer.pad_token_id, width=args.max_length,
                              rows=targs.per_device_train_batch_size) if data.packed \
        else SFTCollator(tokenizer.pad_token_id)
    evaluator = None
    if data.dev is not None and args.eval_samples > 0:
        evaluator = GenerationEvaluator(tokenizer, template, data.dev_samples, count=args.eval_samples,
                                        max_new_tokens=args.eval_max_new_tokens,
                                        batch_size=targs.per_device_eval_batch_size)
    return GenerationEvalTrainer(model=model, args=targs, train_dataset=data.train, eval_dataset=data.dev,
                                 data_collator=collator, processing_class=tokenizer,
                                 evaluator=evaluator, callbacks=callbacks)


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest checkpoint-N folder that was completely written (the Trainer writes trainer_state.json last, so a
    run killed while saving leaves a folder without it, which is skipped)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir())
    for _, path in reversed(found):
        if (path / "trainer_state.json").exists():
            return str(path)
        print(f"note: skipping {path}: incomplete (the run stopped while saving it)", file=sys.stderr)
    return None


def train_resuming(trainer, tag: str) -> None:
    """Train, continuing from the last complete checkpoint in output_dir when a previous run was interrupted (also
    on another number of GPUs under DeepSpeed); then say which step's model the Trainer kept as the best."""
    last = last_complete_checkpoint(trainer.args.output_dir)
    if last:
        print(f"[{tag}] resuming from {last}", flush=True)
        prepare_resume(trainer, last)
    trainer.train(resume_from_checkpoint=last)
    report_best(trainer, tag)


def save_trained(trainer, tokenizer, tag: str, verify: bool = False) -> None:
    """The model (a PEFT adapter, or all weights; under ZeRO-3 gathered from the partitions) with its tokenizer; an
    adapter also records the base it fits. `verify`: reload it and compare logits with the live model."""
    out = trainer.args.output_dir
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        if hasattr(trainer.model, "get_base_model"):
            write_base_fingerprint(out, trainer.model.get_base_model().config)
        print(f"[{tag}] saved to {out}", flush=True)
    if verify:
        check_saved_matches_live(trainer, out, tag)
