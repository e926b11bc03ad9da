"""Baichuan-Finetune-DPO on the embedded default model: the preference files it reads, DPO and SimPO learning the
training pairs (loss down, margin up), the adapter saving / reloading / merging, the full and QLoRA switches, and a
stopped run resuming with the same reference log-probs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from novelkit.training.preference_data import load_preference_pairs
from novelkit.data.readers import iter_records
from novelkit.errors import DataError
from novelkit.evaluation.ratings import Rating, RatingStore
from novelkit.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "Baichuan-Finetune-DPO" / "finetune.py"


def run(*args, ok=True):
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=dict(os.environ),
                         capture_output=True, text=True, timeout=600)
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def csl_pairs(shared_data, tmp_path_factory):
    """Real CSL abstracts (shortened) with their own title chosen over the next paper's title."""
    rows = [r.data for r, _ in zip(iter_records(shared_data / "csl" / "clge_val.tsv"), range(33))]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "为下面的摘要写一个标题：\n" + r["text"][:100], "chosen": r["title"],
                                        "rejected": rows[i + 1]["title"]}, ensure_ascii=False) + "\n"
                            for i, r in enumerate(rows[:-1])), encoding="utf-8")
    return path


def train_args(lr=2e-3):
    return ["--max_length", 160, "--per_device_train_batch_size", 4, "--learning_rate", lr, "--logging_steps", 4,
            "--eval_strategy", "no", "--save_strategy", "steps", "--report_to", "none", "--lora_target", "all"]


TRAIN = train_args()


