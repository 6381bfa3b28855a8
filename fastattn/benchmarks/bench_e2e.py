"""End to end: greedy generation (prefill + new tokens) with the peers a user runs today.

One random LLaMA-format checkpoint (transformers' LlamaForCausalLM, saved with save_pretrained:
8 layers, hidden 1024, GQA 16/4, intermediate 2816, vocab 32000) is loaded four ways, on the
same weights:

  "generate (our model)"     fastattn.models.Llama on the fastattn backend ("fastattn"), on
                             its torch backend ("torch": F.scaled_dot_product_attention with
                             enable_gqa, F.rms_norm, the ordinary rotary), and transformers'
                             LlamaForCausalLM with attn_implementation="sdpa"
                             ("transformers-sdpa").
  "generate (transformers)"  transformers' generate with attn_implementation="fastattn"
                             (fastattn.integrations.transformers: register() + patch_model,
                             "fastattn") against attn_implementation="sdpa" ("sdpa").

Each timed call is one whole generate: prompts of `prompt` tokens (batch `batch`, no padding),
NEW greedy tokens (transformers: min_new_tokens = max_new_tokens, so no run stops early;
ours: no eos). tok/s counts the new tokens only (batch * NEW per call); the time includes
the prefill. The four ways are timed INTERLEAVED (round r runs each once, in turn), so the
noise of a shared machine hits them alike; each row's time is the median of its rounds
(FASTATTN_BENCH_E2E_ROUNDS, default 3; every raw time is in the JSON). The transformers-sdpa
row of the first group and the sdpa row of the second are the same runs. Each row also
records `tokens_agree`: the fraction of its generated tokens equal to transformers-sdpa's
(greedy on the same weights: 1.0 up to near-ties under rounding).
"""
import os
import shutil
import tempfile

import pytest
import torch

from fastattn.benchmarks.plugin import DEVICE, TINY

pytest.importorskip("transformers")
from fastattn.benchmarks import e2e  # noqa: E402

if TINY:
    HF_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    CASES = [(2, 8)]
    NEW = 4
    DTYPES = [torch.float32]
else:
    HF_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    CASES = [(1, 1024), (4, 512)]  # (batch, prompt tokens)
    NEW = 32
    # CUDA: fastattn's kernels take fp16/bf16 only (fp32 would fall back to SDPA).
    DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
ROUNDS = int(os.environ.get("FASTATTN_BENCH_E2E_ROUNDS", "2" if TINY else "3"))

# The rows each group records, and which of the four runners (fastattn.benchmarks.e2e) feeds them.
OURS_IMPLS = {"fastattn": "ours-fastattn", "torch": "ours-torch", "transformers-sdpa": "hf-sdpa"}
HF_IMPLS = {"fastattn": "hf-fastattn", "sdpa": "hf-sdpa"}

_state = {"models": {}, "measured": {}}


def _checkpoint() -> str:
    """The random checkpoint, saved once per session in a temporary folder."""
    if "path" not in _state:
        _state["path"] = e2e.save_checkpoint(tempfile.mkdtemp(prefix="fastattn-e2e-"), **HF_CONFIG)
    return _state["path"]


def teardown_module(module):
    path = _state.pop("path", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
    _state["models"].clear()


def _models(dtype):
    if dtype not in _state["models"]:
        _state["models"][dtype] = e2e.runners(_checkpoint(), dtype, DEVICE, NEW)
    return _state["models"][dtype]


def _measure(dtype, batch, prompt):
    """(ids, {runner: (times, tokens)}) for this case, measured once for both groups."""
    key = (dtype, batch, prompt)
    if key not in _state["measured"]:
        g = torch.Generator().manual_seed(batch * 100003 + prompt)
        ids = torch.randint(0, HF_CONFIG["vocab_size"], (batch, prompt), generator=g).to(DEVICE)
        _state["measured"][key] = (ids, e2e.measure(_models(dtype), ids, ROUNDS))
    return _state["measured"][key]


def _record(bench, op, impl, runner, dtype, batch, prompt):
    ids, measured = _measure(dtype, batch, prompt)
    times, tokens = measured[runner]
    agree = (tokens == measured["hf-sdpa"][1]).float().mean().item()
    gen = _models(dtype)[runner]
    bench(lambda: gen(ids), op=op, impl=impl, shape=f"B{batch} P{prompt} +{NEW}", dtype=dtype, times=times,
          tokens=batch * NEW, new_tokens=NEW, prompt_tokens=prompt, batch=batch, rounds_interleaved=ROUNDS,
          tokens_agree=agree, model=dict(HF_CONFIG))


def _case_id(case):
    return f"B{case[0]}xP{case[1]}"


@pytest.mark.parametrize("impl", list(OURS_IMPLS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_generate_ours(bench, dtype, case, impl):
    _record(bench, "generate (our model)", impl, OURS_IMPLS[impl], dtype, *case)


@pytest.mark.parametrize("impl", list(HF_IMPLS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_generate_transformers(bench, dtype, case, impl):
    _record(bench, "generate (transformers)", impl, HF_IMPLS[impl], dtype, *case)
