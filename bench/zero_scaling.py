"""DeepSpeed ZeRO scaling of the real recipes: each run is `bash <folder>/ds_finetune.sh` (the deepspeed launcher on
GPUs) on a random-initialised Baichuan2-7B-shape model and synthetic SFT data whose every sample is exactly
--max_length tokens, so throughput is comparable between runs.

    python bench/zero_scaling.py --work /tmp/zs --tokenizer TOKENIZER_DIR          # on a machine with 2 GPUs
    python bench/zero_scaling.py --work /tmp/zs --tokenizer TOKENIZER_DIR --tiny   # the same pipeline on a CPU

Runs: LoRA + ZeRO-2 on 1 and on 2 GPUs, and full fine-tuning + ZeRO-3 on 1 and on 2 GPUs on the same 7B layer shapes
with --small_layers layers (the full 32 layers need ~16 bytes/parameter = 120 GB for weights, gradients and Adam state,
which does not fit one GPU with activations), then full fine-tuning of all 32 layers with ZeRO-3 on 2 GPUs. Each
1-GPU run uses gradient accumulation 2, so the global batch (and the data order) equals the 2-GPU run's: the losses
step by step are then comparable. Throughput: tokens over the wall time between the TensorBoard loss events of
optimizer steps --skip and the last (start-up and warm-up left out). Scaling efficiency = tok/s(2 GPUs) /
(2 x tok/s(1 GPU)). The last run of each kind saves (ZeRO-3: consolidated 16-bit weights; LoRA: the adapter) with
--verify_save, which reloads the saved folder with from_pretrained and compares logits with the live model.
Writes results.json and results.md (+ one log per run) into --work (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4)  # --tiny: a CPU check of the pipeline


def build(folder: Path, layers: int, tokenizer: str, tiny: bool) -> None:
    """A from_pretrained folder: Baichuan2-7B shapes (or tiny ones), random weights, the given tokenizer."""
    from shapes import build_model

    if (folder / "config.json").exists():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("baichuan2-7b", device=device, num_hidden_layers=layers, **(TINY if tiny else {}))
    model.save_pretrained(folder)
    del model
    for f in Path(tokenizer).iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)


def synthetic_data(path: Path, tokenizer_dir: str, max_length: int, count: int) -> None:
    """Alpaca records with a short prompt and a response longer than max_length tokens (the recipe truncates it, so
    every sample is exactly max_length tokens), cut from the bundled novels at different offsets."""
    from novelkit.models.loading import load_tokenizer

    text = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "data_examples" / "novels").glob("*.txt")))
    text = re.sub(r"\s+", "", text)
    tokenizer = load_tokenizer(tokenizer_dir)
    chars = 2 * max_length  # measured below: more than max_length tokens
    while len(tokenizer(text[:chars])["input_ids"]) < max_length + 16:
        chars *= 2
    step = max(1, (len(text) - chars) // count)
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            start = (i * step) % max(1, len(text) - chars)
            body = (text * 2)[start:start + chars]
            record = {"instruction": f"续写第{i}段", "input": "", "output": body}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def loss_events(output_dir: Path) -> list[tuple[int, float, float]]:
    """(step, wall time, loss) of every logged training step, from the run's TensorBoard file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(output_dir.glob("runs/*/events.out.tfevents.*"))
    if not events:
        return []
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    return [(e.step, e.wall_time, e.value) for e in acc.Scalars("train/loss")]


