"""The LoRA recipe end to end on a real length mix: our fast path on (the default), off, and HF padding-free + Liger.

    python bench/recipe_throughput.py --assets .gpu --out $OUT   # the GPU machine (bench/gpu_carry.sh recipes scratch)
    python bench/recipe_throughput.py --assets ../shared --tiny --samples 60   # a CPU check of the plumbing

Model: a Llama with Baichuan2-7B's sizes (bench/shapes.py llama-baichuan2-7b; Liger patches Llama, not our Baichuan
class), --layers of its 32 layers, random weights, the real Baichuan 2 tokenizer. Data: --samples records, a third
each of CSL abstract → title (prepare_data.py csl), LCSTS text → title and novel passages of ~800 characters
(prepare_data.py novel), shuffled; MAX_LENGTH 2048, one epoch, LoRA r=8 on q_proj,v_proj (the recipe's default),
no evaluation, bf16. Each run is its own process:
- ours:     bash Baichuan-Finetune-Lora/ds_finetune.sh as the README runs it (packing, compiled layers, the loss
            through Liger's kernel), BATCH=4 rows of 2048 tokens; ours-warm: the same again (a user's second run:
            the compiled layers come from the compile cache);
- off:      the same script with --packing false --compile_layers false: BATCH=4 samples padded to the longest;
- hf-liger: transformers' Trainer as other tools set it up for speed: use_liger_kernel, padding-free batches
            (DataCollatorWithFlattening), the same encoded samples and LoRA, --hf_batch samples per step.
Reported per run: samples/s over the Trainer's train_runtime, and over the wall time from the launch to the exit
(loading, encoding, compilation and saving included), the first logged loss and the train loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def make_data(assets: Path, work: Path, samples: int) -> Path:
    """A shuffled JSONL of the three kinds of records, a third each."""
    per = samples // 3
    for task, raw in (("csl", assets / "data" / "csl" / "clge_val.tsv"), ("novel", assets / "data" / "novels")):
        subprocess.run([PY, "Baichuan-Finetune/prepare_data.py", task, "--raw", str(raw), "--output_dir",
                        str(work / task), "--dev", "0", "--test", "0", "--max_train", str(per)], check=True, cwd=ROOT)
    records = []
    for task in ("csl", "novel"):
        with open(work / task / "train.json", encoding="utf-8") as f:
            records += [json.loads(line) for line in f][:per]
    lcsts = (assets / "data" / "lcsts" / "val.tsv").read_text(encoding="utf-8").splitlines()[:per]
    for line in lcsts:
        title, text = line.split("\t")[:2]
        records.append({"instruction": "为下面这段新闻写一个标题。", "input": text, "output": title})
    random.Random(0).shuffle(records)
    path = work / "mix.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_hf_liger(args) -> None:
    """The peer: transformers' Trainer with Liger-Kernel and padding-free batches (runs in its own process)."""
    sys.path.insert(0, str(ROOT))
    from novelkit.data.templates import get_template
    from novelkit.models.loading import load_model, load_tokenizer
    from novelkit.training.sft_training import DataArguments, load_sft_data

    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    import torch

    tokenizer = load_tokenizer(args.model)
    data = load_sft_data(tokenizer, get_template("baichuan2"),
                         DataArguments(data=args.data, max_length=2048, packing="false"))
    model = load_model(args.model, dtype="bf16", device="cpu")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
    targs = TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=args.hf_batch,
                              num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05,
                              bf16=torch.cuda.is_available(), use_liger_kernel=torch.cuda.is_available(),
                              logging_steps=5, save_strategy="no", report_to="none",
                              remove_unused_columns=False)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train]
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=DataCollatorWithFlattening())
    trainer.train()
    trainer.save_model(args.output_dir)


def parse_log(text: str) -> dict:
    """train_runtime, train_loss and the first logged loss from the Trainer's printed log dicts."""
    def number(key, last=True):
        found = re.findall(rf"'{key}': '?([0-9.e+-]+)", text)
        return float(found[-1 if last else 0]) if found else None
    return {"train_runtime": number("train_runtime"), "train_loss": number("train_loss"),
            "first_loss": number("loss", last=False)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", required=True, help="folder with data/{csl,novels,lcsts} and tokenizers/baichuan2 "
                                                   "(or assets/tokenizers/baichuan2, as in ../shared)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default="/tmp/recipe-throughput")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--hf_batch", type=int, default=24, help="samples per step of the padding-free peer (about the "
                                                            "tokens of ours' 4 rows of 2048)")
    p.add_argument("--runs", default="ours,off,hf-liger")
    p.add_argument("--tiny", action="store_true", help="hidden size 64: a CPU check")
    p.add_argument("--hf", action="store_true", help=argparse.SUPPRESS)  # internal: the peer run itself
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf:
        return run_hf_liger(args)

    assets, work, out = Path(args.assets).resolve(), Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    tokenizers = assets / "tokenizers" if (assets / "tokenizers").is_dir() else assets / "assets" / "tokenizers"
    subprocess.run([PY, "bench/shapes.py", "llama-baichuan2-7b", str(model), "--layers", str(args.layers),
                    "--tokenizer", str(tokenizers / "baichuan2")] + ["--tiny"] * args.tiny,
                   check=True, cwd=ROOT)
    data = make_data(assets, work, args.samples)
    count = sum(1 for _ in open(data, encoding="utf-8"))
    recipe = {"MODEL_PATH": str(model), "DATA": str(data), "DEV": "", "TEMPLATE": "baichuan2", "MAX_LENGTH": "2048",
              "EPOCHS": "1", "BATCH": "4", "EVAL_STEPS": "100000"}
    commands = {
        "ours": (["bash", "Baichuan-Finetune-Lora/ds_finetune.sh"], recipe),
        "ours-warm": (["bash", "Baichuan-Finetune-Lora/ds_finetune.sh"], recipe),  # again: the compile cache warm
        "off": (["bash", "Baichuan-Finetune-Lora/ds_finetune.sh", "--packing", "false", "--compile_layers", "false"],
                recipe),
        "hf-liger": ([PY, __file__, "--hf", "--assets", str(assets), "--model", str(model), "--data", str(data),
                      "--hf_batch", str(args.hf_batch)], {}),
    }
    results = []
    for name in args.runs.split(","):
        argv, env = commands[name]
        output_dir = work / f"out-{name}"
        env = {**os.environ, **env, "OUTPUT_DIR": str(output_dir)}
        argv = argv + (["--output_dir", str(output_dir)] if name == "hf-liger" else [])
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (out / f"recipe_{name}.log").write_text(proc.stdout + proc.stderr)
        row = {"run": name, "samples": count, "rc": proc.returncode, "wall_s": wall,
               **parse_log(proc.stdout + proc.stderr)}
        if row["train_runtime"]:
            row["samples_per_s"] = count / row["train_runtime"]
        row["samples_per_s_wall"] = count / wall
        fast = re.search(r"fast path: (.*)", proc.stdout + proc.stderr)
        row["fast_path"] = fast.group(1) if fast else ""
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "recipe_throughput.json").write_text(json.dumps(results, indent=1))
    print("| run | samples/s (train) | samples/s (wall) | wall s | first loss | train loss | rc |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r.get('samples_per_s') or 0:.1f} | {r['samples_per_s_wall']:.1f} | {r['wall_s']:.0f} | "
              f"{r['first_loss']} | {r['train_loss']} | {r['rc']} |")


if __name__ == "__main__":
    main()
