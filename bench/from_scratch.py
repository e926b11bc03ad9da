"""From scratch to titles: pretrain a small model on the shared data only, fine-tune it to write titles, and score it
against copying the input, on held-out CSL abstract → title and LCSTS text → title. The recipe scripts as the README
runs them, one after another:

    python bench/from_scratch.py --assets .gpu --out $OUT   # the GPU machine (bench/gpu_carry.sh recipes scratch)
    python bench/from_scratch.py --assets ../shared --tiny      # a CPU check of the plumbing

1. data (nothing held out is trained on, not even unsupervised):
   - pretraining corpus: the three novels (西游记 held out whole for the eval loss), the 1,000 CSL abstracts of
     ts_dev.tsv and the 8,666 LCSTS training texts;
   - SFT: those 1,000 CSL abstract → title pairs and the 8,666 LCSTS text → title pairs, shuffled; dev: 200 of each
     from the held-out files (the best checkpoint is chosen on them);
   - held out for scoring: the other 800 CSL pairs of clge_val.tsv (a different paper set) and 800 LCSTS val pairs;
2. Baichuan-Pretrain/ds_finetune.sh from scratch (MODEL_CONFIG, VOCAB_SIZE; the best held-out-book loss is kept);
3. Baichuan-Finetune/ds_finetune.sh on the SFT mix (full fine-tuning; the lowest dev loss is kept, early stopping);
4. Baichuan-Finetune/run_predict.sh on each held-out set, with a copy bias (--encoder_repetition_penalty 1.3), a
   repetition penalty on the generated tokens only (--repetition_penalty 1.2 --no_prompt_penalty) and each title
   chosen among 16 candidates by minimum Bayes risk (--mbr 16 --temperature 0.8 --top_p 0.95): metrics.json carries
   the model's ROUGE and the copying baselines (lead-N, the whole source).
Each step's settings can be changed with --pretrain / --sft as VAR=value lists (the scripts' variables), extra
TrainingArguments flags with --pretrain_args / --sft_args; --drills N --drill_kind adds copying drills to the
pretraining texts; --decode NAME=flags scores several decodings of one model (docs/from_scratch.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from novelkit.data.formats import CSL_ABSTRACT2TITLE_PROMPT, LCSTS_PROMPT, load_samples  # noqa: E402
from novelkit.evaluation.rouge import rouge_l_f  # noqa: E402
from novelkit.outputs import write_jsonl_atomic  # noqa: E402

# the defaults are the best recipe measured (docs/from_scratch.md, run 7 b): 8 x 512 layers with a 6,000-piece
# vocabulary (31.4M parameters), 800 steps with 12 drills per text; SFT selected by the dev loss; decoding with a
# copy bias (the prompt's tokens), a repetition penalty on the generated tokens only and minimum Bayes risk over 16
# candidates (runs 7-10)
PRETRAIN = {"MODEL_CONFIG": str(ROOT / "Baichuan-Pretrain" / "configs" / "babyllama-512.json"), "VOCAB_SIZE": "6000",
            "MAX_LENGTH": "512", "BATCH": "64", "LR": "1e-3", "EVAL_BOOKS": "xiyouji"}
SFT = {"MAX_LENGTH": "512", "BATCH": "64", "LR": "5e-4", "EPOCHS": "15", "EVAL_STEPS": "0.04", "EVAL_SAMPLES": "0",
       "PATIENCE": "3", "GRAD_CKPT": "false"}
TINY_PRETRAIN = {"VOCAB_SIZE": "4000", "MAX_LENGTH": "128", "BATCH": "8", "LR": "1e-3",
                 "EVAL_BOOKS": "xiyouji"}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, rows)
    return path


def pairs(path: Path, fmt: str, prompt: str) -> list[dict]:
    """The file's (source text → title) samples as Alpaca records, the document in `input` (what lead-N copies)."""
    return [{"instruction": prompt, "input": s.source, "output": s.response} for s in load_samples(path, fmt)]


