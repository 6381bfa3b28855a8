"""fastattn.reference is the ground truth of every test: its own edges, against the documented
semantics (outside audit: each case below was wrong in it, and could hide a kernel bug or fail
a correct kernel)."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference


def test_inf_value_at_a_masked_key_stays_out_of_the_rows_that_do_not_see_it():
    # 0 * inf = NaN: the masked keys' zero probabilities times an inf value made rows NaN that
    # never see it (every decode row, every row before it under causal).
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 1, 8, dtype=torch.float64) for _ in range(3))
    v[0, 39, 0, 3] = float("inf")
    out = reference.attention(q, k, v, causal=True)
    assert torch.isfinite(out[0, :39]).all()
    assert torch.isposinf(out[0, 39, 0, 3]) and torch.isfinite(out[0, 39, 0, [0, 1, 2, 4]]).all()
    v[0, 20, 0, 3] = float("-inf")  # a row seeing +inf and -inf in one column: NaN there
    out = reference.attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 39, 0, 3]) and torch.isneginf(out[0, 20:39, 0, 3]).all()
    v[0, 10, 0, 1] = float("nan")
    out = reference.attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 10:, 0, 1]).all() and torch.isfinite(out[0, :10]).all()
    qd, kd, vd = torch.randn(2, 1, 4), torch.randn(2, 4, 1, 4), torch.randn(2, 4, 1, 4)
    vd[:, 3] = float("inf")
    lens = torch.tensor([2, 0], dtype=torch.int32)
    want = reference.decode_attention(qd, kd, vd, lens)
    assert torch.isfinite(want).all() and (want[1] == 0).all()
    torch.testing.assert_close(fastattn.decode_attention(qd, kd, vd, lens), want)


def test_paged_entries_past_the_tokens_may_hold_anything():
    pool = torch.randn(4, 2, 1, 4)
    table = torch.tensor([[0, 1, 99], [2, -1, 7]], dtype=torch.int32)  # unused entries out of range
    lens = torch.tensor([3, 1], dtype=torch.int32)
    q = torch.randn(2, 1, 4)
    want = reference.decode_attention(q, pool, pool.clone(), lens, block_table=table)
    torch.testing.assert_close(fastattn.decode_attention(q, pool, pool.clone(), lens, block_table=table), want)
    q4 = q.unsqueeze(1)
    torch.testing.assert_close(
        reference.attention_with_kvcache(q4, pool, pool.clone(), lens, block_table=table),
        fastattn.attention_with_kvcache(q4, pool, pool.clone(), lens, block_table=table))


def test_decode_cache_with_more_rows_than_the_batch():
    q, kc = torch.randn(1, 2, 4), torch.randn(3, 5, 1, 4)
    lens = torch.tensor([3], dtype=torch.int32)
    want = reference.decode_attention(q, kc, kc.clone(), lens)
    assert want.shape == q.shape
    torch.testing.assert_close(fastattn.decode_attention(q, kc, kc.clone(), lens), want)
    torch.testing.assert_close(reference.decode_attention(q, kc, kc.clone(), 3), want)  # an int length


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                              (torch.float16, torch.bfloat16)])
def test_rms_norm_output_dtype_is_xs_and_eps_none_is_torchs(x_dtype, w_dtype):
    # The weight is converted to x's dtype (as fastattn.rms_norm documents); y had the promoted
    # dtype, rounded twice (the normalised rows, then the product).
    x = torch.randn(8, 64, dtype=x_dtype)
    w = 1 + torch.randn(64, dtype=torch.float64).to(w_dtype) * 0.3
    y = reference.rms_norm(x, w, 1e-6)
    assert y.dtype == x_dtype == fastattn.rms_norm(x, w, 1e-6).dtype
    assert reference.rms_norm(x, w, None).dtype == x_dtype
    for t in (x.double(), x.float()):  # None: the float64 epsilon for float64, else float32's (as torch)
        torch.testing.assert_close(reference.rms_norm(t, w.to(t.dtype), None), F.rms_norm(t, (64,), w.to(t.dtype)),
                                   rtol=2e-7 if t.dtype == torch.float32 else 0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_give_rows_that_see_no_key_zero_beside_an_inf_value(dtype):
    # (the kernels, against the reference above) Causal with Sq > Sk: the first rows see no key
    # and come out 0 even when a key of their tile holds an inf value (they were NaN: 0 * inf).
    q, k, v = (torch.randn(1, n, 2, 16, dtype=dtype) for n in (12, 5, 5))
    v[0, 0, 0, 3] = float("inf")
    out = fastattn.flash_attention(q, k, v, causal=True)
    assert (out[0, :7] == 0).all() and torch.isposinf(out[0, 7:, 0, 3]).all() and torch.isfinite(out[0, 7:, 1]).all()
    torch.testing.assert_close(out.float(), reference.attention(q.float(), k.float(), v.float(), causal=True),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=2e-2)
    # decode: a window that leaves a row no key, an inf value among the keys its tile holds
    qd, kc, vc = torch.randn(1, 2, 16, dtype=dtype), torch.randn(1, 8, 1, 16, dtype=dtype), torch.randn(1, 8, 1, 16, dtype=dtype)
    vc[0, 2, 0, 5] = float("inf")
    lens = torch.tensor([0], dtype=torch.int32)
    assert (fastattn.decode_attention(qd, kc, vc, lens) == 0).all()


def test_non_finite_value_gradients_stay_out_of_the_rows_that_do_not_see_it():
    # The reference is the gradient truth too: a NaN / inf value at key 5 must not make the
    # gradients of the query rows 0..4 (which never see it, causal) NaN through 0 * NaN in the
    # backward. (Rows that see it get NaN, as plain torch's autograd gives: 0 * NaN.)
    for bad in (float("nan"), float("inf")):
        q, k, v = (torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        with torch.no_grad():
            v[0, 5, 0, 1] = bad
        out = reference.attention(q, k, v, causal=True)
        dq, dk, dv = torch.autograd.grad(out[0, :5].sum(), (q, k, v))
        assert torch.isfinite(dq[0, :5]).all() and torch.isfinite(dv).all()
        assert torch.isfinite(dq[0, :, 1]).all() and torch.isfinite(dk[0, :, 1]).all()  # the other head: untouched
