"""fastattn command line: ``python -m fastattn {info,demo,generate,bench}``."""
from __future__ import annotations

import argparse
import sys


def cmd_info(args=None) -> None:
    import platform

    import torch

    import fastattn

    print(f"fastattn {fastattn.__version__}  ({fastattn.__file__.rsplit('/', 2)[0]})")
    print(f"torch    {torch.__version__}  (CUDA runtime {torch.version.cuda or 'none'})")
    print(f"python   {platform.python_version()}  on {platform.machine()}, {torch.get_num_threads()} CPU threads")
    backends = ["cpu"] + (["cuda (archs: " + fastattn._C.CUDA_ARCHS + ")"] if fastattn.cuda_built() else [])
    print(f"kernels  {', '.join(backends)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB")
    else:
        print(f"device   cpu ({platform.processor() or platform.machine()}); no CUDA device visible")


def _best_device() -> str:
    import torch

    import fastattn

    return "cuda" if torch.cuda.is_available() and fastattn.cuda_built() else "cpu"


def _time(fn, device: str, iters: int = 10) -> float:
    """Median seconds per call of fn after one warm-up call (CUDA: events around each call).
    A median, not a mean: the machine may be shared."""
    import statistics
    import time

    import torch

    fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _progress(iterable, desc: str, total=None):
    """tqdm when installed (stderr, cleared when done), the plain iterable otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


# ---- demo: the model on both backends ----------------------------------------------------
def _demo_setup(device: str):
    import torch

    from fastattn.models import LlamaConfig

    if device == "cuda":
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
        return config, torch.bfloat16, 8, [512, 448, 384, 320, 512, 256, 500, 128], 128
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    return config, torch.float32, 4, [96, 80, 64, 40], 32


def _run_backend(model, ids, lengths, new_tokens, feed=None, desc="decode"):
    """Prefill + greedy decode of `new_tokens` tokens. With `feed` (B, n), decode those tokens
    instead of the argmax (teacher forcing, to compare logits step by step across backends).
    Returns tokens (B, n), the logits of every step, and the prefill and per-step times (s);
    the machine may be shared, so callers report medians."""
    import time

    import torch

    device = ids.device.type
    B = ids.shape[0]
    model.setup_cache(B, ids.shape[1] + new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(ids, lengths)
    _sync(device)
    t_prefill = time.perf_counter() - t0
    all_logits, tokens, t_steps = [logits.float()], [], []
    for i in _progress(range(new_tokens), desc=desc):
        tok = logits.argmax(-1) if feed is None else feed[:, i]
        tokens.append(tok)
        if i + 1 < new_tokens:
            t0 = time.perf_counter()
            logits = model.decode_step(tok)
            _sync(device)
            t_steps.append(time.perf_counter() - t0)
            all_logits.append(logits.float())
    return torch.stack(tokens, 1), all_logits, t_prefill, t_steps


def _median(xs):
    import statistics

    return statistics.median(xs)


def demo_model(device: str) -> bool:
    """Small random LLaMA: prefill + decode on both backends, parity and tokens/s."""
    import time

    import torch

    from fastattn.models import Llama

    config, dtype, B, lens, new_tokens = _demo_setup(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config).to(dtype).eval()
    S = max(lens)
    lengths = torch.tensor(lens, dtype=torch.int32, device=device)
    ids = torch.randint(0, config.vocab_size, (B, S), device=device)
    print(f"\nModel: random LLaMA, {model.num_parameters() / 1e6:.1f}M params ({config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, "
          f"head_dim {config.head_dim}), {str(dtype).replace('torch.', '')} on {device}")
    print(f"batch {B}, ragged prompts {lens} tokens, {new_tokens} new tokens each (greedy)")
    # warm-up (allocator, thread pools, kernel caches) on a short prefix
    for backend in ("fastattn", "torch"):
        model.backend = backend
        _run_backend(model, ids[:, :16], None, 2, desc=f"warm-up {backend}")
    # Prefill is timed 3 times per backend (interleaved), decode per step: medians resist the
    # noise of a shared machine.
    prefill_s = {"fastattn": [], "torch": []}
    results = {}
    for rep in range(3):
        for backend in ("fastattn", "torch"):
            model.backend = backend
            if rep == 0:
                feed = None if backend == "fastattn" else results["fastattn"][0]
                results[backend] = _run_backend(model, ids, lengths, new_tokens, feed=feed, desc=f"decode {backend}")
                prefill_s[backend].append(results[backend][2])
            else:
                model.setup_cache(B, S + new_tokens)
                _sync(device)
                t0 = time.perf_counter()
                model.prefill(ids, lengths)
                _sync(device)
                prefill_s[backend].append(time.perf_counter() - t0)
    tok_fa, logits_fa = results["fastattn"][0], results["fastattn"][1]
    logits_t = results["torch"][1]
    diff = max((a - b).abs().max().item() for a, b in zip(logits_fa, logits_t))
    scale = max(a.abs().max().item() for a in logits_t)
    top1 = sum((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(logits_fa, logits_t)) / len(logits_t)
    # fp32: rounding only. bf16: the backends round differently (fastattn accumulates in fp32,
    # the references in bf16), a few bf16 ulps of the largest logit.
    tol = 1e-3 * max(1.0, scale) if dtype == torch.float32 else 5e-2 * max(1.0, scale)
    ok = diff <= tol
    print(f"{'backend':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill ms':>11} {'ms/token step':>14}")
    t_pre = {b: _median(prefill_s[b]) for b in results}
    t_step = {b: _median(results[b][3]) for b in results}
    for name in results:
        print(f"{name:<10} {sum(lens) / t_pre[name]:>14.0f} {B / t_step[name]:>13.0f} {t_pre[name] * 1e3:>11.2f} "
              f"{t_step[name] * 1e3:>14.3f}")
    print(f"fastattn vs torch: prefill {t_pre['torch'] / t_pre['fastattn']:.2f}x, "
          f"decode {t_step['torch'] / t_step['fastattn']:.2f}x  (medians; batch {B})")
    print(f"agreement (same weights, same tokens fed): max |logit diff| {diff:.2e} (tolerance {tol:.1e}), "
          f"top-1 agreement {100 * top1:.1f}% -> {'OK' if ok else 'MISMATCH'}")
    print(f"sample continuation (fastattn, sequence 0): {tok_fa[0, :12].tolist()}")
    return ok


# ---- demo: per-op times at the model's shapes ---------------------------------------------
def demo_ops(device: str) -> None:
    """Each fused op at the demo model's shapes: fastattn vs its plain-torch reference (and
    the torch built-in where one exists)."""
    import torch
    import torch.nn.functional as F

    import fastattn
    from fastattn import reference
    from fastattn.models import rope_tables

    config, dtype, B, lens, new_tokens = _demo_setup(device)
    S, H, Hk, D, N = max(lens), config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    S_max = S + new_tokens
    dev = dict(device=device, dtype=dtype)
    x, r = torch.randn(B * S, N, **dev), torch.randn(B * S, N, **dev)
    w = torch.rand(N, **dev) + 0.5
    q, k, v = torch.randn(B, S, H, D, **dev), torch.randn(B, S, Hk, D, **dev), torch.randn(B, S, Hk, D, **dev)
    cos, sin = rope_tables(D, config.max_position_embeddings, device=device)
    kc, vc = torch.randn(B, S_max, Hk, D, **dev), torch.randn(B, S_max, Hk, D, **dev)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q1, k1, v1 = torch.randn(B, H, D, **dev), torch.randn(B, 1, Hk, D, **dev), torch.randn(B, 1, Hk, D, **dev)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def hf_rms(x, r):
        h = x + r
        return F.rms_norm(h, (N,), w, 1e-6), h

    rows = [
        ("rms_norm+residual", f"{B * S}x{N}",
         lambda: fastattn.rms_norm(x, w, 1e-6, residual=r), lambda: reference.rms_norm(x, w, 1e-6, residual=r),
         ("F.rms_norm", lambda: hf_rms(x, r))),
        ("apply_rotary", f"B{B} S{S} H{H}/{Hk} D{D}",
         lambda: fastattn.apply_rotary(q, k, cos, sin), lambda: reference.apply_rotary(q, k, cos, sin), None),
        ("flash_attention", f"B{B} S{S} H{H}/{Hk} D{D} causal",
         lambda: fastattn.flash_attention(q, k, v, causal=True), lambda: reference.attention(q, k, v, causal=True),
         ("F.sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))),
        ("append_kv", f"B{B} 1 token into {S_max}",
         lambda: fastattn.append_kv(kc, vc, k1, v1, seqlens), lambda: reference.append_kv(kc, vc, k1, v1, seqlens), None),
        ("decode_attention", f"B{B} H{H}/{Hk} D{D} cache {S_max}",
         lambda: fastattn.decode_attention(q1, kc, vc, seqlens), lambda: reference.decode_attention(q1, kc, vc, seqlens),
         None),
    ]
    iters = 20 if device == "cuda" else 9
    print(f"\nPer-op time at the model's shapes ({str(dtype).replace('torch.', '')}, {device}); "
          "torch = fastattn.reference (plain torch)")
    print(f"{'op':<18} {'shape':<30} {'fastattn ms':>12} {'torch ms':>10} {'speedup':>8}  {'torch built-in':<20}")
    for name, shape, ours, ref, builtin in _progress(rows, desc="per-op timing"):
        t_ours, t_ref = _time(ours, device, iters), _time(ref, device, iters)
        extra = ""
        if builtin is not None:
            extra = f"{builtin[0]} {_time(builtin[1], device, iters) * 1e3:.3f} ms"
        print(f"{name:<18} {shape:<30} {t_ours * 1e3:>12.3f} {t_ref * 1e3:>10.3f} {t_ref / t_ours:>7.2f}x  "
              f"{extra:<20}")


def cmd_demo(args) -> None:
    import time

    t0 = time.perf_counter()
    cmd_info()
    device = args.device or _best_device()
    ok = demo_model(device)
    demo_ops(device)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    if not ok:
        sys.exit(1)


# ---- generate from a local checkpoint -----------------------------------------------------
def _load_tokenizer(model_dir: str):
    import os

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("note: tokenizer.json found but the `tokenizers` package is not installed; "
              "give --prompt as token ids", file=sys.stderr)
        return None
    return Tokenizer.from_file(path)


def _eos_of(model_dir: str, config):
    import json
    import os

    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return eos
    return config.eos_token_id


def cmd_generate(args) -> None:
    import time

    import torch

    from fastattn.models import Llama

    device = args.device or _best_device()
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model = Llama.from_pretrained(args.model, backend=args.backend, dtype=dtype, device=device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"generate: {e}")
    tokenizer = _load_tokenizer(args.model)
    if tokenizer is not None:
        prompt_ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            prompt_ids = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise SystemExit(f"no usable tokenizer.json in {args.model}: give --prompt as token ids, e.g. '1 2 3'")
    if not prompt_ids:
        raise SystemExit("the prompt encodes to no tokens")
    ids = torch.tensor([prompt_ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=generator, eos_token_id=_eos_of(args.model, model.config), progress=True)
    _sync(device)
    dt = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    if tokenizer is not None:
        # decode prompt and continuation together: tokenizers put spaces between tokens
        print(tokenizer.decode(prompt_ids + new, skip_special_tokens=True))
    else:
        print(" ".join(str(t) for t in prompt_ids + new))
    print(f"[{len(new)} new tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s, backend {args.backend}, {device}]",
          file=sys.stderr)


def cmd_bench(args) -> None:
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    cmd = [sys.executable, os.path.join(bench_dir, "run.py")]
    if args.out:
        cmd += ["--out", args.out]
    if args.plot:
        cmd += ["--plot", args.plot]
    if args.filter:
        cmd += ["-k", args.filter]
    sys.exit(subprocess.call(cmd, cwd=root))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, compiled backends, device").set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="the main job: kernels vs torch on the best device")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("generate", help="generate from a local Hugging Face LLaMA-format folder")
    p.add_argument("--model", required=True, help="folder with config.json and *.safetensors")
    p.add_argument("--prompt", required=True, help="text (with the folder's tokenizer.json) or token ids '1 2 3'")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", choices=["fastattn", "torch"], default="fastattn")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto = the checkpoint's dtype")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("bench", help="run the benchmark suite, print a table")
    p.add_argument("--out", help="results JSON path (default benchmarks/results/<device>-<date>.json)")
    p.add_argument("--plot", help="also draw a PNG plot here")
    p.add_argument("-k", dest="filter", help="pytest -k expression selecting benchmarks")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
