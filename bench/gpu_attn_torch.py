#!/usr/bin/env python3
"""bench/gpu_attn_torch.py: torch SDPA (flash = FlashAttention-2, and cuDNN) on the shapes that
`apb bench gpu-attn` times, printing the same columns (shape, impl, median ms, best ms, useful TFLOP/s),
so that the two tables can be read side by side from one GPU session (bench/gpu_session.sh).

Shapes: dense causal attention at each token count (GQA: K/V expanded to the query heads, which both
backends need); with --apb-shape also the APB shape of the last of 4 hosts at 128K (P 6144 passing
keys, A 4096 anchor rows, B 32768 local rows), computed as three calls merged by their LSE in plain
torch: anchor rows causal over the anchor keys; local rows against [P | A] without a mask; local rows
causal over their own keys; the two local pieces merged as o = sum_i exp(lse_i - lse) o_i. The merge is
part of the timed work. Useful FLOPs count visible (row, key) pairs only: 4 * pairs * D * Hq.

Inputs: random bf16 (never zeros). Timing: CUDA events around each call, median of --reps after
--warmup calls. Not a test: nothing here checks values (tests/check_gpu_attn.c does, for apb's kernels).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def flops(P, A, B, d, hq):
    pairs = A * (A + 1) / 2 + B * (P + A) + B * (B + 1) / 2
    return 4.0 * pairs * d * hq


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        ms.append(start.elapsed_time(stop))
    ms.sort()
    n = len(ms)
    med = ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])
    return med, ms[0]


def rand_bf16(*shape):
    return (torch.rand(*shape, device="cuda", dtype=torch.float32) * 2 - 1).to(torch.bfloat16)


def dense_fn(backend, n, hq, hkv, d):
    q = rand_bf16(1, hq, n, d)
    g = hq // hkv
    k = rand_bf16(1, hkv, n, d).repeat_interleave(g, 1)
    v = rand_bf16(1, hkv, n, d).repeat_interleave(g, 1)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def with_lse(backend):
    """(q, k, v, causal) -> (o, lse [1, H, rows]) through the aten op of the backend."""
    if backend == SDPBackend.FLASH_ATTENTION:
        op = torch.ops.aten._scaled_dot_product_flash_attention
        return lambda q, k, v, causal: op(q, k, v, 0.0, causal)[:2]
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    return lambda q, k, v, causal: op(q, k, v, None, True, 0.0, causal, False)[:2]


def apb_fn(backend, P, A, B, hq, hkv, d):
    g = hq // hkv
    q = rand_bf16(1, hq, A + B, d)
    k = rand_bf16(1, hkv, P + A + B, d).repeat_interleave(g, 1)
    v = rand_bf16(1, hkv, P + A + B, d).repeat_interleave(g, 1)
    att = with_lse(backend)
    qa, qb = q[:, :, :A], q[:, :, A:]
    ka, va = k[:, :, P:P + A], v[:, :, P:P + A]
    kpa, vpa = k[:, :, :P + A], v[:, :, :P + A]
    kb, vb = k[:, :, P + A:], v[:, :, P + A:]

    def run():
        oa, _ = att(qa, ka, va, True)
        o1, l1 = att(qb, kpa, vpa, False)
        o2, l2 = att(qb, kb, vb, True)
        l1 = l1.reshape(1, hq, B, 1)
        l2 = l2.reshape(1, hq, B, 1)
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
        ob = (o1.float() * w1 + o2.float() * w2) / (w1 + w2)
        return oa, ob.to(torch.bfloat16)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impl", default="flash,cudnn", help="comma-separated: flash, cudnn")
    ap.add_argument("--apb-shape", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.reps < 1 or a.hq % a.hkv:
        sys.exit("gpu_attn_torch.py: --reps must be >= 1 and --hq a multiple of --hkv")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    impls = [s for s in a.impl.split(",") if s]
    for s in impls:
        if s not in backends:
            sys.exit(f"gpu_attn_torch.py: unknown --impl {s}; flash or cudnn")
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0)
    print(f"# {dev}, torch {torch.__version__}\n# bf16, Hq {a.hq}, Hkv {a.hkv}, D {a.d}, "
          f"median of {a.reps} after {a.warmup} warm-up")
    print(f"{'shape':34s} {'impl':10s} {'ms':>10s} {'best_ms':>10s} {'TFLOP/s':>9s}", flush=True)
    shapes = [("dense", 0, 0, int(n)) for n in a.tokens.split(",") if n]
    if a.apb_shape:
        shapes.append(("apb", 6144, 4096, 32768))
    results = []
    for kind, P, A, B in shapes:
        label = f"dense causal n={B}" if kind == "dense" else f"apb P{P} A{A} B{B}"
        fl = flops(P, A, B, a.d, a.hq)
        for name in impls:
            be = backends[name]
            try:
                fn = dense_fn(be, B, a.hq, a.hkv, a.d) if kind == "dense" else apb_fn(be, P, A, B, a.hq, a.hkv, a.d)
                med, best = timed(fn, a.warmup, a.reps)
            except Exception as ex:  # a backend that refuses a shape: say so and go on
                print(f"{label:34s} {name:10s} failed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            finally:
                fn = None
                torch.cuda.empty_cache()
            tf = fl / (med * 1e-3) / 1e12
            print(f"{label:34s} {name:10s} {med:10.3f} {best:10.3f} {tf:9.1f}", flush=True)
            results.append(dict(shape=kind, label=label, P=P, A=A, B=B, Hq=a.hq, Hkv=a.hkv, D=a.d, impl=name,
                                ms=round(med, 4), best_ms=round(best, 4), flop=fl, tflops=round(tf, 2)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(bench="gpu-attn-torch", device=dev, torch=torch.__version__,
                           date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), dtype="bf16",
                           reps=a.reps, warmup=a.warmup, results=results), f, indent=1)


if __name__ == "__main__":
    main()
