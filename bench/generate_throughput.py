"""Generation throughput: our engine (novelkit/generation/engine.py) against plain transformers `generate`, against
transformers' own fast path (static KV cache, decode step compiled by `generate` on a GPU: the peer) and against the
memory-bandwidth limit, in one run.

    python bench/generate_throughput.py --shapes qwen2-1.5b --out q.json            # ~4 min on an H200
    python bench/generate_throughput.py --shapes baichuan2-7b --out b.json          # ~6 min, with the submission
    python bench/generate_throughput.py --batches 1 64 --new-tokens 256 --tianchi 0 # the short version
    python bench/generate_throughput.py --profile DIR --batches 1 64                # kernel tables of decode steps

Random-initialised models of real shapes (bench/shapes.py), bf16, 64-token random prompts, sampling with the same
settings for both (temperature 0.7, top_p 0.9, top_k off), EOS ignored so every sequence makes exactly N tokens.
Tokens/s = batch x N / wall time of the whole call (prefill included), after a warm-up (for the engine the same
call, which captures its CUDA graphs; for `generate` a short call). `generate` is timed over at most 256 new
tokens (--naive-max-tokens): its time per token grows with the length, so for N = 800 its rate over 256 is an
upper bound and the ratio a lower bound. One engine
per shape (compiled, the default on a GPU) serves every batch and length; its first call, timed apart, includes
the compilation. The peer is timed at --peer-batches only (each batch size compiles anew, 1-3 minutes), at the
shortest --new-tokens. The limit: bytes one decode step must read (every weight once, each sequence's KV cache at
its mean length over the run) over the bandwidth a large device-to-device copy reaches here (read + written),
times the batch; "share of limit" is the engine's tokens/s over it. On a CPU the peer is not compiled (transformers
compiles on GPUs only): a CPU run checks the plumbing, e.g.
`--shapes qwen2-1.5b --layers 1 --batches 1 2 --new-tokens 8 --tianchi 0 --peer-batches 1` (~35 s).

Also: the 1,000-prompt title -> abstract submission (CSL titles with an instruction, tokenized with Baichuan 2's
tokenizer; 800 new tokens each) on the Baichuan2-7B shape, timed end to end through the engine, the naive time
extrapolated from the naive rate measured at batch 64; greedy bf16 equality of the engine with `generate` (first
differing position and the gap between the two best logits there); and per batch, the engine's step time
against a bare replay of its CUDA graph (what the host adds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shapes import build_model, parameter_count  # noqa: E402
from novelkit.generation.engine import Engine, Request  # noqa: E402
from novelkit.generation.sampling import SamplingParams  # noqa: E402

SAMPLING = dict(temperature=0.7, top_p=0.9, top_k=0)
PROMPT = 64


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(batch, vocab, length=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab - 1000, (batch, length), generator=g)


def time_generate(model, prompts, new_tokens, static: bool = False):
    """Seconds of one `generate` call after a warm-up. static: transformers' own fast path, the peer (a static KV
    cache, whose decode step `generate` compiles on a GPU); its warm-up has the same length, as the compiled graph is
    specific to the cache's size (1-3 minutes per batch size on an H200)."""
    ids = prompts.to(model.device)
    extra = {"cache_implementation": "static"} if static else {}
    call = lambda n: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,  # noqa: E731
                                    max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                    **SAMPLING, **extra)
    call(new_tokens if static else 8)  # warm-up
    _sync()
    start = time.perf_counter()
    out = call(new_tokens)
    _sync()
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def copy_bandwidth(device, mib: int = 4096, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + written): what the memory can deliver in practice."""
    mib = mib if device == "cuda" else 256
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    _sync()
    return 2 * x.numel() * repeats / (time.perf_counter() - start)


def bytes_per_step(model, batch: int, context: float) -> float:
    """What one decode step must read at least: every weight once (an untied input embedding only reads its rows:
    left out) and each sequence's KV cache over `context` positions."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding.data_ptr() != head.data_ptr():
        weights -= embedding.numel() * embedding.element_size()
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = batch * c.num_hidden_layers * 2 * heads * head_dim * context * embedding.element_size()
    return weights + kv


