"""Prediction on every GPU of a node (issue 21): `Baichuan-Finetune/run_predict.sh` on the same records with
NUM_GPUS=1 and with NUM_GPUS=2..N, as a user runs it, timed end to end.

    python bench/predict_scaling.py --assets .gpu --work /tmp/ps --gpus 1 2 4       # a node with 4 GPUs
    python bench/predict_scaling.py --assets ../shared --work /tmp/ps --tiny         # the same pipeline on a CPU

Model: a random-initialised Baichuan2-7B-shape model (bench/shapes.py, --layers layers) with the real Baichuan 2
tokenizer; records: --records CSL abstract → title prompts (Baichuan-Finetune/prepare_data.py csl, repeated to the
count), greedy, --new_tokens new tokens each (EOS left in: a random model stops where it stops, the same way in every
run). Each run is timed from the command's start to its exit (model loading and warm-up of every process included:
what the user waits for). Its predictions.jsonl must hold every record once, in input order (the split and merge
lose, duplicate or reorder nothing: checked, the bench fails otherwise); how many responses differ from the first
run's is reported (0 on a CPU in fp32; in bf16 on a GPU a different batch mix may change a near-tie's greedy token).
Scaling = records/s(n) / (n x records/s(1)); issue 21's target is >= 0.9.
Writes results.json and results.md into --work (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))

from novelkit.data.readers import iter_records  # noqa: E402


def sh(argv, env=None, log: Path | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if log:
        log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, argv))} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def make_records(assets: Path, work: Path, count: int) -> Path:
    """`count` CSL records in Alpaca JSON lines (prepare_data.py's dev split, repeated to the count, each with its
    own index so that the merge order is checked)."""
    sh([PY, "Baichuan-Finetune/prepare_data.py", "csl", "--raw", str(assets / "data" / "csl" / "clge_val.tsv"),
        "--output_dir", str(work / "csl")])
    rows = [r.data for name in ("train", "dev", "test") if (work / "csl" / f"{name}.json").exists()
            for r in iter_records(work / "csl" / f"{name}.json")]
    records = [dict(rows[i % len(rows)]) for i in range(count)]
    out = work / "records.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", required=True, help="../shared, or the GPU machine's copy (bench/gpu_carry.sh)")
    p.add_argument("--work", default="/tmp/predict-scaling")
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="process counts; the first is the reference")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="BATCH: sequences decoded together per process")
    p.add_argument("--layers", type=int, default=8, help="layers of the Baichuan2-7B shape")
    p.add_argument("--tiny", action="store_true", help="hidden size 64, 2 processes on the CPU (gloo)")
    args = p.parse_args()
    if args.tiny:
        args.records, args.new_tokens, args.batch, args.layers = 24, 8, 4, 2

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        sh([PY, "bench/shapes.py", "baichuan2-7b", str(model), "--layers", str(args.layers), "--tokenizer",
            str(Path(args.assets) / "assets" / "tokenizers" / "baichuan2")
            if (Path(args.assets) / "assets").exists() else str(Path(args.assets) / "tokenizers" / "baichuan2")]
           + (["--tiny"] if args.tiny else []))
    data = make_records(Path(args.assets), work, args.records)
    results = {"records": args.records, "new_tokens": args.new_tokens, "batch": args.batch, "layers": args.layers,
               "tiny": args.tiny, "runs": []}
    reference = None
    for n in args.gpus:
        out = work / f"pred-{n}"
        shutil.rmtree(out, ignore_errors=True)
        env = {"MODEL_PATH": str(model), "DATA": str(data), "OUTPUT_DIR": str(out), "BATCH": str(args.batch),
               "MAX_NEW_TOKENS": str(args.new_tokens), "NUM_GPUS": str(n), "MASTER_PORT": str(29650 + n)}
        seconds = sh(["bash", "Baichuan-Finetune/run_predict.sh"], env, log=work / f"pred-{n}.log")
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        if [r["index"] for r in rows] != list(range(args.records)):
            sys.exit(f"{out}/predictions.jsonl does not hold every record once in input order")
        reference = reference or (n, rows, args.records / seconds)
        rate = args.records / seconds
        run = {"processes": n, "seconds": round(seconds, 1), "records_per_s": round(rate, 2),
               "scaling": round(rate / (n / reference[0] * reference[2]), 3),
               "responses_differing_from_first": sum(a["response"] != b["response"]
                                                     for a, b in zip(rows, reference[1]))}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    lines = [f"{args.records} records, {args.new_tokens} new tokens, BATCH={args.batch}, Baichuan2-7B shape with "
             f"{args.layers} layers{' (tiny)' if args.tiny else ''}", "",
             "| processes | seconds | records/s | scaling | responses differing from the first run's |",
             "|---:|---:|---:|---:|---|"]
    lines += [f"| {r['processes']} | {r['seconds']} | {r['records_per_s']} | {r['scaling']} | "
              f"{r['responses_differing_from_first']} |" for r in results["runs"]]
    for folder in filter(None, [work, os.environ.get("OUT")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "results.json").write_text(json.dumps(results, indent=1))
        (Path(folder) / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
