"""Training throughput on one GPU: the naive HF + PEFT loop, the best peer (Liger-Kernel) and our recipes' training
step, side by side, each run in its own process (clean memory, fresh compile caches).

    python bench/train_throughput.py                       # the default set (docs/performance.md)
    python bench/train_throughput.py lora-7b:liger:2048:mb1 lora-7b:ours:2048:mb1   # chosen runs
    python bench/train_throughput.py --steps 20 --out results.jsonl

A run is WORKLOAD:LOOP:SEQ[:PLAN]:
- WORKLOAD (bench/shapes.py, weights random, tokens random, bf16 weights, bf16 autocast as the Trainer's --bf16):
  lora-7b (LoRA r=8 on all linear layers of a Llama model with Baichuan2-7B's sizes: Liger patches Llama, not our
  Baichuan class), lora-8b (the same on Llama 3 8B), qlora-7b (lora-7b over NF4 weights), full-1.5b (all weights,
  Qwen2-1.5B).
- LOOP: naive = model(**batch).loss, backward, AdamW step, with HF gradient checkpointing on every layer (what the
  HF docs and the seeds do); liger = Liger-Kernel 0.8.5 on the model (RoPE, RMSNorm, SwiGLU, fused linear
  cross-entropy: what LLaMA-Factory, TRL and Axolotl switch on for speed), no checkpointing, fused AdamW (the
  Trainer's default); ours = novelkit.training.fast_training (the loss from the hidden states through Liger's fused
  kernel, compiled decoder layers, checkpointing of only the layers PLAN says), fused AdamW. liger and ours split the global
  batch into micro-batches as PLAN says.
- SEQ: tokens per row; the global batch is 4 rows (1 for qlora-7b).
- PLAN: comma-separated mbN (rows per micro-batch, default all), gcN (checkpoint the first N layers; default none),
  compile / nocompile (torch.compile of each decoder layer; default on for ours only), ce=torch (ours: our PyTorch
  chunked loss instead of Liger's kernel), cmc=N (the Liger loss's chunk size factor, novelkit.models.chunked_loss),
  acc=w / acc=f32 (the Liger loss sums the head's gradient in the weight's dtype, the default, or in float32),
  sdpa=cudnn (cuDNN's attention kernels first), cg (ours: the compiled layers also replayed as CUDA graphs,
  torch.compile's mode="reduce-overhead": no launch gaps between a layer's kernels; the recipes do not do this).
- mix: WORKLOAD:naive-mix / ours-mix: real CSL title-generation lengths (bench/csl_lengths.json): naive pads each
  batch of 4 samples to its longest; ours packs samples into rows of SEQ tokens. Effective (non-padding) tokens/s.

Every run does --steps optimizer steps on the same data (seed 0) and records each step's loss, so runs compare
numerically too. Throughput is over the steps after the first --warmup; peak memory is the CUDA allocator's peak over
the whole run after the weights are built. MFU = 6 × parameters × tokens/s / 790 TFLOP/s (the H200's measured bf16
matmul rate; 6N also for LoRA, as the issue's baseline does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PEAK_FLOPS = 790e12
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a quick check of the code (--tiny)
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
WORKLOADS = {"lora-7b": "llama-baichuan2-7b", "lora-8b": "llama3-8b", "qlora-7b": "llama-baichuan2-7b",
             "full-1.5b": "qwen2-1.5b"}  # workload: shape in bench/shapes.py
DEFAULT_RUNS = [
    "full-1.5b:naive:2048", "full-1.5b:liger:2048:mb4", "full-1.5b:liger:2048:mb4,compile",
    "full-1.5b:ours:2048:mb4", "full-1.5b:ours:2048:mb4,ce=torch",
    "lora-7b:naive:2048", "lora-7b:liger:2048:mb1", "lora-7b:ours:2048:mb1",
    "lora-7b:liger:4096:mb1", "lora-7b:ours:4096:mb1",
    "qlora-7b:liger:2048", "qlora-7b:ours:2048:gc32",
]


def parse_plan(text: str, loop: str) -> dict:
    plan = {"mb": 0, "gc": 0, "compile": loop.startswith("ours"), "ce": "", "cmc": 0, "acc": "", "sdpa": "",
            "cg": False}
    for item in filter(None, text.split(",")):
        if item in ("compile", "nocompile"):
            plan["compile"] = item == "compile"
        elif item == "cg":
            plan["cg"] = True
        elif item.startswith("mb"):
            plan["mb"] = int(item[2:])
        elif item.startswith("gc"):
            plan["gc"] = int(item[2:])
        elif item.startswith("ce="):
            plan["ce"] = item[3:]
        elif item.startswith("cmc="):
            plan["cmc"] = int(item[4:])
        elif item.startswith(("acc=", "sdpa=")):
            key, value = item.split("=")
            plan[key] = value
        else:
            raise SystemExit(f"unknown plan item {item!r}")
    return plan


def apply_liger(model) -> None:
    """Liger-Kernel's kernels on this model instance, as its integrations in other tools switch them on."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2

    apply = {"llama": apply_liger_kernel_to_llama, "qwen2": apply_liger_kernel_to_qwen2}[model.config.model_type]
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)


