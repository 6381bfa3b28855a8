"""fastattn.scaled_dot_product_attention as a drop-in for torch.nn.functional.scaled_dot_product_attention.

Parity is measured with the error-ratio rule against torch's own SDPA: the truth is torch's
SDPA on float64 copies, the low-precision reference is torch's SDPA in the input dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import ops

from conftest import DEVICES, assert_error_ratio, dtypes_for

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_CUDA_MARKS = [d for d in DEVICES if not isinstance(d, str)][0].marks
DEVICE_DTYPES = [
    pytest.param(dev, dt, marks=_CUDA_MARKS if dev == "cuda" else (), id=f"{dev}-{DTYPE_IDS[dt]}")
    for dev in ("cpu", "cuda")
    for dt in dtypes_for(dev, cuda_16bit_only=True)
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the fastattn kernel op, to tell the kernel path from delegation."""
    calls = []
    real = ops.flash_attn_fwd

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(ops, "flash_attn_fwd", counting)
    return calls


def _torch_sdpa_f64(q, k, v, **kw):
    # The math backend on float64 copies is the truth (the CPU flash kernel has no fp64).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def _check(q, k, v, **kw):
    ours = fastattn.scaled_dot_product_attention(q, k, v, **kw)
    low = F.scaled_dot_product_attention(q, k, v, **kw)
    true = _torch_sdpa_f64(q, k, v, **kw)
    assert ours.shape == low.shape and ours.dtype == low.dtype
    assert_error_ratio(ours, low, true)
    return ours


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("L, S", [(1, 1), (17, 17), (97, 97), (17, 97), (97, 17), (1, 40), (40, 1)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_parity(device, dtype, L, S, is_causal, kernel_calls):
    # is_causal is TOP-LEFT aligned in torch: with L != S this differs from flash-attn's.
    q = torch.randn(2, 4, L, 64, device=device, dtype=dtype)
    k = torch.randn(2, 4, S, 64, device=device, dtype=dtype)
    v = torch.randn(2, 4, S, 64, device=device, dtype=dtype)
    _check(q, k, v, is_causal=is_causal)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("hk", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_enable_gqa(device, dtype, hk, is_causal, kernel_calls):
    q = torch.randn(2, 8, 33, 64, device=device, dtype=dtype)
    k = torch.randn(2, hk, 50, 64, device=device, dtype=dtype)
    v = torch.randn(2, hk, 50, 64, device=device, dtype=dtype)
    _check(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("scale", [None, 0.05, 1.0])
def test_scale(device, dtype, scale):
    q, k, v = (torch.randn(1, 2, 30, 128, device=device, dtype=dtype) for _ in range(3))
    _check(q, k, v, is_causal=True, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device, kernel_calls):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # The usual layout: (B, L, H, E) projections viewed as (B, H, L, E); plus a view whose
    # last dim is not contiguous (copied first).
    q = torch.randn(2, 20, 4, 64, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 25, 4, 64, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, 4, 64, 25, device=device, dtype=dtype).transpose(-1, -2)
    _check(q, k, v, is_causal=True)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradients(device, is_causal):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    base = [torch.randn(2, h, s, 64, device=device, dtype=dtype) for h, s in ((4, 13), (2, 21), (2, 21))]
    dout = torch.randn(2, 4, 13, 64, device=device, dtype=dtype)

    def grads(fn, cast):
        args = [t.detach().to(cast).requires_grad_() for t in base]
        fn(*args, is_causal=is_causal, enable_gqa=True).backward(dout.to(cast))
        return [a.grad for a in args]

    ours = grads(fastattn.scaled_dot_product_attention, dtype)
    low = grads(F.scaled_dot_product_attention, dtype)
    true = grads(_torch_sdpa_f64, torch.float64)
    for o, l, t, name in zip(ours, low, true, ("dq", "dk", "dv")):
        assert_error_ratio(o, l, t, name)


# ---- what the kernel does not cover is torch's, unchanged --------------------------------
def test_attn_mask_delegates(kernel_calls):
    q, k, v = (torch.randn(2, 4, 10, 64) for _ in range(3))
    for mask in (torch.rand(10, 10) > 0.3, torch.randn(2, 1, 10, 10)):
        got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)
    assert not kernel_calls


def test_dropout_delegates(kernel_calls):
    q, k, v = (torch.randn(2, 4, 10, 64) for _ in range(3))
    torch.manual_seed(5)
    got = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not kernel_calls


@pytest.mark.parametrize("p", [-0.5, float("nan")])
def test_bad_dropout_p_errors_like_torch(p, kernel_calls):
    # torch refuses a negative / NaN dropout_p; the kernel path used to run without dropout
    q, k, v = (torch.randn(2, 4, 10, 64) for _ in range(3))
    with pytest.raises(RuntimeError) as want:
        F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    with pytest.raises(RuntimeError) as got:
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p)
    assert str(got.value) == str(want.value)
    assert not kernel_calls


@pytest.mark.parametrize(
    "shapes",
    [
        ((4, 10, 64), (4, 12, 64), (4, 12, 64)),          # 3-D
        ((2, 3, 4, 10, 64), (2, 3, 4, 12, 64), (2, 3, 4, 12, 64)),  # 5-D
        ((2, 4, 10, 64), (1, 4, 12, 64), (1, 4, 12, 64)),  # broadcast batch
        ((2, 4, 10, 64), (2, 4, 12, 64), (2, 4, 12, 32)),  # value head dim != E
    ],
    ids=["3d", "5d", "broadcast", "ev"],
)
def test_other_shapes_delegate(shapes, kernel_calls):
    q, k, v = (torch.randn(*s) for s in shapes)
    got = fastattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert not kernel_calls


def test_float64_delegates(kernel_calls):
    q, k, v = (torch.randn(1, 2, 10, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    assert not kernel_calls


def test_gqa_errors_like_torch():
    q = torch.randn(1, 4, 5, 64)
    kv = torch.randn(1, 2, 5, 64)
    with pytest.raises(RuntimeError):  # torch's own error: H != Hk without enable_gqa
        F.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(RuntimeError):
        fastattn.scaled_dot_product_attention(q, kv, kv)
    kv3 = torch.randn(1, 3, 5, 64)
    with pytest.raises(RuntimeError, match="Number of heads in key and value must divide"):
        fastattn.scaled_dot_product_attention(q, kv3, kv3, enable_gqa=True)


def test_sdpa_kernel_without_flash_is_torchs(kernel_calls):
    # torch.nn.attention.sdpa_kernel was ignored: under the math backend torch gives double
    # backward (a gradient penalty), which fastattn's kernel refused; a backend list with no
    # CPU kernel ran ours silently where torch raises. Without the flash backend the call is
    # torch's now; with it (or by default) it is ours.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 2, 6, 32, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(fastattn.scaled_dot_product_attention(q, k, v).square().sum(), q, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), k)
        (g_t,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).square().sum(), q, create_graph=True)
        (gg_t,) = torch.autograd.grad(g_t.square().sum(), k)
    torch.testing.assert_close(gg, gg_t, rtol=0, atol=0)
    assert not kernel_calls
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), pytest.raises(RuntimeError, match="No viable backend"):
        fastattn.scaled_dot_product_attention(q, k, v)
    assert not kernel_calls
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        fastattn.scaled_dot_product_attention(q, k, v)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_vmap_over_key_value_only(compiled, monkeypatch):
    # vmap over key and value with one unbatched query (an outside audit): the result was
    # copied in place into an empty_like of the (unbatched) query, which vmap refuses.
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 16)
    kv = torch.randn(3, 1, 2, 6, 16)

    def ours(b):
        return fastattn.scaled_dot_product_attention(q, b, b)

    fn = torch.vmap(ours)
    got = (torch.compile(fn, fullgraph=True) if compiled else fn)(kv)
    want = torch.vmap(lambda b: F.scaled_dot_product_attention(q, b, b))(kv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not compiled:  # the kernel ran (not torch's SDPA)
        monkeypatch.setattr(ops, "flash_attn_fwd", None)
        with pytest.raises(TypeError):
            fn(kv)


@pytest.mark.parametrize("layout", ["contiguous", "bhle_of_blhe", "lbhe", "packed", "expanded", "expanded_batch"])
def test_output_layout_is_torchs(layout):
    # torch returns an empty_like of the query: the same strides for every dim of size > 1.
    B, H, L, E = 2, 3, 5, 16
    if layout == "contiguous":
        q = torch.randn(B, H, L, E)
    elif layout == "bhle_of_blhe":
        q = torch.randn(B, L, H, E).transpose(1, 2)
    elif layout == "lbhe":
        q = torch.randn(L, B, H, E).permute(1, 2, 0, 3)
    elif layout == "packed":
        q = torch.randn(B, L, 3, H, E)[:, :, 0].transpose(1, 2)
    elif layout == "expanded":
        q = torch.randn(B, 1, L, E).expand(B, H, L, E)
    else:  # one (L, H, E) query broadcast over the batch: empty_like keeps the (H, L) order
        q = torch.randn(1, L, H, E).transpose(1, 2).expand(B, H, L, E)
    k, v = torch.randn(B, H, 7, E), torch.randn(B, H, 7, E)
    got, want = fastattn.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert [s for n, s in zip(got.shape, got.stride()) if n > 1] == [s for n, s in zip(want.shape, want.stride()) if n > 1]
    torch.testing.assert_close(got, want)


def test_contiguous_query_with_a_size1_dims_own_stride_keeps_it():
    # A batch-1 query sliced from a packed (B, 3, H, L, E) projection is_contiguous() with
    # stride[0] = 3 H L E, which torch's empty_like keeps; the eager shortcut to .contiguous()
    # dropped it (diff review). Eager strides equal torch's exactly, size-1 dims included.
    H, L, E = 4, 6, 16
    q = torch.randn(1, 3, H, L, E)[:, 0]
    k, v = torch.randn(1, H, 5, E), torch.randn(1, H, 5, E)
    assert q.is_contiguous() and q.stride()[0] == 3 * H * L * E
    for causal in (False, True):
        got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert got.stride() == want.stride() == torch.empty_like(q).stride()
        torch.testing.assert_close(got, want)


def test_compiles_once_with_dynamic_lengths():
    # The layout copy sorted the query's (symbolic) strides: dynamo refused it under
    # dynamic=True (fullgraph raised; otherwise a graph break per length). Outside audit.
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    fn = torch.compile(fastattn.scaled_dot_product_attention, backend=counter, fullgraph=True, dynamic=True)
    for L in (5, 7, 9):
        q, k, v = (torch.randn(2, 3, L, 16) for _ in range(3))
        got = fn(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def test_causal_with_other_lengths_compiles_and_exports_once():
    # is_causal with L != S passed right = max(L - S, 0) to an int argument and branched on
    # S > L: every new L - S recompiled (fullgraph failed at the recompile limit), and an
    # export with separate L and S dims failed or held for one L/S relation only. Now one
    # graph (SymInt windows, keys narrowed to min(S, L)) serves every L and S.
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(fastattn.scaled_dot_product_attention, backend=counter, fullgraph=True, dynamic=True)
    compiled_frames = []
    for L, S in ((5, 4), (6, 4), (13, 4), (4, 4), (4, 9), (3, 11), (12, 5)):
        q = torch.randn(1, 2, L, 8, requires_grad=True)
        kv = torch.randn(1, 2, S, 8, requires_grad=True)
        got, want = fn(q, kv, kv, is_causal=True), F.scaled_dot_product_attention(q, kv, kv, is_causal=True)
        compiled_frames.append(counter.frame_count)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got.sum(), (q, kv)), torch.autograd.grad(want.sum(), (q, kv))):
            torch.testing.assert_close(a, b)
    # (the first call's count includes one dynamo restart of that trace under aot_eager)
    assert compiled_frames == compiled_frames[:1] * 7, compiled_frames

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    L, S = torch.export.Dim("L", min=2), torch.export.Dim("S", min=2)
    example = (torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8))
    exported = torch.export.export(Causal(), example, dynamic_shapes=({2: L}, {2: S}, {2: S})).module()
    for Lq, Sk in ((9, 4), (6, 6), (3, 10)):
        q, k, v = torch.randn(2, 4, Lq, 8), torch.randn(2, 4, Sk, 8), torch.randn(2, 4, Sk, 8)
        torch.testing.assert_close(exported(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("strict", [False, True])
def test_causal_export_of_transposed_projections_serves_every_length(strict):
    # The usual layout: (B, S, H, E) projections transposed to (B, H, S, E). Cutting such a
    # buffer's keys to min(S, L) made export record whether the cut view is contiguous, a guard
    # on S vs L: the graph ran for the example's relation only ("Guard failed", export audit).
    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return fastattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True)

    def inputs(Lq, Sk):
        g = torch.Generator().manual_seed(Lq * 100 + Sk)
        return torch.randn(2, Lq, 4, 16, generator=g), torch.randn(2, Sk, 4, 16, generator=g), \
            torch.randn(2, Sk, 4, 16, generator=g)

    L, S = torch.export.Dim("L", min=2, max=64), torch.export.Dim("S", min=2, max=64)
    for example in ((5, 9), (6, 6)):
        exported = torch.export.export(Causal(), inputs(*example), dynamic_shapes=({1: L}, {1: S}, {1: S}),
                                       strict=strict).module()
        for Lq, Sk in ((3, 11), (6, 6), (9, 4)):
            q, k, v = inputs(Lq, Sk)
            want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
            torch.testing.assert_close(exported(q, k, v), want)
    # static lengths keep the free view of the keys (the gather is for dynamic ones only)
    static = torch.export.export(Causal(), inputs(4, 16), strict=strict)
    assert not [n for n in static.graph.nodes if "index_select" in str(n.target)]


def test_swapped_in_for_torchs_sdpa(monkeypatch):
    # The drop-in swapped in as torch.nn.functional.scaled_dot_product_attention: what it hands
    # to torch (masks, dropout, float64, 3-D inputs) looked the name up at call time, found
    # itself, and recursed until RecursionError (nn.MultiheadAttention with a key padding mask).
    real = F.scaled_dot_product_attention
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    want = (mha(x, x, x, key_padding_mask=mask, need_weights=False)[0], layer(x, src_key_padding_mask=mask))
    q = torch.randn(1, 2, 4, 8)
    cases = [dict(attn_mask=torch.ones(4, 4, dtype=torch.bool)), dict(is_causal=True)]
    want_direct = [real(q, q, q, **kw) for kw in cases]
    monkeypatch.setattr(F, "scaled_dot_product_attention", fastattn.scaled_dot_product_attention)
    got = (mha(x, x, x, key_padding_mask=mask, need_weights=False)[0], layer(x, src_key_padding_mask=mask))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for kw, w in zip(cases, want_direct):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, **kw), w)
    torch.testing.assert_close(F.scaled_dot_product_attention(q.double(), q.double(), q.double()),
                               real(q.double(), q.double(), q.double()))
    torch.testing.assert_close(F.scaled_dot_product_attention(q[0], q[0], q[0]), real(q[0], q[0], q[0]))


