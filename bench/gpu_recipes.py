"""The GPU recipe suite: what a user runs, on one GPU, as the README shows it.

Each folder's shell scripts with their defaults (evaluation on), on random-initialised models of real layer sizes
(bench/shapes.py, 2 layers) with the real Baichuan tokenizers and real data (CSL, the novels); each training script
killed once (kill -9) mid-training and run again, which must resume. One table: step, pass/fail, wall time, time to
the first training step or first token, peak GPU memory; written to OUT/gpu_recipes.{md,json}.

    bash bench/gpu_carry.sh                        # here: wheels, tokenizers and data into .whl/ and .gpu/
    python3 bench/gpu_recipes.py --assets .gpu --out "$OUT"     # there, one device call (docs/gpu_recipes.md)

Parts (--only), run in concurrent lanes so that the whole suite fits one call of under 10 minutes (--lanes 1: one
after another, for timings without neighbours):
  lora, full, qlora  ds_finetune.sh (killed, rerun: resumes), run_predict.sh on the dev file and in submission mode;
                     LoRA also merge_lora.py
  dpo                Baichuan-Finetune-DPO continuing the lora part's adapter (same lane, after it) on CSL pairs (an
                     abstract's own text chosen over the next paper's), killed, rerun: resumes with the same reference
                     log-probs; run_predict.sh on the dev file
  pretrain           Baichuan-Pretrain continued (killed, resumed), then its run_predict.sh on the held-out book
  scratch            Baichuan-Pretrain from scratch (babyllama config, a tokenizer trained on the corpus)
  embedding          Baichuan-Embedding build + search
  analysis           run_analysis.sh model (its estimates; the measured check runs on CPU up to 50M parameters)
  serve, demo        `python -m novelkit.serve` answering the openai client (streaming too), started cold (empty
                     compile cache) and warm; web_demo.py answering gradio_client
  qwen               the server, cold and warm, on the Qwen2-1.5B shape (all 28 layers): the warm-up target
  shapes             the model-specific steps on Baichuan-7B (RoPE), Baichuan2-13B (ALiBi), Qwen2, Qwen3, Llama 3:
                     load, LoRA and full training steps with evaluation, engine generation, save and reload
Only when named (--only tianchi; ~5 minutes and 15 GB of disk on its own):
  tianchi            the Tianchi-style submission end to end: run_predict.sh on the Baichuan2-7B shape (all 32 layers),
                     the 1,000 CSL titles of clge_val.tsv, 800 new tokens each, sampling, 128 slots
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # novelkit, for the DPO part's pairs
PY = sys.executable
FIRST_STEP = "first training step"  # `first=` for the training scripts: the Trainer's progress bar moves
PARTS = ("lora", "dpo", "full", "qlora", "pretrain", "scratch", "embedding", "analysis", "serve", "demo", "qwen", "shapes",
         "tianchi")
ON_REQUEST = ("tianchi",)  # not in the whole suite: run only when --only names them
# Lanes run side by side (one H200 holds them all: ~70 GiB together); each lane's parts run in order. The two
# trainings of all weights share a lane (their checkpoints would not fit the disk together); the serving lane's
# first tokens are measured with neighbours training (--lanes 1 for quiet timings). That lane is the longest: pretrain
# goes first, as its held-out-book prediction is run nowhere else (full's steps repeat the other lanes' scripts).
LANES = (("pretrain", "full"), ("lora", "dpo", "embedding", "analysis"), ("qlora", "scratch"), ("serve", "demo", "qwen"),
         ("shapes", "tianchi"))


@dataclass
class Result:
    step: str
    ok: bool = False
    wall_s: float = 0.0
    first_s: float | None = None  # first training step or first token, from the step's start
    peak_gib: float | None = None
    note: str = ""
    log: str = ""
    part: str = ""
    lane_peers: int = 0  # other lanes running when the step started
    peak_scope: str = ""  # "process": the step's own processes; "gpu": the whole GPU's (neighbours included)


@dataclass
class Suite:
    work: Path
    assets: Path
    out: Path
    budget_s: float
    tiny: list = field(default_factory=list)  # ["--tiny"] for a CPU dry run (bench/shapes.py)
    only: set = field(default_factory=set)  # parts to run (--only); empty: all
    results: list[Result] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running_lanes: int = 0
    local: threading.local = field(default_factory=threading.local)  # the part a lane's thread runs

    @property
    def model(self) -> Path:
        return self.work / "baichuan2-7b-l2"

    @property
    def csl(self) -> Path:
        return self.work / "csl"

    @property
    def tiny_pretraining(self) -> dict:
        """Pretraining settings for a CPU dry run, whose 2 cores would spend a step's whole time limit on 2,048-token
        blocks and on evaluating a held-out book: 256-token blocks, 1% of them held out instead."""
        return {"MAX_LENGTH": "256", "EVAL_BOOKS": "", "EVAL_FRACTION": "0.01"} if self.tiny else {}

    # --- running one command ---------------------------------------------------------------------------------
    def run(self, step: str, cmd: list[str] | str, env: dict | None = None, *, first: str | None = None,
            first_file: Path | None = None, kill_when=None, timeout: float = 240, check=None):
        """Runs `cmd` (a list, or a string for bash), logging to WORK/logs/<step>.log. first: a regex whose first
        match in the output marks the first step/token; first_file: a file whose appearance (non-empty) does.
        kill_when(): True -> kill -9 the process group (the step then passes if it was killed as planned).
        check(log) -> note string on failure, '' or None when all is well."""
        result = self.new_result(step)
        left = self.time_left()
        if left < 20:
            result.note = "not run: the call's time budget is spent"
            self.record(result)
            return result
        log_path = log_file(self.work, step)
        # a port of its own for the deepspeed launcher's rendezvous: lanes launch side by side
        full_env = {**os.environ, "MASTER_PORT": str(free_port()), **(env or {}), "PYTHONUNBUFFERED": "1"}
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
        start = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        chunks: list[str] = []
        marks: dict[str, float] = {}

        def read():
            for raw in iter(lambda: proc.stdout.read1(65536), b""):
                text = raw.decode("utf-8", "replace")
                chunks.append(text)
                if first and "first" not in marks:
                    if first == FIRST_STEP:  # a progress count past the one the bar started at (0, or a resumed step)
                        counts = [int(n) for n in re.findall(r"(\d+)/\d+ \[", "".join(chunks))]
                        if counts and max(counts) > counts[0]:
                            marks["first"] = time.time() - start
                    elif re.search(first, "".join(chunks[-50:])):
                        marks["first"] = time.time() - start

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sampler = GpuMemory(proc.pid)
        killed = False
        deadline = start + min(timeout, left)
        while proc.poll() is None:
            if first_file is not None and "first" not in marks and first_file.exists() and first_file.stat().st_size:
                marks["first"] = time.time() - start
            if kill_when is not None and not killed and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                result.note = f"timed out after {time.time() - start:.0f} s"
                break
            time.sleep(0.2)
        proc.wait()
        reader.join(timeout=10)
        result.wall_s = time.time() - start
        result.peak_gib, result.peak_scope = sampler.stop(), sampler.scope
        result.first_s = marks.get("first")
        log = "".join(chunks)
        log_path.write_text(log)
        result.log = str(log_path)
        if kill_when is not None:
            result.ok = killed and not result.note
            result.note = result.note or ("killed as planned" if killed else f"ended (rc {proc.returncode}) before "
                                                                              f"the kill")
        elif not result.note:
            result.ok = proc.returncode == 0
            if not result.ok:
                result.note = f"rc {proc.returncode}: " + last_error(log)
            elif check is not None:
                try:
                    problem = check(log)
                except Exception as error:  # noqa: BLE001 - a check that breaks fails its row, not the part
                    problem = f"check failed: {type(error).__name__}: {error}"
                result.ok, result.note = not problem, problem or ""
        self.record(result)
        return result

    def new_result(self, step: str) -> Result:
        return Result(step, part=getattr(self.local, "part", ""), lane_peers=max(self.running_lanes - 1, 0))

    def record(self, result: Result):
        with self.lock:  # written after every step: a call cut short still brings its rows back
            self.results.append(result)
            self.save({"command": " ".join(sys.argv), "partial": True}, quiet=True)
        first = f"{result.first_s:.1f}" if result.first_s is not None else "-"
        peak = f"{result.peak_gib:.1f}" if result.peak_gib is not None else "-"
        print(f"[suite] {'PASS' if result.ok else 'FAIL'} {result.step}: {result.wall_s:.1f} s, first {first} s, "
              f"peak {peak} GiB {result.note}", flush=True)

    def table(self, title: str) -> str:
        rows = [f"### {title}", "", "| step | result | wall s | first step / token s | peak GPU GiB | note |",
                "|---|---|---:|---:|---:|---|"]
        order = {part: i for i, part in enumerate(("",) + PARTS)}
        for r in sorted(self.results, key=lambda r: order.get(r.part, 0)):  # by part; in order within one
            first = f"{r.first_s:.1f}" if r.first_s is not None else ""
            peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else ""
            if peak and r.peak_scope == "gpu" and r.lane_peers:
                peak += " (GPU)"  # nvidia-smi could not name the step's processes: the whole GPU's, lanes included
            rows.append(f"| {r.step} | {'pass' if r.ok else '**FAIL**'} | {r.wall_s:.1f} | {first} | {peak} | "
                        f"{r.note.replace('|', '/')[:160]} |")
        passed = sum(r.ok for r in self.results)
        rows += ["", f"{passed} of {len(self.results)} steps passed in {time.time() - self.started:.0f} s."]
        return "\n".join(rows)

    def time_left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def save(self, extra: dict, quiet: bool = False):
        self.out.mkdir(parents=True, exist_ok=True)
        md = self.table("GPU recipe suite")
        (self.out / "gpu_recipes.md").write_text(md + "\n")
        payload = {"machine": machine(), **extra, "results": [asdict(r) for r in self.results]}
        (self.out / "gpu_recipes.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False))
        if not quiet:
            shutil.make_archive(str(self.out / "gpu_recipes_logs"), "gztar", self.work / "logs")
            print(md, flush=True)

    def wants(self, part: str) -> bool:
        return part in self.only if part in ON_REQUEST else not self.only or part in self.only

    def run_lanes(self, lanes, steps: dict):
        """Each lane (a list of parts) in a thread of its own, its parts one after another."""
        def lane(parts):
            for part in parts:
                self.local.part = part
                try:
                    steps[part](self)
                except Exception as error:  # noqa: BLE001 - a broken part is a failed row, not the end of the suite
                    result = self.new_result(f"{part}: {type(error).__name__}")
                    result.note = str(error)[:300]
                    self.record(result)
            with self.lock:
                self.running_lanes -= 1

        lanes = [[p for p in parts if self.wants(p)] for parts in lanes]
        lanes = [parts for parts in lanes if parts]
        self.running_lanes = len(lanes)
        threads = [threading.Thread(target=lane, args=(parts,), daemon=True) for parts in lanes]
        for thread in threads:
            thread.start()
            time.sleep(2)  # staggered: the processes' imports and launches do not all land at once
        for thread in threads:
            thread.join()


class GpuMemory:
    """Peak GPU memory of one step's processes (the process group `pgid`: nvidia-smi's compute apps, every 0.25 s),
    in GiB. Where nvidia-smi cannot name the processes (another PID namespace), the GPU's used memory above what
    was in use at the start: the step's own only when no other lane runs."""

    def __init__(self, pgid: int | None = None):
        self.pgid = pgid
        self.base = self._used()
        self.peak = self.base
        self.own_peak = 0.0
        self.running = self.base is not None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _own(self) -> float:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                  "nounits", "-i", "0"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0.0
        total = 0.0
        for line in out.splitlines():
            try:
                pid, used = (x.strip() for x in line.split(","))
                if os.getpgid(int(pid)) == self.pgid:
                    total += float(used)
            except (ValueError, OSError):
                continue
        return total

    @staticmethod
    def _used():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _loop(self):
        while self.running:
            own = self._own() if self.pgid is not None else 0.0
            self.own_peak = max(self.own_peak, own)
            if not self.own_peak:  # the fallback, only while nvidia-smi has not named the step's processes
                used = self._used()
                if used is not None:
                    self.peak = max(self.peak, used)
            time.sleep(0.25)

    def stop(self):
        self.running = False
        self.thread.join(timeout=5)
        self.scope = "process" if self.own_peak else "gpu"
        if self.own_peak:
            return self.own_peak / 1024
        return None if self.base is None else (self.peak - self.base) / 1024