def quantize_nf4(model):
    """Replace every decoder linear layer by a bitsandbytes NF4 layer (double quantisation, bf16 compute), as QLoRA
    loading does; embeddings and lm_head stay in bf16."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "lm_head" not in f"{name}.{child_name}":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                layer.weight = layer.weight.to(child.weight.device)  # quantises
                setattr(module, child_name, layer)
                del child
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return model


def build(workload: str, loop: str, plan: dict, overrides: dict):
    from peft import LoraConfig, get_peft_model
    from shapes import build_model

    import novelkit.models.chunked_loss as chunked_loss
    from novelkit.training.fast_training import checkpoint_some_layers, compile_layers, decoder_layers, use_chunked_loss

    model = build_model(WORKLOADS[workload], device=DEVICE, dtype=torch.bfloat16, **overrides)
    params = sum(p.numel() for p in model.parameters())
    naive = loop.startswith("naive")
    ours = loop.startswith("ours")
    if loop.startswith("liger"):
        apply_liger(model)
    if plan["ce"] == "torch":
        chunked_loss.liger_linear_cross_entropy = lambda: None
    if plan["cmc"]:
        chunked_loss.LIGER_CHUNK = plan["cmc"]
    if plan["acc"]:
        chunked_loss.LIGER_FLOAT32_SUM = plan["acc"] == "f32"
    if plan["sdpa"] == "cudnn":  # cuDNN's attention first (Hopper kernels); the context stays on for the whole run
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH], set_priority=True).__enter__()
    if workload == "qlora-7b":
        quantize_nf4(model)
        if not ours:  # the usual QLoRA preparation: everything not quantised goes to float32
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            from novelkit.models.quantization import prepare_4bit_for_training
            prepare_4bit_for_training(model, gradient_checkpointing=plan["gc"] != 0)
    checkpoint = naive or plan["gc"] != 0 or (workload == "qlora-7b" and not ours)
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if workload != "full-1.5b":
            model.enable_input_require_grads()
    if workload != "full-1.5b":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    on = {}
    if not naive:
        if plan["gc"]:
            checkpoint_some_layers(model, plan["gc"])
        if ours:
            on["chunked_loss"] = use_chunked_loss(model)
            on["loss_kernel"] = chunked_loss.gpu_loss_kernel()
        on["compiled"] = compile_layers(model) if plan["compile"] else False
        if plan["cg"] and on["compiled"]:  # the same layers again, now captured as CUDA graphs (forward and backward)
            for layer in decoder_layers(model):
                layer.compile(mode="reduce-overhead")
            on["compiled"] = "reduce-overhead"
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5 if workload == "full-1.5b" else 1e-4,
                                  fused=None if naive else True)
    return model, optimizer, params, on


def fixed_batches(steps, rows, seq, vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (rows, seq), generator=g) for _ in range(steps)]


def mixed_batches(steps, rows, seq, vocab, packed: bool):
    """CSL title→abstract sample lengths (Baichuan 2 tokenizer and template), prompt tokens masked, random tokens.
    Ours: samples packed into `rows` rows of at most `seq` tokens (novelkit.data.packing). Naive: the very same samples
    per step, as one batch padded to its longest sample (SFTCollator), so both see the same data per step."""
    from novelkit.data.features import SFTCollator
    from novelkit.data.packing import PackedCollator, pack_rows

    lengths = json.loads((ROOT / "bench" / "csl_lengths.json").read_text())
    g = torch.Generator().manual_seed(0)
    pool = []
    for i in range(steps * rows * seq // 150):
        prompt, response = lengths[i % len(lengths)]
        ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
        pool.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    packed_rows = pack_rows(pool, seq)[:steps * rows]
    batches = []
    for step in range(len(packed_rows) // rows):
        step_rows = packed_rows[step * rows:(step + 1) * rows]
        if packed:
            batches.append(PackedCollator(pad_token_id=0, width=seq)(step_rows))
            continue
        samples = []
        for row in step_rows:  # cut each row back into its samples at the position resets
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            samples += [{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}
                        for a, b in zip(starts, starts[1:])]
        batch = SFTCollator(pad_token_id=0)(samples)
        batches.append({"input_ids": batch["input_ids"], "labels": batch["labels"],
                        "attention_mask": batch["attention_mask"]})
    return batches


def pad_tokens(batch) -> int:
    """Padding in a packed batch (token id 0 is only padding here: the random ids start at 3)."""
    ids = batch["input_ids"]
    return int((ids == 0).sum())


KERNEL_KINDS = (("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
                ("attention", ("flash", "fmha", "sdpa", "attention")),
                ("loss (Liger)", ("liger", "cross_entropy", "element_mul")),
                ("optimizer", ("adam", "multi_tensor_apply")),
                ("compiled layers' fused elementwise", ("triton_",)))


def kernel_kinds(prof) -> str:
    """GPU time by kind of kernel (matmul, attention, loss, optimizer, fused elementwise, the rest): where a step goes."""
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        # kernels have device time and no CPU time of their own; GPU-side annotations (Optimizer.step, autograd
        # functions' names) span kernels already counted
        if e.self_cpu_time_total or not us or getattr(e, "is_user_annotation", False):
            continue
        name = e.key.lower()
        kind = next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other (copies, elementwise)")
        totals[kind] = totals.get(kind, 0.0) + us / 1000
    if not totals:  # a CPU run: no device kernels
        return ""
    whole = sum(totals.values())
    return "\n".join(f"{k:40s} {ms:9.1f} ms {ms / whole:6.1%}" for k, ms in sorted(totals.items(), key=lambda x: -x[1])) \
        + f"\n{'GPU kernels in all':40s} {whole:9.1f} ms\n"


def kernel_table(prof, rows: int = 25) -> str:
    """The profiler's busiest GPU kernels (self time), as text, after the time by kind of kernel."""
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total",
                                      row_limit=rows, max_name_column_width=70)
    return kernel_kinds(prof) + "\n" + table


