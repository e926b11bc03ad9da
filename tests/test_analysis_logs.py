"""Baichuan-Analysis logs report on a real (tiny) training run: TensorBoard events and trainer_state.json give the
same curves, several runs share one plot, resumed runs are merged."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from novelkit.analysis.runlogs import read_run
from novelkit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "Baichuan-Analysis" / "analyze_logs.py"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, default_model_dir):
    """4 LoRA steps on the embedded default model, loss every step, eval loss every 2, a checkpoint at step 4."""
    work = tmp_path_factory.mktemp("logs")
    sft = ROOT / "data_examples" / "sft"
    (work / "train.jsonl").write_text("".join(sft.joinpath("train.jsonl").read_text().splitlines(True)[:16]))
    (work / "dev.jsonl").write_text("".join(sft.joinpath("dev.jsonl").read_text().splitlines(True)[:4]))
    run = work / "run"
    # one thread: the tiny model gains nothing from more, and a busy machine can stall on thread hand-offs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "Baichuan-Finetune-Lora" / "finetune.py"), "--output_dir", str(run),
         "--data", str(work / "train.jsonl"), "--dev", str(work / "dev.jsonl"), "--max_length", "96",
         "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1",
         "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "4",
         "--report_to", "tensorboard"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def png_description(path) -> str:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
        image.load()  # decodes every pixel: a complete, uncorrupted PNG
        return image.text["Description"]


def test_event_files_and_trainer_state_give_the_same_curves(trained_run):
    events = read_run(trained_run)
    state = read_run(trained_run / "checkpoint-4" / "trainer_state.json")
    assert "events.out.tfevents" in events.source
    for metric in ("loss", "eval_loss", "learning_rate"):
        steps, values = events.series(metric)
        assert steps == state.series(metric)[0] == ([1, 2, 3, 4] if metric != "eval_loss" else [2, 4])
        assert values == pytest.approx(state.series(metric)[1], rel=1e-6)  # TensorBoard stores float32


def test_report_puts_several_runs_on_one_plot(trained_run, tmp_path):
    second = tmp_path / "second" / "trainer_state.json"
    second.parent.mkdir()
    state = json.loads((trained_run / "checkpoint-4" / "trainer_state.json").read_text())
    for entry in state["log_history"]:  # a second run that went better
        for key in ("loss", "eval_loss"):
            if key in entry:
                entry[key] -= 1.0
    second.write_text(json.dumps(state))
    argv, sys.argv = sys.argv, [str(SCRIPT), "--runs", str(trained_run), str(second), "--output_dir", str(tmp_path / "r")]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    first, better = report["runs"]
    assert (first["run"], better["run"]) == ("run", "second")
    assert better["final_loss"] == pytest.approx(first["final_loss"] - 1, abs=1e-5)
    assert first["final_perplexity"] == pytest.approx(math.exp(first["final_loss"]))
    assert first["best_eval_step"] in (2, 4) and first["last_step"] == 4
    descriptions = {name: png_description(tmp_path / "r" / name) for name in
                    ("loss.png", "eval_loss.png", "perplexity.png", "learning_rate.png")}
    assert descriptions["loss.png"] == "title: Training loss; x: step; y: loss; lines: run, second"
    assert descriptions["perplexity.png"].endswith("lines: run (train), run (eval), second (train), second (eval)")
    assert "y: learning rate" in descriptions["learning_rate.png"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert all(f"![{name}]({name})" in md for name in descriptions)


def test_resumed_run_is_merged_and_the_latest_checkpoint_chosen(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    for folder, points in (("first", {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.9}), ("resumed", {3: 2.5, 4: 1.5, 5: 1.0})):
        writer = SummaryWriter(run / "runs" / folder)
        for step, loss in points.items():
            writer.add_scalar("train/loss", loss, step)
        writer.close()
    assert read_run(run).metrics["loss"] == {1: 4.0, 2: 3.0, 3: 2.5, 4: 1.5, 5: 1.0}  # the later launch wins

    states = tmp_path / "states"
    for step in (2, 10):
        (states / f"checkpoint-{step}").mkdir(parents=True)
        (states / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [{"loss": 1.0 / step, "step": step}]}))
    assert read_run(states).metrics["loss"] == {10: 0.1}  # checkpoint-10, not checkpoint-2 (sorted as text)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no TensorBoard event files"):
        read_run(tmp_path / "empty")
    bad = tmp_path / "trainer_state.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match=f"^{bad}: not a trainer_state.json"):
        read_run(bad)
