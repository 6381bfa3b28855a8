"""fastattn command line: ``python -m fastattn {info,demo,generate,bench}``."""
from __future__ import annotations

import argparse
import math
import os
import sys

ERRORS_EPILOG = """\
errors: a bad argument, model folder or prompt is reported as one line,
"fastattn: error: ...", on stderr, and exits with code 2 before any heavy work.
An unexpected internal error prints one line with the exception type and message
and exits with code 1; set FASTATTN_DEBUG=1 to get the full traceback instead.
demo exits with code 1 when the two backends disagree."""


class UsageError(Exception):
    """A bad argument, model folder or prompt: main() prints it as one line, exit code 2."""


def cmd_info(args=None) -> None:
    import platform

    import torch

    import fastattn

    print(f"fastattn {fastattn.__version__}  ({fastattn.__file__.rsplit('/', 2)[0]})")
    print(f"torch    {torch.__version__}  (CUDA runtime {torch.version.cuda or 'none'})")
    print(f"python   {platform.python_version()}  on {platform.machine()}, {torch.get_num_threads()} CPU threads")
    backends = ["cpu"] + (["cuda (archs: " + fastattn._C.CUDA_ARCHS + ")"] if fastattn.cuda_built() else [])
    print(f"kernels  {', '.join(backends)}")
    print(f"cpu isa  {fastattn.cpu_isa()}  (the CPU kernel build in use; FASTATTN_CPU_ISA caps it)")
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


def _resolve_device(requested) -> str:
    """--device, checked against this build and machine; None -> the best available."""
    if requested is None:
        return _best_device()
    if requested == "cuda":
        import torch

        import fastattn

        if not fastattn.cuda_built():
            raise UsageError("--device cuda: this build of fastattn has no CUDA kernels (CPU-only build)")
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible to torch "
                             f"(torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none'})")
    return requested


def _time(fn, device: str, iters: int = 10) -> float:
    """Median seconds per call of fn after one warm-up call (CUDA: events around each call).
    A median, not a mean: the machine may be shared."""
    import statistics

    from fastattn.benchmarks.timing import time_calls

    return statistics.median(time_calls(fn, device, iters, warmup=1))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _progress(iterable, desc: str, total=None):
    """A progress bar on stderr, never on stdout: tqdm (cleared when done) when stderr is a
    terminal; otherwise (a log file, a pipe) one plain line naming the step, so logs hold no
    carriage-return debris glued to the table lines of stdout."""
    sys.stdout.flush()  # what stdout holds goes out before the bar appears
    if not _stderr_is_tty():
        sys.stderr.write(f"{desc} ...\n")
        sys.stderr.flush()
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _emit(line: str, bar=None) -> None:
    """Print a table line on stdout while `bar` (from _progress) may be drawn on stderr: the
    bar is cleared first and redrawn after, so the two never share a terminal line."""
    if hasattr(bar, "clear") and hasattr(bar, "write"):
        bar.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


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
    """Small random LLaMA: prefill + decode on both backends (fastattn's kernels; the torch
    backend is the strongest plain-torch model: SDPA with enable_gqa, F.rms_norm, the ordinary
    rotary), parity and tokens/s."""
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
    # fp32: rounding only. bf16: the backends round differently (fused kernels round once, torch
    # rounds after each op), a few bf16 ulps of the largest logit.
    tol = 1e-3 * max(1.0, scale) if dtype == torch.float32 else 5e-2 * max(1.0, scale)
    ok = diff <= tol
    print(f"{'backend':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill ms':>11} {'ms/token step':>14}")
    t_pre = {b: _median(prefill_s[b]) for b in results}
    t_step = {b: _median(results[b][3]) for b in results}
    for name in results:
        print(f"{name:<10} {sum(lens) / t_pre[name]:>14.0f} {B / t_step[name]:>13.0f} {t_pre[name] * 1e3:>11.2f} "
              f"{t_step[name] * 1e3:>14.3f}")
    print(f"fastattn vs torch (SDPA, F.rms_norm): prefill {t_pre['torch'] / t_pre['fastattn']:.2f}x, "
          f"decode {t_step['torch'] / t_step['fastattn']:.2f}x  (medians; batch {B})")
    print(f"agreement (same weights, same tokens fed): max |logit diff| {diff:.2e} (tolerance {tol:.1e}), "
          f"top-1 agreement {100 * top1:.1f}% -> {'OK' if ok else 'MISMATCH'}")
    print(f"sample continuation (fastattn, sequence 0): {tok_fa[0, :12].tolist()}")
    return ok


