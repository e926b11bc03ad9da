"""Decoding's matrix products at one or two rows: cuBLAS against a Triton matrix-vector kernel, and the copy limit.

Issue 19's profile put a Qwen2-1.5B decode step's matrix products at 1,389 µs at batch 1, against 716 µs for reading
every weight once at the measured copy bandwidth: cuBLAS's kernels for one row average 2.2 TB/s, the small ones
(o_proj: 4.7 MB in 6.1 µs) mostly fixed cost. This measures, per projection of a shape (`bench/shapes.py`), the
time of one product inside a CUDA graph of one per layer, each with its own weight (so no weight stays in the 50 MB
L2 cache, as in the real step), for cuBLAS (`F.linear`) and for a Triton kernel that streams the weight once
(`gemv`, each program a few output rows, the reduction over K kept in registers), over a small grid of its tile
sizes; and the bandwidth each reaches. The engine's compiled step keeps batch >= 2, so rows = 2 is its batch 1.

    python3 bench/decode_matmul.py --shapes qwen2-1.5b baichuan2-7b --rows 1 2 --out gemv.json     # on a GPU
    TRITON_INTERPRET=1 python3 bench/decode_matmul.py --check                                       # CPU: results
"""
import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.generate_throughput import copy_bandwidth  # noqa: E402
from bench.shapes import model_config  # noqa: E402


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[r, n] = sum_k x[r, k] * w[n, k] for BLOCK_N outputs n; the products are summed in float32 registers of
    shape (ROWS, BLOCK_N, BLOCK_K) and reduced over K once, after the loop."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    r = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        kk = i * BLOCK_K + k
        w = tl.load(w_ptr + n[:, None] * K + kk[None, :], mask=(n[:, None] < N) & (kk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + r[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        acc += x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + r[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty), mask=n[None, :] < N)


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int, stages: int) -> torch.Tensor:
    rows, k = x.shape
    n = w.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, n, k, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k,
                                            num_warps=warps, num_stages=stages)
    return y


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of each fused projection the engine runs per layer (engine_model.fuse_linear_weights), and the head."""
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or h // heads  # Qwen3 gives its own
    inter = shape["intermediate_size"]
    return {"qkv": ((heads + 2 * kv) * head_dim, h), "o": (h, heads * head_dim), "gate_up": (2 * inter, h),
            "down": (h, inter),
            "head": (shape["vocab_size"], h)}


def time_graph(fn, repeats: int = 20) -> float:
    """Seconds per replay of a CUDA graph of fn(), after a warm-up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def check():
    """The kernel's results against F.linear (TRITON_INTERPRET=1 runs it on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for rows, n, k, block_n, block_k in [(1, 24, 40, 8, 16), (2, 33, 64, 4, 32), (4, 16, 100, 16, 64)]:
        x = torch.randn(rows, k, device=device)
        w = torch.randn(n, k, device=device)
        got, want = gemv(x, w, block_n, block_k, 4, 1), F.linear(x, w)
        err = (got - want).abs().max().item()
        assert err < 1e-3, (rows, n, k, err)
        print(f"rows {rows}, N {n}, K {k}: max error {err:.2e}")
    print("gemv matches F.linear")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["qwen2-1.5b"])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2])
    p.add_argument("--layers", type=int, default=None, help="weights per projection (default: the shape's layers)")
    p.add_argument("--check", action="store_true", help="only compare the kernel's results with F.linear")
    p.add_argument("--out")
    args = p.parse_args()
    if args.check:
        return check()
    check()
    bandwidth = copy_bandwidth("cuda")
    print(f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (read + written)", flush=True)
    grid = list(itertools.product([1, 2, 4, 8, 16], [256, 512, 1024], [4, 8], [1, 3]))
    results = {"copy_bandwidth": bandwidth, "rows": []}
    for name in args.shapes:
        shape = model_config(name).to_dict()
        layers = args.layers or shape["num_hidden_layers"]
        for proj, (n, k) in projections(shape).items():
            count = 1 if proj == "head" else layers
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
            nbytes = n * k * 2
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                cublas = time_graph(lambda: [F.linear(x, w) for w in weights]) / count
                best = None
                for block_n, block_k, warps, stages in grid:
                    if block_k > max(256, triton.next_power_of_2(k)) or rows * block_n * block_k > 64 * 32 * warps:
                        continue
                    try:
                        assert torch.allclose(gemv(x, weights[0], block_n, block_k, warps, stages).float(),
                                              F.linear(x, weights[0]).float(), atol=2e-2, rtol=2e-2)
                        t = time_graph(lambda: [gemv(x, w, block_n, block_k, warps, stages) for w in weights])
                    except Exception as error:  # a tile the compiler refuses: skip it, say so
                        print(f"  skip {block_n}x{block_k} w{warps} s{stages}: {type(error).__name__}")
                        continue
                    t /= count
                    if best is None or t < best[0]:
                        best = (t, dict(block_n=block_n, block_k=block_k, warps=warps, stages=stages))
                row = {"shape": name, "proj": proj, "rows": rows, "N": n, "K": k, "MB": nbytes / 1e6,
                       "limit_us": nbytes / bandwidth * 1e6, "cublas_us": cublas * 1e6,
                       "cublas_TBps": nbytes / cublas / 1e12, "triton_us": best[0] * 1e6,
                       "triton_TBps": nbytes / best[0] / 1e12, "triton_config": best[1]}
                results["rows"].append(row)
                print(f"{name:14} {proj:8} rows {rows}: {nbytes / 1e6:7.1f} MB  limit {row['limit_us']:7.1f} µs  "
                      f"cuBLAS {row['cublas_us']:7.1f} µs ({row['cublas_TBps']:.2f} TB/s)  Triton "
                      f"{row['triton_us']:7.1f} µs ({row['triton_TBps']:.2f} TB/s) {best[1]}", flush=True)
            weights = x = None  # free them before the next projection's
        per_layer = {}
        for rows in args.rows:
            mine = [r for r in results["rows"] if r["shape"] == name and r["rows"] == rows]
            sums = {key: sum(r[key] * (1 if r["proj"] == "head" else layers) for r in mine)
                    for key in ("limit_us", "cublas_us", "triton_us")}
            sums["best_us"] = sum(min(r["cublas_us"], r["triton_us"]) * (1 if r["proj"] == "head" else layers)
                                  for r in mine)
            per_layer[rows] = sums
            print(f"{name} rows {rows}, a step's products: limit {sums['limit_us']:,.0f} µs, cuBLAS "
                  f"{sums['cublas_us']:,.0f}, Triton {sums['triton_us']:,.0f}, the faster of each "
                  f"{sums['best_us']:,.0f}", flush=True)
        results.setdefault("steps", {})[name] = per_layer
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
