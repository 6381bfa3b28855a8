"""Mixture-of-experts feed-forward: fastattn.models.moe.MoEFeedForward vs transformers'
MixtralSparseMoeBlock (its default experts implementation, "grouped_mm" where torch has it)
on the same weights, in tokens/s.

What is reported besides tokens/s: decode-sized calls are bound by reading the selected
experts' weights, so their entries carry ``gbps`` (bytes of the distinct experts the tokens
picked, 3 * hidden * inter each, over the median time; ``pct_of_copy`` against the run's copy
bandwidth); prefill-sized calls are matrix products, so they carry ``tflops`` (2 * tokens *
top_k * 3 * hidden * inter over the median time; ``pct_of_gemm`` against the run's GEMM rate).
Our module runs the fastattn backend: on the CPU its decode calls go through the
``moe_experts`` kernel, its prefill calls through the per-expert torch matmuls.

Shapes: a Mixtral block scaled to the machine (CPU: hidden 1024, expert inter 3584, 8 experts,
top-2; CUDA: Mixtral-8x7B's hidden 4096, inter 14336), a prefill-sized batch (512 tokens) and
a decode-sized one (4 tokens), fp32 and bf16 on the CPU, bf16 on CUDA. Both modules route with
the same router, so they run the same experts on the same tokens.

Run as a script for the interleaved A/B comparison (the two implementations alternate within
every repetition, so a noisy machine slows both alike; the speedup is the median of the
per-repetition ratios):

    python -m fastattn.benchmarks.bench_moe [--reps 7] [--eager] [--tokens 512 4] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from fastattn.models.moe import MoEFeedForward

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    SHAPE = dict(hidden=64, inter=96, experts=4, top_k=2)
    TOKENS = [16, 2]
    DTYPES = [torch.float32]
elif DEVICE == "cuda":
    SHAPE = dict(hidden=4096, inter=14336, experts=8, top_k=2)
    TOKENS = [512, 4]
    DTYPES = [torch.bfloat16]
else:
    SHAPE = dict(hidden=1024, inter=3584, experts=8, top_k=2)
    TOKENS = [512, 4]
    DTYPES = [torch.float32, torch.bfloat16]

IMPLS = ["fastattn", "transformers"]


def build(dtype, device=DEVICE, shape=None, seed: int = 0, eager: bool = False):
    """(ours, transformers' block or None) on the same random weights."""
    s = dict(SHAPE if shape is None else shape)
    torch.manual_seed(seed)
    ours = MoEFeedForward(s["hidden"], s["inter"], s["experts"], s["top_k"], norm_topk_prob=True)
    with torch.no_grad():
        ours.router.weight.normal_(0, 0.5)  # Mixtral-like spread of the router's probabilities
    ours = ours.to(device=device, dtype=dtype).eval()
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return ours, None
    cfg = MixtralConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_local_experts=s["experts"],
                        num_experts_per_tok=s["top_k"])
    if eager:
        cfg._experts_implementation = "eager"
    else:  # what from_pretrained picks by default
        cfg._experts_implementation = _default_experts_implementation()
    with torch.device("meta"):
        theirs = MixtralSparseMoeBlock(cfg)
    theirs.load_state_dict({"gate.weight": ours.router.weight, "experts.gate_up_proj": ours.w13,
                            "experts.down_proj": ours.w2}, assign=True)
    return ours, theirs.eval()


def _default_experts_implementation() -> str:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
    except ImportError:
        return "eager"
    has = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return "grouped_mm" if has else "eager"


def is_decode(tokens: int) -> bool:
    return tokens <= 8


def shape_label(tokens: int, shape=None) -> str:
    s = SHAPE if shape is None else shape
    kind = "decode" if is_decode(tokens) else "prefill"
    return f"{kind} T{tokens} H{s['hidden']} I{s['inter']} E{s['experts']} k{s['top_k']}"


def work(ours, x, shape=None) -> dict:
    """What one call on x (.., hidden) must do: weight_bytes (the distinct experts its tokens
    pick, each read once) and expert_flops (2 * tokens * top_k * 3 * hidden * inter)."""
    s = SHAPE if shape is None else shape
    with torch.no_grad():
        _, ids = ours.route(x.reshape(-1, s["hidden"]))
    tokens = x.numel() // s["hidden"]
    per_expert = 3 * s["hidden"] * s["inter"] * x.element_size()
    return {"weight_bytes": int(torch.unique(ids).numel()) * per_expert,
            "expert_flops": 2 * tokens * s["top_k"] * 3 * s["hidden"] * s["inter"]}