def log_file(work: Path, step: str) -> Path:
    path = work / "logs" / (re.sub(r"[^\w.-]+", "_", step).strip("_") + ".log")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def last_error(log: str) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]+", log) if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|error:|Exception)", line)]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


@functools.cache
def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_checkpoint(folder: Path, step: int):
    return lambda: (folder / f"checkpoint-{step}" / "trainer_state.json").exists()


def trainer_state(folder: Path) -> dict:
    states = sorted(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text()) if states else {}


def check_trained(folder: Path, steps: int, weights: str, rouge: bool = True):
    def check(log):
        if "resuming from" not in log:
            return "did not resume from the killed run's checkpoint"
        if not (folder / weights).exists():
            return f"no {weights} in the output"
        best = folder / "best_checkpoint.json"  # which step's model is the output (novelkit/training/best_checkpoint)
        if not best.exists():
            return "no best_checkpoint.json"
        summary = json.loads(best.read_text())
        if summary["last_step"] != steps and not summary["stopped_early"]:
            return f"stopped at step {summary['last_step']}, not {steps}, and not by early stopping"
        history = trainer_state(folder).get("log_history", [])  # the newest checkpoint left: the last or the best
        if not any("eval_loss" in h for h in history):
            return "no evaluation ran"
        if rouge and not any("eval_rouge-1" in h for h in history):
            return "no generation-based evaluation (ROUGE) ran"
        losses = [h["loss"] for h in history if "loss" in h]
        return "" if losses and all(x == x for x in losses) else "no finite training loss logged"
    return check


