"""Baichuan-Analysis model report: parameter counts (real and meta-device models), LoRA trainable parameters against
PEFT, the memory estimate against a measured training peak, and the Baichuan2-7B/13B configs without weights."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from novelkit.models.baichuan import BaichuanForCausalLM, tiny_config
from novelkit.models.loading import load_model
from novelkit.analysis.memory import GIB, NF4_BYTES, empty_model, estimate_memory, load_config, lora_parameters, \
    lora_target_modules, model_shape, parameters_by_component, parameters_by_type

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Analysis"
MARGIN = 0.15  # stated in analyze_model.py and its report


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", ["auto", "all", "o_proj,down_proj"])
@pytest.mark.parametrize("kind", ["default", "baichuan2-7b", "baichuan-13b"])
def test_counts_and_lora_parameters_match_torch_and_peft(kind, spec, default_model_dir):
    torch.manual_seed(0)
    model = load_model(None, device="cpu") if kind == "default" else BaichuanForCausalLM(tiny_config(kind))
    total = sum(p.numel() for p in model.parameters())
    assert sum(parameters_by_type(model).values()) == sum(parameters_by_component(model).values()) == total
    assert model_shape(model).params == total
    targets = lora_target_modules(model, spec)
    peft_targets = "all-linear" if spec == "all" else sorted(targets)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets))
    assert trainable(wrapped) == lora_parameters(targets, 4) > 0
    if spec == "auto":  # W_pack on Baichuan (as the fine-tuning recipe), q_proj and v_proj elsewhere
        names = {n.rsplit(".", 1)[-1] for n in targets}
        assert names == ({"W_pack"} if model.config.model_type == "baichuan" else {"q_proj", "v_proj"})


def test_meta_model_from_a_config_counts_like_the_real_one(default_model_dir, tmp_path):
    real = load_model(None, device="cpu")
    meta = empty_model(load_config(default_model_dir))
    assert next(meta.parameters()).device.type == "meta"
    assert model_shape(meta) == model_shape(real)
    assert parameters_by_component(meta) == parameters_by_component(real)
    # the same config as a bare JSON file
    (tmp_path / "config.json").write_text((default_model_dir / "config.json").read_text())
    assert model_shape(empty_model(load_config(tmp_path / "config.json"))) == model_shape(real)


def test_zero_estimates_follow_deepspeeds_estimator():
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shape(empty_model(load_config(FOLDER / "configs" / "baichuan2-13b.json")))
    for gpus in (1, 4, 8):
        rows = {e.mode: e for e in estimate_memory(shape, 0, 0, 1, 1, num_gpus=gpus)}
        states = {mode: e.weights + e.gradients + e.optimizer for mode, e in rows.items()}
        assert states["full ZeRO-2"] == pytest.approx(zero2.estimate_zero2_model_states_mem_needs(
            shape.params, gpus, cpu_offload=False)[1], abs=1)
        cpu, gpu = zero2.estimate_zero2_model_states_mem_needs(shape.params, gpus, cpu_offload=True)
        assert states["full ZeRO-2 + offload optimizer"] == gpu
        assert rows["full ZeRO-2 + offload optimizer"].cpu == pytest.approx(cpu, abs=1)
        _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus, cpu_offload=False)
        assert states["full ZeRO-3"] == pytest.approx(gpu, abs=1)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus)
        assert states["full ZeRO-3 + offload params and optimizer"] == gpu
        assert rows["full ZeRO-3 + offload params and optimizer"].cpu == pytest.approx(cpu, abs=1)


def test_report_on_the_default_model_checks_the_estimate(tmp_path, default_model_dir):
    """run_analysis.sh model with no MODEL_PATH: the embedded default, trained 2 AdamW steps on CPU (fp32) for each
    of full / LoRA x with / without gradient checkpointing; measured = parameters + torch's CPU allocator peak."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUTPUT_DIR": str(tmp_path),
           "BATCH": "2", "MAX_LENGTH": "128", "LORA_TARGET": "all"}
    out = subprocess.run(["bash", str(FOLDER / "run_analysis.sh"), "model"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    params = load_model(None, device="cpu").num_parameters()
    assert report["parameters"] == params
    checks = {(row["method"], row["gradient_checkpointing"]): row for row in report["measured_check"]}
    assert set(checks) == {("full", False), ("full", True), ("LoRA", False), ("LoRA", True)}
    for row in checks.values():
        assert abs(row["error"]) <= report["check_margin"] == MARGIN, row
    # real peaks: full fine-tuning holds weights, gradients and AdamW states (16 bytes a parameter) and more
    assert checks[("full", False)]["measured_bytes"] > 16 * params
    assert checks[("full", True)]["measured_bytes"] < checks[("full", False)]["measured_bytes"]
    md = (tmp_path / "report.md").read_text()
    for text in ("peak = weights + optimizer states + max(", "| QLoRA |", "![memory_by_method.png]", "| LoRA | True |"):
        assert text in md
    for png in ("memory_by_method.png", "memory_by_length.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baichuan2_7b_from_a_config_alone(tmp_path):
    """No weights: a folder with only config.json, as a user estimating memory before downloading 15 GB."""
    (tmp_path / "model").mkdir()
    shutil.copy(FOLDER / "configs" / "baichuan2-7b.json", tmp_path / "model" / "config.json")
    script = FOLDER / "analyze_model.py"
    argv, sys.argv = sys.argv, [str(script), "--model_path", str(tmp_path / "model"), "--batch", "4",
                                "--max_length", "2048", "--output_dir", str(tmp_path / "report")]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["parameters"] == 7_505_973_248  # Baichuan2-7B's published size
    assert report["lora"]["trainable"] == 32 * 8 * (4096 + 3 * 4096)  # W_pack in 32 layers, r=8
    assert report["parameters_by_type"]["NormHead"] == 125_696 * 4096
    assert report["measured_check"] == []
    gib = report["memory_gib"]
    assert gib["QLoRA"]["peak"] < gib["LoRA"]["peak"] < gib["full"]["peak"]
    assert gib["LoRA"]["peak_with_checkpointing"] < gib["LoRA"]["peak"]
    lora = report["lora"]["trainable"]
    qlora_weights = 6_476_005_376 * NF4_BYTES + 2 * 1_029_967_872 + 4 * lora  # 4-bit linears, bf16 rest, fp32 adapters
    assert gib["QLoRA"]["weights"] == pytest.approx(qlora_weights / GIB, abs=1e-3)
