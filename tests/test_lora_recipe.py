"""Baichuan-Finetune-Lora end to end on the embedded default model and real CSL data: train, predict, merge, resume."""

import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from novelkit.data.readers import iter_records
from novelkit.models.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Finetune-Lora"


def run(script, *args, cwd):
    out = subprocess.run([sys.executable, str(FOLDER / script), *map(str, args)], cwd=cwd, env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def csl_files(shared_data, tmp_path_factory):
    """Title → abstract pairs from CSL as Alpaca JSON lines (the paper task), abstracts shortened to keep CPU runs short."""
    d = tmp_path_factory.mktemp("csl")
    rows = [r.data for r, _ in zip(iter_records(shared_data / "csl" / "clge_val.tsv"), range(48))]
    def alpaca(r):
        return {"instruction": "根据标题生成中文学位论文摘要：", "input": r["title"], "output": r["text"][:120]}
    (d / "train.jsonl").write_text("".join(json.dumps(alpaca(r), ensure_ascii=False) + "\n" for r in rows[:40]))
    (d / "dev.jsonl").write_text("".join(json.dumps(alpaca(r), ensure_ascii=False) + "\n" for r in rows[40:]))
    return d


@pytest.fixture(scope="module")
def trained(csl_files, tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    log = run("finetune.py", "--data", csl_files / "train.jsonl", "--dev", csl_files / "dev.jsonl",
              "--output_dir", out, "--max_length", 160, "--max_steps", 12, "--learning_rate", 3e-3,
              "--per_device_train_batch_size", 4, "--logging_steps", 1, "--eval_strategy", "no",
              "--save_strategy", "steps", "--save_steps", 6, "--report_to", "tensorboard", cwd=ROOT)
    return out, log


def losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h], state["global_step"]


def test_adapter_is_saved_and_learned(trained, default_model_dir):
    out, log = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "novelkit_base.json"):
        assert (out / name).exists(), name
    loss, step = losses(out / "checkpoint-12")
    assert step == 12 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, loss
    # PEFT starts every lora_B at zero: non-zero weights mean the adapter really changed
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard log missing"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(default_model_dir)