def run_one(spec: str, steps: int, warmup: int, overrides: dict, profile_dir: str = "") -> dict:
    parts = spec.split(":")
    workload, loop, seq = parts[0], parts[1], int(parts[2])
    plan = parse_plan(parts[3] if len(parts) > 3 else "", loop)
    torch.manual_seed(0)
    model, optimizer, params, on = build(workload, loop, plan, overrides)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    rows = 1 if workload == "qlora-7b" else 4
    if loop.endswith("-mix"):
        batches = mixed_batches(steps, rows, seq, vocab, packed=loop.startswith("ours"))
        steps = min(steps, len(batches))
    else:
        batches = [{"input_ids": x, "labels": x} for x in fixed_batches(steps, rows, seq, vocab)]
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    micro = plan["mb"] if not loop.startswith("naive") and plan["mb"] else None
    losses, times, real_tokens, slots = [], [], 0, 0
    profiler = None
    for step, batch in enumerate(batches[:steps]):
        profiled = profile_dir and step == steps - 1  # the last step, after everything has compiled and warmed up
        if profiled:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + [torch.profiler.ProfilerActivity.CUDA] * (DEVICE == "cuda"))
            profiler.__enter__()
        batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        sync()
        start = time.perf_counter()
        if plan["cg"]:  # a new iteration: the graphs' outputs of the last step may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        n = batch["input_ids"].shape[0]
        parts_ = [slice(i, i + micro) for i in range(0, n, micro)] if micro else [slice(0, n)]
        total = torch.zeros((), device=DEVICE)
        for part in parts_:
            sub = {k: v[part] for k, v in batch.items()}
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):  # as the Trainer's --bf16
                loss = model(**sub, use_cache=False).loss
            (loss / len(parts_)).backward()
            total += loss.detach() / len(parts_)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(total.item())
        if profiler is not None:
            profiler.__exit__(None, None, None)
            name = spec.replace(":", "_").replace(",", "-")
            Path(profile_dir, f"profile_{name}.txt").write_text(kernel_table(profiler))
            profiler = None
        if step >= warmup and not profiled:  # the profiler's own overhead stays out of the numbers
            labels = batch["labels"]
            if loop.endswith("-mix"):  # every sample token, prompt included, as a padding-free run would process
                real_tokens += int((batch["position_ids"] >= 0).sum()) - int(pad_tokens(batch)) \
                    if "position_ids" in batch else int(batch["attention_mask"].sum())
            else:
                real_tokens += labels.numel()
            slots += labels.numel()
    timed_steps = times[warmup:len(times) - bool(profile_dir)]
    timed = sum(timed_steps)
    result = {
        "run": spec, "workload": workload, "loop": loop, "seq": seq, "plan": parts[3] if len(parts) > 3 else "",
        "params": params, "steps": len(times), "warmup": warmup, "on": on,
        "tokens_per_s": real_tokens / timed, "slot_tokens_per_s": slots / timed,
        "step_s_median": statistics.median(timed_steps), "first_step_s": times[0],
        "peak_gib": peak_gib(), "losses": losses,
    }
    result["mfu"] = 6 * params * result["slot_tokens_per_s"] / PEAK_FLOPS
    return result


