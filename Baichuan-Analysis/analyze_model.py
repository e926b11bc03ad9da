"""Will it fit: a model's parameters by module, what LoRA trains, and the GPU memory of each fine-tuning method.

The model is built on the meta device from its config, so a folder holding only config.json (or a config JSON file,
e.g. Baichuan-Analysis/configs/baichuan2-7b.json) is enough for a 7B/13B estimate. A small model (the embedded default
when no path is given) is also trained for two steps on CPU to check the estimate against the measured peak.
Writes <output_dir>/report.md, report.json and plots. Run through run_analysis.sh, or directly:
    python Baichuan-Analysis/analyze_model.py --model_path Baichuan-Analysis/configs/baichuan2-7b.json --batch 4
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package at the repository root
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.analysis.memory import (GIB, activation_bytes, empty_model, estimate_fp32, estimate_memory,
                                      formulas_markdown, load_config, lora_activation_inputs, lora_parameters,
                                      lora_target_modules, measure_training_peak, model_shape, parameters_by_component,
                                      parameters_by_type)
from novelkit.analysis.plots import curves, stacked_bars
from novelkit.analysis.report import human_bytes, human_count, table, write_report
from novelkit.errors import exit_on_error
from novelkit.models.loading import load_model, resolve_model_path

from transformers import AutoModelForCausalLM

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
MARGIN = 0.15  # the estimate is within this of the measured peak on tiny models (tests/test_analysis_model.py)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="model folder, folder with config.json, or config JSON file; "
                                                     "empty = the embedded default")
    p.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--max_length", type=int, default=512, help="tokens per sample")
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs that ZeRO partitions over")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--lora_target", default="auto", help="auto | all | comma list of module names")
    p.add_argument("--measure", choices=["auto", "yes", "no"], default="auto",
                   help="train 2 steps on CPU to check the estimate; auto: when the model has at most 50M parameters")
    p.add_argument("--output_dir", default="output/analysis/model")
    return p.parse_args()


def measured_check(args, build, shape, lora_names, lora_params, lora_inputs) -> list[dict]:
    """Estimated and measured peaks of fp32 AdamW training on CPU: full, LoRA, each with and without checkpointing."""
    from peft import LoraConfig, get_peft_model

    rows = []
    for method in ("full", "LoRA"):
        for checkpointing in (False, True):
            model = build()  # a fresh model for each run
            if method == "LoRA":
                model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                         lora_dropout=args.lora_dropout, target_modules=lora_names))
            if checkpointing:  # renamed activation_checkpointing_enable in recent transformers
                getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
                if method == "LoRA":
                    model.enable_input_require_grads()
            estimate = estimate_fp32(shape, args.batch, args.max_length, lora_params if method == "LoRA" else 0,
                                     lora_inputs if method == "LoRA" else None, checkpointing).peak
            measured = measure_training_peak(model, args.batch, args.max_length)
            rows.append({"method": method, "gradient_checkpointing": checkpointing, "estimated_bytes": estimate,
                         "measured_bytes": measured, "error": estimate / measured - 1})
            print(f"[model] check {method} checkpointing={checkpointing}: estimated {human_bytes(estimate)}, "
                  f"measured {human_bytes(measured)}", flush=True)
    return rows


@exit_on_error
def main():
    args = parse_args()
    from_file = args.model_path and Path(args.model_path).is_file()
    path = args.model_path if from_file else resolve_model_path(args.model_path or None)
    config = load_config(path)
    model = empty_model(config)
    shape = model_shape(model)
    targets = lora_target_modules(model, args.lora_target)
    lora_params = lora_parameters(targets, args.lora_r)
    lora_inputs = lora_activation_inputs(targets, args.lora_r, args.lora_dropout, shape.layers)
    print(f"[model] {path}: {human_count(shape.params)} parameters, LoRA r={args.lora_r} on {len(targets)} modules "
          f"trains {human_count(lora_params)}", flush=True)

    # estimates at the chosen setting, with and without gradient checkpointing, and across lengths
    def estimates(length, checkpointing):
        return estimate_memory(shape, lora_params, lora_inputs, args.batch, length, args.num_gpus, checkpointing)
    plain, checkpointed = estimates(args.max_length, False), estimates(args.max_length, True)
    by_length = {length: estimates(length, False) for length in LENGTHS}

    # memory does not depend on the weights' values: a config-only model is measured with random ones
    has_weights = not from_file and any(p.suffix in (".safetensors", ".bin") for p in Path(path).iterdir())

    def build():
        if has_weights:
            return load_model(path, dtype="fp32", device="cpu")
        return AutoModelForCausalLM.from_config(config).float()
    measure = args.measure == "yes" or (args.measure == "auto" and shape.params <= 50_000_000)
    check = measured_check(args, build, shape, sorted(targets), lora_params, lora_inputs) if measure else []

    def gib(x):
        return round(x / GIB, 3)
    data = {
        "model": str(path), "model_type": config.model_type, "parameters": shape.params, "shape": vars(shape),
        "parameters_by_type": parameters_by_type(model), "parameters_by_component": parameters_by_component(model),
        "lora": {"r": args.lora_r, "target": args.lora_target, "modules": len(targets), "trainable": lora_params,
                 "share": lora_params / shape.params},
        "setting": {"batch": args.batch, "max_length": args.max_length, "num_gpus": args.num_gpus},
        "memory_gib": {e.mode: {"weights": gib(e.weights), "gradients": gib(e.gradients), "optimizer": gib(e.optimizer),
                                "activations": gib(e.activations), "peak": gib(e.peak), "cpu": gib(e.cpu),
                                "peak_with_checkpointing": gib(c.peak)} for e, c in zip(plain, checkpointed)},
        "peak_gib_by_length": {e.mode: {n: gib(by_length[n][i].peak) for n in LENGTHS} for i, e in enumerate(plain)},
        "measured_check": check, "check_margin": MARGIN,
    }

    figures = {
        "memory_by_method.png": stacked_bars(
            [e.mode for e in plain], {"weights + optimizer states": [gib(e.weights + e.optimizer) for e in plain],
                                      "activations / gradients at the peak": [gib(e.peak - e.weights - e.optimizer)
                                                                              for e in plain]},
            f"Peak memory per GPU (batch {args.batch} x {args.max_length}, {args.num_gpus} GPU)", "GiB"),
        "memory_by_length.png": curves(
            {e.mode: (list(LENGTHS), [gib(by_length[n][i].peak) for n in LENGTHS]) for i, e in enumerate(plain)},
            f"Peak memory per GPU vs length (batch {args.batch}, no checkpointing)", "max length (tokens)",
            "GiB", logy=True),
    }
    acts = activation_bytes(shape, args.batch, args.max_length, 2, False)
    memory_rows = [[e.mode, *(human_bytes(x) for x in (e.weights, e.gradients, e.optimizer, e.activations, e.peak)),
                    human_bytes(c.peak), human_bytes(e.cpu) if e.cpu else "-"] for e, c in zip(plain, checkpointed)]
    check_rows = [[r["method"], r["gradient_checkpointing"], human_bytes(r["estimated_bytes"]),
                   human_bytes(r["measured_bytes"]), f"{r['error']:+.1%}"] for r in check]
    h, i = shape.hidden, shape.intermediate
    target_names = sorted({n.rsplit(".", 1)[-1] for n in targets})
    md = "\n\n".join([
        f"# Model report: {path}",
        f"{config.model_type}, {shape.params:,} parameters ({human_count(shape.params)}): hidden {h}, intermediate "
        f"{i}, {shape.layers} layers, {shape.heads} heads, vocabulary {shape.vocab}.",
        "## Parameters by module type\n\n" + table(["module type", "parameters", "share"], [
            [k, f"{v:,}", f"{v / shape.params:.2%}"] for k, v in data["parameters_by_type"].items()]),
        "## Parameters by component\n\n" + table(["component", "parameters", "share"], [
            [k, f"{v:,}", f"{v / shape.params:.2%}"] for k, v in data["parameters_by_component"].items()]),
        f"## LoRA / QLoRA\n\nr={args.lora_r}, target `{args.lora_target}` ({', '.join(target_names)} in "
        f"{len(targets)} modules): **{lora_params:,} trainable parameters** ({lora_params / shape.params:.3%} of the "
        f"model); r * (in + out) per wrapped layer. QLoRA trains the same adapters on a 4-bit base.",
        f"## Estimated GPU memory per GPU\n\nbf16 mixed-precision AdamW, micro-batch {args.batch} x {args.max_length} "
        f"tokens, {args.num_gpus} GPU(s); activations without checkpointing "
        f"{human_bytes(acts['kept'])}.\n\n" + table(
            ["method", "weights", "gradients", "optimizer", "activations", "peak", "peak, grad. checkpointing",
             "CPU RAM"], memory_rows)
        + "\n\nAdd about 1 GiB per GPU for the CUDA context and allocator fragmentation, plus DeepSpeed's "
          "communication buckets (2 bytes x reduce_bucket_size / allgather_bucket_size elements each).",
        "![memory_by_method.png](memory_by_method.png)\n\n![memory_by_length.png](memory_by_length.png)",
        formulas_markdown(),
        "## Check against a measured peak\n\n" + (
            f"fp32 AdamW, 2 steps on CPU at batch {args.batch} x {args.max_length} (same formulas with 4-byte values; "
            "measured = parameters + the peak of torch's CPU allocator from torch.profiler memory events). "
            f"Tolerated error: {MARGIN:.0%}.\n\n"
            + table(["method", "checkpointing", "estimated", "measured", "error"], check_rows)
            if check else "Not measured (over 50M parameters, or --measure no); run without --model_path to see the "
                          "check on the embedded default model."),
    ])
    for f in write_report(args.output_dir, md, data, figures):
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