def test_predict_writes_predictions_and_metrics(trained, csl_files):
    out, _ = trained
    pred = out.parent / "pred"
    log = run("predict.py", "--lora_model", out, "--data", csl_files / "dev.jsonl", "--output_dir", pred,
              "--max_new_tokens", 24, "--batch_size", 3, cwd=ROOT)
    rows = [json.loads(line) for line in (pred / "predictions.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (csl_files / "dev.jsonl").read_text().splitlines()]
    assert len(rows) == len(dev) == 8
    assert [{k: v for k, v in r.items() if k not in ("index", "response")} for r in rows] == dev  # fields kept
    assert [r["index"] for r in rows] == list(range(8))  # in input order
    assert all(isinstance(r["response"], str) for r in rows)
    metrics = json.loads((pred / "metrics.json").read_text())
    for key in ("rouge-chinese/word", "rouge-chinese/char", "standard/word", "standard/char"):
        assert set(metrics[key]) == {"rouge-1", "rouge-2", "rouge-l"}
        assert all(0 <= metrics[key][m][s] <= 1 for m in metrics[key] for s in "prf")
    assert "| metric | P | R | F |" in log and "| rouge-l |" in log  # the markdown table is printed
    # beside the model, what copying the input (the title) scores on the same references
    n = int(statistics.median(len(r["output"]) for r in dev))
    assert set(metrics["baselines"]) == {f"lead-{n}", "source"}
    assert f"| lead-{n} (copy its first {n} characters) |" in log and metrics["verdict"] in log
    assert_no_dependency_noise(log)


# What dependencies printed on every run before novelkit.versions.quiet_dependency_noise (bitsandbytes' optional CPU
# kernel, peft reading a deprecated transformers property, the cache's old keyword, DeepSpeed on a CPU, pinned memory).
NOISE = ("Failed to load CPU gemm_4bit_forward", "is_gradient_checkpointing", "past_key_values",
         "Setting accelerator to CPU", "pin_memory", "FutureWarning")


def assert_no_dependency_noise(log):
    assert not [line for line in log.splitlines() if any(noise in line for noise in NOISE)], log[-3000:]


def test_training_console_shows_no_dependency_noise(trained):
    assert_no_dependency_noise(trained[1])


def test_adapter_reload_gives_identical_logits_and_merge_matches(trained, tmp_path):
    out, _ = trained
    tok = load_tokenizer(str(out))
    ids = tok(["根据标题生成中文学位论文摘要：超立方体网络的连通度"], return_tensors="pt")
    live = load_model(None, device="cpu", adapter=str(out))
    again = load_model(None, device="cpu", adapter=str(out))
    with torch.no_grad():
        a, b = live(**ids).logits, again(**ids).logits
        base = load_model(None, device="cpu")(**ids).logits
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-4  # the adapter changes the model

    run("merge_lora.py", "--lora_model", out, "--output_dir", tmp_path / "merged", cwd=ROOT)
    from transformers import AutoModelForCausalLM  # plain transformers, no PEFT

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        m = merged(**ids).logits
    assert torch.allclose(m, a, atol=1e-5), (m - a).abs().max()


def test_rerun_resumes_from_last_checkpoint(trained, csl_files):
    out, _ = trained
    log = run("finetune.py", "--data", csl_files / "train.jsonl", "--output_dir", out, "--max_length", 160,
              "--max_steps", 16, "--learning_rate", 3e-3, "--per_device_train_batch_size", 4, "--logging_steps", 1,
              "--save_strategy", "steps", "--save_steps", 4, "--report_to", "none", cwd=ROOT)
    assert f"resuming from {out / 'checkpoint-12'}" in log
    loss, step = losses(out / "checkpoint-16")
    assert step == 16
    # steps 1-12 come from the first run's saved state, 13-16 are new: one loss per step, none repeated
    assert len(loss) == 16


def test_ds_finetune_sh_with_deepspeed_zero2(csl_files, tmp_path, default_model_dir):
    """The shell entry point under DeepSpeed ZeRO-2: torchrun, one CPU process, gloo (first use compiles an op)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DATA=str(csl_files / "train.jsonl"),
               DEV="", OUTPUT_DIR=str(tmp_path / "ds"), DS_CONFIG=str(FOLDER / "ds_zero2.json"), MAX_LENGTH="128")
    out = subprocess.run(["bash", str(FOLDER / "ds_finetune.sh"), "--max_steps", "3", "--save_strategy", "no",
                          "--report_to", "none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "DeepSpeed" in out.stdout + out.stderr or "deepspeed" in out.stdout + out.stderr
    weights = load_file(tmp_path / "ds" / "adapter_model.safetensors")
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{bad}"], "error: {bad}:2: missing field 'output'"),
        (["--data", "{missing}"], "error: {missing}: file not found"),
        (["--data", "{bad}", "--template", "nope"], "error: unknown template 'nope'"),
        (["--data", "{bad}", "--model_path", "{missing}"], "error: model folder not found: {missing}"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    bad, missing = tmp_path / "bad.jsonl", tmp_path / "missing.jsonl"
    bad.write_text('{"instruction": "写", "output": "好"}\n{"instruction": "写"}\n', encoding="utf-8")
    fill = {"bad": bad, "missing": missing}
    out = subprocess.run([sys.executable, str(FOLDER / "finetune.py"), "--output_dir", str(tmp_path / "o"),
                          *[a.format(**fill) for a in args]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(**fill)), last
    assert "Traceback" not in out.stderr


def test_packed_training_learns(csl_files, tmp_path, default_model_dir):
    """--packing true (the default on a GPU): the 40 samples go into fewer, fuller rows, and the adapter learns."""
    out = tmp_path / "packed"
    log = run("finetune.py", "--data", csl_files / "train.jsonl", "--output_dir", out, "--max_length", 1024,
              "--packing", "true", "--max_steps", 8, "--learning_rate", 3e-3, "--per_device_train_batch_size", 2,
              "--logging_steps", 1, "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", 8,
              "--report_to", "none", cwd=ROOT)
    rows = int(log.split("packing: 40 samples in ")[1].split()[0])
    assert rows <= 40 // 3
    assert "fast path: chunked_loss=True" in log
    loss, step = losses(out / "checkpoint-8")
    assert step == 8 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3, loss


def test_the_best_checkpoint_is_the_output_and_training_stops_when_the_dev_loss_rises(tmp_path, default_model_dir):
    """Training answers are one fixed text, the dev answers another for the same prompts: once the adapter has learned
    the answers' shape, the more it learns the higher the dev loss. The lowest evaluation's adapter is the output,
    training stops after --patience evaluations without a lower loss, and a rerun resumes with the patience count
    and stops at its next evaluation."""
    prompts = [f"第{i}个问题：今天写什么？" for i in range(24)]
    for name, answer in (("train", "甲乙丙丁甲乙丙丁"), ("dev", "戊己庚辛戊己庚辛")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"instruction": p, "output": answer},
                                                                   ensure_ascii=False) + "\n" for p in prompts))
    out = tmp_path / "out"
    args = ["--data", tmp_path / "train.jsonl", "--dev", tmp_path / "dev.jsonl", "--output_dir", out,
            "--max_length", 64, "--max_steps", 40, "--learning_rate", 3e-3, "--per_device_train_batch_size", 8,
            "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "steps", "--save_steps", 2,
            "--save_total_limit", 2, "--eval_samples", 0, "--patience", 2, "--report_to", "none"]
    log = run("finetune.py", *args, cwd=ROOT)
    best = json.loads((out / "best_checkpoint.json").read_text())
    steps, values = zip(*((e["step"], e["value"]) for e in best["evaluations"]))
    low = steps[values.index(min(values))]
    assert best["metric"] == "eval_loss" and best["best_step"] == low and best["best_value"] == min(values)
    assert all(v > min(values) for v in values[-2:])  # the two evaluations after the best were worse ...
    assert best["stopped_early"] and best["last_step"] == low + 4 == steps[-1] < 40  # ... so it stopped there
    assert f"[lora] best model: step {low}, eval_loss" in log and f"stopped early at step {low + 4} of 40" in log
    # the output is the best checkpoint's adapter (kept by the checkpoint rotation), not the last step's
    saved = load_file(out / "adapter_model.safetensors")
    best_weights, last_weights = (load_file(out / f"checkpoint-{n}" / "adapter_model.safetensors")
                                  for n in (low, low + 4))
    assert all(torch.equal(saved[k], best_weights[k]) for k in saved)
    assert not all(torch.equal(saved[k], last_weights[k]) for k in saved)

    log = run("finetune.py", *args, cwd=ROOT)  # the rerun resumes with 2 evaluations already without improvement
    again = json.loads((out / "best_checkpoint.json").read_text())
    assert f"resuming from {out / f'checkpoint-{low + 4}'}" in log and again["best_step"] == low
    if again["evaluations"][-1]["value"] >= min(values):  # no new best at its first evaluation: it stops there
        assert again["last_step"] == low + 6 and again["stopped_early"]
    assert all(torch.equal(load_file(out / "adapter_model.safetensors")[k], best_weights[k]) for k in saved)
