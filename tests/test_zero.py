"""DeepSpeed ZeRO through the real shell entries on CPU processes (gloo): ZeRO-3 over two processes, its consolidated
16-bit save reloaded to the live model's logits, resuming that run on one process with the same losses, LoRA under
ZeRO-3 saving a plain adapter; the launcher each ds_finetune.sh uses; the configs beside every script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from novelkit.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["Baichuan-Finetune", "Baichuan-Finetune-Lora", "Baichuan-Finetune-QLora", "Baichuan-Pretrain"]
CONFIGS = ["ds_zero2.json", "ds_zero2_offload.json", "ds_zero3.json", "ds_zero3_offload.json"]
DATA = ROOT / "data_examples" / "sft" / "train.jsonl"


def ds_finetune(folder, tmp_path, port, *args, **variables):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DATA=str(DATA), DEV="",
               MAX_LENGTH="64", BF16="false", MASTER_PORT=str(port), **{k: str(v) for k, v in variables.items()})
    out = subprocess.run(["bash", str(ROOT / folder / "ds_finetune.sh"), "--report_to", "none", "--logging_steps",
                          "1", *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def step_losses(checkpoint: Path) -> dict[int, tuple[float, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h}


def test_zero3_on_two_processes_saves_whole_weights_and_resumes_on_one(tmp_path, default_model_dir):
    config = ROOT / "Baichuan-Finetune" / "ds_zero3.json"
    two = tmp_path / "two"
    log = ds_finetune("Baichuan-Finetune", tmp_path, 29611, "--max_steps", 6, "--save_steps", 3, "--verify_save",
                      "true", OUTPUT_DIR=two, DS_CONFIG=config, NUM_GPUS=2, BATCH=4)
    assert sorted(p.name for p in (two / "checkpoint-3" / "global_step3").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # partitioned
    # the consolidated save is a plain model folder, and it is the trained model: same logits on the same input
    assert "[full] reloaded" in log and "logits max |diff| 0 " in log, log[-2000:]
    saved = load_model(str(two), device="cpu")
    base = load_model(None, device="cpu")
    assert any((a - b).abs().max() > 0 for a, b in zip(saved.parameters(), base.parameters()))

    # the same run resumed from step 3 on ONE process (gradient accumulation 2 keeps the global batch of 8)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(two / "checkpoint-3", one / "checkpoint-3")
    log = ds_finetune("Baichuan-Finetune", tmp_path, 29612, "--max_steps", 6, "--save_steps", 3,
                      OUTPUT_DIR=one, DS_CONFIG=config, NUM_GPUS=1, BATCH=4, GRAD_ACCUM=2)
    assert "written by 2 processes, resuming with 1" in log, log[-3000:]
    assert (one / "checkpoint-3" / "latest_universal").exists()
    resumed, continuous = step_losses(one / "checkpoint-6"), step_losses(two / "checkpoint-6")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # optimizer state and data order carried over: the same steps as without the stop
        assert resumed[step] == pytest.approx(continuous[step], rel=1e-3), (step, resumed, continuous)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lora_under_zero3_saves_a_plain_adapter(tmp_path, default_model_dir):
    out = tmp_path / "lora"
    log = ds_finetune("Baichuan-Finetune-Lora", tmp_path, 29613, "--max_steps", 3, "--save_strategy", "no",
                      "--learning_rate", 1e-2, "--verify_save", "true", OUTPUT_DIR=out,
                      DS_CONFIG=ROOT / "Baichuan-Finetune-Lora" / "ds_zero3.json")
    assert "[lora] reloaded" in log and "logits max |diff| 0 " in log, log[-2000:]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # the adapter only, not the gathered base
    assert all(w.numel() > 0 for w in weights.values())  # whole tensors, not empty ZeRO-3 placeholders
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())
    model = load_model(None, device="cpu", adapter=str(out))  # loads like any PEFT adapter
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.fixture()
def fake_launchers(tmp_path):
    """`deepspeed` and `torchrun` that only record how they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("deepspeed", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir, tmp_path / "calls"


@pytest.mark.parametrize("folder", FOLDERS)
def test_launcher_uses_deepspeed_with_a_hostfile(folder, fake_launchers, tmp_path):
    bin_dir, calls = fake_launchers
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", HOSTFILE="hosts",
               NUM_GPUS="8", MASTER_PORT="29555", DS_CONFIG=f"{folder}/ds_zero3.json", BF16="true")
    assert subprocess.run(["bash", str(ROOT / folder / "ds_finetune.sh"), "--max_steps", "5"], env=env,
                          cwd=tmp_path, timeout=120).returncode == 0
    call = calls.read_text().split()
    assert call[:9] == ["deepspeed", "--hostfile", "hosts", "--num_gpus", "8", "--master_port", "29555",
                        "--no_local_rank", str(ROOT / folder / Path(call[8]).name)]
    assert call[-4:] == ["--max_steps", "5", "--deepspeed", f"{folder}/ds_zero3.json"]