# ---- demo: against transformers on the same weights --------------------------------------
def demo_transformers(device: str) -> None:
    """Whole greedy generate() calls on one random checkpoint (saved with transformers'
    save_pretrained, the demo model's shapes): our model on fastattn vs on its torch backend
    (SDPA, F.rms_norm) vs transformers with attn_implementation="sdpa", and transformers with
    attn_implementation="fastattn" (register + patch_model) vs "sdpa". Interleaved rounds,
    medians. Skipped with a note when transformers is not installed."""
    import importlib.util
    import shutil
    import tempfile

    import torch

    if importlib.util.find_spec("transformers") is None:
        print("\nAgainst transformers: skipped (transformers is not installed: pip install transformers)")
        return
    from fastattn.benchmarks import e2e

    config, dtype, B, lens, new_tokens = _demo_setup(device)
    S, rounds = max(lens), 3
    hf_config = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                     max_position_embeddings=config.max_position_embeddings)
    path = tempfile.mkdtemp(prefix="fastattn-demo-")
    try:
        e2e.save_checkpoint(path, **hf_config)
        gens = e2e.runners(path, dtype, device, new_tokens)
        ids = torch.randint(0, config.vocab_size, (B, S), generator=torch.Generator().manual_seed(1)).to(device)
        print(f"\nAgainst transformers {_transformers_version()} on the same weights (save_pretrained checkpoint): "
              f"generate(), batch {B}, prompts of {S} tokens, {new_tokens} new tokens, "
              f"{str(dtype).replace('torch.', '')}; {rounds} interleaved rounds, medians")
        bar = _progress(range(rounds), desc="generate rounds")
        it = iter(bar)
        measured = e2e.measure(gens, ids, rounds, on_round=lambda r: next(it, None))
        if hasattr(bar, "close"):
            bar.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    med = {name: _median(times) for name, (times, _) in measured.items()}
    ref_tokens = measured["hf-sdpa"][1]
    labels = {"ours-fastattn": "our model, fastattn backend", "ours-torch": "our model, torch backend (SDPA)",
              "hf-sdpa": 'transformers, attn_implementation="sdpa"',
              "hf-fastattn": 'transformers, attn_implementation="fastattn"'}
    print(f"{'':<46} {'new tok/s':>10} {'s/generate':>11} {'tokens = sdpa':>14}")
    for name in e2e.RUNNERS:
        agree = (measured[name][1] == ref_tokens).float().mean().item()
        print(f"{labels[name]:<46} {B * new_tokens / med[name]:>10.1f} {med[name]:>11.3f} {100 * agree:>13.1f}%")
    print(f"our model on fastattn: {med['ours-torch'] / med['ours-fastattn']:.2f}x its torch backend, "
          f"{med['hf-sdpa'] / med['ours-fastattn']:.2f}x transformers+sdpa; transformers with fastattn: "
          f"{med['hf-sdpa'] / med['hf-fastattn']:.2f}x transformers+sdpa")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


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
    bar = _progress(rows, desc="per-op timing")
    for name, shape, ours, ref, builtin in bar:
        t_ours, t_ref = _time(ours, device, iters), _time(ref, device, iters)
        extra = ""
        if builtin is not None:
            extra = f"{builtin[0]} {_time(builtin[1], device, iters) * 1e3:.3f} ms"
        _emit(f"{name:<18} {shape:<30} {t_ours * 1e3:>12.3f} {t_ref * 1e3:>10.3f} {t_ref / t_ours:>7.2f}x  "
              f"{extra:<20}".rstrip(), bar)


def cmd_demo(args) -> None:
    import time

    t0 = time.perf_counter()
    device = _resolve_device(args.device)
    cmd_info()
    ok = demo_model(device)
    demo_transformers(device)
    demo_ops(device)
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    if not ok:
        sys.exit(1)


# ---- generate from a local checkpoint -----------------------------------------------------
# Every check on the folder, the prompt and the lengths runs before the weights are loaded.
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


