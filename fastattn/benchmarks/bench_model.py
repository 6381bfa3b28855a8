"""End-to-end model: prefill and decode tokens/s, backend fastattn vs torch vs torch.compile of
the torch backend (and of the fastattn backend, side by side).

CUDA: a ~1B-parameter LLaMA (Llama-3.2-1B shapes), bf16, 2k context; decode at batch 1 and 16.
CPU: a small model in fp32 (the machine's threads). The torch.compile rows run on CUDA always
and on the CPU only with FASTATTN_BENCH_COMPILE=1 (compiling takes minutes there).

Decode is timed as one decode_step at a fixed context: each call first resets every
sequence's cache length to the context, so all rounds measure the same step. Decode rows also
record bytes_per_step: the weights plus the K/V rows one step reads.
"""
import os

import pytest
import torch

import fastattn
from fastattn.models import Llama, LlamaConfig

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    DTYPE = torch.float32
    CONTEXT = 16
    PREFILL = [(1, 16)]
elif DEVICE == "cuda":
    CONFIG = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    DTYPE = torch.bfloat16
    CONTEXT = 2048
    PREFILL = [(1, 2048), (16, 512)]
else:
    CONFIG = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    DTYPE = torch.float32
    CONTEXT = 256
    PREFILL = [(1, 256), (16, 64)]

DECODE_BATCHES = [1] if TINY else [1, 16]
# Decode replayed from a CUDA graph (Llama.capture_decode_step): no per-layer launch overhead.
GRAPH_IMPLS = ["fastattn+graph", "torch+graph"] if DEVICE == "cuda" and not TINY else []
COMPILE = (DEVICE == "cuda" and not TINY) or os.environ.get("FASTATTN_BENCH_COMPILE") == "1"
IMPLS = ["fastattn", "torch"] + (["compile(torch)", "compile(fastattn)"] if COMPILE else [])

_state = {}


def _model():
    if "model" not in _state:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            _state["model"] = Llama(CONFIG).to(DTYPE).eval()
    return _state["model"]


def _runner(impl, kind):
    """The callable to time: model.prefill / model.decode_step on the impl's backend."""
    model = _model()
    model.backend = "fastattn" if "fastattn" in impl else "torch"
    fn = model.prefill if kind == "prefill" else model.decode_step
    if impl.startswith("compile("):
        key = (impl, kind)
        if key not in _state:
            _state[key] = torch.compile(fn)
        fn = _state[key]
    return model, fn


def _shape_label(batch, tokens, what):
    return f"B{batch} {what}{tokens}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,seqlen", PREFILL, ids=lambda v: str(v))
def test_prefill(bench, benchmark, impl, batch, seqlen):
    model, fn = _runner(impl, "prefill")
    ids = torch.randint(0, CONFIG.vocab_size, (batch, seqlen), device=DEVICE)
    model.setup_cache(batch, seqlen)
    info = bench(lambda: fn(ids), op="model prefill", impl=impl, shape=_shape_label(batch, seqlen, "S"),
                 dtype=DTYPE, tokens=batch * seqlen, params=model.num_parameters())
    benchmark.extra_info["tokens_per_s"] = batch * seqlen / info["median_s"]


@pytest.mark.parametrize("impl", IMPLS + GRAPH_IMPLS)
@pytest.mark.parametrize("batch", DECODE_BATCHES)
def test_decode(bench, benchmark, impl, batch):
    model, fn = _runner(impl.replace("+graph", ""), "decode")
    c = CONFIG
    cache = model.setup_cache(batch, CONTEXT + 1)
    # The step's cost does not depend on what the cache holds, only on its valid length.
    for kv in cache.k + cache.v:  # (one tensor per layer)
        kv.normal_()
    if impl.endswith("+graph"):
        cache.seqlens.fill_(CONTEXT)
        try:
            fn = model.capture_decode_step()
        except Exception as e:  # e.g. an op that still reads lengths on the host
            pytest.skip(f"unavailable: decode step not capturable on backend {model.backend}: {type(e).__name__}: {e}")
    tokens = torch.randint(0, c.vocab_size, (batch,), device=DEVICE)

    def step():
        cache.seqlens.fill_(CONTEXT)
        return fn(tokens)

    elt = torch.finfo(DTYPE).bits // 8
    kv_bytes = 2 * c.num_hidden_layers * batch * CONTEXT * c.num_key_value_heads * c.head_dim * elt
    weight_bytes = model.num_parameters() * elt
    info = bench(step, op="model decode", impl=impl, shape=_shape_label(batch, CONTEXT, "ctx"), dtype=DTYPE,
                 bytes_per_step=weight_bytes + kv_bytes, tokens=batch, params=model.num_parameters())
    benchmark.extra_info["tokens_per_s"] = batch / info["median_s"]
