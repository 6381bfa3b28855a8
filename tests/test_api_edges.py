"""Edges of the public API found by an external fuzz review: a failed attention_with_kvcache
call must leave the caches alone; flags are bools (not truthy values); integers past int64 and
NumPy integers; SDPA's dtype under autocast and its output layout, as torch's; the message for
an integer rms_norm weight. CPU only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import assert_error_ratio


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


# ---- 1. attention_with_kvcache: a call that raises changes nothing -------------------------
def _kv_step(B=1, Sq=2, H=2, Hk=1, D=8):
    return torch.randn(B, Sq, H, D), torch.randn(B, Sq, Hk, D), torch.randn(B, Sq, Hk, D)


@pytest.mark.parametrize("num_splits", [129, 200, 2**64])
def test_kvcache_bad_num_splits_leaves_cache_unchanged(num_splits):
    q, k, v = _kv_step()
    kc, vc = torch.randn(1, 8, 1, 8), torch.randn(1, 8, 1, 8)
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match=r"num_splits must be in \[0, 128\]"):
        fastattn.attention_with_kvcache(q, kc, vc, _i32([3]), k=k, v=v, num_splits=num_splits)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


def test_kvcache_bad_cached_page_leaves_pool_unchanged():
    # The bad index is in the page of tokens already cached (0..3), not in the page the new
    # rows go to (1): append_kv alone would not see it, the attention would, after writing.
    q, k, v = _kv_step()
    kp, vp = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    kp0, vp0 = kp.clone(), vp.clone()
    for bad in (99, -1, 4):
        with pytest.raises(ValueError, match=rf"block_table\[0, 0\] = {bad} is not a page of the pool"):
            fastattn.attention_with_kvcache(q, kp, vp, _i32([4]), k=k, v=v, block_table=_i32([[bad, 1]]))
        assert torch.equal(kp, kp0) and torch.equal(vp, vp0)
    # Entries past the used pages may hold anything; a good table appends and attends.
    out = fastattn.attention_with_kvcache(q, kp, vp, _i32([4]), k=k, v=v, block_table=_i32([[2, 1, 99]]))
    assert torch.equal(kp[1, :2], k[0]) and torch.isfinite(out).all()


def test_kvcache_capacity_error_leaves_pool_unchanged():
    q, k, v = _kv_step(Sq=3)
    kp, vp = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    kp0 = kp.clone()
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        fastattn.attention_with_kvcache(q[:, :3], kp, vp, _i32([6]), k=k, v=v, block_table=_i32([[0, 1]]))
    assert torch.equal(kp, kp0)


def test_num_splits_bounds_and_types():
    q = torch.randn(2, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    sl = _i32([3, 8])
    ref = fastattn.decode_attention(q, kc, vc, sl, num_splits=1)
    for n in (128, np.int64(3), np.int32(0)):
        torch.testing.assert_close(fastattn.decode_attention(q, kc, vc, sl, num_splits=n), ref)
    for n in (129, 2**64, -1):
        with pytest.raises(ValueError, match=r"num_splits must be in \[0, 128\]"):
            fastattn.decode_attention(q, kc, vc, sl, num_splits=n)
    for n in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="num_splits must be an int"):
            fastattn.decode_attention(q, kc, vc, sl, num_splits=n)


# ---- 2. flags are bools ---------------------------------------------------------------------
def _flash_qkv():
    return torch.randn(1, 3, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)


@pytest.mark.parametrize("name", ["causal", "return_lse"])
@pytest.mark.parametrize("value", ["no", 1, 0, None, 1.0])
def test_flash_flags_must_be_bool(name, value):
    q, k, v = _flash_qkv()
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        fastattn.flash_attention(q, k, v, **{name: value})
    cu = _i32([0, 3])
    cuk = _i32([0, 4])
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, cuk, 3, 4, **{name: value})


def test_numpy_bool_flags_accepted():
    q, k, v = _flash_qkv()
    out, lse = fastattn.flash_attention(q, k, v, causal=np.bool_(True), return_lse=np.bool_(True))
    ref, ref_lse = fastattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    # every flag, also the ones that skip host checks (they used to refuse a NumPy bool, with
    # the message "must be a bool, got bool")
    x = torch.randn(1, 3, 2, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    for flag in (np.bool_(True), np.bool_(False)):
        q2, k2 = fastattn.apply_rotary(x, x, cos, sin, check_positions=flag)
        assert torch.equal(q2, fastattn.apply_rotary(x, x, cos, sin)[0])
        kc, vc = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
        fastattn.append_kv(kc, vc, x, x, _i32([1]), check_capacity=flag)
        assert torch.equal(kc[:, 1:4], x) and torch.equal(vc[:, 1:4], x)


def test_cache_and_rotary_flags_must_be_bool():
    q = torch.randn(1, 1, 2, 8)
    kc = torch.randn(1, 4, 1, 8)
    sl = _i32([4])
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        fastattn.decode_attention(q[:, 0], kc, kc, sl, return_lse=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        fastattn.attention_with_kvcache(q, kc, kc, sl, return_lse="yes")
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastattn.attention_with_kvcache(q, kc, kc, sl, causal=1)
    x = torch.randn(1, 3, 2, 8)
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    for name in ("interleaved", "inplace", "check_positions"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fastattn.apply_rotary(x, x, cos, sin, **{name: 1})


@pytest.mark.parametrize("name", ["is_causal", "enable_gqa"])
@pytest.mark.parametrize("value", [1, "no", np.bool_(True), None])
def test_sdpa_flags_type_error_as_torch(name, value):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match=f"argument '{name}' must be bool") as ours:
        fastattn.scaled_dot_product_attention(q, q, q, **{name: value})
    with pytest.raises(TypeError) as theirs:
        F.scaled_dot_product_attention(q, q, q, **{name: value})
    assert str(ours.value) == str(theirs.value)  # "... not numpy.bool" too (was "not bool")


def test_sdpa_scale_and_enable_gqa_keyword_only_as_torch():
    # torch's parser takes at most 6 positional arguments; ours took 8, so code that worked on
    # fastattn failed on torch.
    q = torch.randn(1, 2, 3, 8)
    for extra in ((0.5,), (0.5, False)):
        for f in (fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention):
            with pytest.raises(TypeError, match="positional arguments"):
                f(q, q, q, None, 0.0, False, *extra)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, q, q, None, 0.0, False, scale=0.5),
                               F.scaled_dot_product_attention(q, q, q, None, 0.0, False, scale=0.5))


@pytest.mark.parametrize("window", [(True, False), (0, True), (1.0, 0), ("1", 0)])
def test_window_entries_must_be_ints(window):
    q, k, v = _flash_qkv()
    with pytest.raises(ValueError, match="window must be a pair of ints"):
        fastattn.flash_attention(q, k, v, window=window)


# ---- 3. integers past int64, NumPy integers -------------------------------------------------
def test_huge_window_is_unbounded():
    q, k, v = _flash_qkv()
    for causal in (False, True):
        ref = fastattn.flash_attention(q, k, v, causal=causal)
        for w in [(2**64, 2**64), (2**63, -1), (-1, 2**100)]:
            torch.testing.assert_close(fastattn.flash_attention(q, k, v, causal=causal, window=w), ref, rtol=0, atol=0)
    ref = fastattn.flash_attention_varlen(q[0], k[0], v[0], _i32([0, 3]), _i32([0, 4]), 3, 4)
    out = fastattn.flash_attention_varlen(q[0], k[0], v[0], _i32([0, 3]), _i32([0, 4]), 3, 4, window=(2**64, 2**64))
    assert torch.equal(out, ref)
    kc = torch.randn(1, 6, 1, 8)
    qk = torch.randn(1, 2, 2, 8)
    ref = fastattn.attention_with_kvcache(qk, kc, kc, _i32([5]))
    assert torch.equal(fastattn.attention_with_kvcache(qk, kc, kc, _i32([5]), window=(2**64, 2**64)), ref)
    with pytest.raises(ValueError, match="window sizes must be >= 0 or -1"):
        fastattn.flash_attention(q, k, v, window=(-(2**64), 0))


def test_numpy_window_accepted():
    q, k, v = _flash_qkv()
    ref = fastattn.flash_attention(q, k, v, window=(2, 0))
    assert torch.equal(fastattn.flash_attention(q, k, v, window=(np.int64(2), np.int32(0))), ref)


def test_max_seqlen_past_int32():
    q, k, v = _flash_qkv()
    cu, cuk = _i32([0, 3]), _i32([0, 4])
    for kw in ({"max_seqlen_q": 2**64, "max_seqlen_k": 4}, {"max_seqlen_q": 3, "max_seqlen_k": 2**31}):
        name = next(n for n, x in kw.items() if x > 4)
        with pytest.raises(ValueError, match=rf"{name} must be <= 2147483647"):
            fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, cuk, **kw)
    ref = fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, cuk, 3, 4)
    assert torch.equal(fastattn.flash_attention_varlen(q[0], k[0], v[0], cu, cuk, np.int64(3), np.int32(4)), ref)


# ---- 4. SDPA under autocast -----------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_cpu_autocast_matches_torch(amp_dtype, is_causal):
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 4, 13, 32), torch.randn(2, 4, 13, 32)
    with torch.autocast("cpu", dtype=amp_dtype):
        ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        # mixed inputs: torch casts every eligible input, so do we
        mixed = fastattn.scaled_dot_product_attention(q.to(amp_dtype), k, v, is_causal=is_causal)
        # float64 is not cast by autocast
        f64 = fastattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal)
    assert ours.dtype == theirs.dtype == mixed.dtype == amp_dtype and f64.dtype == torch.float64
    lo = [t.to(amp_dtype) for t in (q, k, v)]
    true = F.scaled_dot_product_attention(*(t.double() for t in lo), is_causal=is_causal)
    assert_error_ratio(ours, theirs, true, "out")
    assert torch.equal(mixed, ours)


def test_sdpa_autocast_gradients_flow_to_fp32_inputs():
    q, k, v = (torch.randn(1, 2, 5, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))


# ---- 5. SDPA output layout ------------------------------------------------------------------
_B, _H, _L, _S, _E = 2, 4, 5, 7, 8
_QUERY_LAYOUTS = {
    "contiguous": lambda: torch.randn(_B, _H, _L, _E),
    "BLHE_transposed": lambda: torch.randn(_B, _L, _H, _E).transpose(1, 2),
    "HBLE_permuted": lambda: torch.randn(_H, _B, _L, _E).transpose(0, 1),
    "LBHE_permuted": lambda: torch.randn(_L, _B, _H, _E).permute(1, 2, 0, 3),
    "head_sliced": lambda: torch.randn(_B, 2 * _H, _L, _E)[:, ::2],
    "last_dim_strided": lambda: torch.randn(_B, _H, _E, _L).transpose(2, 3),
    "decode_L1": lambda: torch.randn(_B, _H, 1, _E),
}


@pytest.mark.parametrize("layout", list(_QUERY_LAYOUTS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_output_layout_as_torch(layout, is_causal):
    q = _QUERY_LAYOUTS[layout]()
    k, v = torch.randn(_B, _H, _S, _E), torch.randn(_B, _H, _S, _E)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(ours, theirs)
    assert ours.is_contiguous() == theirs.is_contiguous()
    live = [i for i, n in enumerate(ours.shape) if n > 1]  # a size-1 dim's stride is free
    assert [ours.stride(i) for i in live] == [theirs.stride(i) for i in live]
    if theirs.is_contiguous():
        ours.view(_B, -1)


def test_sdpa_contiguous_output_gradients():
    q, k, v = (torch.randn(_B, _H, n, _E, dtype=torch.float64).float().requires_grad_() for n in (_L, _S, _S))
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.is_contiguous()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out.view(_B, -1), (q, k, v), dout.view(_B, -1))
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ins, is_causal=True)
    ref_grads = torch.autograd.grad(ref, ins, dout.double())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_sdpa_compile_fullgraph_layout_and_autocast():
    f = torch.compile(fastattn.scaled_dot_product_attention, fullgraph=True, backend="aot_eager")
    q, k, v = torch.randn(_B, _H, _L, _E), torch.randn(_B, _H, _S, _E), torch.randn(_B, _H, _S, _E)
    out = f(q, k, v, is_causal=True)
    eager = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.stride() == eager.stride() and out.is_contiguous()
    torch.testing.assert_close(out, eager)
    qt = torch.randn(_B, _L, _H, _E).transpose(1, 2)
    assert f(qt, k, v).stride() == fastattn.scaled_dot_product_attention(qt, k, v).stride()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(q, k, v)
        eager = fastattn.scaled_dot_product_attention(q, k, v)
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager)


# ---- 6. rms_norm with an integer weight -----------------------------------------------------
def test_rms_norm_integer_weight_message():
    x = torch.randn(3, 5)
    w = torch.ones(5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"weight must be a floating-point tensor.*weight\.to\(x\.dtype\)"):
        fastattn.rms_norm(x, w)
    # The suggested conversion gives torch's result.
    torch.testing.assert_close(fastattn.rms_norm(x, w.to(x.dtype)), F.rms_norm(x, (5,), w, 1e-6))
    # (nn.RMSNorm cannot hold an integer weight, in torch or here: a Parameter that requires
    # grad must be floating point.)


def test_cuda_backward_fits_reads_the_shared_memory_limit(monkeypatch):
    # Training at head dim 256 needs a 128 KiB backward block: on a 99 KiB GPU (sm_86 / sm_89) the
    # SDPA drop-in and the HF integration hand it to torch (checked here with stand-in device
    # properties: no GPU on CI).
    import types

    import fastattn.functional as F_

    t = torch.empty(1)
    for optin, fits in ((99 * 1024, False), (227 * 1024, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev, optin=optin: types.SimpleNamespace(shared_memory_per_block_optin=optin))
        monkeypatch.setattr(F_, "_SMEM_OPTIN_BY_DEVICE", {})  # (asked once per device, then kept)
        assert F_.cuda_backward_fits(t, 256) is fits
        assert F_.cuda_backward_fits(t, 128)
        # and the decode kernels' rule on the same device (the model's decode step asks it)
        assert F_.decode_cuda_fits(t, 128) and F_.decode_cuda_fits(t, 64, 5, 30.0)
        assert F_.decode_cuda_fits(t, 256) is fits and F_.decode_cuda_fits(t, 128, 2) is fits
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace())
    monkeypatch.setattr(F_, "_SMEM_OPTIN_BY_DEVICE", {})
    assert F_.cuda_backward_fits(t, 256)  # a torch that does not report the limit: assume it fits


def test_gpu_facts_known_from_eager_calls_hold_under_torch_compile(monkeypatch):
    # While torch.compile traces, the device is not asked; what an eager call on that device
    # learnt is used (it returned True there before, so a compiled model on a GPU without code
    # in the build, or a 99 KiB part, launched kernels it cannot run). Stand-in device facts on a
    # CPU tensor (no GPU on CI; the memo is keyed by device index only).
    import fastattn.functional as F_

    monkeypatch.setattr(F_, "_CODE_FOR_DEVICE", {0: False})
    monkeypatch.setattr(F_, "_SMEM_OPTIN_BY_DEVICE", {0: 99 * 1024})

    def facts(x):
        return (x + float(F_.cuda_kernels_run_on(x)), x + float(F_.cuda_backward_fits(x, 256)),
                x + float(F_.decode_cuda_fits(x, 256)), x + float(F_.decode_cuda_fits(x, 128)))

    x = torch.zeros(1)
    want = [0.0, 0.0, 0.0, 1.0]
    assert [t.item() for t in facts(x)] == want
    torch._dynamo.reset()
    assert [t.item() for t in torch.compile(facts, fullgraph=True, backend="eager")(x)] == want
    # nothing known yet: assumed to fit (the device is not asked while tracing)
    monkeypatch.setattr(F_, "_CODE_FOR_DEVICE", {})
    monkeypatch.setattr(F_, "_SMEM_OPTIN_BY_DEVICE", {})
    torch._dynamo.reset()
    assert [t.item() for t in torch.compile(facts, fullgraph=True, backend="eager")(x)] == [1.0] * 4
    assert F_._CODE_FOR_DEVICE == {} and F_._SMEM_OPTIN_BY_DEVICE == {}


def test_fp32_operands_spanning_2gib_read_in_place():
    """From an outside audit: the CPU flash forward reads fp32 Q and V in place, their row
    stride becoming the GEMM's leading dimension, and ATen's brgemm throws std::bad_alloc for
    an operand spanning 2 GiB or more (here 2 query rows of a sequence-first (S, B, H, D)
    activation, row stride B * H * D = 2^28 + 512 floats; the 4 GiB buffer is never touched).
    fastattn's own GEMM (cpu_gemm.h) takes any leading dimension: the same bits as on a compact
    copy (as for the K^T scratch past 2^29 keys x head dims, 1M keys at d512)."""
    S, H, D, B = 2, 8, 64, 2**19 + 1
    g = torch.Generator().manual_seed(0)
    q_small, k, v_small = (torch.randn(1, S, H, D, generator=g) for _ in range(3))
    want = fastattn.flash_attention(q_small, k, v_small)
    xq, xv = torch.empty(S, B, H, D), torch.empty(S, B, H, D)
    q, v = xq.transpose(0, 1)[B - 1:], xv.transpose(0, 1)[B - 1:]
    q.copy_(q_small)
    v.copy_(v_small)
    assert q.stride(1) * S * 4 > 2**31
    assert torch.equal(fastattn.flash_attention(q, k, v_small), want)
    assert torch.equal(fastattn.flash_attention(q_small, k, v), want)


def test_flash_attention_keys_past_int32_refused_by_name():
    """Sk >= 2^31 (stride-0 keys, no memory): a ValueError naming the lengths (the short-query
    route raised torch's bare 'value cannot be converted to type int without overflow')."""
    Sk = 2**31 + 16
    k = torch.ones(1, 1, 1, 8, dtype=torch.bfloat16).expand(1, Sk, 1, 8)
    q = torch.ones(1, 1, 1, 8, dtype=torch.bfloat16)
    for sq in (1, 17):  # the short-query route and the tiled kernel
        with pytest.raises(ValueError, match="sequence lengths must be below 2\\^31 on the CPU"):
            fastattn.flash_attention(q.expand(1, sq, 1, 8), k, k)


def test_star_import_has_the_documented_helpers():
    # README documents fastattn.cpu_isa() and fastattn.cuda_built(); only cpu_isa was in
    # __all__, so `from fastattn import *` left cuda_built out (newcomer audit).
    namespace = {}
    exec("from fastattn import *", namespace)
    assert isinstance(namespace["cuda_built"](), bool) and isinstance(namespace["cpu_isa"](), str)


def test_fake_tensor_mode_shape_propagation_of_the_host_checked_paths():
    # Outside torch.compile, FakeTensorMode (shape propagation) reached the CPU value checks of
    # three paths (paged attention_with_kvcache with k/v, paged flash_attn_varlen_func,
    # flash_attn_with_kvcache with cache_batch_idx): DataDependentOutputException, where every
    # other public function returns fakes of the real shapes (export audit).
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastattn.integrations import flash_attn as fa

    def ints(*v):
        return torch.tensor(v, dtype=torch.int32)

    pool = torch.randn(10, 4, 2, 8)
    table = (torch.arange(15, dtype=torch.int32).reshape(3, 5) % 9) + 1
    cache = torch.randn(3, 20, 2, 8)
    cases = [
        (lambda q, k, v, s, b, kn, vn: fastattn.attention_with_kvcache(q, k, v, s, k=kn, v=vn, block_table=b),
         (torch.randn(3, 2, 4, 8), pool, pool.clone(), ints(5, 0, 17), table, torch.randn(3, 2, 2, 8),
          torch.randn(3, 2, 2, 8))),
        (lambda q, k, v, a, b, t: fa.flash_attn_varlen_func(q, k, v, a, b, 6, 7, causal=True, block_table=t),
         (torch.randn(11, 4, 8), pool, pool.clone(), ints(0, 5, 11), ints(0, 6, 13), table[:2])),
        (lambda q, k, v, s, i: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=s, cache_batch_idx=i),
         (torch.randn(2, 1, 4, 8), cache, cache.clone(), ints(5, 9), torch.tensor([2, 0]))),
    ]
    for fn, args in cases:
        real = fn(*[a.clone() for a in args])
        with FakeTensorMode() as mode:
            fake = fn(*[mode.from_tensor(a) for a in args])
        assert fake.shape == real.shape and fake.dtype == real.dtype


