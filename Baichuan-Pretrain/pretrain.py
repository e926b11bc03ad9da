"""Domain pretraining on novels: continue a model (MODEL_PATH), or train a small one from scratch (MODEL_CONFIG) with a
SentencePiece tokenizer trained on the corpus.

Flags: our few below, plus every transformers TrainingArguments flag. Run through ds_finetune.sh, or directly:
    python Baichuan-Pretrain/pretrain.py --corpus data_examples/novels --output_dir output/pretrain --max_length 512
"""

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.errors import ConfigError, exit_on_error
from novelkit.training.best_checkpoint import (BestCheckpointArguments, best_metric_name, keep_best_checkpoint,
                                               report_best)
from novelkit.training.fast_training import prepare_fast_training
from novelkit.models.loading import load_model, load_tokenizer, max_positions, resolve_model_path
from novelkit.data.pretraining import (CleaningRules, build_token_cache, iter_corpus_books, load_patterns,
                                  train_eval_blocks)
from novelkit.training.zero import join_cpu_processes, prepare_resume

import torch
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint


@dataclass
class ScriptArguments(BestCheckpointArguments):
    corpus: str = field(default="data_examples/novels", metadata={"help": ".txt novels (file or folder) or JSONL"})
    model_path: str = field(default="", metadata={"help": "model to continue; empty with no model_config = default"})
    model_config: str = field(default="", metadata={"help": "JSON config to train from scratch (see configs/)"})
    tokenizer_path: str = field(default="", metadata={"help": "from scratch: an existing tokenizer folder"})
    vocab_size: int = field(default=8000, metadata={"help": "from scratch: SentencePiece vocabulary to train"})
    max_length: int = field(default=2048, metadata={"help": "tokens per training block"})
    eval_books: str = field(default="", metadata={"help": "comma-separated book names held out whole for eval"})
    eval_fraction: float = field(default=0.02, metadata={"help": "without eval_books: share of blocks held out"})
    clean_patterns: str = field(default="", metadata={"help": "file of extra boilerplate regexes, one per line"})
    min_book_chars: int = 200
    cache_dir: str = field(default="", metadata={"help": "token cache; default <output_dir>/../token_cache"})
    num_proc: int = field(default=0, metadata={"help": "tokenizer processes; 0 = one per core (max 8) for a "
                                                             "corpus over 32 MB, else 1"})


class PretrainTrainer(Trainer):
    """Adds eval perplexity (exp of the eval loss) to every evaluation."""

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if f"{prefix}_loss" in metrics:
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 50.0))
            self.log({f"{prefix}_perplexity": metrics[f"{prefix}_perplexity"]})
        return metrics


def argmax_logits(logits, labels):
    # keep only the predicted ids: the Trainer would otherwise gather [blocks, length, vocab] logits for the eval set
    return logits.argmax(dim=-1)


def token_accuracy(eval_pred):
    preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
    mask = labels != -100
    return {"token_accuracy": float((preds[mask] == labels[mask]).mean())}


def tokenizer_for_scratch(args, out_dir: Path) -> str:
    """The tokenizer folder for a from-scratch run: the given one, or a SentencePiece model trained on the corpus
    (saved once in <output_dir>/tokenizer and reused by reruns)."""
    if args.tokenizer_path:
        return args.tokenizer_path
    folder = out_dir / "tokenizer"
    if not (folder / "tokenizer.model").exists():
        from novelkit.models.default_model import train_tokenizer

        print(f"[pretrain] training a {args.vocab_size}-piece SentencePiece tokenizer on {args.corpus}", flush=True)
        lines = (line.strip() for book in iter_corpus_books(args.corpus) for line in book.text.split("\n"))
        train_tokenizer((line for line in lines if line), folder, vocab_size=args.vocab_size)
    return str(folder)


@exit_on_error
def main():
    args, targs = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    join_cpu_processes(targs)  # DeepSpeed over several CPU processes (torchrun): let it see them all
    out_dir = Path(targs.output_dir)

    # 1. the tokenizer and the model: continued (model_path / the embedded default) or from scratch (model_config)
    if args.model_config:
        tokenizer_dir = tokenizer_for_scratch(args, out_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        config = json.loads(Path(args.model_config).read_text())
        config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config = AutoConfig.for_model(**config)
        torch.manual_seed(targs.seed)
        model = AutoModelForCausalLM.from_config(config)
        print(f"[pretrain] from scratch: {args.model_config}, {model.num_parameters() / 1e6:.1f}M parameters")
    else:
        tokenizer_dir = resolve_model_path(args.model_path)
        tokenizer = load_tokenizer(tokenizer_dir)
        model = load_model(tokenizer_dir, device="cpu", dtype="bf16" if targs.bf16 else "fp32")
        print(f"[pretrain] continuing {tokenizer_dir}, {model.num_parameters() / 1e6:.1f}M parameters")
    if args.max_length > max_positions(model.config):
        raise ConfigError(f"MAX_LENGTH={args.max_length} is more than the model's {max_positions(model.config)} "
                          f"positions; lower MAX_LENGTH")

    # 2. the corpus: cleaned, split by whole books, tokenised once into a memory-mapped cache, packed into blocks
    eval_books = [b.strip() for b in args.eval_books.split(",") if b.strip()]
    rules = CleaningRules(patterns=load_patterns(args.clean_patterns), min_book_chars=args.min_book_chars)
    cache = build_token_cache(args.corpus, tokenizer_dir, args.cache_dir or out_dir.parent / "token_cache", rules,
                              eval_books, num_proc=args.num_proc or None, load_tokenizer=load_tokenizer)
    train, dev = train_eval_blocks(cache, args.max_length, 0.0 if eval_books else args.eval_fraction)
    print(f"[pretrain] {len(train)} training blocks, {len(dev) if dev else 0} eval blocks of {args.max_length} tokens")
    if dev is None:
        targs.eval_strategy = IntervalStrategy.NO
    callbacks = keep_best_checkpoint(targs, best_metric_name(args.best_metric, ("loss",)), args.patience,
                                     asked=args.best_metric != "auto")

    # 3. train, resuming from the last checkpoint (same data order: the Trainer replays the sampler's seed); on a GPU
    #    with the fast path: loss without whole logits, compiled decoder layers (novelkit/training/fast_training.py)
    if targs.gradient_checkpointing:
        model.config.use_cache = False
    if not is_deepspeed_zero3_enabled():
        prepare_fast_training(model, compile=False if targs.deepspeed else None, tag="pretrain")
    trainer = PretrainTrainer(model=model, args=targs, train_dataset=train, eval_dataset=dev,
                              processing_class=tokenizer, compute_metrics=token_accuracy,
                              preprocess_logits_for_metrics=argmax_logits, callbacks=callbacks)
    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if last:
        print(f"[pretrain] resuming from {last}", flush=True)
        prepare_resume(trainer, last)  # a DeepSpeed checkpoint from another number of GPUs: its universal form
    trainer.train(resume_from_checkpoint=last)
    report_best(trainer, "pretrain")  # the best held-out loss's model is the one saved below

    # 4. save a plain model folder (from_pretrained loads it) with its tokenizer
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out_dir))
        print(f"[pretrain] model saved to {out_dir}", flush=True)


if __name__ == "__main__":
    main()