@pytest.mark.parametrize("swapped", [False, True])
def test_causal_bias_masks(swapped, monkeypatch):
    # torch.nn.attention.bias.causal_upper_left / causal_lower_right dispatch themselves from
    # their __torch_function__ only when the function called is the one named
    # F.scaled_dot_product_attention: after the swap, the hand-off read the bias's
    # uninitialised data as a dense mask (silently wrong) or failed to broadcast (SDPA audit).
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    real = F.scaled_dot_product_attention
    torch.manual_seed(0)
    cases = []
    for L, S in ((5, 7), (7, 5), (6, 6)):
        q, k, v = torch.randn(2, 4, L, 16), torch.randn(2, 4, S, 16), torch.randn(2, 4, S, 16)
        for bias in (causal_lower_right(L, S), causal_upper_left(L, S)):
            cases.append(((q, k, v, bias), real(q, k, v, attn_mask=bias)))
    if swapped:
        monkeypatch.setattr(F, "scaled_dot_product_attention", fastattn.scaled_dot_product_attention)
    torch._dynamo.reset()  # (one graph per case below: the recompile limit is per code object)
    compiled = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                             fullgraph=True, backend="eager")
    for (q, k, v, bias), want in cases:
        for got in (fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias), compiled(q, k, v, bias)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_dims, transposed", [(1, False), (0, True), (1, True), ((None, 1, 1), True)])