def test_launcher_on_cpu_uses_torchrun_with_gloo_processes(fake_launchers, tmp_path):
    bin_dir, calls = fake_launchers
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", NUM_GPUS="2",
               DS_CONFIG="ds.json", BF16="false")
    env.pop("HOSTFILE", None)
    env.pop("MASTER_PORT", None)
    assert subprocess.run(["bash", str(ROOT / "Baichuan-Finetune" / "ds_finetune.sh")], env=env, cwd=tmp_path,
                          timeout=120).returncode == 0
    call = calls.read_text().split()
    assert call[:5] == ["torchrun", "--nproc_per_node", "2", "--master_port", "29500"]
    assert call[-4:] == ["--use_cpu", "true", "--deepspeed", "ds.json"]


@pytest.mark.parametrize("gpus,num_gpus,visible,expected", [
    ("1", "", "", ["python", "0"]),       # one GPU: the script itself, in the launcher's environment
    ("4", "1", "2,3", ["python", "2"]),   # NUM_GPUS=1 of several: the first visible one
    ("2", "", "", ["deepspeed", "--master_port"]),  # several: the deepspeed launcher
])
def test_launcher_on_one_gpu_starts_the_script_itself(gpus, num_gpus, visible, expected, fake_launchers, tmp_path):
    bin_dir, calls = fake_launchers
    # a `python` that reports `gpus` CUDA devices to the launcher's probe and records how it was started
    (bin_dir / "python").write_text(
        f'#!/bin/sh\ncase "$*" in *device_count*) echo {gpus}; exit 0;; esac\n'
        f'echo "python $CUDA_VISIBLE_DEVICES $RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $*" >> "{calls}"\n')
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", NUM_GPUS=num_gpus, CUDA_VISIBLE_DEVICES=visible,
               MASTER_PORT="29556", DS_CONFIG="ds.json", BF16="true")
    env.pop("HOSTFILE", None)
    assert subprocess.run(["bash", str(ROOT / "Baichuan-Finetune-Lora" / "ds_finetune.sh"), "--max_steps", "5"],
                          env=env, cwd=tmp_path, timeout=120).returncode == 0
    call = calls.read_text().split()
    assert call[:2] == expected
    assert call[-4:] == ["--max_steps", "5", "--deepspeed", "ds.json"]
    if expected[0] == "python":
        assert call[2:8] == ["0", "0", "1", "127.0.0.1", "29556", "-u"]
        assert call[8] == str(ROOT / "Baichuan-Finetune-Lora" / "finetune.py")


def test_every_script_has_the_same_four_zero_configs():
    for name in CONFIGS:
        texts = {(ROOT / folder / name).read_text() for folder in FOLDERS}
        assert len(texts) == 1, f"{name} differs between folders"
        config = json.loads(texts.pop())
        zero = config["zero_optimization"]
        assert zero["stage"] == int(name[7])
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # from_pretrained-loadable saves
        # offload runs the optimizer on the CPU: DeepSpeed's CPU Adam, which needs the optimizer block
        assert ("offload_optimizer" in zero) == ("optimizer" in config) == ("offload" in name)