def bandwidth_limit(model, batch: int, new_tokens: int, bandwidth: float) -> float:
    """Tokens per second if every decode step only read what it must at the measured copy bandwidth (the KV cache
    at its mean length over the run)."""
    return batch * bandwidth / bytes_per_step(model, batch, PROMPT + (new_tokens - 1) / 2)


def time_engine(engine, prompts, new_tokens):
    params = SamplingParams(do_sample=True, **SAMPLING)
    make = lambda: [Request(p.tolist(), new_tokens, params, ignore_eos=True) for p in prompts]  # noqa: E731
    engine.run(make())  # warm-up: captures the graphs of every (batch, length) bucket this call meets
    _sync()
    start = time.perf_counter()
    done = engine.run(make())
    _sync()
    seconds = time.perf_counter() - start
    assert all(len(r.tokens) == new_tokens for r in done)
    return seconds


def step_profile(engine, batch, vocab, steps=50):
    """Milliseconds per engine step (graph replay + sampling + host bookkeeping) against a bare replay of the
    same graph: the difference is what the host adds per step."""
    params = SamplingParams(do_sample=True, **SAMPLING)
    requests = [engine.add(Request(p.tolist(), 100, params, ignore_eos=True)) for p in _prompts(batch, vocab)]
    for _ in range(5):
        engine.step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync()
    step_ms = (time.perf_counter() - start) / steps * 1000
    graph = engine.graphs[engine.last_graph][0]
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    _sync()
    replay_ms = (time.perf_counter() - start) / steps * 1000
    for r in requests:
        engine.cancel(r)
    while engine.busy:
        engine.step()
    return {"batch": batch, "step_ms": round(step_ms, 3), "replay_ms": round(replay_ms, 3)}


def kernel_profile(model, batches, out_dir, steps=20):
    """Where a decode step's time goes: the busiest GPU kernels over `steps` engine steps at each batch size, one
    text table per batch under out_dir (one compiled engine serves all batches)."""
    engine = Engine(model, max_batch=max(batches), max_len=PROMPT + 300)
    params = SamplingParams(do_sample=True, **SAMPLING)
    shape = model.config.model_type
    for batch in batches:
        for p in _prompts(batch, model.config.vocab_size):
            engine.add(Request(p.tolist(), 300, params, ignore_eos=True))
        for _ in range(10):  # prefill, graph capture, warm-up
            engine.step()
        _sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            _sync()
        table_text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                               max_name_column_width=70)
        Path(out_dir, f"profile_decode_{shape}_batch{batch}.txt").write_text(
            f"{steps} engine steps, batch {batch}, compiled={engine.compiled is not None}\n{table_text}")
        for request in list(engine.active.values()):
            engine.cancel(request.request)
        while engine.active or engine.pending:
            engine.step()
        print(f"profiled {shape} batch {batch}", flush=True)


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def greedy_equality(model, prompts, new_tokens, engine):
    """Per prompt: first position where the engine's greedy tokens differ from generate's, and generate's top-2
    logit gap there (a near-tie explains a bf16 divergence). The control: where `generate` itself differs between
    all prompts in one batch and each alone (same weights, other matrix shapes, so other bf16 rounding)."""
    rows = []
    ours = engine.run([Request(p.tolist(), new_tokens) for p in prompts])
    greedy = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                  pad_token_id=0)
    ids = prompts.to(model.device)  # equal lengths: no padding
    batched = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy)[:, ids.shape[1]:]
    for p, r, together in zip(prompts, ours, batched.tolist()):
        ids = p[None].to(model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), output_scores=True,
                             return_dict_in_generate=True, **greedy)
        theirs = out.sequences[0, ids.shape[1]:].tolist()
        first = _first_difference(r.tokens, theirs)
        row = {"equal_tokens": first is None, "first_difference": first,
               "generate_batched_vs_alone_first_difference": _first_difference(together, theirs)}
        if first is not None:
            top2 = out.scores[first][0].float().topk(2).values
            spread = out.scores[first][0].float().std().item()
            row.update(top2_gap=round((top2[0] - top2[1]).item(), 4), logit_std=round(spread, 4))
        rows.append(row)
    return rows


