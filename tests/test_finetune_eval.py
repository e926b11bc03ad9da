"""Evaluation during training holds one batch of logits: its peak memory does not grow with the dev set, even with a
64k vocabulary, while the seeds' compute_metrics approach (logits gathered over the whole dev set) does."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from novelkit.data.features import SFTCollator
from novelkit.data.features import encode_sft_dataset
from novelkit.data.formats import load_samples
from novelkit.data.templates import get_template
from novelkit.training.sft_training import DataArguments, SFTData, make_trainer

VOCAB = 64_000
LENGTH = 48  # every sample is cut to this many tokens, so every batch has the same shape
CLEAR_REFS = Path("/proc/self/clear_refs")


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth_mb(run) -> float:
    """How far the resident set rose above its starting point while `run` ran (the peak, however brief)."""
    CLEAR_REFS.write_text("5")  # resets VmHWM, the peak resident set, to the current size
    start = kib("VmRSS")
    run()
    return (kib("VmHWM") - start) / 1024


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux /proc/self/clear_refs")
def test_eval_memory_is_flat_in_the_dev_set_size(shared_data, default_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=256)).eval()
    template = get_template("human_assistant")
    samples = list(load_samples(shared_data / "csl" / "clge_val.tsv"))[:48]
    rows = encode_sft_dataset(default_tokenizer, template, samples, LENGTH, "dev")
    assert all(len(r["input_ids"]) == LENGTH for r in rows)
    targs = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none",
                              use_cpu=True)

    def ours(n):
        data = SFTData(train=rows[:n], dev=rows[:n], dev_samples=samples[:n])
        args = DataArguments(eval_samples=0)  # the loss pass is where logits could pile up
        trainer = make_trainer(model, default_tokenizer, template, targs, data, args)
        return lambda: trainer.evaluate()

    ours(8)()  # warm-up: first-call allocations
    small, large = peak_growth_mb(ours(8)), peak_growth_mb(ours(48))
    batch_logits_mb = 4 * LENGTH * VOCAB * 4 / 2**20  # 47 MB
    # one batch's logits may or may not still be resident at the peak, as the allocator reuses or maps anew (in one
    # full-suite run: 46.6 MB at 8 samples, 93.5 at 48); piling up would be 12 batches at 48 samples
    assert large - small < 2 * batch_logits_mb, (small, large)

    seeds = Trainer(model=model, args=targs, eval_dataset=rows, data_collator=SFTCollator(0),
                    compute_metrics=lambda p: {"n": float(len(p.predictions))})
    gathered = peak_growth_mb(seeds.evaluate)
    assert gathered - small > 6 * batch_logits_mb, (small, gathered)  # the test does see logits pile up


def test_evaluation_during_training_leaves_the_model_trainable(default_model_dir, tmp_path, monkeypatch):
    """The GPU crash after the first evaluation ("Inference tensors cannot be saved for backward"): the Trainer puts
    the model in eval mode before the evaluator generates, and an engine that took that for "not being trained" froze
    its weights (gate/up fused into a tensor made under inference mode). The CPU takes the GPU's path here: an engine
    not told otherwise freezes its weights, as a compiled one does on a GPU."""
    from peft import LoraConfig, get_peft_model

    from novelkit.generation import engine
    from novelkit.models.loading import load_model, load_tokenizer
    from novelkit.training.sft_training import load_sft_data

    original = engine.Engine.__init__

    def gpu_defaults(self, *args, compile=None, frozen=None, **kwargs):
        original(self, *args, compile=compile, frozen=(compile is not False) if frozen is None else frozen, **kwargs)

    monkeypatch.setattr(engine.Engine, "__init__", gpu_defaults)
    tokenizer = load_tokenizer(str(default_model_dir))
    model = get_peft_model(load_model(str(default_model_dir)), LoraConfig(r=4, target_modules=["W_pack"]))
    template = get_template("baichuan2")
    root = Path(__file__).resolve().parents[1] / "data_examples" / "sft"
    args = DataArguments(data=str(root / "train.jsonl"), dev=str(root / "dev.jsonl"), max_length=96, eval_samples=2,
                         eval_max_new_tokens=8, packing="false", compile_layers="false")
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=2,
                              per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3,
                              save_strategy="no", report_to="none", use_cpu=True, logging_steps=1)
    trainer = make_trainer(model, tokenizer, template, targs, load_sft_data(tokenizer, template, args), args)
    trainer.train()  # crashed at step 3 before the fix

    history = trainer.state.log_history
    assert sum("eval_rouge-1" in h for h in history) == 2 and trainer.state.global_step == 4
    assert len([h["loss"] for h in history if "loss" in h]) == 4  # trained on after each evaluation
    assert not [n for n, p in model.named_parameters() if p.is_inference()]
    # no parameter became a view into another's storage (a frozen engine fuses gate/up; saving would then fail)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(storages) == len(set(storages))
    model.save_pretrained(tmp_path / "adapter")