def check_predictions(folder: Path, count: int):
    def check(log):
        path = folder / "predictions.jsonl"
        rows = [x for x in path.read_text().split("\n") if x] if path.exists() else []  # U+2028 stays in its row
        if len(rows) != count:
            return f"{len(rows)} predictions, expected {count}"
        if not (folder / "metrics.json").exists():
            return "no metrics.json"
        return ""
    return check


def check_submission(path: Path, count: int):
    def check(log):
        if not path.exists():
            return "no submission file"
        text = path.read_text()
        # split on "\n" only: generated text may hold U+2028, which str.splitlines() splits on
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.split("\n") if x]
        filled = sum(bool(str(r.get("output", "")).strip()) for r in records)
        return "" if len(records) == count and filled else f"{len(records)} records, {filled} with an output"
    return check


# --- the parts -------------------------------------------------------------------------------------------------------


def prepare(suite: Suite):
    """What several parts share: the Baichuan2-7B-shaped model and the CSL files."""
    suite.run("build model (Baichuan2-7B layers, 2 of 32)",
              [PY, "bench/shapes.py", "baichuan2-7b", str(suite.model), "--layers", "2", "--tokenizer",
               str(suite.assets / "tokenizers" / "baichuan2"), *suite.tiny])
    suite.run("prepare_data.py csl", [PY, "Baichuan-Finetune/prepare_data.py", "csl", "--raw",
                                      str(suite.assets / "data" / "csl" / "clge_val.tsv"), "--output_dir",
                                      str(suite.csl)])