def markdown(results: list[dict]) -> str:
    """One row per run; speed-ups against the naive loop and against the fastest Liger run of the same workload and
    length (the best peer in the same run), with that run's peak memory beside ours."""
    lines = ["| run | tokens/s | peak GiB | MFU | step s | first step s | vs naive | vs best Liger (its GiB) | "
             "max loss diff |", "|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in results if "error" not in r]
    naive = {(r["workload"], r["seq"], r["loop"].replace("naive", "")): r for r in ok if r["loop"].startswith("naive")}
    liger = {}
    for r in ok:
        key = (r["workload"], r["seq"], r["loop"].replace("liger", ""))
        if r["loop"].startswith("liger") and r["tokens_per_s"] > liger.get(key, {"tokens_per_s": 0})["tokens_per_s"]:
            liger[key] = r
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        suffix = r["loop"].replace("naive", "").replace("liger", "").replace("ours", "")
        base, peer = naive.get((r["workload"], r["seq"], suffix)), liger.get((r["workload"], r["seq"], suffix))
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base and base is not r else ""
        vs_peer = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}× ({peer['peak_gib']:.1f})" \
            if peer and r["loop"].startswith("ours") else ""
        diff = ""
        if base and base is not r and not r["loop"].endswith("-mix"):
            n = min(len(base["losses"]), len(r["losses"]))
            diff = f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'][:n], base['losses'][:n])):.2%}"
        lines.append(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r['mfu']:.0%} | "
                     f"{r['step_s_median']:.3f} | {r['first_step_s']:.1f} | {speed} | {vs_peer} | {diff} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=0, help="num_hidden_layers override (0: the real shape)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, to check the code on a CPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.jsonl"))
    parser.add_argument("--profile", default="", help="folder: write a kernel table of each run's last step there "
                                                      "(that step is then not representative of the timing)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one spec in this process
    args = parser.parse_args()
    overrides = dict(TINY) if args.tiny else {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.warmup, overrides, args.profile)), flush=True)
        return
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"{name}  torch {torch.__version__}", flush=True)
    results = []
    for spec in args.runs:
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--warmup",
                               str(args.warmup), "--layers", str(args.layers), "--profile", args.profile]
                              + ["--tiny"] * args.tiny,
                              capture_output=True, text=True)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(found[0]) if found else {"run": spec, "error": (proc.stderr.strip().splitlines()
                                                                             or ["no output"])[-1]}
        if not found:
            print(proc.stderr[-3000:], file=sys.stderr)
        results.append(result)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        shown = {k: v for k, v in result.items() if k != "losses"}
        print(f"{time.time() - started:.0f}s {json.dumps(shown)}", flush=True)
        gc.collect()
    print(markdown(results))


if __name__ == "__main__":
    main()