@pytest.mark.source_tree
def test_readme_python_blocks_run_as_written():
    # The README's ```python blocks are code a newcomer pastes: each must run as written (the
    # API block was signatures with a bare `*`, a SyntaxError; newcomer audit). Signatures
    # live in ```text blocks.
    import os
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    blocks = re.findall(r"^```python\n(.*?)^```", open(readme).read(), flags=re.S | re.M)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_head_count_mismatch_names_the_layout():
    """Newcomer audit: q and k in SDPA's (B, H, S, D) layout reached a bare 'number of query
    heads (100) ... key/value heads (120)'; the error now says which dims hold the heads."""
    r = torch.randn
    with pytest.raises(ValueError, match=r"q is \(B, Sq, H, D\) and k / v \(B, Sk, Hk, D\), heads in dim -2 "
                                         r"\(a \(B, H, S, D\) tensor, as SDPA takes, is passed as x.transpose\(1, 2\)\)"):
        fastattn.flash_attention(r(2, 8, 100, 16), r(2, 2, 120, 16), r(2, 2, 120, 16))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"multiple of the number of key/value heads \(3\): q is \(total_q, H, D\) "
                                         r"and k / v \(total_k, Hk, D\), heads in dim -2$"):
        fastattn.flash_attention_varlen(r(4, 4, 16), r(4, 3, 16), r(4, 3, 16), cu, cu, 4, 4)
    kc = r(2, 2, 256, 16)  # (B, Hk, S, D): the caches' heads in dim 1 by mistake
    with pytest.raises(ValueError, match=r"kv heads \(256\): q's heads are its dim -2, the caches' their dim 2"):
        fastattn.decode_attention(r(2, 8, 16), kc, kc, torch.tensor([3, 3], dtype=torch.int32))