class GpuMemory:
    """Peak memory in use on each GPU while a run goes, sampled with nvidia-smi (covers every process)."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate()
        values = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]
        return max(values) / 1024 if values else None


def run(name: str, folder: str, model: Path, data: Path, work: Path, *, gpus: int, accum: int, batch: int,
        config: str, args, verify: bool, port: int) -> dict:
    out_dir = work / name
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, MODEL_PATH=str(model), DATA=str(data), DEV="", OUTPUT_DIR=str(out_dir),
               MAX_LENGTH=str(args.max_length), BATCH=str(batch), GRAD_ACCUM=str(accum), NUM_GPUS=str(gpus),
               LORA_DROPOUT="0",  # dropout draws differ between 1 and 2 processes; without it the losses compare
               DS_CONFIG=str(ROOT / folder / config), MASTER_PORT=str(port))
    if args.tiny:
        env["BF16"] = "false"
    cmd = ["bash", str(ROOT / folder / "ds_finetune.sh"), "--max_steps", str(args.steps), "--logging_steps", "1",
           "--save_strategy", "no", "--report_to", "tensorboard", "--gradient_checkpointing", "true",
           "--warmup_steps", "2", "--verify_save", str(verify).lower()]
    print(f"== {name}: {' '.join(f'{k}={env[k]}' for k in ('NUM_GPUS', 'BATCH', 'GRAD_ACCUM'))} {config} "
          f"{model.name}", flush=True)
    memory = GpuMemory()
    start = time.time()
    with (work / f"{name}.log").open("w") as log:
        # its own process group, so that a run past --run_timeout is stopped with the launcher's children
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
        try:
            code = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    seconds = time.time() - start
    peak = memory.stop()
    text = (work / f"{name}.log").read_text(errors="replace")
    events = loss_events(out_dir)
    result = {"name": name, "gpus": gpus, "accum": accum, "batch": batch, "config": config, "model": model.name,
              "returncode": code, "wall_s": round(seconds, 1), "peak_gib": peak and round(peak, 1),
              "losses": [round(v, 4) for _, _, v in events]}
    timed = [e for e in events if e[0] >= args.skip]
    if len(timed) >= 2:
        step_s = (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0])
        tokens = batch * accum * gpus * args.max_length
        result.update(step_s=round(step_s, 3), tok_s=round(tokens / step_s, 1),
                      tok_s_per_gpu=round(tokens / step_s / gpus, 1))
    check = re.search(r"reloaded .*?logits max \|diff\| (\S+) \(max \|logit\| (\S+), (\S+)\)", text)
    if check:
        result.update(reload_max_diff=float(check.group(1)), max_logit=float(check.group(2)), dtype=check.group(3))
    if code != 0:
        result["error"] = [line for line in text.splitlines() if "Error" in line][-3:]
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
    return result


def compare(one: dict, two: dict) -> dict:
    """Scaling efficiency and loss agreement of a 1-GPU and a 2-GPU run with the same global batch."""
    out = {}
    if one.get("tok_s") and two.get("tok_s"):
        out["efficiency"] = round(two["tok_s"] / (2 * one["tok_s"]), 3)
    n = min(len(one["losses"]), len(two["losses"]))
    if n:
        out["loss_max_abs_diff"] = round(max(abs(a - b) for a, b in zip(one["losses"][:n], two["losses"][:n])), 4)
        out["loss_first_last_1gpu"] = [one["losses"][0], one["losses"][n - 1]]
        out["loss_first_last_2gpu"] = [two["losses"][0], two["losses"][n - 1]]
    return out


def table(results: list[dict], pairs: dict, args) -> str:
    rows = ["| run | model | GPUs | batch × accum | config | s/step | tok/s | tok/s per GPU | peak GiB/GPU | "
            "reload max abs diff |", "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        diff = f"{r['reload_max_diff']:.3g} ({r['dtype']})" if "reload_max_diff" in r else ""
        rows.append(f"| {r['name']} | {r['model']} | {r['gpus']} | {r['batch']} × {r['accum']} | {r['config']} | "
                    f"{r.get('step_s', '–')} | {r.get('tok_s', '–')} | {r.get('tok_s_per_gpu', '–')} | "
                    f"{r.get('peak_gib') or '–'} | {diff or ('failed' if r['returncode'] else '')} |")
    rows += ["", "| pair | scaling efficiency | loss max abs diff (per step) | loss first → last (1 GPU / 2 GPUs) |",
             "|---|---:|---:|---|"]
    for name, c in pairs.items():
        rows.append(f"| {name} | {c.get('efficiency', '–')} | {c.get('loss_max_abs_diff', '–')} | "
                    f"{c.get('loss_first_last_1gpu', '–')} / {c.get('loss_first_last_2gpu', '–')} |")
    return "\n".join(rows) + f"\n\n{args.steps} optimizer steps, {args.max_length} tokens per sample; throughput " \
                             f"over steps {args.skip}–{args.steps}.\n"


def publish(work: Path, names: list[str]) -> None:
    """Copy results to $OUT as soon as they exist (the device machine returns what is there, even after a kill)."""
    if os.environ.get("OUT"):
        for name in names:
            shutil.copy(work / name, Path(os.environ["OUT"]) / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (models, data, runs)")
    parser.add_argument("--tokenizer", required=True, help="Baichuan 2 tokenizer folder")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=6, help="first optimizer step of the timed window")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="per-GPU micro batch")
    parser.add_argument("--small_layers", type=int, default=8, help="layers of the full fine-tuning scaling pair")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--run_timeout", type=float, default=600, help="seconds before a run is stopped")
    parser.add_argument("--deadline", type=float, default=0, help="start no run after this many seconds (0: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny hidden sizes, fp32: check the pipeline on a CPU")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    layers = 2 if args.tiny else 32
    small, big = work / f"baichuan2-7b-shape-{args.small_layers}l", work / f"baichuan2-7b-shape-{layers}l"
    data = work / "train.jsonl"
    if not data.exists():
        synthetic_data(data, args.tokenizer, args.max_length, count=args.steps * args.batch * 2 + 8)
    plan = [  # name, folder, model, gpus, accum, config, verify
        ("full_zero3_small_2gpu", "Baichuan-Finetune", small, 2, 1, "ds_zero3.json", True),
        ("full_zero3_small_1gpu", "Baichuan-Finetune", small, 1, 2, "ds_zero3.json", False),
        ("lora_zero2_1gpu", "Baichuan-Finetune-Lora", big, 1, 2, "ds_zero2.json", False),
        ("lora_zero2_2gpu", "Baichuan-Finetune-Lora", big, 2, 1, "ds_zero2.json", True),
        ("full_zero3_2gpu", "Baichuan-Finetune", big, 2, 1, "ds_zero3.json", True),
    ]
    began = time.time()
    only = {n for n in args.only.split(",") if n}
    results = []
    for index, (name, folder, model, gpus, accum, config, verify) in enumerate(plan):
        if only and name not in only:
            continue
        if args.deadline and time.time() - began > args.deadline:
            print(f"== {name}: not started, past --deadline {args.deadline:.0f} s", flush=True)
            continue
        build(model, args.small_layers if model == small else layers, args.tokenizer, args.tiny)
        results.append(run(name, folder, model, data, work, gpus=gpus, accum=accum, batch=args.batch,
                           config=config, args=args, verify=verify, port=29500 + index))
        (work / "results.json").write_text(json.dumps(results, indent=1))
        publish(work, ["results.json", f"{name}.log"])
    by = {r["name"]: r for r in results}
    pairs = {f"{a} vs {b}": compare(by[a], by[b]) for a, b in
             [("lora_zero2_1gpu", "lora_zero2_2gpu"), ("full_zero3_small_1gpu", "full_zero3_small_2gpu")]
             if a in by and b in by}
    (work / "results.json").write_text(json.dumps({"runs": results, "pairs": pairs}, indent=1))
    md = table(results, pairs, args)
    (work / "results.md").write_text(md)
    publish(work, ["results.json", "results.md"])
    print(md)


if __name__ == "__main__":
    main()