def drop_checkpoints(folder: Path):
    """The suite's disk (64 GiB there) holds the lanes' outputs at once: a finished part's checkpoints go."""
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


# part: (folder, --max_steps, the step after whose checkpoint the first run is killed, script settings, extra
# flags). Full fine-tuning evaluates and saves at half-way (EVAL_STEPS=0.5; 17 GB checkpoints of a 1.4B model: float32
# weights and AdamW state; one kept), so that it and the pretraining after it in its lane fit the 64 GiB disk.
FINETUNE = {"lora": ("Baichuan-Finetune-Lora", 20, 8, {}, ""),
            "full": ("Baichuan-Finetune", 10, 5, {"EVAL_STEPS": "0.5"}, "--save_total_limit 1"),
            "qlora": ("Baichuan-Finetune-QLora", 20, 8, {}, "")}


def finetune(suite: Suite, tag: str):
    folder, steps, kill_at, settings, extra = FINETUNE[tag]
    weights = "model.safetensors" if tag == "full" else "adapter_model.safetensors"
    work, csl = suite.work, suite.csl
    out = work / tag
    env = {"MODEL_PATH": str(suite.model), "DATA": str(csl / "train.json"), "DEV": str(csl / "dev.json"),
           "EPOCHS": "1", "OUTPUT_DIR": str(out), **settings}
    cmd = f"bash {folder}/ds_finetune.sh --max_steps {steps} {extra}".strip()
    suite.run(f"{folder}/ds_finetune.sh (killed at step > {kill_at})", cmd, env, first=FIRST_STEP,
              kill_when=has_checkpoint(out, kill_at), timeout=300)
    suite.run(f"{folder}/ds_finetune.sh (rerun: resumes)", cmd, env, first=FIRST_STEP, timeout=300,
              check=check_trained(out, steps, weights))
    drop_checkpoints(out)
    predict = {"MODEL_PATH": str(out)} if tag == "full" else {"LORA_MODEL": str(out)}
    pred_dir = out / "dev-predictions"
    suite.run(f"{folder}/run_predict.sh (dev, ROUGE)", f"bash {folder}/run_predict.sh",
              {**predict, "DATA": str(csl / "dev.json"), "OUTPUT_DIR": str(pred_dir)},
              first_file=pred_dir / "predictions.jsonl", check=check_predictions(pred_dir, 100))
    submit = out / "submit.json"
    suite.run(f"{folder}/run_predict.sh (submission)", f"bash {folder}/run_predict.sh",
              {**predict, "DATA": str(csl / "test.json"), "SUBMIT": str(submit), "OUTPUT_DIR": str(out / "submit-run")},
              first_file=out / "submit-run" / "predictions.jsonl", check=check_submission(submit, 100))
    if tag == "lora":
        merged = work / "lora-merged"
        suite.run("Baichuan-Finetune-Lora/merge_lora.py",
                  [PY, "Baichuan-Finetune-Lora/merge_lora.py", "--lora_model", str(out), "--output_dir", str(merged)],
                  check=lambda log: "" if (merged / "config.json").exists() else "no merged model")
        shutil.rmtree(merged, ignore_errors=True)
    if tag == "full":
        shutil.rmtree(out, ignore_errors=True)  # 6 GB: room for the pretraining after it


