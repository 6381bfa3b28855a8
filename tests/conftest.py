"""Shared test helpers: devices, dtypes and the error-ratio rule of DESIGN.md section 5."""
from __future__ import annotations

import pytest
import torch

import fastattn

import os

HAS_CUDA = torch.cuda.is_available() and fastattn.cuda_built()

# scripts/gpu_check.sh sets this: on the GPU machine a CUDA test that skips is a failure.
if os.environ.get("FASTATTN_REQUIRE_CUDA") == "1" and not HAS_CUDA:
    raise RuntimeError("FASTATTN_REQUIRE_CUDA=1 but no CUDA device or no CUDA build of fastattn")

# Tests that read the repository's sources (the CUDA kernels compiled with g++ under the CPU
# emulation, the checkout-only benchmark tooling) are skipped, with that reason, when the
# tests run against an installed wheel from a copy of tests/ that has no source tree beside it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_SOURCE_TREE = os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "csrc"))
_SOURCE_TREE_FILES = ("test_flash_bwd_layout.py",)  # besides every tests/*_emulated.py


def pytest_configure(config):
    # Also registered here (not only in pyproject.toml), for runs outside the checkout.
    for line in ("cuda: needs a CUDA GPU (skipped without one)", "slow: longer tests",
                 "source_tree: needs the fastattn source checkout (skipped against an installed wheel)"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    if HAS_SOURCE_TREE:
        return
    skip = pytest.mark.skip(reason=f"needs the fastattn source tree (csrc/, setup.py), not found at {ROOT}")
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name.endswith("_emulated.py") or name in _SOURCE_TREE_FILES or item.get_closest_marker("source_tree"):
            item.add_marker(skip)


# Every test that takes `device` runs on the CPU, and on CUDA when a GPU and a CUDA build are
# present; the CUDA copies carry the `cuda` marker and are skipped (not passed) without one.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")]),
]

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtypes_for(device: str, cuda_16bit_only: bool = False):
    if device == "cuda" and cuda_16bit_only:
        return [torch.float16, torch.bfloat16]
    return ALL_DTYPES


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_ratio(ours, ref_low, ref_true, name: str = "output", factor: float = 2.0, atol: float = 1e-5):
    """flash-attn's rule: err(ours) <= factor * err(reference in the same low precision) + atol,
    both measured against the reference computed in fp32/fp64 (`ref_true`). For fp32 inputs
    the low-precision reference *is* the fp32 reference run the unfused way, so the bound
    stays meaningful (it is then a small multiple of fp32 rounding)."""
    assert ours.shape == ref_true.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_true.shape)}"
    assert torch.isfinite(ours.float()).all() or not torch.isfinite(ref_true.float()).all(), f"{name}: non-finite values"
    err = max_err(ours, ref_true)
    ref_err = max_err(ref_low, ref_true)
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} * reference error {ref_err:.3e} + {atol:g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- ctypes arguments of the CPU emulators of the CUDA kernels (tests/*_emulate.cpp) --------
def emu_ptrs(*tensors):
    """The tensors' data pointers (None for None) as a C array of void*."""
    import ctypes

    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


def emu_extent(t) -> int:
    """Bytes from t's data pointer to the end of its last element (what a kernel may touch)."""
    if t is None or t.numel() == 0:
        return 0
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def emu_ptrs_sizes(*tensors):
    """(pointers, extents in bytes): the emulators run the kernels on guarded copies (memcheck)."""
    import ctypes

    return emu_ptrs(*tensors), (ctypes.c_int64 * len(tensors))(*[emu_extent(t) for t in tensors])


def emu_bank_rows(text: str, kernel=None) -> list:
    """Rows of an emulator's bank-conflict report (tab-separated: kernel, access, instructions,
    wavefronts, ideal wavefronts); `kernel` overrides the first column."""
    rows = []
    for line in text.splitlines():
        name, kind, inst, waves, ideal = line.split("\t")
        rows.append({"kernel": kernel or name, "access": kind, "instructions": int(inst), "wavefronts": int(waves),
                     "ideal_wavefronts": int(ideal), "conflict_ratio": int(waves) / max(int(ideal), 1)})
    return rows


def emu_bank_report(rows: list, label: str, tmp_path) -> list:
    """Prints the bank-conflict rows as a table and writes them to <tmp_path>/<label>_bank_conflicts.json
    (a report, not a check)."""
    import json

    print(f"\n{label}: shared-memory bank conflicts at the tracked access points")
    print(f"{'kernel':32} {'access':10} {'instr':>9} {'wavefronts':>11} {'ideal':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['kernel']:32} {r['access']:10} {r['instructions']:9d} {r['wavefronts']:11d} "
              f"{r['ideal_wavefronts']:9d} {r['conflict_ratio']:6.2f}")
    path = tmp_path / f"{label}_bank_conflicts.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"written to {path}")
    return rows


# ---------------------------------------------------------------------------------------
# Tiny Hugging Face models for the model tests (test_model, test_model_archs, test_generation)
# ---------------------------------------------------------------------------------------
def randomize_norms(model):
    """transformers initialises norm weights to 1 and biases to 0; perturb them so a
    mis-mapped norm or bias cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, path, **kw) -> str:
    """save_pretrained (safetensors) into path; returns it as a str for from_pretrained."""
    model.save_pretrained(str(path), **kw)
    return str(path)


def tiny_llama_config(vocab_size: int, **overrides):
    """A 2-layer GQA transformers.LlamaConfig with eager attention (the exact reference)."""
    import transformers

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    kw.update(overrides)
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg
