"""The model-specific steps of the GPU recipe suite (bench/gpu_recipes.py, part `shapes`), for one shape, in one process:
load a saved random-initialised model of real layer sizes (2 layers) the way the recipes do, a few LoRA steps and a
few full fine-tuning steps through the recipes' Trainer (evaluation with ROUGE of generated responses on), engine
generation against `generate`, and the LoRA adapter saved and reloaded to identical logits.

    python3 bench/gpu_model_steps.py qwen2-1.5b --tokenizer .gpu/tokenizers/baichuan2 --data /tmp/csl --work /tmp/s

Prints one "[steps] name: ok / FAILED ..." line per step and "[steps] all passed" at the end when every one did.
Baichuan-7B takes the Baichuan 1 tokenizer, the others Baichuan 2's; Qwen2, Qwen3 and Llama 3, whose tokenizers are
not in ../shared, take Baichuan 2's with their vocabulary cut to its size (random weights would otherwise pick ids it
cannot decode). Layers are not compiled here (`compile_layers=false`): the folder parts compile them on the Baichuan 2
shape, and five shapes x two trainings would spend most of the call compiling.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import novelkit  # noqa: E402,F401  (version check, quiet dependency noise)
import torch  # noqa: E402

from bench.shapes import build_model  # noqa: E402


# Shapes whose own tokenizer is not in ../shared/assets: a Baichuan tokenizer stands in, and the vocabulary is its size.
STAND_IN_TOKENIZER = ("qwen2-1.5b", "qwen3-8b", "llama3-8b")


def train(model, tokenizer, template, data_dir: Path, out: Path, lora: bool, bf16: bool):
    from transformers import TrainingArguments

    from novelkit.training.sft_training import DataArguments, load_sft_data, make_trainer

    args = DataArguments(data=str(data_dir / "train.json"), dev=str(data_dir / "dev.json"), max_length=256,
                         eval_samples=4, eval_max_new_tokens=32, compile_layers="false",
                         best_metric="last")  # no checkpoints here: the model of the last step
    targs = TrainingArguments(output_dir=str(out), max_steps=4, eval_strategy="steps", eval_steps=2,
                              per_device_train_batch_size=2, per_device_eval_batch_size=4, bf16=bf16,
                              learning_rate=2e-4 if lora else 2e-5, save_strategy="no", report_to="none",
                              logging_steps=1, gradient_checkpointing=not lora)
    trainer = make_trainer(model, tokenizer, template, targs, load_sft_data(tokenizer, template, args), args)
    trainer.train()
    history = trainer.state.log_history
    evaluations = sum("eval_rouge-1" in h for h in history)
    losses = [h["loss"] for h in history if "loss" in h]
    assert trainer.state.global_step == 4 and evaluations == 2, (trainer.state.global_step, evaluations)
    assert losses and all(loss == loss for loss in losses), losses
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="folder of train.json / dev.json (prepare_data.py csl)")
    parser.add_argument("--work", required=True)
    parser.add_argument("--tiny", action="store_true", help="hidden size 64, on the CPU if there is no GPU: dry run")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bf16" if device == "cuda" else "fp32"

    from peft import LoraConfig, get_peft_model

    from novelkit.data.formats import Sample
    from novelkit.data.templates import default_template_name, encode_prompt, get_template
    from novelkit.generation.engine import Engine, Request
    from novelkit.models.loading import load_model, load_tokenizer, write_base_fingerprint
    from novelkit.training.sft_training import lora_targets

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "model"
    from bench.shapes import TINY

    tiny = {**TINY, **({"num_key_value_heads": 2} if args.shape in STAND_IN_TOKENIZER else {}),
            **({"head_dim": 16} if args.shape == "qwen3-8b" else {})}
    overrides = {"num_hidden_layers": 2, **(tiny if args.tiny else {})}
    if args.shape in STAND_IN_TOKENIZER:  # no tokenizer of theirs here: ids must stay inside the stand-in's vocabulary
        overrides["vocab_size"] = len(load_tokenizer(args.tokenizer))
    build_model(args.shape, device=device, **overrides).save_pretrained(folder)
    for f in Path(args.tokenizer).iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    failed = []

    def step(name, fn):
        start = time.time()
        try:
            fn()
            print(f"[steps] {args.shape} {name}: ok ({time.time() - start:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - report every step
            failed.append(name)
            print(f"[steps] {args.shape} {name}: FAILED\n{traceback.format_exc()}", flush=True)

    tokenizer = load_tokenizer(str(folder))
    state = {}

    def load():
        state["model"] = load_model(str(folder), dtype=dtype)
        config = state["model"].config
        state["template"] = get_template(default_template_name(tokenizer, config))
        print(f"[steps] {args.shape}: {sum(p.numel() for p in state['model'].parameters()) / 1e9:.2f} B parameters, "
              f"template {default_template_name(tokenizer, config)}", flush=True)

    def lora_steps():
        model = get_peft_model(state["model"], LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(
            "auto", state["model"])))
        state["lora"] = train(model, tokenizer, state["template"], Path(args.data), work / "lora", lora=True,
                              bf16=device == "cuda").model
        state["lora"].save_pretrained(work / "adapter")
        write_base_fingerprint(str(work / "adapter"), state["lora"].get_base_model().config)

    def reload_adapter():
        from accelerate.utils import extract_model_from_parallel

        # the Trainer's bf16 mixed precision leaves an autocast wrapper on forward (under it LoRA's float32 matmuls
        # run in bf16: the first GPU run saw logits 1 bf16 step apart); the weights are compared, so it comes off
        live = extract_model_from_parallel(state["lora"], keep_fp32_wrapper=False).eval()
        ids = torch.tensor([encode_prompt(tokenizer, state["template"], Sample(prompt="根据标题生成摘要：超立方体网络",
                                                                             response=""))], device=device)
        with torch.no_grad():
            expected = live(input_ids=ids).logits
            reloaded = load_model(str(folder), dtype=dtype, adapter=str(work / "adapter")).eval()
            got = reloaded(input_ids=ids).logits
        assert torch.equal(got, expected), f"max difference {(got - expected).abs().max().item()}"

    def engine_generation():
        model = load_model(str(folder), dtype=dtype).eval()
        prompts = [encode_prompt(tokenizer, state["template"], Sample(prompt=p, response=""))
                   for p in ("写一段开头。", "天色已晚，", "根据标题生成摘要：图神经网络", "续写：雨下了一整夜")]
        done = Engine(model, tokenizer, max_batch=4, max_len=128).run(
            [Request(p, 32, ignore_eos=True) for p in prompts])
        assert all(len(r.tokens) == 32 for r in done)
        ids = torch.tensor([prompts[0]], device=device)
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                   do_sample=False)[0, -1].item()
        assert done[0].tokens[0] == reference, (done[0].tokens[0], reference)  # the prefill's greedy token

    def full_steps():
        model = load_model(str(folder), dtype=dtype)
        trained = train(model, tokenizer, state["template"], Path(args.data), work / "full", lora=False,
                        bf16=device == "cuda").model
        trained.save_pretrained(work / "full-saved")
        reloaded = load_model(str(work / "full-saved"), dtype=dtype).eval()
        ids = torch.tensor([[1, 100, 200, 300]], device=device)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)

    for name, fn in (("load", load), ("LoRA steps with evaluation", lora_steps),
                     ("adapter saved and reloaded: identical logits", reload_adapter),
                     ("engine generation", engine_generation),
                     ("full fine-tuning steps with evaluation, saved and reloaded", full_steps)):
        if name != "load" and "model" not in state:
            failed.append(name)
            continue
        step(name, fn)
    print("[steps] all passed" if not failed else f"[steps] failed: {', '.join(failed)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