def dpo(suite: Suite):
    from novelkit.data.formats import load_samples
    from novelkit.outputs import write_jsonl_atomic

    out, adapter = suite.work / "dpo", suite.work / "lora"
    pairs = {}
    for name, count in (("train", 160), ("dev", 40)):  # 20 steps of 4 pairs, and evaluations that stay short
        samples = load_samples(suite.csl / f"{name}.json")[:count]
        pairs[name] = suite.work / f"pairs-{name}.jsonl"
        write_jsonl_atomic(pairs[name], [{"prompt": s.prompt, "chosen": s.response,
                                          "rejected": samples[(i + 1) % len(samples)].response}
                                         for i, s in enumerate(samples)])
    env = {"MODEL_PATH": str(suite.model), "DATA": str(pairs["train"]), "DEV": str(pairs["dev"]), "EPOCHS": "1",
           "OUTPUT_DIR": str(out),
           "ADAPTER": str(adapter) if (adapter / "adapter_model.safetensors").exists() else ""}
    cmd = "bash Baichuan-Finetune-DPO/ds_finetune.sh --max_steps 20"
    suite.run("Baichuan-Finetune-DPO/ds_finetune.sh (killed at step > 8)", cmd, env, first=FIRST_STEP,
              kill_when=has_checkpoint(out, 8), timeout=300)
    trained = check_trained(out, 20, "adapter_model.safetensors", rouge=False)

    def check(log):
        if "reference log-probs read" not in log:
            return "the rerun did not reuse the reference log-probs"
        history = trainer_state(out).get("log_history", [])
        if not any("eval_rewards/margins" in h for h in history):
            return "no preference margin evaluated"
        return trained(log)
    suite.run("Baichuan-Finetune-DPO/ds_finetune.sh (rerun: resumes)", cmd, env, first=FIRST_STEP, timeout=300,
              check=check)
    drop_checkpoints(out)
    pred_dir = out / "dev-predictions"
    suite.run("Baichuan-Finetune-DPO/run_predict.sh (dev, ROUGE)", "bash Baichuan-Finetune-DPO/run_predict.sh",
              {"LORA_MODEL": str(out), "DATA": str(suite.csl / "dev.json"), "OUTPUT_DIR": str(pred_dir)},
              first_file=pred_dir / "predictions.jsonl", check=check_predictions(pred_dir, 100))