def _read_json(model_dir: str, name: str):
    import json

    try:
        with open(os.path.join(model_dir, name)) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"--model {model_dir}: {name} is not valid JSON ({e})")
    except OSError as e:
        raise UsageError(f"--model {model_dir}: cannot read {name}: {e.strerror or e}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _model_config(model_dir: str):
    """The folder's config.json as a LlamaConfig, or a UsageError naming what is wrong."""
    from fastattn.models import LlamaConfig

    if not os.path.exists(model_dir):
        raise UsageError(f"--model {model_dir}: no such folder")
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model {model_dir}: not a folder (give the folder holding config.json and *.safetensors)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"--model {model_dir}: no config.json in this folder "
                         "(expected a Hugging Face LLaMA-format checkpoint folder)")
    hf = _read_json(model_dir, "config.json")
    if not isinstance(hf, dict):
        raise UsageError(f"--model {model_dir}: config.json must hold a JSON object, not {type(hf).__name__}")
    for key in _CONFIG_SIZES:
        value = hf.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise UsageError(f"--model {model_dir}: config.json: {key} must be a positive integer, got {value!r}")
    try:
        return LlamaConfig.from_hf(hf)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise UsageError(f"--model {model_dir}: config.json: {_one_line(e)}")


def _eos_ids(model_dir: str, config):
    """eos_token_id from generation_config.json, else from config.json: None, an int or a list of ints."""
    sources = []
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        gen = _read_json(model_dir, "generation_config.json")
        if not isinstance(gen, dict):
            raise UsageError(f"--model {model_dir}: generation_config.json must hold a JSON object, "
                             f"not {type(gen).__name__}")
        sources.append(("generation_config.json", gen.get("eos_token_id")))
    sources.append(("config.json", config.eos_token_id))
    for name, eos in sources:
        if eos is None:
            continue
        if not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
            raise UsageError(f"--model {model_dir}: {name}: eos_token_id must be an integer or a list of "
                             f"integers, got {eos!r}")
        return eos
    return None


def _load_tokenizer(model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("note: tokenizer.json found but the `tokenizers` package is not installed; "
              "give --prompt as token ids", file=sys.stderr)
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers package raises plain Exception on a malformed file
        raise UsageError(f"--model {model_dir}: cannot read tokenizer.json: {_one_line(e)}")


def _prompt_ids(args, tokenizer, config):
    vocab = config.vocab_size
    if tokenizer is not None and not args.token_ids:
        try:
            ids = tokenizer.encode(args.prompt).ids
        except Exception as e:  # the tokenizers package raises plain Exception (e.g. a broken model)
            raise UsageError(f"--prompt: {args.model}/tokenizer.json cannot encode it: {_one_line(e)}")
        if not ids:
            raise UsageError(f"--prompt {args.prompt!r}: encodes to no tokens with {args.model}/tokenizer.json")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"--prompt: tokenizer.json gives token id {bad[0]}, outside this model's vocabulary "
                             f"(vocab_size {vocab}): the tokenizer does not match the checkpoint")
    else:
        words = args.prompt.replace(",", " ").split()
        if not words:
            raise UsageError("--prompt: no tokens; give token ids like '1 2 3' (or text, with a tokenizer.json "
                             "in the --model folder)")
        ids = []
        for w in words:
            try:
                ids.append(int(w))
            except ValueError:
                why = "with --token-ids" if tokenizer is not None else f"without a tokenizer.json in {args.model}"
                raise UsageError(f"--prompt: {w!r} is not a token id; {why}, give the prompt as token ids, "
                                 "e.g. '1 2 3'")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"--prompt: token id {bad[0]} is outside this model's vocabulary "
                             f"(vocab_size {vocab}: ids 0 to {vocab - 1})")
    limit = config.max_position_embeddings
    if len(ids) > limit:
        raise UsageError(f"--prompt: {len(ids)} tokens, but the model's max_position_embeddings is {limit} "
                         f"(a prompt may have at most {limit} tokens)")
    if len(ids) + args.max_new_tokens - 1 > limit:  # the last new token is never fed back
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: the {len(ids)}-token prompt plus "
                         f"{args.max_new_tokens} new tokens need {len(ids) + args.max_new_tokens - 1} positions, "
                         f"more than the model's max_position_embeddings {limit} "
                         f"(use --max-new-tokens {limit - len(ids) + 1} or fewer)")
    return ids


