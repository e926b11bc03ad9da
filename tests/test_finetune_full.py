"""Baichuan-Finetune (full-parameter SFT) end to end on the embedded default model and real CSL data made by
prepare_data.py: the loss falls, evaluation logs eval loss and ROUGE to TensorBoard, the saved model gives exactly the
trainer's last eval loss, a run killed with SIGKILL resumes, and the shell entry runs under DeepSpeed ZeRO-3."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entry_scripts import run_script
from novelkit.data.features import SFTCollator
from novelkit.data.features import encode_sft_dataset
from novelkit.data.formats import load_samples
from novelkit.data.templates import default_template_name, get_template
from novelkit.models.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Finetune"


@pytest.fixture(scope="module")
def csl(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("csl")
    assert run_script(FOLDER / "prepare_data.py", "csl", "--raw", shared_data / "csl" / "clge_val.tsv",
                      "--output_dir", out, "--dev", 8, "--test", 4, "--max_train", 40) == 0
    return out


@pytest.fixture(scope="module")
def trained(csl, tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("full") / "model"
    code = run_script(FOLDER / "finetune.py", "--data", csl / "train.json", "--dev", csl / "dev.json",
                      "--output_dir", out, "--max_length", 96, "--max_steps", 10, "--learning_rate", 2e-3,
                      "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8, "--logging_steps", 1,
                      "--eval_strategy", "steps", "--eval_steps", 5, "--eval_samples", 3, "--eval_max_new_tokens", 8,
                      "--save_strategy", "steps", "--save_steps", 5, "--gradient_checkpointing", "true",
                      "--report_to", "tensorboard")
    assert code == 0
    return out


def test_loss_falls_and_evaluation_is_logged(trained):
    state = json.loads((trained / "checkpoint-10" / "trainer_state.json").read_text())
    loss = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(loss) == 10 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.1, loss
    evals = {h["step"]: h for h in state["log_history"] if "eval_loss" in h or "eval_rouge-l" in h}
    assert sorted(evals) == [5, 10]
    generated = [h for h in state["log_history"] if "eval_rouge-l" in h]
    assert [h["step"] for h in generated] == [5, 10]
    assert all(0 <= h[k] <= 1 for h in generated for k in ("eval_rouge-1", "eval_rouge-2", "eval_rouge-l"))
    events = EventAccumulator(str(next(trained.glob("runs/*")))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/rouge-1", "eval/rouge-l"} <= tags, tags
    assert [e.step for e in events.Scalars("eval/rouge-l")] == [5, 10]
    for name in ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json"):
        assert (trained / name).exists(), name


def test_saved_model_gives_the_trainers_last_eval_loss(trained, csl, default_model_dir):
    state = json.loads((trained / "checkpoint-10" / "trainer_state.json").read_text())
    last_eval = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1]
    tokenizer = load_tokenizer(str(trained))
    model = load_model(str(trained), device="cpu").eval()
    template = get_template(default_template_name(tokenizer, model.config))
    rows = encode_sft_dataset(tokenizer, template, load_samples(csl / "dev.json"), 96, "dev")
    batch = SFTCollator(tokenizer.pad_token_id)(rows)  # the trainer's single eval batch of 8
    base = load_model(None, device="cpu").eval()
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(last_eval, rel=1e-5)
        assert abs(base(**batch).loss.item() - last_eval) > 0.1  # the weights did change


def test_training_killed_with_sigkill_resumes(csl, tmp_path, default_model_dir, capsys):
    out = tmp_path / "killed"
    flags = ["--data", csl / "train.json", "--output_dir", out, "--max_length", 48, "--learning_rate", 1e-3,
             "--per_device_train_batch_size", 2, "--logging_steps", 1, "--save_strategy", "steps", "--save_steps", 2,
             "--report_to", "none"]
    proc = subprocess.Popen([sys.executable, str(FOLDER / "finetune.py"), *map(str, flags), "--max_steps", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-2" / "trainer_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert steps, "no checkpoint was written before the kill"

    assert run_script(FOLDER / "finetune.py", *flags, "--max_steps", steps[-1] + 2) == 0
    assert f"resuming from {out / f'checkpoint-{steps[-1]}'}" in capsys.readouterr().out
    state = json.loads((out / f"checkpoint-{steps[-1] + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps[-1] + 2
    assert len([h for h in state["log_history"] if "loss" in h]) == steps[-1] + 2  # no step lost or repeated


def test_ds_finetune_sh_with_deepspeed_zero3(csl, tmp_path, default_model_dir):
    """The shell entry under DeepSpeed ZeRO-3 (params, grads and optimizer state partitioned), one CPU process."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DATA=str(csl / "train.json"),
               DEV=str(csl / "dev.json"), OUTPUT_DIR=str(tmp_path / "ds"), DS_CONFIG=str(FOLDER / "ds_zero3.json"),
               MAX_LENGTH="64", EVAL_STEPS="2", EVAL_SAMPLES="1", BF16="false")
    out = subprocess.run(["bash", str(FOLDER / "ds_finetune.sh"), "--max_steps", "2", "--report_to", "none",
                          "--eval_max_new_tokens", "4", "--per_device_eval_batch_size", "8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "'eval_rouge-l'" in log  # generation under ZeRO-3 (parameters gathered layer by layer)
    states = torch.load(tmp_path / "ds" / "checkpoint-2" / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    zero = states["ds_config"]["zero_optimization"]
    assert zero["stage"] == 3 and isinstance(zero["reduce_bucket_size"], int)  # the "auto" values were filled in
    saved = load_model(str(tmp_path / "ds"), device="cpu")  # whole weights gathered from the partitions
    base = load_model(None, device="cpu")
    assert saved.get_input_embeddings().weight.shape == base.get_input_embeddings().weight.shape
    assert any((a - b).abs().max() > 0 for a, b in zip(saved.parameters(), base.parameters()))