def history(checkpoint: Path) -> list[dict]:
    return [h for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- the data


def test_every_preference_shape_reads_to_the_same_prompt_and_bad_records_name_file_line_and_field(tmp_path):
    chat = [{"role": "system", "content": "你是小说家。"}, {"role": "user", "content": "续写"}]
    records = [
        {"prompt": "续写", "chosen": "好", "rejected": "坏", "system": "你是小说家。"},
        {"instruction": "续写", "input": "", "system": "你是小说家。", "chosen": "好", "rejected": "坏"},
        {"messages": chat, "chosen": {"role": "assistant", "content": "好"}, "rejected": "坏"},
        {"conversations": [{"from": "system", "value": "你是小说家。"}, {"from": "human", "value": "续写"}],
         "chosen": {"from": "gpt", "value": "好"}, "rejected": {"from": "gpt", "value": "坏"}},
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "好"}],
         "rejected": [{"role": "assistant", "content": "坏"}]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    pairs = load_preference_pairs(path)
    assert [(p.sample.system, p.sample.prompt, p.chosen, p.rejected) for p in pairs] == \
        [("你是小说家。", "续写", "好", "坏")] * 5

    for bad, message in (({"prompt": "续写", "chosen": "好"}, "missing field 'rejected'"),
                         ({"prompt": "续写", "chosen": "好", "rejected": " 好"}, "are the same text"),
                         ({"prompt": "续写", "chosen": {"role": "user", "content": "好"}, "rejected": "坏"},
                          "must be an assistant turn"),
                         ({"text": "续写", "chosen": "好", "rejected": "坏"}, "cannot tell the prompt")):
        path.write_text(json.dumps(records[0], ensure_ascii=False) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        with pytest.raises(DataError) as e:
            load_preference_pairs(path)
        assert f"{path}:2" in str(e.value) and message in str(e.value), str(e.value)


def test_ratings_database_gives_pairs_by_the_overall_choice_or_one_axis(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    store.add(Rating("li", "续写", "甲", "乙", "old", "new", (2, 3, 5), (4, 3, 1), "B"))
    store.add(Rating("wang", "续写", "乙", "甲", "new", "old", (4, 4, 2), (2, 4, 4), "A"))
    store.add(Rating("li", "再写", "丙", "丁", "old", "new", (3, 3, 3), (3, 3, 3), "tie"))
    overall = load_preference_pairs(tmp_path / "ratings.sqlite")
    assert [(p.sample.prompt, p.chosen, p.rejected) for p in overall] == [("续写", "乙", "甲")]
    style = load_preference_pairs(tmp_path / "ratings.sqlite", by="文风")
    assert [(p.chosen, p.rejected) for p in style] == [("甲", "乙")]
    with pytest.raises(DataError, match="every rating was a tie"):
        load_preference_pairs(tmp_path / "ratings.sqlite", by="背景知识")


def test_a_bad_pairs_file_stops_the_recipe_with_one_line(tmp_path, default_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "续写", "chosen": "好", "rejected": "坏"}\n{"prompt": "续写", "chosen": 3, '
                   '"rejected": "坏"}\n', encoding="utf-8")
    log = run("--data", bad, "--output_dir", tmp_path / "out", ok=False)
    assert f"{bad}:2" in log and "field 'chosen'" in log and "Traceback" not in log, log[-2000:]


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def dpo_adapter(csl_pairs, tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    log = run("--data", csl_pairs, "--output_dir", out, "--max_steps", 24, "--save_steps", 12, *TRAIN, "--logging_steps", 1,
              "--verify_save", "true")
    return out, log


def test_dpo_lowers_the_loss_and_widens_the_margin_on_the_training_pairs(dpo_adapter):
    out, log = dpo_adapter
    steps = history(out / "checkpoint-24")
    first, last = steps[0], steps[-1]
    # the policy starts as the reference: every reward 0, loss ln 2
    assert abs(first["rewards/margins"]) < 0.05 and abs(first["loss"] - 0.6931) < 0.02, first
    assert last["loss"] < first["loss"] - 0.1 and last["rewards/margins"] > 0.3, (first, last)
    assert last["rewards/accuracies"] >= 0.75, last
    assert (out / "reference_logps.json").exists() and "reference log-probs read" not in log


def test_the_dpo_adapter_reloads_to_identical_logits_and_merges(dpo_adapter, default_model_dir):
    out, log = dpo_adapter
    assert f"[dpo] reloaded {out}: logits max |diff|" in log, log[-1500:]  # --verify_save compared them
    ids = torch.tensor([[5, 17, 29, 300, 41, 7, 99, 12]])
    base = load_model(str(default_model_dir), dtype="fp32", device="cpu")
    base_logits = logits(base, ids)
    tuned = load_model(str(default_model_dir), dtype="fp32", device="cpu", adapter=str(out))
    tuned_logits = logits(tuned, ids)
    assert (tuned_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), tuned_logits, atol=1e-4, rtol=1e-4)


def test_simpo_learns_without_a_reference(csl_pairs, tmp_path, default_model_dir):
    out = tmp_path / "simpo"
    run("--data", csl_pairs, "--output_dir", out, "--loss", "simpo", "--beta", 2.0, "--max_steps", 16,
        "--save_steps", 16, *TRAIN)
    steps = history(out / "checkpoint-16")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1 and steps[-1]["rewards/margins"] > \
        steps[0]["rewards/margins"], (steps[0], steps[-1])
    assert not (out / "reference_logps.json").exists()


def test_full_fine_tuning_switch_trains_every_weight(csl_pairs, tmp_path, default_model_dir):
    out = tmp_path / "full"
    run("--data", csl_pairs, "--output_dir", out, "--finetuning", "full", "--max_steps", 16, "--save_steps", 16,
        *train_args(lr=3e-5), "--logging_steps", 8)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    first_epoch, second_epoch = history(out / "checkpoint-16")  # each title is one pair's chosen, another's rejected:
    # what is learned must come from the prompt, which takes a pass over the pairs to show
    assert second_epoch["rewards/margins"] > max(first_epoch["rewards/margins"], 0.05), (first_epoch, second_epoch)


def test_qlora_switch_trains_an_adapter_on_the_4bit_model(csl_pairs, tmp_path, default_model_dir):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    log = run("--data", csl_pairs, "--output_dir", out, "--finetuning", "qlora", "--max_steps", 24, "--save_steps",
              24, *TRAIN, "--logging_steps", 8)
    assert (out / "adapter_model.safetensors").exists() and "in NF4" in log, log[-2000:]
    epochs = history(out / "checkpoint-24")  # three passes over the pairs
    assert epochs[-1]["rewards/margins"] > max(epochs[0]["rewards/margins"], 0.05), epochs


def test_a_stopped_run_resumes_from_its_checkpoint_with_the_same_reference(csl_pairs, tmp_path, default_model_dir):
    out = tmp_path / "resume"
    run("--data", csl_pairs, "--output_dir", out, "--max_steps", 12, "--save_steps", 6, *TRAIN)
    reference = (out / "reference_logps.json").read_text()
    log = run("--data", csl_pairs, "--output_dir", out, "--max_steps", 18, "--save_steps", 6, *TRAIN)
    assert "resuming from" in log and "checkpoint-12" in log, log[-2000:]
    assert "reference log-probs read from" in log
    assert (out / "reference_logps.json").read_text() == reference
    assert json.loads((out / "checkpoint-18" / "trainer_state.json").read_text())["global_step"] == 18


def test_export_pairs_writes_the_ratings_as_a_pairs_file_the_recipe_reads(tmp_path):
    store = RatingStore(tmp_path / "ratings.sqlite")
    store.add(Rating("li", "续写", "甲", "乙", "sft", "sft", (2, 3, 5), (4, 3, 1), "B"))
    store.add(Rating("li", "再写", "丙", "丁", "sft", "sft", (3, 3, 3), (3, 3, 3), "tie"))
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "Baichuan-Finetune-DPO" / "export_pairs.py"), "--ratings",
                           str(tmp_path / "ratings.sqlite"), "--output", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 ratings by overall -> 1 pairs (1 ties" in done.stdout
    assert [(p.sample.prompt, p.chosen, p.rejected) for p in load_preference_pairs(out)] == [("续写", "乙", "甲")]
    missing = subprocess.run([sys.executable, str(ROOT / "Baichuan-Finetune-DPO" / "export_pairs.py"), "--ratings",
                              str(tmp_path / "none.sqlite")], capture_output=True, text=True)
    assert missing.returncode != 0 and "none.sqlite" in missing.stderr and "Traceback" not in missing.stderr