_models = {}


def _models_for(dtype):
    if dtype not in _models:
        _models.clear()  # one dtype's weights at a time
        _models[dtype] = build(dtype)
    return _models[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_moe(bench, benchmark, impl, tokens, dtype):
    ours, theirs = _models_for(dtype)
    if impl == "transformers" and theirs is None:
        pytest.skip("unavailable: transformers is not installed")
    fn = ours if impl == "fastattn" else theirs
    # The same tokens for every implementation (they route to the same experts, so each row
    # reads the same expert weights): a fresh draw per row compared unequal work.
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, SHAPE["hidden"], generator=g, dtype=dtype).to(DEVICE)
    w = work(ours, x)
    # decode: GB/s of weight reads; prefill: GFLOP/s of the expert matmuls (see the docstring)
    measure = dict(bytes=w["weight_bytes"]) if is_decode(tokens) else dict(flops=w["expert_flops"])
    with torch.no_grad():
        info = bench(lambda: fn(x), op="moe", impl=impl, shape=shape_label(tokens), dtype=dtype, tokens=tokens,
                     expert_flops=w["expert_flops"], weight_bytes=w["weight_bytes"], **measure)
    benchmark.extra_info["tokens_per_s"] = tokens / info["median_s"]


# ---- interleaved A/B (python -m fastattn.benchmarks.bench_moe) -----------------------------
def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved(dtype, tokens: int, reps: int = 7, eager: bool = False, shape=None):
    """Median seconds per call of each implementation and the median of the per-repetition
    speedups (transformers' time / ours), the order alternating every repetition."""
    ours, theirs = build(dtype, shape=shape)
    impls = {"fastattn": ours, "transformers": theirs}
    if eager:
        impls["transformers-eager"] = build(dtype, shape=shape, eager=True)[1]
    x = torch.randn(1, tokens, (shape or SHAPE)["hidden"], device=DEVICE, dtype=dtype)
    times = {k: [] for k in impls}
    with torch.no_grad():
        ref = theirs(x).float()
        err = (ours(x).float() - ref).abs().max().item() / ref.abs().max().item()
        for fn in impls.values():  # warm-up
            fn(x)
        names = list(impls)
        for r in range(reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                _sync()
                t0 = time.perf_counter()
                impls[name](x)
                _sync()
                times[name].append(time.perf_counter() - t0)
    out = {"dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "rel_err": err}
    out.update(work(ours, x, shape))
    for name, t in times.items():
        med = statistics.median(t)
        out[name] = {"median_s": med, "tokens_per_s": tokens / med,
                     "weight_gbps": out["weight_bytes"] / med / 1e9, "gflops": out["expert_flops"] / med / 1e9}
        if name != "fastattn":
            out[name]["speedup"] = statistics.median(a / b for a, b in zip(t, times["fastattn"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--eager", action="store_true", help="also transformers' eager per-expert loop")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtypes", nargs="+", default=[str(d).replace("torch.", "") for d in DTYPES])
    args = p.parse_args(argv)
    print(f"device {DEVICE}, threads {torch.get_num_threads()}, shape {SHAPE}, {args.reps} interleaved repetitions")
    for dt in args.dtypes:
        for tokens in args.tokens:
            r = interleaved(getattr(torch, dt), tokens, args.reps, args.eager)
            rate = ((lambda d: f"{d['weight_gbps']:5.1f} GB/s") if is_decode(tokens)
                    else (lambda d: f"{d['gflops']:6.1f} GFLOP/s"))
            line = f"{dt:9s} {shape_label(tokens):40s} rel.err {r['rel_err']:.1e}  fastattn " \
                   f"{r['fastattn']['tokens_per_s']:9.1f} tok/s ({rate(r['fastattn'])})"
            for name in r:
                if name.startswith("transformers"):
                    line += f"  {name} {r[name]['tokens_per_s']:9.1f} tok/s ({rate(r[name])}, speedup " \
                            f"{r[name]['speedup']:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
