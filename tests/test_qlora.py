"""Baichuan-Finetune-QLora on the CPU (bitsandbytes NF4): the eval-mode repacking pitfall and its fix, then the recipe
end to end on real CSL data: the loss falls, the adapter keeps changing after evaluation passes, the saved adapter
gives exactly the trainer's last eval loss, and predict.py runs on it in 4-bit with the seed's flags."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from entry_scripts import run_script
from novelkit.data.features import SFTCollator
from novelkit.data.features import encode_sft_dataset
from novelkit.data.formats import load_samples
from novelkit.data.templates import default_template_name, get_template
from novelkit.models.loading import load_model, load_tokenizer
from novelkit.models.quantization import choose_optimizer, is_repacked_for_cpu, load_4bit_model, nf4_config

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "Baichuan-Finetune-QLora"


def bnb_cpu_4bit_error():
    """Why bitsandbytes 4-bit cannot run on this CPU, or None when it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.to("cpu")(torch.randn(1, 64))  # .to() quantises
    except Exception as e:  # noqa: BLE001 - any failure means: skip with the reason
        return f"{type(e).__name__}: {e}"
    return None


pytestmark = pytest.mark.skipif(bnb_cpu_4bit_error() is not None, reason=f"no CPU 4-bit: {bnb_cpu_4bit_error()}")


def has_avx512bf16():
    import bitsandbytes.functional as F

    return bool(F.has_avx512bf16())


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_eval_pass_cuts_lora_gradients_unless_the_layout_is_kept(tmp_path):
    torch.manual_seed(0)
    # layer sizes multiple of 64: the repacking fails outright on others, as on the default model's 352-wide MLP
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(tmp_path)
    ids = torch.randint(3, 512, (2, 16))

    def lora_gradients(model):
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for n, p in model.named_parameters() if "lora_B" in n]

    def after_eval_pass(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
        assert all(g is not None for g in lora_gradients(model))
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        return model

    plain = load_model(str(tmp_path), dtype="fp32", device="cpu", device_map={"": "cpu"},
                       quantization_config=nf4_config(torch.bfloat16))
    plain = after_eval_pass(plain)
    assert is_repacked_for_cpu(plain)
    assert all(g is None for g in lora_gradients(plain))  # the pitfall: training goes on, the adapter gets nothing

    kept = after_eval_pass(load_4bit_model(str(tmp_path), device="cpu"))
    assert not is_repacked_for_cpu(kept)
    assert all(g is not None and g.abs().sum() > 0 for g in lora_gradients(kept))


def test_paged_adamw_on_gpu_plain_adamw_on_cpu(tmp_path):
    assert choose_optimizer(TrainingArguments(output_dir=str(tmp_path)), on_gpu=True) == "paged_adamw_32bit"
    assert choose_optimizer(TrainingArguments(output_dir=str(tmp_path)), on_gpu=False) == "adamw_torch"
    assert choose_optimizer(TrainingArguments(output_dir=str(tmp_path), optim="adafactor"), on_gpu=True) == "adafactor"


def test_missing_bitsandbytes_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    code = run_script(FOLDER / "finetune.py", "--output_dir", tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: QLoRA needs bitsandbytes, which cannot be imported"), err[-3:]


@pytest.fixture(scope="module")
def csl(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("csl")
    assert run_script(ROOT / "Baichuan-Finetune" / "prepare_data.py", "csl", "--raw",
                      shared_data / "csl" / "clge_val.tsv", "--output_dir", out, "--dev", 8, "--test", 4,
                      "--max_train", 32) == 0
    return out


@pytest.fixture(scope="module")
def trained(csl, tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    code = run_script(FOLDER / "finetune.py", "--data", csl / "train.json", "--dev", csl / "dev.json",
                      "--output_dir", out, "--max_length", 64, "--max_steps", 8, "--learning_rate", 1e-2,
                      "--lora_r", 8, "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8,
                      "--logging_steps", 1, "--eval_strategy", "steps", "--eval_steps", 4, "--eval_samples", 2,
                      "--eval_max_new_tokens", 4, "--save_strategy", "steps", "--save_steps", 4,
                      "--gradient_checkpointing", "true", "--report_to", "none")
    assert code == 0
    return out


def test_loss_falls_and_adapter_keeps_learning_after_evaluation(trained):
    state = json.loads((trained / "checkpoint-8" / "trainer_state.json").read_text())
    loss = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(loss) == 8 and sum(loss[-2:]) / 2 < sum(loss[:2]) / 2, loss
    assert [h["step"] for h in state["log_history"] if "eval_rouge-l" in h] == [4, 8]  # loss pass + generation
    after_eval = load_file(trained / "checkpoint-4" / "adapter_model.safetensors")  # saved right after step 4's eval
    last = load_file(trained / "checkpoint-8" / "adapter_model.safetensors")
    assert after_eval.keys() == last.keys() and any("lora_A" in k for k in last)
    unchanged = [k for k in last if torch.equal(last[k], after_eval[k])]
    assert not unchanged, unchanged
    # the output is the best evaluation's checkpoint
    best = json.loads((trained / "best_checkpoint.json").read_text())["best_step"]
    final = load_file(trained / "adapter_model.safetensors")
    kept = load_file(trained / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)


def test_saved_adapter_gives_the_best_evaluations_loss(trained, csl):
    """Reloaded in 4 bits, the saved adapter gives the dev loss the Trainer logged at the best evaluation."""
    state = json.loads((trained / "checkpoint-8" / "trainer_state.json").read_text())
    best = json.loads((trained / "best_checkpoint.json").read_text())["best_step"]
    last_eval = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h and h["step"] == best][-1]
    tokenizer = load_tokenizer(str(trained))
    model = load_4bit_model(None, device="cpu", adapter=str(trained)).eval()
    template = get_template(default_template_name(tokenizer, model.config))
    batch = SFTCollator(tokenizer.pad_token_id)(encode_sft_dataset(tokenizer, template, load_samples(csl / "dev.json"),
                                                             64, "dev"))
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(last_eval, rel=1e-5)
        with model.disable_adapter():
            assert abs(model(**batch).loss.item() - last_eval) > 1e-3


def test_predict_in_4bit_with_the_seed_flags(trained, csl, tmp_path):
    predictions = tmp_path / "p" / "predictions.jsonl"
    code = run_script(FOLDER / "predict.py", "--lora_model", trained, "--load_in_4bit", "--only_cpu",
                      "--data_file", csl / "dev.json", "--predictions_file", predictions, "--max_new_tokens", 4)
    assert code == 0
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(8))
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["scored"] == 8