def test_jit_trace_of_the_default_scale_says_it_is_a_constant():
    """torch.jit.trace records flash_attention's default softmax_scale (1 / sqrt(D)) as a
    constant, so the traced function is wrong at another head dim (outside audit): tracing
    says so by name; an explicit scale traces without that warning."""
    import warnings

    def args(D):
        g = torch.Generator().manual_seed(D)
        return torch.randn(1, 5, 2, D, generator=g), torch.randn(1, 7, 2, D, generator=g), \
            torch.randn(1, 7, 2, D, generator=g)

    cu_q, cu_k = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    for f in (lambda q, k, v: fastattn.flash_attention(q, k, v),
              lambda q, k, v: fastattn.flash_attention_varlen(q[0], k[0], v[0], cu_q, cu_k, 5, 7)):
        with pytest.warns(torch.jit.TracerWarning, match=r"default softmax_scale \(1 / sqrt\(D\), D = 8 here\) as a "
                                                          r"constant: the traced function is wrong at any other head dim"):
            torch.jit.trace(f, args(8), check_trace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(lambda q, k, v: fastattn.flash_attention(q, k, v, softmax_scale=0.25), args(8),
                                 check_trace=False)
    assert not [w for w in caught if "softmax_scale" in str(w.message)]
    a = args(8)
    assert torch.equal(traced(*a), fastattn.flash_attention(*a, softmax_scale=0.25))
