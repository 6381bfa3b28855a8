"""End-to-end generation against what a user runs today, shared by the benchmark suite
(bench_e2e.py) and the CLI demo: one random LLaMA-format checkpoint (transformers'
LlamaForCausalLM, save_pretrained) loaded four ways on the same weights, each a callable
ids (B, S) -> the B x new_tokens greedy tokens it generates:

  ours-fastattn  fastattn.models.Llama on the fastattn backend
  ours-torch     the same model on its torch backend (SDPA with enable_gqa, F.rms_norm,
                 the ordinary rotary: the strongest plain-torch model)
  hf-sdpa        transformers' generate, attn_implementation="sdpa"
  hf-fastattn    transformers' generate, attn_implementation="fastattn" (register() +
                 patch_model from fastattn.integrations.transformers)

``measure`` times them INTERLEAVED (round r runs each once, in turn) so the noise of a
shared machine hits all alike; callers report medians. transformers runs with
min_new_tokens = max_new_tokens and ours without eos, so every run makes the same number of
tokens. Needs transformers (import errors reach the caller).
"""
from __future__ import annotations

import contextlib
import time

import torch

RUNNERS = ("ours-fastattn", "ours-torch", "hf-sdpa", "hf-fastattn")


@contextlib.contextmanager
def _quiet():
    """transformers' own progress bars (saving shards, loading weights) off: they would land
    between a caller's table lines and in its logs."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def save_checkpoint(path: str, seed: int = 0, **config) -> str:
    """A random transformers LlamaForCausalLM with this config (LlamaConfig fields), saved
    with save_pretrained (fp32 safetensors) into path."""
    import transformers

    cfg = transformers.LlamaConfig(**{"rms_norm_eps": 1e-5, "tie_word_embeddings": False, **config})
    torch.manual_seed(seed)
    with _quiet():
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def runners(path: str, dtype: torch.dtype, device: str, new_tokens: int) -> dict:
    """RUNNERS name -> generate(ids) -> new tokens (B, new_tokens), all on the checkpoint at path."""
    import transformers

    import fastattn.integrations.transformers as fa_hf
    from fastattn.models import Llama

    ours = Llama.from_pretrained(path, backend="fastattn", dtype=dtype, device=device).eval()
    fa_hf.register()
    hf = {}
    for impl in ("sdpa", "fastattn"):
        with _quiet():
            m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl)
        m = m.to(device).eval()
        if impl == "fastattn":
            fa_hf.patch_model(m)
        hf[impl] = m

    def run_ours(backend):
        def generate(ids):
            ours.backend = backend
            return ours.generate(ids, new_tokens)[:, ids.shape[1]:]
        return generate

    def run_hf(model):
        def generate(ids):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            return out[:, ids.shape[1]:]
        return generate

    return {"ours-fastattn": run_ours("fastattn"), "ours-torch": run_ours("torch"),
            "hf-sdpa": run_hf(hf["sdpa"]), "hf-fastattn": run_hf(hf["fastattn"])}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(gens: dict, ids: torch.Tensor, rounds: int, warmup_tokens: int = 32, on_round=None) -> dict:
    """{name: (seconds per round, tokens of the first round)}: every runner once per round, in
    turn, after one warm-up call each on a prompt of at most warmup_tokens tokens.
    on_round(r) is called after each round (progress)."""
    device = ids.device.type
    for gen in gens.values():
        gen(ids[:, :min(ids.shape[1], warmup_tokens)])
    times = {name: [] for name in gens}
    tokens = {}
    for r in range(rounds):
        for name, gen in gens.items():
            _sync(device)
            t0 = time.perf_counter()
            out = gen(ids)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            tokens.setdefault(name, out)
        if on_round is not None:
            on_round(r)
    return {name: (times[name], tokens[name]) for name in gens}