def test_vmap_output_layout_is_torchs(in_dims, transposed):
    # Under torch.vmap over a middle dim the output took the batched query's per-example strides,
    # which leave gaps: not contiguous, 1.67x the memory, and .view failed where torch's works
    # (SDPA audit). torch's batching rule gives a contiguous result.
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, 16).transpose(-3, -2) if transposed else torch.randn(3, 2, 4, 5, 16)
               for _ in range(3))
    if isinstance(in_dims, tuple):
        q = q[:, 0]
    want = torch.vmap(F.scaled_dot_product_attention, in_dims=in_dims)(q, k, v)
    got = torch.vmap(fastattn.scaled_dot_product_attention, in_dims=in_dims)(q, k, v)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride() and got.view(-1).shape == want.view(-1).shape


def test_jit_script_after_the_swap(monkeypatch):
    # After the swap torch.jit.script compiled the drop-in (a Python function) for every
    # F.scaled_dot_product_attention call it met and failed on its keyword-only arguments:
    # nn.MultiheadAttention and TransformerEncoderLayer could not be scripted (SDPA audit).
    # Scripted code calls torch's op, as a jit.trace records it.
    monkeypatch.setattr(F, "scaled_dot_product_attention", fastattn.scaled_dot_product_attention)
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16)
    for module in (torch.nn.MultiheadAttention(16, 2), torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)):
        module.eval()
        scripted = torch.jit.script(module)
        args = (x, x, x) if isinstance(module, torch.nn.MultiheadAttention) else (x,)
        want, got = module(*args), scripted(*args)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        torch.testing.assert_close(got, want)

    @torch.jit.script
    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(causal(q, q, q), fastattn.scaled_dot_product_attention(q, q, q, is_causal=True))


@pytest.mark.parametrize("is_causal", [False, True])
def test_jit_trace_records_torchs_sdpa(is_causal):
    # torch.jit.trace records Python arithmetic on shapes as constants: a traced drop-in wrote
    # through the traced shapes' output strides (silently wrong at any other size) and, causal,
    # failed in torch.sym_min on the tracer's tensor shapes. Traced, the drop-in records torch's
    # own SDPA (one op, exact at every shape); TorchScript outside tracing is unchanged.
    def attend(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    def inputs(B, H, L, S, E):
        g = torch.Generator().manual_seed(B * 1000 + L * 10 + E)
        return [torch.randn(B, H, n, E, generator=g) for n in (L, S, S)]

    traced = torch.jit.trace(attend, inputs(1, 2, 8, 8, 16), check_trace=False)
    for shape in [(1, 2, 8, 8, 16), (1, 2, 20, 9, 16), (3, 4, 8, 30, 16), (1, 2, 8, 8, 64)]:
        args = inputs(*shape)
        torch.testing.assert_close(traced(*args), F.scaled_dot_product_attention(*args, is_causal=is_causal))