PRETRAIN_FLAGS = "--max_steps 20 --eval_steps 10 --save_steps 10 --save_total_limit 1"


def pretrain(suite: Suite):
    novels = suite.assets / "data" / "novels"
    out = suite.work / "pretrain"
    env = {"CORPUS": str(novels), "EVAL_BOOKS": "xiyouji", "MODEL_PATH": str(suite.model), "OUTPUT_DIR": str(out),
           **suite.tiny_pretraining}
    cmd = f"bash Baichuan-Pretrain/ds_finetune.sh {PRETRAIN_FLAGS}"
    suite.run("Baichuan-Pretrain/ds_finetune.sh continue (killed at step > 10)", cmd, env, first=FIRST_STEP,
              kill_when=has_checkpoint(out, 10), timeout=300)
    suite.run("Baichuan-Pretrain/ds_finetune.sh continue (rerun: resumes)", cmd, env, first=FIRST_STEP, timeout=300,
              check=check_trained(out, 20, "model.safetensors", rouge=False))
    drop_checkpoints(out)
    # a CPU dry run scores the small bundled book (the script's default), at fewer points
    book = {"BOOK": str(novels / "xiyouji.txt")} if not suite.tiny else {"POSITIONS": "4", "NEW_TOKENS": "32"}
    suite.run("Baichuan-Pretrain/run_predict.sh (held-out book)", "bash Baichuan-Pretrain/run_predict.sh",
              {"MODEL_PATH": str(out), "OUTPUT_DIR": str(out / "eval"), **book},
              check=lambda log: "" if list((out / "eval").glob("*.json")) else "no evaluation written")


def scratch(suite: Suite):
    scratch = suite.work / "scratch"
    suite.run("Baichuan-Pretrain/ds_finetune.sh from scratch (babyllama)",
              f"bash Baichuan-Pretrain/ds_finetune.sh {PRETRAIN_FLAGS}",
              {"CORPUS": str(suite.assets / "data" / "novels"), "EVAL_BOOKS": "xiyouji",
               "MODEL_CONFIG": "Baichuan-Pretrain/configs/babyllama.json", "OUTPUT_DIR": str(scratch),
               **suite.tiny_pretraining},
              first=FIRST_STEP, timeout=300,
              check=lambda log: "" if (scratch / "model.safetensors").exists() else "no model saved")


def embedding(suite: Suite):
    index = suite.work / "embedding"
    suite.run("Baichuan-Embedding/run_embedding.sh (build)", "bash Baichuan-Embedding/run_embedding.sh",
              {"MODEL_PATH": str(suite.model), "DATA": str(suite.assets / "data" / "novels" / "xiyouji.txt"),
               "INDEX_DIR": str(index)})
    suite.run("Baichuan-Embedding/embed.py search",
              [PY, "Baichuan-Embedding/embed.py", "search", "--index", str(index), "孙悟空大闹天宫"],
              check=lambda log: "" if "xiyouji" in log else "no passage of the book found")


def analysis(suite: Suite):
    # as the README runs it: --measure auto checks the estimate against a measured CPU run only for models of up to
    # 50M parameters (one CPU thread, 8 training steps: a 1.4B model takes longer than the whole call)
    report = suite.work / "analysis"
    suite.run("Baichuan-Analysis/run_analysis.sh model", "bash Baichuan-Analysis/run_analysis.sh model",
              {"MODEL_PATH": str(suite.model), "OUTPUT_DIR": str(report)},
              check=lambda log: "" if (report / "report.json").exists() else "no report")


def serve(suite: Suite):
    serve_client(suite, suite.model, "cold: empty compile cache")
    serve_client(suite, suite.model, "warm: second start")


def qwen(suite: Suite):
    model = suite.work / "qwen2-1.5b"
    # Baichuan 2's tokenizer stands in for Qwen2's (not in ../shared): the vocabulary is its 125,696 ids, not 151,936
    suite.run("build model (Qwen2-1.5B, all 28 layers, Baichuan 2 vocabulary)",
              [PY, "bench/shapes.py", "qwen2-1.5b", str(model), "--tokenizer",
               str(suite.assets / "tokenizers" / "baichuan2"), "--vocab_size", "125696", *suite.tiny])
    serve_client(suite, model, "Qwen2-1.5B cold")
    serve_client(suite, model, "Qwen2-1.5B warm")