CLAUSE_END = "，。；：！？,;:!?"


def clauses(text: str) -> list[str]:
    """The text cut after each clause-ending punctuation mark, the mark kept with its clause."""
    parts, start = [], 0
    for i, c in enumerate(text):
        if c in CLAUSE_END:
            parts.append(text[start:i + 1])
            start = i + 1
    return parts + ([text[start:]] if text[start:] else [])


def key_clause(text: str) -> str:
    """The clause that shares the most with the rest of the text (character ROUGE-1 F, as PEGASUS picks its gap
    sentences), its closing punctuation dropped: what a title is most likely to restate."""
    def f1(part: str, rest: str) -> float:
        overlap = sum((Counter(part) & Counter(rest)).values())
        return 2 * overlap / (len(part) + len(rest)) if part and rest else 0.0
    parts = clauses(text)
    scored = [(f1(c, text.replace(c, "", 1)), -i, c) for i, c in enumerate(parts) if len(c) >= 5]
    return (max(scored)[2] if scored else text).rstrip(CLAUSE_END)[:32]


def title_clause(text: str, title: str) -> str:
    """The clause closest to the text's own title by character ROUGE-L F (the metric the held-out sets are scored
    with), its closing punctuation dropped: which clause a title writer would copy, learnt from training pairs."""
    target = list(title)
    scored = [(rouge_l_f(list(c.rstrip(CLAUSE_END)), target), -i, c)
              for i, c in enumerate(clauses(text)) if len(c) >= 5]
    return (max(scored)[2] if scored else text).rstrip(CLAUSE_END)[:32]


def copy_drills(texts: list[str], per_text: int, seed: int = 0, kind: str = "span",
                titles: list[str] | None = None) -> list[str]:
    """Each text followed by `per_text` drill lines about itself: a self-supervised drill in copying from the context.
    A model this small learns to copy from ordinary text only after far more tokens than 3.8 M characters give
    (induction heads form after billions), and titles are mostly copied phrases. Kinds:
      span    "摘录：" + 6-24 characters from a random place;
      clause  the same, starting where a clause does (the text's start or after ，。；： …), as titles' phrases do;
      key     first "要点：" + the clause most like the rest of the text (PEGASUS' gap-sentence choice: pretraining
              that resembles summarising), then clause spans;
      title   as key, but "要点：" + the clause closest to the text's own title (`titles`, the training pairs'
              outputs): the held-out sets' oracle clause scores far above lead-N (docs/from_scratch.md, run 8)."""
    if kind not in ("span", "clause", "key", "title"):
        raise ValueError(f"drill kind {kind!r}: span, clause, key or title")
    if kind == "title" and (titles is None or len(titles) != len(texts)):
        raise ValueError("drill kind title needs one title per text")
    rng = random.Random(seed)
    drills = []
    for i, text in enumerate(texts):
        key = key_clause(text) if kind == "key" else title_clause(text, titles[i]) if kind == "title" else None
        lines = [text] + (["要点：" + key] if key is not None and per_text else [])
        while len(lines) < per_text + 1:
            n = rng.randint(6, 24)
            if kind == "span":
                start = rng.randrange(max(len(text) - n, 1))
            else:
                start = rng.choice([0] + [i + 1 for i, c in enumerate(text[:-n]) if c in CLAUSE_END])
            lines.append("摘录：" + text[start:start + n])
        drills.append("\n".join(lines))
    return drills


