"""decode_attention and append_kv: parity with fastattn.reference (error-ratio rule), ragged
lengths, GQA/MQA, split-KV, strided caches, opcheck, torch.compile, bad input, CUDA graphs."""
import math

import pytest
import torch

import fastattn
from fastattn import reference

from conftest import DEVICES, HAS_CUDA, assert_error_ratio, dtypes_for

# (H, Hk): group sizes 1, 4, 7, 8 and MQA.
HEADS = [(3, 3), (8, 2), (14, 2), (16, 2), (6, 1)]


def _head_dim(device):
    return 64 if device == "cuda" else 40  # CPU kernels take any head dim


def _cache(B, S, Hk, D, dtype, device, strided=False):
    """k/v caches (B, S, Hk, D); strided: a view into a bigger buffer (padded rows, heads and
    head dim, so every stride but the last differs from the compact layout)."""
    if strided:
        base = torch.randn(2, B, S + 3, Hk + 2, D + 8, dtype=dtype, device=device)
        return base[0, :, 1 : S + 1, 1 : Hk + 1, :D], base[1, :, 1 : S + 1, 1 : Hk + 1, :D]
    return (torch.randn(B, S, Hk, D, dtype=dtype, device=device),
            torch.randn(B, S, Hk, D, dtype=dtype, device=device))


def _seqlens(lengths, device):
    return torch.tensor(lengths, dtype=torch.int32, device=device)


def _check_against_reference(q, kc, vc, seqlens, out, lse=None, softmax_scale=None):
    true_out, true_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), seqlens,
                                                    softmax_scale=softmax_scale, return_lse=True)
    low_out, low_lse = reference.decode_attention(q, kc, vc, seqlens, softmax_scale=softmax_scale,
                                                  return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_error_ratio(out, low_out, true_out, "out")
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == true_lse.shape
        empty = seqlens == 0
        assert torch.isneginf(lse[empty]).all(), "lse of an empty sequence must be -inf"
        assert torch.equal(out[empty].float(), torch.zeros_like(out[empty].float())), "empty sequence must output 0"
        assert_error_ratio(lse[~empty], low_lse[~empty].float(), true_lse[~empty], "lse", atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda hh: f"H{hh[0]}_Hk{hh[1]}")
def test_decode_matches_reference_all_splits(device, heads):
    H, Hk = heads
    S = 300
    D = _head_dim(device)
    lengths = [0, 1, S, 129, 77]  # empty, one key, full capacity, ragged
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kc, vc = _cache(len(lengths), S, Hk, D, dtype, device)
    q = torch.randn(len(lengths), H, D, dtype=dtype, device=device)
    seqlens = _seqlens(lengths, device)
    outs = {}
    for num_splits in (1, 2, 8, 0):
        out, lse = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=num_splits, return_lse=True)
        _check_against_reference(q, kc, vc, seqlens, out, lse)
        outs[num_splits] = (out.float(), lse)
    # Every split count computes the same thing: they agree with each other to rounding.
    for n in (2, 8, 0):
        torch.testing.assert_close(outs[n][0], outs[1][0], atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)
        torch.testing.assert_close(outs[n][1], outs[1][1], atol=1e-4, rtol=0)