def shapes(suite: Suite):
    for shape in ("baichuan-7b", "baichuan2-13b", "qwen2-1.5b", "qwen3-8b", "llama3-8b"):
        tokenizer = suite.assets / "tokenizers" / ("baichuan1" if shape == "baichuan-7b" else "baichuan2")
        work = suite.work / f"steps-{shape}"
        suite.run(f"model steps: {shape} (2 layers)",
                  [PY, "bench/gpu_model_steps.py", shape, "--tokenizer", str(tokenizer), "--data", str(suite.csl),
                   "--work", str(work), *suite.tiny], timeout=240,
                  check=lambda log: "" if "[steps] all passed" in log else last_error(log))
        shutil.rmtree(work, ignore_errors=True)


def tianchi(suite: Suite):
    """Issue 19's job through the script a user runs: every CSL title (`csl_records`' prompt) in a submission file,
    800 new tokens each with sampling, on the Baichuan2-7B shape; the first record's time and the whole job's."""
    from novelkit.data.tasks import csl_records

    model, work = suite.work / "baichuan2-7b", suite.work / "tianchi"
    suite.run("build model (Baichuan2-7B, all 32 layers)",
              [PY, "bench/shapes.py", "baichuan2-7b", str(model), "--tokenizer",
               str(suite.assets / "tokenizers" / "baichuan2"), *suite.tiny], timeout=180)
    records = [{**r, "output": ""} for r in csl_records(suite.assets / "data" / "csl" / "clge_val.tsv")]
    work.mkdir(parents=True, exist_ok=True)
    (work / "test.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                    encoding="utf-8")
    submit, out, tokens = work / "submit.json", work / "run", 16 if suite.tiny else 800
    suite.run(f"Baichuan-Finetune/run_predict.sh ({len(records):,} titles x {tokens} tokens, sampling, submission)",
              "bash Baichuan-Finetune/run_predict.sh --do_sample --temperature 0.7 --top_p 0.9",
              {"MODEL_PATH": str(model), "DATA": str(work / "test.json"), "SUBMIT": str(submit), "OUTPUT_DIR": str(out),
               "BATCH": "128", "MAX_NEW_TOKENS": str(tokens)},
              first_file=out / "predictions.jsonl", timeout=480, check=check_submission(submit, len(records)))
    shutil.rmtree(model, ignore_errors=True)


STEPS = {"lora": lambda s: finetune(s, "lora"), "dpo": dpo, "full": lambda s: finetune(s, "full"),
         "qlora": lambda s: finetune(s, "qlora"), "pretrain": pretrain, "scratch": scratch, "embedding": embedding,
         "analysis": analysis, "serve": serve, "demo": lambda s: demo_client(s, s.model, "warm"), "qwen": qwen, "shapes": shapes,
         "tianchi": tianchi}


# --- the server and the demo -------------------------------------------------------------------------------------


@contextmanager
def launched(suite: Suite, step: str, argv: list[str], ready, env: dict | None = None):
    """A server (`argv`) started for one step: yields (result, start time) once ready() is true; then stopped, its
    wall time, peak GPU memory and log filled in, the row recorded. An exception inside is the row's note."""
    result = suite.new_result(step)
    if suite.time_left() < 60:
        result.note = "not run: the call's time budget is spent"
        suite.record(result)
        yield None
        return
    log_path = log_file(suite.work, step)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    sampler = GpuMemory(proc.pid)
    try:
        while True:
            if proc.poll() is not None or time.time() - start > suite.time_left():
                raise RuntimeError("did not come up: " + last_error(log_path.read_text()))
            try:
                if ready():
                    break
            except OSError:
                pass
            time.sleep(0.3)
        yield result, start
    except Exception as error:  # noqa: BLE001 - a failed step is a row, not the end of the suite
        result.ok, result.note = False, f"{type(error).__name__}: {error}"[:300]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except ProcessLookupError:  # it had already exited: the note says why
            pass
        result.wall_s = time.time() - start
        result.peak_gib, result.peak_scope = sampler.stop(), sampler.scope
        result.log = str(log_path)
        suite.record(result)


def serve_client(suite: Suite, model: Path, tag: str):
    """`python -m novelkit.serve`: time from the launch to the first streamed token of a request sent as soon as the
    port answers (start-up, loading, compiling and the request), then the openai client's calls."""
    import openai

    port = free_port()
    argv = [PY, "-m", "novelkit.serve", "--model_path", str(model), "--port", str(port), "--max_tokens", "64"]
    with launched(suite, f"python -m novelkit.serve ({tag}): openai client, streaming", argv,
                  lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True) as running:
        if running is None:
            return
        result, start = running
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        messages = [{"role": "user", "content": "写一句开头。"}]
        pieces = []
        for chunk in client.chat.completions.create(model="m", messages=messages, stream=True, max_tokens=32,
                                                    temperature=0):
            if chunk.choices and chunk.choices[0].delta.content:
                if result.first_s is None:
                    result.first_s = time.time() - start
                pieces.append(chunk.choices[0].delta.content)
        whole = client.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
        text = client.completions.create(model="m", prompt="雨下了一整夜，", max_tokens=16, temperature=0.8,
                                         top_p=0.9).choices[0].text
        result.ok = "".join(pieces) == whole.choices[0].message.content and bool(text) \
            and whole.usage.completion_tokens > 0
        result.note = "" if result.ok else f"stream {''.join(pieces)!r} vs whole {whole.choices[0].message.content!r}"


def demo_client(suite: Suite, model: Path, tag: str):
    """web_demo.py: time from the launch to the first streamed chat chunk through gradio_client."""
    import urllib.request

    from gradio_client import Client

    port = free_port()
    argv = [PY, "web_demo.py", "--model_path", str(model), "--port", str(port), "--max_new_tokens", "32",
            "--ratings_db", str(suite.work / "ratings.sqlite")]
    with launched(suite, f"web_demo.py ({tag}): gradio_client chat", argv,
                  lambda: bool(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)),
                  env={"GRADIO_ANALYTICS_ENABLED": "False"}) as running:
        if running is None:
            return
        result, start = running
        job = Client(f"http://127.0.0.1:{port}/", verbose=False).submit("从前有座山", "", False, 0, 0.85, 5, 1.1, 24,
                                                                        api_name="/chat")
        chunks = []
        for chunk in job:
            if result.first_s is None:
                result.first_s = time.time() - start
            chunks.append(chunk)
        final = job.result()
        result.ok = bool(final) and len(chunks) >= 2
        result.note = "" if result.ok else f"{len(chunks)} chunks, final {final!r}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=".gpu", help="tokenizers/ and data/ copied from ../shared (gpu_carry.sh)")
    parser.add_argument("--out", default=os.environ.get("OUT", "output/gpu_recipes"))
    parser.add_argument("--work", default="/tmp/gpu_recipes")
    parser.add_argument("--budget", type=float, default=560, help="seconds; later steps are not started past it")
    parser.add_argument("--tiny", action="store_true", help="hidden size 64 models: a dry run of the plumbing on a CPU")
    parser.add_argument("--only", default="", help="comma list of parts: " + ", ".join(PARTS))
    parser.add_argument("--lanes", type=int, default=0, help=f"parts run side by side ({len(LANES)}: the suite's "
                        "lanes; 1: one after another); default: the lanes on a GPU, one after another with --tiny")
    args = parser.parse_args()
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    if only - set(PARTS):
        parser.error(f"unknown parts {sorted(only - set(PARTS))}; the parts: {', '.join(PARTS)}")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # a fresh NOVELKIT_HOME: the compile cache starts empty, so the first start of each shape is a cold one
    os.environ["NOVELKIT_HOME"] = str(work / "home")
    suite = Suite(work, Path(args.assets).resolve(), Path(args.out), args.budget, ["--tiny"] if args.tiny else [],
                  only)
    prepare(suite)
    lanes = args.lanes or (1 if args.tiny else len(LANES))  # a CPU has no cores to spare for side-by-side training
    lanes = LANES if lanes > 1 else [[part for lane in LANES for part in lane]]
    suite.run_lanes(lanes, STEPS)
    suite.save({"command": " ".join(sys.argv), "lanes": len(lanes)})
    for r in suite.results:
        if not r.ok and r.log and Path(r.log).exists():
            print(f"\n===== {r.step}: last lines of {r.log}\n" + Path(r.log).read_text()[-2500:], flush=True)


if __name__ == "__main__":
    main()