def make_data(assets: Path, work: Path, tiny: bool, drills: int = 0, drill_kind: str = "span") -> dict:
    data = assets / "data"
    csl_train = pairs(data / "csl" / "ts_dev.tsv", "csl_abstract2title", CSL_ABSTRACT2TITLE_PROMPT)
    csl_held = pairs(data / "csl" / "clge_val.tsv", "csl_abstract2title", CSL_ABSTRACT2TITLE_PROMPT)
    seen = {r["output"] for r in csl_train}
    csl_held = [r for r in csl_held if r["output"] not in seen]  # a paper in both files stays on the training side
    lcsts_train = pairs(data / "lcsts" / "train.tsv", "lcsts", LCSTS_PROMPT)
    lcsts_held = pairs(data / "lcsts" / "val.tsv", "lcsts", LCSTS_PROMPT)
    # the shared LCSTS val.tsv repeats 49 train.tsv pairs word for word: held out means not trained on
    lcsts_seen = {r["input"] for r in lcsts_train}
    repeated = sum(r["input"] in lcsts_seen for r in lcsts_held)
    lcsts_held = [r for r in lcsts_held if r["input"] not in lcsts_seen]
    if tiny:
        csl_train, lcsts_train, csl_held, lcsts_held = csl_train[:40], lcsts_train[:40], csl_held[:30], lcsts_held[:30]
    dev_n = 10 if tiny else 200
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for book in ("xiyouji", "hongloumeng", "shuihuzhuan"):
        text = (data / "novels" / f"{book}.txt").read_text(encoding="utf-8")
        (corpus / f"{book}.txt").write_text(text[:20000] if tiny else text, encoding="utf-8")
    for name, rows in (("csl_abstracts", csl_train), ("lcsts_texts", lcsts_train)):  # one "book", a text a line
        texts = [r["input"] for r in rows]
        drilled = copy_drills(texts, drills, kind=drill_kind, titles=[r["output"] for r in rows]) if drills else texts
        (corpus / f"{name}.txt").write_text("\n".join(drilled) + "\n", encoding="utf-8")
    sft = csl_train + lcsts_train
    random.Random(0).shuffle(sft)
    return {
        "corpus": corpus,
        "train": write_jsonl(work / "sft" / "train.jsonl", sft),
        "dev": write_jsonl(work / "sft" / "dev.jsonl", csl_held[:dev_n] + lcsts_held[:dev_n]),
        "csl": write_jsonl(work / "sft" / "csl_test.jsonl", csl_held[dev_n:]),
        "lcsts": write_jsonl(work / "sft" / "lcsts_test.jsonl", lcsts_held[dev_n:]),
        "counts": {"pretrain_csl_abstracts": len(csl_train), "pretrain_lcsts_texts": len(lcsts_train),
                   "sft_train": len(sft), "dev": 2 * dev_n, "csl_test": len(csl_held) - dev_n,
                   "lcsts_test": len(lcsts_held) - dev_n, "lcsts_val_repeating_train": repeated},
    }


def settings(pairs: list[str]) -> dict:
    return dict(p.split("=", 1) for p in pairs)