_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")]
DEVICE_DTYPES = [("cpu", torch.float32), ("cpu", torch.float16), ("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dt, marks=_CUDA) for dt in dtypes_for("cuda", cuda_16bit_only=True)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
def test_decode_dtypes(device, dtype):
    D = 128 if device == "cuda" else 64
    lengths = [5, 1000, 0]
    kc, vc = _cache(3, 1000, 2, D, dtype, device)
    q = torch.randn(3, 8, D, dtype=dtype, device=device)
    seqlens = _seqlens(lengths, device)
    for num_splits in (1, 3):
        out, lse = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=num_splits, return_lse=True)
        _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_q4d_scale_and_strided_cache(device):
    D = _head_dim(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    kc, vc = _cache(2, 65, 2, D, dtype, device, strided=True)
    assert not kc.is_contiguous()
    q = torch.randn(2, 1, 10, D, dtype=dtype, device=device)  # (B, 1, H, D), group 5
    seqlens = _seqlens([65, 33], device)
    out, lse = fastattn.decode_attention(q, kc, vc, seqlens, softmax_scale=0.3, num_splits=2, return_lse=True)
    assert out.shape == q.shape
    _check_against_reference(q, kc, vc, seqlens, out, lse, softmax_scale=0.3)
    # The 3-D form gives the same numbers, and return_lse=False returns just out.
    out3 = fastattn.decode_attention(q[:, 0], kc, vc, seqlens, softmax_scale=0.3, num_splits=2)
    torch.testing.assert_close(out3, out[:, 0], atol=0, rtol=0)
    # A non-contiguous q (a head-strided slice) works too.
    q_big = torch.randn(2, 20, D, dtype=dtype, device=device)
    qs = q_big[:, ::2]
    out_s = fastattn.decode_attention(qs, kc, vc, seqlens, softmax_scale=0.3)
    _check_against_reference(qs, kc, vc, seqlens, out_s, softmax_scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_decode_cpu_strided_16bit_cache_odd_head_dim(dtype):
    """The CPU register-tile path reads K/V in place and widens 16-bit rows in registers: a
    strided cache view (padded rows, heads and head dim), D = 44 (two 16-lane chunks, one
    native-vector chunk and a scalar tail of the value rows on AVX2), a group of 3 (padded to
    the 4-row tile), lengths that end mid-block and mid-4-key-group."""
    D = 44
    kc, vc = _cache(3, 101, 2, D, dtype, "cpu", strided=True)
    assert not kc.is_contiguous() and kc.stride(2) != D
    q = torch.randn(3, 6, D, dtype=dtype)
    seqlens = _seqlens([101, 35, 2], "cpu")
    for num_splits in (1, 3):
        out, lse = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=num_splits, return_lse=True)
        _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_large_group(device):
    """Group sizes past one CUDA head slice (32) and 12: still one answer."""
    D = _head_dim(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for H, Hk in ((40, 1), (24, 2)):
        kc, vc = _cache(2, 200, Hk, D, dtype, device)
        q = torch.randn(2, H, D, dtype=dtype, device=device)
        seqlens = _seqlens([200, 17], device)
        out, lse = fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)
        _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.parametrize("device", DEVICES)
def test_append_then_decode_equals_full_attention(device):
    D = _head_dim(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, S_max, H, Hk, Sn = 3, 50, 8, 2, 3
    kc = torch.zeros(B, S_max, Hk, D, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    prefix = [4, 0, 40]
    full_k = [torch.randn(p + Sn, Hk, D, dtype=dtype, device=device) for p in prefix]
    full_v = [torch.randn(p + Sn, Hk, D, dtype=dtype, device=device) for p in prefix]
    for b, p in enumerate(prefix):
        kc[b, :p], vc[b, :p] = full_k[b][:p], full_v[b][:p]
    seqlens = _seqlens(prefix, device)
    new_k = torch.stack([full_k[b][p:] for b, p in enumerate(prefix)])
    new_v = torch.stack([full_v[b][p:] for b, p in enumerate(prefix)])
    fastattn.append_kv(kc, vc, new_k, new_v, seqlens)
    assert seqlens.tolist() == prefix, "append_kv must not advance cache_seqlens"
    seqlens += Sn
    q = torch.randn(B, H, D, dtype=dtype, device=device)
    out = fastattn.decode_attention(q, kc, vc, seqlens)
    for b in range(B):
        true = reference.attention(q[b:b + 1, None].double(), full_k[b][None].double(), full_v[b][None].double())
        low = reference.attention(q[b:b + 1, None], full_k[b][None], full_v[b][None])
        assert_error_ratio(out[b:b + 1, None], low, true, f"out[{b}]")
    # Rows past the new lengths were not touched.
    for b, p in enumerate(prefix):
        assert kc[b, p + Sn:].abs().sum() == 0 and vc[b, p + Sn:].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_append_kv_matches_reference_strided(device, dtype):
    kc, vc = _cache(3, 20, 2, 16, dtype, device, strided=True)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    k = torch.randn(3, 4, 2, 16, dtype=dtype, device=device)
    v = torch.randn(3, 4, 2, 16, dtype=dtype, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    seqlens = _seqlens([0, 7, 16], device)
    fastattn.append_kv(kc, vc, k, v, seqlens)
    reference.append_kv(kc_ref, vc_ref, k, v, seqlens)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def _split_range(length, num_splits, split, block):
    """Python transcription of csrc/include/fastattn/decode_split.h."""
    per = -(-length // num_splits)
    chunk = -(-per // block) * block
    begin = split * chunk
    return min(begin, length), min(begin + chunk, length)


def test_split_ranges_partition_every_sequence():
    for block in (32, 128):
        for length in (0, 1, 31, 32, 33, 127, 128, 129, 1000, 4096):
            for n in (1, 2, 3, 7, 8, 64):
                ranges = [_split_range(length, n, s, block) for s in range(n)]
                covered = [k for b, e in ranges for k in range(b, e)]
                assert covered == list(range(length)), (block, length, n)
                assert all(b % block == 0 or b == e for b, e in ranges)


def test_opcheck():
    kc, vc = _cache(2, 33, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    seqlens = _seqlens([33, 5], "cpu")
    torch.library.opcheck(torch.ops.fastattn.decode_attention, (q, kc, vc, seqlens, None, 0))
    torch.library.opcheck(torch.ops.fastattn.decode_attention, (q, kc, vc, seqlens, 0.5, 3))
    k = torch.randn(2, 2, 2, 16)
    v = torch.randn(2, 2, 2, 16)
    torch.library.opcheck(torch.ops.fastattn.append_kv, (kc, vc, k, v, _seqlens([3, 30], "cpu")))


def test_decode_cpu_bits_do_not_depend_on_thread_count():
    kc, vc = _cache(2, 700, 2, 32, torch.float32, "cpu")
    q = torch.randn(2, 8, 32)
    seqlens = _seqlens([700, 333], "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)  # auto splits > 1 here
        torch.set_num_threads(max(2, threads))
        many = fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kv_head_slices_keep_the_bits(dtype):
    """Few (batch, query chunk, split) items (here one sequence, one split) are cut into kv-head
    slices after the thread count (2 items per thread, each slice at least ~2^17 QK^T
    multiply-adds: every case below allows 2 or more): the same bits at 1, 2, 3 and 5 threads
    (2 to 8 slices; whole 4-head units for MHA decode, Hk = 13: a short last slice) as the
    sequence unsliced in a batch of 4 at one thread, and the reference's answer, for MHA
    decode, GQA decode and several queries per sequence (register tiles and GEMM), paged and
    windowed."""
    torch.manual_seed(3)
    S, L = 1200, 1100
    cases = []
    for Hk, G, Sq, D in ((13, 1, 1, 136), (8, 4, 1, 64), (6, 4, 3, 32), (5, 2, 16, 48)):
        kc, vc = _cache(1, S, Hk, D, dtype, "cpu", strided=Hk == 8)
        q = torch.randn(1, Sq, Hk * G, D).to(dtype)
        cases.append((q, kc, vc, None, (-1, -1) if Sq == 1 else (400, 0)))
    pool_k, pool_v = _cache(80, 16, 4, 64, dtype, "cpu")  # paged: 75 of 80 pages, shuffled
    table = torch.randperm(80)[:75].view(1, 75).int()
    cases.append((torch.randn(1, 2, 12, 64).to(dtype), pool_k, pool_v, table, (-1, -1)))
    lens = _seqlens([L], "cpu")
    threads = torch.get_num_threads()
    for q, kc, vc, table, window in cases:
        runs = []
        batch = (4,) + (1,) * (q.dim() - 1)
        kwargs = dict(causal=False, window=window, num_splits=1, return_lse=True)
        try:
            torch.set_num_threads(1)
            whole = fastattn.attention_with_kvcache(  # 4 items: no slices at 1 thread
                q.repeat(batch), kc if table is not None else kc.repeat(batch),
                vc if table is not None else vc.repeat(batch), lens.repeat(4),
                block_table=None if table is None else table.repeat(4, 1), **kwargs)
            for n in (1, 2, 3, 5):
                torch.set_num_threads(n)
                runs.append(fastattn.attention_with_kvcache(q, kc, vc, lens, block_table=table, **kwargs))
        finally:
            torch.set_num_threads(threads)
        for out, lse in runs:
            assert torch.equal(out[0], whole[0][3]) and torch.equal(lse[0], whole[1][3]), (q.shape, kc.shape)
        want_out, want_lse = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens,
                                                              block_table=table, causal=False, window=window,
                                                              return_lse=True)
        low_out = reference.attention_with_kvcache(q, kc, vc, lens, block_table=table, causal=False, window=window)
        assert_error_ratio(runs[0][0], low_out, want_out, "out")
        torch.testing.assert_close(runs[0][1], want_lse.float(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hk", [4, 5, 8, 13])
def test_decode_cpu_mha_packed_heads(dtype, Hk):
    """MHA decode (one query row per kv head) runs the register tiles over 4 kv heads at a time
    (the first Hk // 4 * 4 heads; the rest one by one): each head's output and lse are the same
    bits as that head decoded alone, over odd head dims, strided and paged caches, ragged
    lengths (0 and 1 included), splits, a window and soft-capping; a NaN in one head's keys
    reaches that head only."""
    torch.manual_seed(Hk)
    B, S = 3, 77
    lens = _seqlens([77, 0, 41], "cpu")
    for D, strided, splits in ((8, False, 0), (24, True, 3), (40, False, 1), (130, True, 0)):
        kc, vc = _cache(B, S, Hk, D, dtype, "cpu", strided=strided)
        q = torch.randn(B, Hk, D).to(dtype)
        out, lse = fastattn.decode_attention(q, kc, vc, lens, num_splits=splits, return_lse=True)
        _check_against_reference(q, kc, vc, lens, out, lse)
        for h in range(Hk):
            o1, l1 = fastattn.decode_attention(q[:, h:h + 1], kc[:, :, h:h + 1], vc[:, :, h:h + 1], lens,
                                               num_splits=splits, return_lse=True)
            assert torch.equal(out[:, h:h + 1], o1) and torch.equal(lse[:, h:h + 1], l1), (D, h)
    # window and soft-capping (attention_with_kvcache, one query per sequence), paged caches
    D, page = 48, 16
    pool_k, pool_v = torch.randn(12, page, Hk, D).to(dtype), torch.randn(12, page, Hk, D).to(dtype)
    table = torch.tensor([[3, 7, 1, 0, 9], [11, 2, 4, 5, 6], [8, 10, 0, 1, 2]], dtype=torch.int32)
    q = torch.randn(B, 1, Hk, D).to(dtype)
    kw = dict(block_table=table, causal=True, window=(29, 0), softcap=3.0)
    out = fastattn.attention_with_kvcache(q, pool_k, pool_v, lens, **kw)
    for h in range(Hk):
        o1 = fastattn.attention_with_kvcache(q[:, :, h:h + 1], pool_k[:, :, h:h + 1].contiguous(),
                                             pool_v[:, :, h:h + 1].contiguous(), lens, **kw)
        assert torch.equal(out[:, :, h:h + 1], o1), h
    kc, vc = _cache(B, S, Hk, 40, dtype, "cpu")
    kc[0, 5, Hk - 1, 3] = float("nan")
    q = torch.randn(B, Hk, 40).to(dtype)
    out = fastattn.decode_attention(q, kc, vc, lens)
    assert torch.isnan(out[0, Hk - 1]).all() and not torch.isnan(out[0, :Hk - 1]).any()
    assert not torch.isnan(out[1:]).any()


def test_decode_cpu_strided_cache_seqlens():
    # cache_seqlens may be any int32 view: its own elements are checked and read (not the buffer's).
    kc, vc = _cache(3, 20, 2, 16, torch.float32, "cpu")
    q = torch.randn(3, 4, 16)
    buffer = torch.tensor([20, 99, 0, -5, 7, 99], dtype=torch.int32)
    view = buffer[::2]  # [20, 0, 7]
    out = fastattn.decode_attention(q, kc, vc, view)
    assert torch.equal(out, fastattn.decode_attention(q, kc, vc, view.contiguous()))
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 20\].*cache_seqlens\[0\] = 99"):
        fastattn.decode_attention(q, kc, vc, buffer[1::2])


@pytest.mark.parametrize("lengths", [[110, 3, 64], [700, 110, 0]])
def test_decode_cpu_auto_splits_follow_lengths_not_capacity(lengths):
    # num_splits=0 on the CPU is picked from the longest sequence, not the cache's capacity:
    # the same caches' first max(lengths) rows inside a 2048-row allocation give the same bits
    # (a capacity-based pick cut the big one into 16 mostly empty splits).
    B, Hk, D, used = len(lengths), 2, 40, max(lengths)
    big_k, big_v = _cache(B, 2048, Hk, D, torch.float32, "cpu")
    q = torch.randn(B, 8, D)
    seqlens = _seqlens(lengths, "cpu")
    big = fastattn.decode_attention(q, big_k, big_v, seqlens, return_lse=True)
    tight = fastattn.decode_attention(q, big_k[:, :used].contiguous(), big_v[:, :used].contiguous(), seqlens,
                                      return_lse=True)
    assert torch.equal(big[0], tight[0]) and torch.equal(big[1], tight[1])
    _check_against_reference(q, big_k, big_v, seqlens, big[0], big[1])


def test_decode_is_not_differentiable():
    kc, vc = _cache(2, 8, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16, requires_grad=True)
    out, lse = fastattn.decode_attention(q, kc, vc, _seqlens([8, 3], "cpu"), return_lse=True)
    assert not out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    kc, vc = _cache(2, 40, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 1, 4, 16)
    k_new = torch.randn(2, 1, 2, 16)
    v_new = torch.randn(2, 1, 2, 16)
    seqlens = _seqlens([10, 0], "cpu")

    def step(q, kc, vc, k_new, v_new, seqlens):
        fastattn.append_kv(kc, vc, k_new, v_new, seqlens)
        return fastattn.decode_attention(q, kc, vc, seqlens + 1, return_lse=True)

    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = torch.compile(step, fullgraph=True)(q, kc, vc, k_new, v_new, seqlens)
    out_e, lse_e = step(q, kc2, vc2, k_new, v_new, seqlens)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(lse, lse_e)


def test_bad_inputs():
    kc, vc = _cache(2, 8, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    sl = _seqlens([3, 8], "cpu")
    dec = fastattn.decode_attention
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        dec(q, kc, vc, sl.long())
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2,\)"):
        dec(q, kc, vc, sl[:1])
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(2,\)"):
        dec(q, kc, vc, sl.view(2, 1))
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 8\]"):
        dec(q, kc, vc, _seqlens([3, 9], "cpu"))
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 8\]"):
        dec(q, kc, vc, _seqlens([-1, 2], "cpu"))
    with pytest.raises(ValueError, match="must be a multiple of the number of kv heads"):
        dec(torch.randn(2, 3, 16), kc, vc, sl)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        dec(q, kc, vc[:, :4], sl)
    with pytest.raises(ValueError, match="head dim 16 but q has head dim 8"):
        dec(torch.randn(2, 4, 8), kc, vc, sl)
    with pytest.raises(ValueError, match="k_cache has dtype"):
        dec(q.double().float().half(), kc, vc, sl)
    with pytest.raises(ValueError, match="k_cache must have a contiguous last dimension"):
        dec(q, kc.transpose(1, 3).contiguous().transpose(1, 3), vc, sl)
    with pytest.raises(ValueError, match=r"q must be \(B, H, D\) or \(B, 1, H, D\)"):
        dec(torch.randn(2, 2, 4, 16), kc, vc, sl)
    with pytest.raises(ValueError, match="k_cache has batch"):
        dec(torch.randn(3, 4, 16), kc, vc, sl)
    with pytest.raises(ValueError, match="num_splits must be"):
        dec(q, kc, vc, sl, num_splits=-1)
    with pytest.raises(TypeError, match="cache_seqlens must be a torch.Tensor"):
        dec(q, kc, vc, [3, 8])
    with pytest.raises(ValueError, match="cache_seqlens is on meta but must be on cpu"):
        dec(q, kc, vc, sl.to("meta"))
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        dec(q, kc[0], vc[0], sl)
    # Direct op callers get the binding's checks.
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        torch.ops.fastattn.decode_attention(q, kc, vc, sl.long(), None, 0)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 8\]"):
        torch.ops.fastattn.decode_attention(q, kc, vc, _seqlens([3, 9], "cpu"), None, 0)
    with pytest.raises(ValueError, match="must be a multiple of the number of kv heads"):
        torch.ops.fastattn.decode_attention(torch.randn(2, 3, 16), kc, vc, sl, None, 0)
    with pytest.raises(ValueError, match="num_splits must be in"):
        torch.ops.fastattn.decode_attention(q, kc, vc, sl, None, 100000)

    k = torch.randn(2, 3, 2, 16)
    app = fastattn.append_kv
    with pytest.raises(ValueError, match=r"exceeds the cache capacity S_max = 8"):
        app(kc, vc, k, k, _seqlens([5, 6], "cpu"))
    with pytest.raises(ValueError, match=r"exceeds the cache capacity S_max = 8"):
        torch.ops.fastattn.append_kv(kc, vc, k, k, _seqlens([5, 6], "cpu"))
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        app(kc, vc, k, k, _seqlens([-1, 0], "cpu"))
    with pytest.raises(ValueError, match=r"k must be \(B, Sn, Hk, D\)"):
        app(kc, vc, torch.randn(2, 3, 1, 16), k, sl)
    with pytest.raises(ValueError, match=r"k must be \(B, Sn, Hk, D\)"):
        torch.ops.fastattn.append_kv(kc, vc, torch.randn(2, 3, 1, 16), k, sl)
    with pytest.raises(ValueError, match="v must have k's shape"):
        app(kc, vc, k, k[:, :2], sl)
    with pytest.raises(ValueError, match="k has dtype"):
        app(kc, vc, k.half(), k, sl)
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        app(kc, vc, k, k, sl.long())
    with pytest.raises(ValueError, match="cache_seqlens must be int32"):
        torch.ops.fastattn.append_kv(kc, vc, k, k, sl.long())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_cuda_head_dims(d):
    kc, vc = _cache(3, 500, 2, d, torch.bfloat16, "cuda")
    q = torch.randn(3, 20, d, dtype=torch.bfloat16, device="cuda")  # group 10
    seqlens = _seqlens([500, 1, 0], "cuda")
    for num_splits in (1, 3, 0):
        out, lse = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=num_splits, return_lse=True)
        _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_misaligned_cache_view():
    """A cache view the 16-byte loads cannot use (offset by one element, odd strides) runs
    on a compact copy: same answer."""
    base = torch.randn(2, 2, 300, 3, 65, dtype=torch.float16, device="cuda")
    kc, vc = base[0, :, :, :, 1:], base[1, :, :, :, 1:]
    q = torch.randn(2, 6, 64, dtype=torch.float16, device="cuda")
    seqlens = _seqlens([300, 7], "cuda")
    out, lse = fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)
    _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_contiguous_cache_at_odd_offset():
    """Contiguous caches whose data starts one element into a buffer (base pointer not
    16-byte aligned; Tensor.contiguous() would return the same view): a fresh copy is used."""
    shape = (2, 300, 3, 64)
    n = 2 * 300 * 3 * 64
    buf = torch.randn(2 * n + 2, dtype=torch.float16, device="cuda")
    kc, vc = buf[1 : 1 + n].view(shape), buf[n + 2 :].view(shape)
    assert kc.is_contiguous() and vc.is_contiguous()
    q = torch.randn(2, 6, 64, dtype=torch.float16, device="cuda")
    seqlens = _seqlens([300, 7], "cuda")
    out, lse = fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)
    _check_against_reference(q, kc, vc, seqlens, out, lse)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_bad_inputs():
    kc, vc = _cache(2, 8, 2, 40, torch.float16, "cuda")
    sl = _seqlens([3, 8], "cuda")
    with pytest.raises(ValueError, match="head dim 40 is not supported on CUDA"):
        fastattn.decode_attention(torch.randn(2, 4, 40, dtype=torch.float16, device="cuda"), kc, vc, sl)
    kc32, vc32 = kc.float(), vc.float()
    with pytest.raises(ValueError, match="q must be float16 or bfloat16 on CUDA"):
        fastattn.decode_attention(torch.randn(2, 4, 40, device="cuda"), kc32, vc32, sl)
    # The remaining checks need a head dim the CUDA kernels take, else that check fires first.
    kc, vc = _cache(2, 8, 2, 64, torch.float16, "cuda")
    with pytest.raises(ValueError, match="cache_seqlens is on cpu"):
        fastattn.decode_attention(torch.randn(2, 4, 64, dtype=torch.float16, device="cuda"), kc, vc, sl.cpu())
    k = torch.randn(2, 3, 2, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="exceeds the cache capacity S_max = 8"):
        fastattn.append_kv(kc, vc, k, k, _seqlens([5, 6], "cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_graph_capture_and_replay():
    """A decode step (append + decode with num_splits=0) captured once and replayed with new
    lengths and new tokens: no host sync inside, and every replay matches eager."""
    dev = "cuda"
    B, S_max, H, Hk, D = 3, 4096, 32, 8, 128
    dtype = torch.bfloat16
    kc, vc = _cache(B, S_max, Hk, D, dtype, dev)
    seqlens = _seqlens([100, 1, 3000], dev)
    q = torch.randn(B, H, D, dtype=dtype, device=dev)
    k_new = torch.randn(B, 1, Hk, D, dtype=dtype, device=dev)
    v_new = torch.randn(B, 1, Hk, D, dtype=dtype, device=dev)

    def step():
        fastattn.append_kv(kc, vc, k_new, v_new, seqlens)
        seqlens.add_(1)
        return fastattn.decode_attention(q, kc, vc, seqlens, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = step()
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        before = seqlens.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(seqlens, before + 1)
        assert torch.equal(kc[torch.arange(B, device=dev), before.long()], k_new[:, 0])
        _check_against_reference(q, kc, vc, seqlens, out_g.clone(), lse_g.clone())


# ---- CUDA kernel layout checks that need no GPU -----------------------------------------
# (tests/test_decode_emulated.py runs the kernels' own code on the CPU; these check what an
# emulation cannot see: shared-memory bank conflicts and the shared-memory budget.)
_HEADS_PER_WARP = 8  # decode_kernels.cuh


def _warps(d):  # warps_for() in decode_kernels.cuh: 8-warp blocks from D = 96 up
    return 4 if d <= 64 else 8


def _block_n(d):  # block_n_for() / heads_per_block_for() in decode_kernels.cuh
    return 128 if d <= 128 else 64


def _heads_per_block(d):
    return 32 if d <= 128 else 16


def _swz(row, col, d):
    """Python transcription of swz<kD>() in csrc/cuda/decode_kernels.cuh (element offset):
    chunk c ^ (row & 7) when a row is a multiple of 8 chunks, else (D = 96, 12 chunks) the
    swizzle stays inside aligned 4-chunk groups, c ^ ((row >> 1) & 3)."""
    key = (row & 7) if d % 64 == 0 else ((row >> 1) & 3)
    return row * d + ((((col >> 3) ^ key) << 3) | (col & 7))


@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_cuda_smem_swizzle_is_a_conflict_free_bijection(d):
    block_n = _block_n(d)
    # Bijection over a [block_n][d] tile.
    offs = {_swz(r, c, d) for r in range(block_n) for c in range(d)}
    assert offs == set(range(block_n * d))
    bank = lambda elem: (elem * 2 // 4) % 32  # 16-bit elements, 4-byte banks
    # Q K^T: lane l reads 16 bytes (chunk c) of row st*32 + l; a 16-byte warp load is served
    # in 4 phases of 8 lanes, each of which must touch 32 distinct banks.
    for st in range(block_n // 32):
        for c in range(d // 8):
            for phase in range(4):
                banks = [bank(_swz(st * 32 + phase * 8 + l, c * 8, d)) + w for l in range(8) for w in range(4)]
                assert len(set(banks)) == 32
    # P V: all lanes read kD/32 elements of one row; each phase of (128 bytes) must hit
    # distinct banks.
    # At D = 96 lanes 0..23 read 4 elements each and lanes 24..31 repeat lanes 16..23's
    # addresses (a broadcast, not a conflict): distinct 4-byte words of a phase, distinct banks.
    dpl = 4 if d == 96 else d // 32
    lane_col = (lambda l: (l if l < 24 else l - 8) * dpl) if d == 96 else (lambda l: l * dpl)
    lanes_per_phase = 128 // (dpl * 2)
    for row in range(16):
        for phase in range(32 // lanes_per_phase):
            words = set()
            for l in range(phase * lanes_per_phase, (phase + 1) * lanes_per_phase):
                e = _swz(row, lane_col(l), d)
                words |= {e * 2 // 4 + w for w in range(dpl * 2 // 4)}
            banks = [w % 32 for w in words]
            assert len(set(banks)) == len(banks)
            assert len(banks) == (32 if d != 96 or phase == 0 else 16)
    # Shared memory per block fits an A100 (163 KiB opt-in) and so an H100.
    smem = 2 * 2 * block_n * d * 2 + _heads_per_block(d) * d * 4 + _warps(d) * _HEADS_PER_WARP * 32 * 4
    assert smem <= 163 * 1024


# ---- issue 13: append_kv is an in-place op (versions, autograd, aliasing); softmax_scale ----
def _append_args(device="cpu"):
    return (torch.full((1, 1, 1, 2), 5.0, device=device), torch.zeros(1, 1, 1, 2, device=device),
            _seqlens([1], device))


@pytest.mark.parametrize("direct", [False, True], ids=["functional", "op"])
def test_append_kv_refuses_grad_and_bumps_versions(direct):
    app = torch.ops.fastattn.append_kv if direct else fastattn.append_kv
    k_new, v_new, sl = _append_args()
    # The case: a cache that is part of a graph used to be overwritten silently,
    # so its gradient came out as 10 instead of 2 in the written row.
    w = torch.ones(1, 4, 1, 2, requires_grad=True)
    kc = w * 1.0
    vc = torch.zeros(1, 4, 1, 2)
    loss = (kc * kc).sum()
    with pytest.raises(RuntimeError, match="append_kv is not differentiable but k_cache requires grad"):
        app(kc, vc, k_new, v_new, sl)
    with pytest.raises(RuntimeError, match="append_kv is not differentiable but v_cache requires grad"):
        app(vc, kc, k_new, v_new, sl)
    # k/v that require grad would be copied into the cache without a graph edge.
    with pytest.raises(RuntimeError, match="append_kv is not differentiable but k requires grad"):
        app(torch.zeros(1, 4, 1, 2), vc, k_new.requires_grad_(), v_new, sl)
    k_new = k_new.detach()
    assert torch.equal(kc, torch.ones(1, 4, 1, 2)) and torch.equal(vc, torch.zeros(1, 4, 1, 2))
    # Under no_grad the write happens, and bumps both versions like any in-place torch op,
    # so the cache saved for (kc * kc)'s backward is reported instead of a wrong gradient.
    versions = (kc._version, vc._version)
    with torch.no_grad():
        app(kc, vc, k_new, v_new, sl)
    assert (kc._version, vc._version) == (versions[0] + 1, versions[1] + 1)
    assert torch.equal(kc[0, 1], torch.full((1, 2), 5.0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # A cache that does not require grad but was saved by another op is caught the same way.
    x = torch.randn(1, 4, 1, 2)
    y = (x * w).sum()
    app(x, torch.zeros(1, 4, 1, 2), k_new, v_new, sl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("direct", [False, True], ids=["functional", "op"])
def test_append_kv_refuses_overlapping_memory(direct):
    app = torch.ops.fastattn.append_kv if direct else fastattn.append_kv
    sl = _seqlens([1, 2], "cpu")
    kc, vc = _cache(2, 8, 2, 16, torch.float32, "cpu")
    k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    before = (kc.clone(), vc.clone())
    with pytest.raises(ValueError, match="k_cache has elements sharing memory"):
        app(torch.zeros(2, 1, 2, 16).expand(2, 8, 2, 16), vc, k, v, sl)
    with pytest.raises(ValueError, match="v_cache has elements sharing memory"):
        app(kc, torch.zeros(2, 8, 1, 16).expand(2, 8, 2, 16), k, v, sl)
    # Strides that cannot rule sharing out (rows 8 elements apart, 16 wide) are refused too.
    with pytest.raises(ValueError, match="k_cache has elements sharing memory"):
        app(torch.zeros(300).as_strided((2, 8, 2, 16), (128, 8, 64, 1)), vc, k, v, sl)
    with pytest.raises(ValueError, match="k_cache and v_cache overlap in memory"):
        app(kc, kc, k, v, sl)
    with pytest.raises(ValueError, match="k_cache and v_cache overlap in memory"):
        app(kc[:, 1:], kc[:, :-1], k, v, sl)
    with pytest.raises(ValueError, match="k and k_cache overlap in memory"):
        app(kc, vc, kc[:, 5:], v, sl)
    with pytest.raises(ValueError, match="v and k_cache overlap in memory"):
        app(kc, vc, k, kc[:, :3], sl)
    with pytest.raises(ValueError, match="k and v_cache overlap in memory"):
        app(kc, vc, vc[:, 2:5], v, sl)
    with pytest.raises(ValueError, match="cache_seqlens and k_cache overlap in memory"):
        app(kc, vc, k, v, kc.view(-1)[:2].view(torch.int32))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
    # k and v are only read: the same tensor (or overlapping views) for both is fine.
    kc_ref, vc_ref = kc.clone(), vc.clone()
    app(kc, vc, k, k, sl)
    reference.append_kv(kc_ref, vc_ref, k, k, sl)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_append_kv_interleaved_kv_cache():
    # k and v caches interleaved in one (B, S, 2, Hk, D) buffer: their byte ranges intersect
    # but no element is shared, so the write is allowed and exact.
    kv = torch.randn(2, 8, 2, 2, 16)
    kc, vc = kv[:, :, 0], kv[:, :, 1]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    sl = _seqlens([0, 5], "cpu")
    fastattn.append_kv(kc, vc, k, v, sl)
    reference.append_kv(kc_ref, vc_ref, k, v, sl)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize(
    "scale, exc, match",
    [
        (float("nan"), ValueError, "softmax_scale must be finite.*got nan"),
        (float("inf"), ValueError, "softmax_scale must be finite.*got inf"),
        (-float("inf"), ValueError, "softmax_scale must be finite"),
        (1e39, ValueError, "softmax_scale must be finite in float32"),  # inf once the kernel casts it
        ("abc", TypeError, "softmax_scale must be a real number"),
        (1j, TypeError, "softmax_scale must be a real number"),
        (torch.tensor(0.5), TypeError, "softmax_scale must be a real number"),
        (True, TypeError, "softmax_scale must be a real number"),
    ],
)
def test_decode_bad_softmax_scale(scale, exc, match):
    kc, vc = _cache(2, 8, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    with pytest.raises(exc, match=match):
        fastattn.decode_attention(q, kc, vc, _seqlens([3, 8], "cpu"), softmax_scale=scale)


def test_decode_direct_op_refuses_non_finite_scale():
    kc, vc = _cache(2, 8, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    for bad in (float("nan"), float("inf"), -float("inf"), -1e39):
        with pytest.raises(ValueError, match="decode_attention: softmax_scale must be finite"):
            torch.ops.fastattn.decode_attention(q, kc, vc, _seqlens([3, 8], "cpu"), bad, 0)
    # A Python int is a real number and is accepted.
    out = fastattn.decode_attention(q, kc, vc, _seqlens([3, 8], "cpu"), softmax_scale=1)
    _check_against_reference(q, kc, vc, _seqlens([3, 8], "cpu"), out, softmax_scale=1.0)


@pytest.mark.parametrize("D", [1, 2, 3, 8])
def test_cpu_bf16_tiny_head_dims_within_the_rule(D):
    # bf16 at head dims below 16 stays off the AVX512-BF16 pair path (P rounded to bf16 while the
    # row sum is not: at d 1..8 decode came out up to 8.9x the rule's bound on such CPUs). Random
    # cases, the rule per case; on CPUs without AVX512-BF16 this was always the path.
    g = torch.Generator().manual_seed(D)
    for case in range(60):
        Sk = 2 + case % 41
        q = torch.randn(1, 4, D, generator=g).bfloat16()
        k = torch.randn(1, Sk, 1, D, generator=g).bfloat16()
        v = torch.randn(1, Sk, 1, D, generator=g).bfloat16()
        lens = torch.tensor([Sk], dtype=torch.int32)
        out = fastattn.decode_attention(q, k, v, lens)
        assert_error_ratio(out, reference.decode_attention(q, k, v, lens),
                           reference.decode_attention(q.double(), k.double(), v.double(), lens), f"case {case}")
        qf = q[:, None]  # the flash forward on one query row (Sk keys, GQA 4:1)
        outf = fastattn.flash_attention(qf, k, v)
        assert_error_ratio(outf, reference.attention(qf, k, v), reference.attention(qf.double(), k.double(), v.double()),
                           f"flash case {case}")
