"""Make train/dev/test files for one of the seeds' three tasks from the raw files, for all three fine-tuning folders.

    python Baichuan-Finetune/prepare_data.py csl   --raw ../shared/data/csl/clge_val.tsv   --output_dir data/csl
    python Baichuan-Finetune/prepare_data.py ner   --raw ../shared/data/msra_ner/eval.jsonl --output_dir data/ner
    python Baichuan-Finetune/prepare_data.py novel --raw ../shared/data/novels             --output_dir data/novel

Writes Alpaca JSON lines: train.json and dev.json ({instruction, input, output}) and test.json (output "", the input
of run_predict.sh's submission mode).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root

from novelkit.data.tasks import TASKS, split_records, task_records, unique_records
from novelkit.errors import exit_on_error
from novelkit.outputs import write_jsonl_atomic


@exit_on_error
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=TASKS, help="csl: title → abstract; ner: MSRA entities; novel: passage writing")
    p.add_argument("--raw", nargs="+", required=True, help="raw file(s): CSL .tsv, MSRA .jsonl, novel .txt or folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dev", type=int, default=100, help="records held out for evaluation")
    p.add_argument("--test", type=int, default=100, help="records for the submission file (outputs blanked)")
    p.add_argument("--max_train", type=int, default=0, help="keep at most this many training records; 0 = all")
    p.add_argument("--max_chars", type=int, default=800, help="novel: passage length in characters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    raw = task_records(args.task, args.raw, max_chars=args.max_chars)
    rows = unique_records(raw)
    train, dev, test = split_records(rows, args.dev, args.test, args.seed)
    if args.max_train:
        train = train[:args.max_train]
    out = Path(args.output_dir)
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        write_jsonl_atomic(out / f"{name}.json", part)
    print(f"{args.task}: {len(rows)} records from {', '.join(args.raw)} ({len(raw) - len(rows)} repeated prompts "
          f"dropped) -> {out}/train.json ({len(train)}), dev.json ({len(dev)}), test.json ({len(test)})")


if __name__ == "__main__":
    main()