def run(name: str, argv: list[str], env: dict, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    print(f"[from_scratch] {name}: rc {proc.returncode}, {seconds:.0f} s", flush=True)
    if proc.returncode:
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", required=True, help="../shared (or a copy with data/{novels,csl,lcsts})")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default="/tmp/from-scratch")
    p.add_argument("--pretrain", nargs="*", default=[], help="VAR=value for Baichuan-Pretrain/ds_finetune.sh")
    p.add_argument("--pretrain_steps", type=int, default=800)
    p.add_argument("--pretrain_args", default=None, help="extra TrainingArguments flags for the pretraining; "
                                                          "default '--bf16 true' (none with --tiny)")
    p.add_argument("--sft", nargs="*", default=[], help="VAR=value for Baichuan-Finetune/ds_finetune.sh")
    p.add_argument("--sft_args", default="", help="extra TrainingArguments flags for the SFT, e.g. "
                                                   "'--weight_decay 0.1 --neftune_noise_alpha 5'")
    p.add_argument("--decode", nargs="*",
                   default=["mbr16=--encoder_repetition_penalty 1.3 --repetition_penalty 1.2 --no_prompt_penalty "
                            "--mbr 16 --temperature 0.8 --top_p 0.95"],
                   help="NAME=predict.py flags, one prediction per item; greedy= for plain greedy decoding")
    p.add_argument("--drills", type=int, default=12, help="copying drills per pretraining text (copy_drills)")
    p.add_argument("--drill_kind", default="key", choices=("span", "clause", "key", "title"), help="see copy_drills")
    p.add_argument("--tiny", action="store_true", help="a few records and steps on the embedded-size config: CPU")
    args = p.parse_args()
    if args.pretrain_args is None:
        args.pretrain_args = "" if args.tiny else "--bf16 true"

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(Path(args.assets), work, args.tiny, args.drills, args.drill_kind)
    pretrain_env = {**(TINY_PRETRAIN if args.tiny else PRETRAIN), **settings(args.pretrain)}
    if args.tiny:
        tiny_config = work / "tiny.json"
        tiny_config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                           "num_hidden_layers": 2, "num_attention_heads": 4,
                                           "num_key_value_heads": 4, "max_position_embeddings": 512}))
        pretrain_env["MODEL_CONFIG"] = str(tiny_config)
    steps = 8 if args.tiny else args.pretrain_steps
    model = work / "pretrain"
    result = {"data": data["counts"], "drills": args.drills, "drill_kind": args.drill_kind, "pretrain": pretrain_env,
              "seconds": {}}
    result["seconds"]["pretrain"] = run(
        "pretrain", ["bash", "Baichuan-Pretrain/ds_finetune.sh", "--max_steps", str(steps), "--eval_steps",
                     str(max(steps // 6, 1)), "--save_steps", str(max(steps // 6, 1)), *args.pretrain_args.split()],
        {**pretrain_env, "CORPUS": str(data["corpus"]), "OUTPUT_DIR": str(model)}, out)
    sft_env = {**SFT, **({"BATCH": "8", "EPOCHS": "1", "EVAL_SAMPLES": "4", "MAX_LENGTH": "160"} if args.tiny else {}),
               **settings(args.sft)}
    result["sft"] = sft_env
    tuned = work / "sft-model"
    result["seconds"]["sft"] = run(
        "sft", ["bash", "Baichuan-Finetune/ds_finetune.sh"] + (["--max_steps", "6"] if args.tiny else [])
        + args.sft_args.split(),
        {**sft_env, "MODEL_PATH": str(model), "DATA": str(data["train"]), "DEV": str(data["dev"]),
         "OUTPUT_DIR": str(tuned)}, out)
    result["best"] = json.loads((tuned / "best_checkpoint.json").read_text()) \
        if (tuned / "best_checkpoint.json").exists() else None
    for decode in args.decode:
        name, _, flags = decode.partition("=")
        for task in ("csl", "lcsts"):
            key = task if name == "greedy" else f"{task}-{name}"
            pred = work / f"pred-{key}"
            result["seconds"][f"predict_{key}"] = run(
                f"predict_{key}", ["bash", "Baichuan-Finetune/run_predict.sh", *flags.split()],
                {"MODEL_PATH": str(tuned), "DATA": str(data[task]), "OUTPUT_DIR": str(pred), "BATCH": "64",
                 "MAX_NEW_TOKENS": "48"}, out)
            metrics = json.loads((pred / "metrics.json").read_text())
            result[key] = {k: metrics[k] for k in ("samples", "rouge-chinese/char", "rouge-chinese/word", "baselines",
                                                   "verdict")}
            result[key]["decode"] = flags
            # the first predictions beside the numbers, to read what the model writes
            head = (pred / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[:40]
            (out / f"predictions-{key}.jsonl").write_text("\n".join(head) + "\n", encoding="utf-8")
            print(f"[from_scratch] {key}: {metrics['verdict']}", flush=True)
            print(metrics["baseline_table"], flush=True)
            (out / "from_scratch.json").write_text(json.dumps(result, ensure_ascii=False, indent=1),
                                                   encoding="utf-8")


if __name__ == "__main__":
    main()