def tianchi_prompts(vocab, tokenizer_dir, data):
    """Random token prompts of the submission's lengths (the real titles with the instruction, counted by the
    Baichuan 2 tokenizer); random ids, since the model is random too."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    titles = [line.split("\t")[0] for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = [len(sp.encode("请根据论文标题写出摘要。\n标题：" + t)) + 2 for t in titles]  # + the two chat markers
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1000, vocab - 1000, (n,), generator=g).tolist() for n in lengths]


def tianchi(engine, prompts, new_tokens):
    max_batch = engine.max_batch
    lengths = [len(p) for p in prompts]
    params = SamplingParams(do_sample=True, **SAMPLING)
    warm = [Request(p, new_tokens, params, ignore_eos=True) for p in prompts[:max_batch]]
    engine.run(warm)
    _sync()
    start = time.perf_counter()
    engine.run([Request(p, new_tokens, params, ignore_eos=True) for p in prompts])
    _sync()
    seconds = time.perf_counter() - start
    return {"prompts": len(prompts), "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
            "new_tokens": new_tokens, "max_batch": max_batch, "engine_seconds": round(seconds, 1),
            "engine_tokens_per_s": round(len(prompts) * new_tokens / seconds)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2-1.5b", "baichuan2-7b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--new-tokens", nargs="+", type=int, default=[256, 800])
    p.add_argument("--naive-max-tokens", type=int, default=256,
                   help="naive generate is timed over at most this many new tokens (its per-token time grows with the "
                        "length, so for longer N its rate is an upper bound and the ratio a lower bound)")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the shape's own)")
    p.add_argument("--peer-batches", nargs="*", type=int, default=[1, 64],
                   help="batches at which transformers' compiled static cache is timed (each compiles anew), at the "
                        "shortest --new-tokens, timed over at most --naive-max-tokens; none: skip the peer")
    p.add_argument("--eager-check", action="store_true", help="also time the engine without CUDA graphs")
    p.add_argument("--tianchi", type=int, default=1, help="1: time the 1,000-prompt submission (Baichuan2-7B)")
    p.add_argument("--tianchi-batch", type=int, default=128)
    p.add_argument("--tokenizer", default="shared/assets/tokenizers/baichuan2")
    p.add_argument("--data", default="shared/data/csl/clge_val.tsv")
    p.add_argument("--out", default="generate_throughput.json")
    p.add_argument("--equality-only", action="store_true", help="only the greedy equality check, for --shapes")
    p.add_argument("--profile", default="", help="folder: only write kernel tables of decode steps there, for "
                                                 "--shapes and --batches")
    args = p.parse_args()
    if args.profile:
        for shape in args.shapes:
            overrides = {"num_hidden_layers": args.layers} if args.layers else {}
            kernel_profile(build_model(shape, dtype=torch.bfloat16, **overrides), args.batches, args.profile)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {"hardware": hardware, "torch": torch.__version__, "args": vars(args), "rows": [], "equality": {}}
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (read + written)", flush=True)
    import transformers

    results["transformers"] = transformers.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        overrides = {"num_hidden_layers": args.layers} if args.layers else {}
        model = build_model(shape, device=device, dtype=torch.bfloat16, **overrides)
        params_b = parameter_count(model) / 1e9
        print(f"== {shape}: {params_b:.2f} B parameters", flush=True)
        vocab = model.config.vocab_size
        submission = []
        if args.tianchi and shape == "baichuan2-7b":
            submission = tianchi_prompts(vocab, ROOT / args.tokenizer, ROOT / args.data)
        engine = Engine(model, max_batch=max(args.batches + [args.tianchi_batch] * bool(submission)),
                        max_len=max([PROMPT + max(args.new_tokens + [64])] + [len(p) + 800 for p in submission]))
        start = time.perf_counter()
        engine.run([Request(p.tolist(), min(args.new_tokens), ignore_eos=True) for p in _prompts(2, vocab)])
        _sync()
        results.setdefault("first_call_s", {})[shape] = round(time.perf_counter() - start, 1)
        results.setdefault("compiled", {})[shape] = engine.compiled is not None
        print(f"first call {results['first_call_s'][shape]} s, compiled step: {engine.compiled is not None}",
              flush=True)
        results["equality"][shape] = greedy_equality(model, _prompts(4, vocab, seed=7), 64, engine)
        print("greedy equality:", results["equality"][shape], flush=True)
        if args.equality_only:
            Path(args.out).write_text(json.dumps(results, indent=2))
            continue
        if device == "cuda":
            results.setdefault("step_profile", {})[shape] = [step_profile(engine, b, vocab) for b in args.batches]
            print("step profile:", results["step_profile"][shape], flush=True)
        naive_rate = {}
        for batch in args.batches:
            prompts = _prompts(batch, vocab)
            for new in args.new_tokens:
                timed = min(new, args.naive_max_tokens)
                if (batch, timed) not in naive_rate:
                    naive_rate[batch, timed] = batch * timed / time_generate(model, prompts, timed)
                naive = naive_rate[batch, timed]
                torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
                redraws = engine.redraws
                rate = batch * new / time_engine(engine, prompts, new)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
                limit = bandwidth_limit(model, batch, new, bandwidth)
                row = {"shape": shape, "batch": batch, "new_tokens": new, "naive_tokens_per_s": naive,
                       "naive_timed_tokens": timed,
                       "engine_tokens_per_s": rate, "ratio": rate / naive, "engine_ms_per_step": batch / rate * 1000,
                       "engine_peak_gib": round(peak, 1), "redraws": engine.redraws - redraws,
                       "limit_tokens_per_s": limit, "engine_share_of_limit": rate / limit}
                if batch in args.peer_batches and new == min(args.new_tokens):
                    row["static_tokens_per_s"] = batch * timed / time_generate(model, prompts, timed, static=True)
                    row["engine_over_static"] = rate / row["static_tokens_per_s"]
                if args.eager_check and new == min(args.new_tokens):
                    eager = Engine(model, max_batch=batch, max_len=PROMPT + new, cuda_graphs=False)
                    row["engine_eager_tokens_per_s"] = batch * new / time_engine(eager, prompts, new)
                    del eager
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=2))  # partial results survive a timeout
        if submission:
            t = tianchi(engine, submission, 800)
            rate = naive_rate[max(naive_rate)]  # the largest batch, over the most tokens timed
            t["naive_seconds_extrapolated"] = round(t["prompts"] * t["new_tokens"] / rate, 1)
            t["naive_rate_used"] = round(rate, 1)
            results["tianchi"] = t
            print("tianchi:", t, flush=True)
        del engine, model
        torch.cuda.empty_cache() if device == "cuda" else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results) -> str:
    lines = [f"copy bandwidth {results.get('copy_bandwidth_gb_s', 0):,.0f} GB/s (read + written)", "",
             "| shape | batch | new tokens | naive tokens/s (timed over) | static cache, compiled (peer) | "
             "engine tokens/s | engine / naive | engine / peer | bandwidth limit | engine share of limit | "
             "engine ms/step | engine peak GiB | redraws |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        peer = r.get("static_tokens_per_s")
        peer_cells = (f"{peer:,.0f}", f"{r['engine_over_static']:.2f}x") if peer else ("", "")
        lines.append(f"| {r['shape']} | {r['batch']} | {r['new_tokens']} | {r['naive_tokens_per_s']:,.0f} "
                     f"({r['naive_timed_tokens']}) | {peer_cells[0]} | {r['engine_tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.1f}x | {peer_cells[1]} | {r.get('limit_tokens_per_s', 0):,.0f} | "
                     f"{r.get('engine_share_of_limit', 0):.0%} | {r['engine_ms_per_step']:.2f} | "
                     f"{r['engine_peak_gib']} | {r['redraws']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