def _load_model(args, dtype, device):
    from fastattn.models import Llama

    errors = (OSError, ValueError, RuntimeError, KeyError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # an optional dependency of generate, not of fastattn: say so, exit 2
        raise UsageError("generate reads the checkpoint's *.safetensors weights with the safetensors package, "
                         "which is not installed: pip install safetensors") from None
    try:
        return Llama.from_pretrained(args.model, backend=args.backend, dtype=dtype, device=device).eval()
    except errors as e:
        msg = _one_line(e)
        if msg.startswith("from_pretrained: "):
            msg = msg[len("from_pretrained: "):]
        raise UsageError(f"--model {args.model}: cannot load the checkpoint's *.safetensors weights: {msg}")


def cmd_generate(args) -> None:
    import time

    import torch

    device = _resolve_device(args.device)
    if args.num_beams > 1 and (args.temperature != 0 or args.top_k is not None or args.top_p is not None):
        raise UsageError("--num-beams > 1 is beam search, which is deterministic: drop --temperature, --top-k and "
                         "--top-p (they are for sampling with --num-beams 1)")
    if args.num_return_sequences > args.num_beams:
        raise UsageError(f"--num-return-sequences {args.num_return_sequences}: at most --num-beams "
                         f"({args.num_beams}) sequences come back")
    if args.cache == "paged" and args.backend == "fastattn":
        from fastattn.models.llama import paged_kernels_available

        if not paged_kernels_available():
            raise UsageError("--cache paged: this fastattn build has no paged-cache kernels for --backend fastattn; "
                             "use --backend torch (or --cache contiguous)")
    config = _model_config(args.model)
    eos = _eos_ids(args.model, config)
    tokenizer = _load_tokenizer(args.model)
    prompt_ids = _prompt_ids(args, tokenizer, config)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = _load_model(args, dtype, device)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        given = " and ".join(f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None)
        sys.stderr.write(f"fastattn: warning: {given} ignored: --temperature 0 is greedy decoding "
                         "(give --temperature > 0 to sample)\n")
        sys.stderr.flush()
    ids = torch.tensor([prompt_ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=generator, eos_token_id=eos, progress=_stderr_is_tty(), cache=args.cache,
                         page_size=args.page_size, num_beams=args.num_beams, length_penalty=args.length_penalty,
                         early_stopping=args.early_stopping, num_return_sequences=args.num_return_sequences,
                         repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens)
    _sync(device)
    dt = time.perf_counter() - t0
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    for row in out.tolist():  # one line per returned sequence (beam search: best first)
        new = row[len(prompt_ids):]
        ends = [i for i, t in enumerate(new) if t in eos_ids]
        new = new[:ends[0] + 1] if ends else new  # the padding after an eos is not text
        if tokenizer is not None:
            # decode prompt and continuation together: tokenizers put spaces between tokens
            print(tokenizer.decode(prompt_ids + new, skip_special_tokens=True))
        else:
            print(" ".join(str(t) for t in prompt_ids + new))
    new = out[0, len(prompt_ids):].tolist()
    kv = ""
    if args.cache == "paged" and model.cache is not None:
        kv = f", paged KV cache: {model.cache.num_pages_used} pages of {args.page_size} tokens"
    print(f"[{len(new)} new tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s, backend {args.backend}, {device}{kv}]",
          file=sys.stderr)


# ---- bench ----------------------------------------------------------------------------------
BENCH_EPILOG = """\
Where results go: --out, else benchmarks/results/<device>-<date>.json when run from inside the
fastattn source checkout the package is imported from, else ./fastattn-bench-<device>-<date>.json
in the current folder (--tiny inside the checkout: fastattn-bench-tiny-<device>-<date>.json in the
temporary folder, away from the committed results). The suites ship inside the package (fastattn/benchmarks), so this works
from an installed wheel; it needs pytest and pytest-benchmark, and --plot needs matplotlib:
pip install 'fastattn[bench]'.

Output: stdout holds only the table; progress (one line per benchmark) goes to stderr; pytest's
own output goes to a log file (--log, else a temporary file whose path is given on failure).
'% copy' is the share of the copy bandwidth measured in the same run, given only for working
sets larger than the last-level cache ('in cache' otherwise).

--readme rewrites README.md's performance section, from results of a clean commit only.
Errors are one line on stderr: exit 2 for a bad argument, 1 when a benchmark fails."""


def _output_path(flag: str, path: str, make_parents: bool) -> str:
    """An absolute output file path, checked before any benchmark runs."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a folder; give a file path")
    parent = os.path.dirname(full)
    if not make_parents and not os.path.exists(parent):
        raise UsageError(f"{flag} {path}: no such folder {parent}")
    existing = parent
    while not os.path.exists(existing):  # the missing folders of --out are created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")
    return full


def _read_results(path: str) -> dict:
    import json

    if not os.path.exists(path):
        raise UsageError(f"--report {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--report {path}: is a folder; give a results JSON file")
    try:
        with open(path) as f:
            results = json.load(f)
    except ValueError as e:
        raise UsageError(f"--report {path}: not valid JSON ({_one_line(e)})")
    except OSError as e:
        raise UsageError(f"--report {path}: cannot read: {e.strerror or e}")
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise UsageError(f"--report {path}: not a benchmark results file (no \"benchmarks\" list)")
    from fastattn.benchmarks import report

    problem = report.malformed_row(results)
    if problem:
        raise UsageError(f"--report {path}: {problem}")
    return results


def _check_plot_path(path: str) -> str:
    from fastattn.benchmarks import report

    full = _output_path("--plot", path, make_parents=False)
    missing = report.matplotlib_missing()
    if missing:
        raise UsageError(missing)
    ext = os.path.splitext(full)[1].lstrip(".").lower()
    if ext:
        from matplotlib.figure import Figure

        supported = Figure().canvas.get_supported_filetypes()
        if ext not in supported:
            raise UsageError(f"--plot {path}: matplotlib cannot write .{ext} files "
                             f"(use .png, or one of {', '.join(sorted(supported))})")
    return full


def cmd_bench(args) -> None:
    from fastattn.benchmarks import meta, report, runner

    results = None
    if args.report:
        conflicts = [flag for flag, value in (("--out", args.out), ("-k", args.filter), ("--tiny", args.tiny),
                                              ("--log", args.log)) if value]
        if conflicts:
            raise UsageError(f"--report reads an existing results file; {', '.join(conflicts)} only apply to "
                             "a new run")
        results = _read_results(args.report)
    plot_path = _check_plot_path(args.plot) if args.plot else None
    root = None
    if args.readme:
        root = meta.source_checkout()
        if root is None:
            raise UsageError("--readme: fastattn is not imported from a source checkout; there is no README.md "
                             "to update")
        if results is not None:
            refusal = report.readme_refusal(results)
            if refusal:
                raise UsageError(refusal)
        else:
            if args.tiny:
                raise UsageError("--readme: a --tiny run is a plumbing check; the README takes real sizes only")
            commit, dirty = meta.git_state(root)
            if commit is None:
                raise UsageError(f"--readme: {root} is not a git checkout; the README takes results from a clean "
                                 "commit only")
            if dirty:
                raise UsageError("--readme: the tree has uncommitted changes; the README takes results from a "
                                 "clean commit only (commit first, then run bench --readme)")
    failures, log_path, source = [], None, args.report
    if results is None:
        missing = runner.missing_runtime()
        if missing:
            raise UsageError(missing)
        out = _output_path("--out", args.out, make_parents=True) if args.out else runner.default_out(_best_device(), tiny=args.tiny)
        log = _output_path("--log", args.log, make_parents=False) if args.log else None
        try:
            results, failures, log_path = runner.run_suites(out, args.filter, args.tiny, log)
        except runner.BenchUsageError as e:
            raise UsageError(str(e))
        except runner.BenchError as e:
            _fail(str(e), 1)
        source = out
    report.print_table(results)
    sys.stdout.flush()
    if plot_path:
        try:
            report.plot(results, plot_path)
        except report.ReportError as e:
            raise UsageError(str(e))
        sys.stderr.write(f"plot: {plot_path}\n")
    if failures:
        nodeid, message = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        _fail(f"bench: {len(failures)} benchmark{'s' if len(failures) > 1 else ''} failed; {nodeid}: {message}"
              f"{more} (pytest log: {log_path})", 1)
    if args.readme:
        refusal = report.readme_refusal(results)
        if refusal:
            raise UsageError(refusal)
        try:
            sys.stderr.write(report.write_readme(results, source, root) + "\n")
        except report.ReportError as e:
            raise UsageError(str(e))


# ---- argument parsing and error reporting --------------------------------------------------
def _one_line(e) -> str:
    """An exception's message on one line (torch messages often span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else text[:397] + "..."


def _int_in(lo: int, hi=None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}" if hi is None
                                             else f"must be an integer in [{lo}, {hi}], got {value}")
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _early_stopping(text: str):
    choices = {"true": True, "false": False, "never": "never"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"must be true, false or never, got {text!r}")
    return choices[text.lower()]


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0.0 < value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (main prints it) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fastattn", description=__doc__, epilog=ERRORS_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("info", help="versions, compiled backends, device").set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="the main job: kernels vs torch on the best device")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("generate", help="generate from a local Hugging Face LLaMA-format folder",
                       epilog=ERRORS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder with config.json and *.safetensors")
    p.add_argument("--prompt", required=True, help="text (with the folder's tokenizer.json) or token ids '1 2 3'")
    p.add_argument("--token-ids", action="store_true",
                   help="read --prompt as token ids even when the folder has a tokenizer.json")
    p.add_argument("--max-new-tokens", type=_int_in(1), default=32)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_int_in(1), default=None)
    p.add_argument("--top-p", type=_top_p, default=None)
    p.add_argument("--seed", type=_int_in(-2 ** 63, 2 ** 64 - 1), default=None)
    p.add_argument("--backend", choices=["fastattn", "torch"], default="fastattn")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto = the checkpoint's dtype")
    p.add_argument("--cache", choices=["contiguous", "paged"], default="contiguous",
                   help="KV cache layout: contiguous (default, one (max length) block per sequence) or paged "
                        "(pages of --page-size tokens handed out as sequences grow); same tokens either way")
    p.add_argument("--page-size", type=_int_in(1), default=16, metavar="N",
                   help="tokens per page of the paged cache (default 16; used with --cache paged)")
    p.add_argument("--num-beams", type=_int_in(1), default=1, metavar="N",
                   help="beam search with N beams (default 1: greedy / sampling)")
    p.add_argument("--length-penalty", type=_finite, default=1.0,
                   help="beam search: a finished beam scores sum(log p) / length ** this (default 1)")
    p.add_argument("--early-stopping", type=_early_stopping, default=False, metavar="{true,false,never}",
                   help="beam search: true = stop when N beams are done; false (default) = when none can improve "
                        "at the current length; never = at the maximum length (transformers' meanings)")
    p.add_argument("--num-return-sequences", type=_int_in(1), default=1, metavar="R",
                   help="beam search: print the R best beams, best first (default 1)")
    p.add_argument("--repetition-penalty", type=_positive, default=1.0,
                   help="> 1 discourages tokens already in the text (positive logits divided, negative "
                        "multiplied; default 1 = off)")
    p.add_argument("--min-new-tokens", type=_int_in(0), default=0, metavar="N",
                   help="no eos before N new tokens (default 0)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("bench", help="run the benchmark suites (or --report a results file), print a table",
                       description="Run fastattn's benchmark suites against their peers (pytest-benchmark),\n"
                                   "save a results JSON, print a table, optionally draw a PNG.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results JSON path (default: see below)")
    p.add_argument("--plot", metavar="PNG", help="also draw one figure (a panel per op family) into this file")
    p.add_argument("-k", dest="filter", metavar="EXPR",
                   help="pytest -k expression selecting benchmarks, e.g. rms_norm, 'flash and not bwd'")
    p.add_argument("--report", metavar="JSON", help="no run: table (and --plot) of an existing results file")
    p.add_argument("--readme", action="store_true",
                   help="also write the table into README.md's performance section (clean commits only)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes, 2 rounds: checks the plumbing in seconds, the numbers mean nothing")
    p.add_argument("--log", help="keep pytest's output in this file (default: a temporary file)")
    p.set_defaults(func=cmd_bench)
    return parser


def _debug() -> bool:
    return os.environ.get("FASTATTN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"fastattn: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def main(argv=None) -> None:
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        if args.cmd is None:
            raise UsageError(f"no command given: choose one of info, demo, generate, bench "
                             f"(see: {parser.prog} --help)")
        if extra:  # name the subcommand whose --help lists the valid options
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see: {parser.prog} {args.cmd} --help)")
        args.func(args)
    except UsageError as e:
        _fail(str(e), 2)
    except BrokenPipeError:
        # stdout went away (`... | head`): nothing left to report to
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        sys.exit(1)
    except KeyboardInterrupt:
        if _debug():
            raise
        _fail("interrupted", 130)
    except Exception as e:
        if _debug():
            raise
        _fail(f"{type(e).__name__}: {_one_line(e)} (unexpected; set FASTATTN_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
