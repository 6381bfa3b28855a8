"""Paged KV caches (block_table) for decode_attention and append_kv, and
attention_with_kvcache (several new queries per sequence over a contiguous or paged cache):
parity with fastattn.reference and between layouts, ragged lengths (0, page boundaries),
page sizes 1 / 3 / 16 / 256, pages shuffled in a larger pool, GQA/MQA, causal / window,
split-KV, query chunking, opcheck, torch.compile, bad input, CUDA graphs."""
import sys

import pytest
import torch

import fastattn
from fastattn import reference

from conftest import DEVICES, HAS_CUDA, assert_error_ratio

HEADS = [(4, 4), (8, 2), (6, 1)]  # MHA, GQA 4, MQA


def _head_dim(device):
    return 64 if device == "cuda" else 40  # CPU kernels take any head dim


def _dtypes(device):
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.float16, torch.bfloat16]


def _seqlens(lengths, device):
    return torch.tensor(lengths, dtype=torch.int32, device=device)


def _to_paged(kc, vc, page_size, spare_pages=3, generator=None):
    """The dense caches (B, S_max, Hk, D) as page pools in shuffled order plus spare pages
    (random data the kernels must never read), and the block table (B, ceil(S_max / ps))."""
    B, S_max, Hk, D = kc.shape
    per_seq = -(-S_max // page_size)
    num_pages = B * per_seq + spare_pages
    order = torch.randperm(num_pages, generator=generator)[: B * per_seq]
    block_table = order.view(B, per_seq).to(torch.int32).to(kc.device)
    pools = []
    for cache in (kc, vc):
        pool = torch.randn(num_pages, page_size, Hk, D, dtype=cache.dtype, device=cache.device)
        padded = torch.zeros(B, per_seq * page_size, Hk, D, dtype=cache.dtype, device=cache.device)
        padded[:, :S_max] = cache
        pool[block_table.long().cpu().view(-1).to(cache.device)] = padded.view(B * per_seq, page_size, Hk, D)
        pools.append(pool)
    return pools[0], pools[1], block_table


def _check(out, lse, true_out, true_lse, low_out, low_lse):
    assert out.shape == true_out.shape and lse.shape == true_lse.shape and lse.dtype == torch.float32
    assert_error_ratio(out, low_out, true_out, "out")
    dead = torch.isneginf(true_lse)
    assert torch.equal(torch.isneginf(lse), dead), "lse must be -inf exactly where a row sees no key"
    assert_error_ratio(lse[~dead], low_lse[~dead].float(), true_lse[~dead], "lse", atol=1e-4)
    dead_rows = dead.transpose(1, 2) if out.dim() == 4 else dead
    assert (out[dead_rows] == 0).all(), "a row that sees no key must output 0"


# ---- paged decode ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 3, 16, 256])
@pytest.mark.parametrize("heads", HEADS, ids=lambda hh: f"H{hh[0]}_Hk{hh[1]}")
def test_paged_decode_matches_reference_and_contiguous(device, page_size, heads):
    H, Hk = heads
    D = _head_dim(device)
    S_max = 2 * page_size + 40 if page_size < 256 else 512
    # Ragged: empty, exactly one page, one past a page, mid-page, the full capacity.
    lengths = [0, page_size, page_size + 1, min(S_max, 2 * page_size + 5), S_max]
    B = len(lengths)
    for dtype in _dtypes(device):
        kc = torch.randn(B, S_max, Hk, D, dtype=dtype, device=device)
        vc = torch.randn(B, S_max, Hk, D, dtype=dtype, device=device)
        kp, vp, bt = _to_paged(kc, vc, page_size)
        seqlens = _seqlens(lengths, device)
        q = torch.randn(B, H, D, dtype=dtype, device=device)
        true_out, true_lse = reference.decode_attention(q.double(), kc.double(), vc.double(), seqlens, return_lse=True)
        low_out, low_lse = reference.decode_attention(q, kc, vc, seqlens, return_lse=True)
        for num_splits in (1, 3, 0):
            out, lse = fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt, num_splits=num_splits,
                                                 return_lse=True)
            _check(out, lse, true_out, true_lse, low_out, low_lse)
            if S_max % page_size == 0 and num_splits > 0:
                # Same keys, same blocks, same split: the layouts must give the same bits.
                out_c, lse_c = fastattn.decode_attention(q, kc, vc, seqlens, num_splits=num_splits, return_lse=True)
                assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
        # The reference reading the pool through the table agrees with the dense reference.
        ref_paged = reference.decode_attention(q.double(), kp.double(), vp.double(), seqlens, block_table=bt)
        assert torch.allclose(ref_paged, true_out)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_shared_and_strided_pool(device):
    """Two sequences sharing their first pages (prefix caching), a pool that is a strided view
    of a bigger buffer, and a block table whose rows are a strided view too."""
    D, Hk, H, ps = _head_dim(device), 2, 4, 4
    dtype = torch.float16 if device == "cuda" else torch.float32
    base = torch.randn(2, 12, ps + 1, Hk + 1, D + 8, dtype=dtype, device=device)
    kp, vp = base[0, :, 1:, :Hk, :D], base[1, :, 1:, :Hk, :D]
    table = torch.tensor([[5, 7, 2, 0, 9, 9], [5, 7, 11, 0, 3, 3]], dtype=torch.int32, device=device)
    bt = table[:, ::2]  # pages [5, 2, 9] and [5, 11, 3], stride 2 along the pages
    seqlens = _seqlens([10, 9], device)
    q = torch.randn(2, H, D, dtype=dtype, device=device)
    out, lse = fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt, return_lse=True)
    kd = reference.paged_rows(kp, bt, 12)
    vd = reference.paged_rows(vp, bt, 12)
    true_out, true_lse = reference.decode_attention(q.double(), kd.double(), vd.double(), seqlens, return_lse=True)
    low_out, low_lse = reference.decode_attention(q, kd, vd, seqlens, return_lse=True)
    _check(out, lse, true_out, true_lse, low_out, low_lse)


# ---- paged append ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_append_matches_reference(device, page_size):
    """Rows crossing page boundaries land in the right (shuffled) pages; no other byte of the
    pool changes."""
    B, Hk, D = 3, 2, _head_dim(device)
    for dtype in _dtypes(device):
        kc = torch.randn(B, 4 * page_size + 8, Hk, D, dtype=dtype, device=device)
        kp, vp, bt = _to_paged(kc, kc.clone(), page_size)
        seqlens = _seqlens([0, page_size - 1, 2 * page_size], device)
        Sn = page_size + 2
        k = torch.randn(B, Sn, Hk, D, dtype=dtype, device=device)
        v = torch.randn(B, Sn, Hk, D, dtype=dtype, device=device)
        kr, vr = kp.clone(), vp.clone()
        reference.append_kv(kr, vr, k, v, seqlens, block_table=bt)
        fastattn.append_kv(kp, vp, k, v, seqlens, block_table=bt)
        assert torch.equal(kp, kr) and torch.equal(vp, vr)
        assert torch.equal(seqlens, _seqlens([0, page_size - 1, 2 * page_size], device)), "not advanced"


def test_paged_append_then_decode_equals_contiguous():
    """A decode loop on a paged cache (pages handed out as sequences grow) gives the same bits
    as the same loop on a contiguous cache."""
    B, H, Hk, D, ps, steps = 3, 8, 2, 32, 4, 11
    S_max = 16
    kc = torch.zeros(B, S_max, Hk, D)
    vc = torch.zeros(B, S_max, Hk, D)
    kp = torch.zeros(B * S_max // ps + 1, ps, Hk, D)
    vp = torch.zeros_like(kp)
    bt = torch.zeros(B, S_max // ps, dtype=torch.int32)
    free = list(range(1, kp.shape[0]))[::-1]  # page 0 never used
    len_c = _seqlens([0, 2, 5], "cpu")
    len_p = len_c.clone()
    for b, n in enumerate(len_c.tolist()):
        for j in range(-(-n // ps)):
            bt[b, j] = free.pop()
    for _ in range(steps):
        for b, n in enumerate(len_p.tolist()):
            if n % ps == 0:
                bt[b, n // ps] = free.pop()
        q = torch.randn(B, H, D)
        k, v = torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
        fastattn.append_kv(kc, vc, k, v, len_c)
        fastattn.append_kv(kp, vp, k, v, len_p, block_table=bt)
        len_c += 1
        len_p += 1
        out_c = fastattn.decode_attention(q, kc, vc, len_c, num_splits=1)
        out_p = fastattn.decode_attention(q, kp, vp, len_p, block_table=bt, num_splits=1)
        assert torch.equal(out_c, out_p)


# ---- attention_with_kvcache --------------------------------------------------------------
def _kvcache_case(device, dtype, B, H, Hk, D, Sq, lengths, S_max, paged, page_size=16):
    kc = torch.randn(B, S_max, Hk, D, dtype=dtype, device=device)
    vc = torch.randn(B, S_max, Hk, D, dtype=dtype, device=device)
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sq, Hk, D, dtype=dtype, device=device)
    v = torch.randn(B, Sq, Hk, D, dtype=dtype, device=device)
    seqlens = _seqlens(lengths, device)
    bt = None
    if paged:
        kc, vc, bt = _to_paged(kc, vc, page_size)
    return q, k, v, kc, vc, seqlens, bt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("append", [True, False], ids=["append", "noappend"])
@pytest.mark.parametrize("mask", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0)), (False, (3, 2))],
                         ids=["causal", "full", "causal_window", "window"])
@pytest.mark.parametrize("Sq", [1, 4, 16])
def test_attention_with_kvcache_matches_reference(device, paged, append, mask, Sq):
    causal, window = mask
    B, H, Hk, D, S_max = 4, 8, 2, _head_dim(device), 64
    # Lengths before the step: 0 (the queries see only themselves, or nothing without
    # append), short (rows with no visible key when causal and Sq > length), page boundary.
    lengths = [0, 2, 16, 40]
    for dtype in _dtypes(device):
        q, k, v, kc, vc, seqlens, bt = _kvcache_case(device, dtype, B, H, Hk, D, Sq, lengths, S_max, paged)
        kw = dict(causal=causal, window=window, block_table=bt)
        if append:
            kw.update(k=k, v=v)
        k_ref, v_ref = kc.double(), vc.double()  # copies: the reference appends into them
        true_out, true_lse = reference.attention_with_kvcache(
            q.double(), k_ref, v_ref, seqlens,
            **{**kw, **({"k": k.double(), "v": v.double()} if append else {})}, return_lse=True)
        low_out, low_lse = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, **kw,
                                                            return_lse=True)
        out, lse = fastattn.attention_with_kvcache(q, kc, vc, seqlens, **kw, return_lse=True)
        _check(out, lse, true_out, true_lse, low_out, low_lse)
        if append:  # the new rows are in the caches, the lengths untouched
            assert torch.equal(kc.double(), k_ref) and torch.equal(vc.double(), v_ref)
            assert torch.equal(seqlens, _seqlens(lengths, device))
        # Split-KV merges exactly what one split computes (up to fp32 rounding).
        # (With append, the rows are in the caches now: the same keys are cache_seqlens + Sq.)
        keys = seqlens + Sq if append else seqlens
        out_s = fastattn.attention_with_kvcache(q, kc, vc, keys, causal=causal, window=window, block_table=bt,
                                                num_splits=3)
        assert_error_ratio(out_s, low_out, true_out, "out (num_splits=3)")


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_window_from_the_cache_length_stays_dynamic(strict):
    # window=(S_max // 2, 0) with a dynamic cache length: the op's window is SymInt (it was
    # int: strict export failed "Constraints violated", non-strict _check_window refused the
    # SymInt; export audit). The program serves other lengths with eager's output.
    class Step(torch.nn.Module):
        def forward(self, q, kc, vc, lengths):
            return fastattn.attention_with_kvcache(q, kc, vc, lengths, window=(kc.shape[1] // 2, 0))

    def inputs(S):
        torch.manual_seed(S)
        return (torch.randn(2, 3, 4, 8), torch.randn(2, S, 2, 8), torch.randn(2, S, 2, 8),
                torch.tensor([S, S - 3], dtype=torch.int32))

    S = torch.export.Dim("S", min=4, max=64)
    program = torch.export.export(Step(), inputs(10), dynamic_shapes=(None, {1: S}, {1: S}, None), strict=strict)
    for n in (7, 23):
        assert torch.equal(program.module()(*inputs(n)), Step()(*inputs(n)))


@pytest.mark.parametrize("cache", ["k_cache", "v_cache"])
def test_attention_with_kvcache_reads_q_as_passed_when_it_views_the_written_rows(cache):
    # q a view of the cache rows this call's append writes (a buffer reused for the queries):
    # the append overwrote q before attention read it, a silently wrong output (fuzz audit).
    torch.manual_seed(0)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    q = (kc if cache == "k_cache" else vc)[:, 3:5]  # (B, Sq=2, H=2, D): rows 3, 4 are written
    q_as_passed, kc0, vc0 = q.clone(), kc.clone(), vc.clone()
    k, v = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    seqlens = torch.tensor([3, 3], dtype=torch.int32)
    out = fastattn.attention_with_kvcache(q, kc, vc, seqlens, k=k, v=v)
    want = reference.attention_with_kvcache(q_as_passed.double(), kc0.double(), vc0.double(), seqlens,
                                            k=k.double(), v=v.double())
    low = reference.attention_with_kvcache(q_as_passed, kc0.clone(), vc0.clone(), seqlens, k=k, v=v)
    assert_error_ratio(out, low, want, "out")
    assert torch.equal(kc[:, 3:5], k) and torch.equal(vc[:, 3:5], v)  # appended all the same


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, sys.maxsize), (sys.maxsize, sys.maxsize), (sys.maxsize, 0), (2**62, 2**40)])
def test_attention_with_kvcache_huge_window_is_unbounded(device, window):
    """A window side of sys.maxsize (or any side reaching past the cache) excludes nothing, as
    for flash_attention: the same bits as -1. It used to overflow the kernels' band arithmetic
    (position + window): every row saw no key (out 0, lse -inf)."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 3, 4, 16, device=device, dtype=dtype)
    kc, vc = (torch.randn(2, 24, 2, 16, device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([10, 2], dtype=torch.int32, device=device)
    for causal in (False, True):
        unbounded = tuple(-1 if w >= 2**40 else w for w in window)
        out, lse = fastattn.attention_with_kvcache(q, kc, vc, lens, causal=causal, window=window, return_lse=True)
        ref, ref_lse = fastattn.attention_with_kvcache(q, kc, vc, lens, causal=causal, window=unbounded,
                                                       return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse), causal
        assert torch.isfinite(lse[0]).all()  # sequence 0 (10 keys): every row sees keys


@pytest.mark.parametrize("device", DEVICES)
def test_attention_with_kvcache_single_query_is_decode(device):
    B, H, Hk, D = 3, 8, 2, _head_dim(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, _, _, kc, vc, seqlens, bt = _kvcache_case(device, dtype, B, H, Hk, D, 1, [0, 7, 33], 48, paged=True)
    for splits in (1, 4):
        out, lse = fastattn.attention_with_kvcache(q, kc, vc, seqlens, block_table=bt, num_splits=splits,
                                                   return_lse=True)
        out_d, lse_d = fastattn.decode_attention(q, kc, vc, seqlens, block_table=bt, num_splits=splits,
                                                 return_lse=True)
        assert torch.equal(out, out_d) and torch.equal(lse[..., 0], lse_d)


@pytest.mark.parametrize("H, Hk, D, Sq", [(32, 8, 64, 130), (32, 32, 128, 33)])
def test_attention_with_kvcache_long_query_block_chunks(H, Hk, D, Sq):
    """Sq large enough that the CPU kernel cuts the queries into several chunks (and odd):
    decode::cpu_query_chunk gives 131072 / (group 4 * Hk 8 * D 64) = 64 queries per chunk,
    so 130 queries are chunks of 64, 64 and 2; multi-head 131072 / (32 * 128) = 32, so 33
    queries are 32 and 1 (that last chunk on the 4-heads-per-tile MHA path)."""
    B = 2
    q, k, v, kc, vc, seqlens, bt = _kvcache_case("cpu", torch.float32, B, H, Hk, D, Sq, [0, 100], 256, paged=True)
    true_out, true_lse = reference.attention_with_kvcache(q.double(), kc.clone().double(), vc.clone().double(),
                                                          seqlens, k=k.double(), v=v.double(), block_table=bt,
                                                          return_lse=True)
    low_out, low_lse = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, k=k, v=v,
                                                        block_table=bt, return_lse=True)
    out, lse = fastattn.attention_with_kvcache(q, kc, vc, seqlens, k=k, v=v, block_table=bt, return_lse=True)
    _check(out, lse, true_out, true_lse, low_out, low_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_cache_conveniences(device):
    """As flash-attn's flash_attn_with_kvcache: cache_seqlens as a Python int (every sequence
    that length) and a contiguous cache preallocated for a larger batch (sequence b is row b;
    rows from B on are neither read nor written): the same bits as the explicit call on the
    first B rows."""
    B, Bc, H, Hk, D, S_max, L, Sq = 2, 5, 8, 2, _head_dim(device), 24, 9, 3
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    kc, vc = rnd(Bc, S_max, Hk, D), rnd(Bc, S_max, Hk, D)
    q1, q, k, v = rnd(B, H, D), rnd(B, Sq, H, D), rnd(B, Sq, Hk, D), rnd(B, Sq, Hk, D)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)

    out, lse = fastattn.decode_attention(q1, kc, vc, L, return_lse=True)
    want, want_lse = fastattn.decode_attention(q1, kc[:B].clone(), vc[:B].clone(), lengths, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)

    kc_big, vc_big = kc.clone(), vc.clone()
    kc_own, vc_own = kc[:B].clone(), vc[:B].clone()
    out = fastattn.attention_with_kvcache(q, kc_big, vc_big, L, k=k, v=v)
    want = fastattn.attention_with_kvcache(q, kc_own, vc_own, lengths, k=k, v=v)
    assert torch.equal(out, want)
    assert torch.equal(kc_big[:B], kc_own) and torch.equal(vc_big[:B], vc_own)  # appended in place
    assert torch.equal(kc_big[B:], kc[B:]) and torch.equal(vc_big[B:], vc[B:])  # other rows untouched

    # Still refused: a bool, a negative or beyond-int32 length, a cache smaller than q's batch.
    with pytest.raises(TypeError, match="cache_seqlens"):
        fastattn.decode_attention(q1, kc, vc, True)
    for bad in (-1, 2**31):
        with pytest.raises(ValueError, match="cache_seqlens"):
            fastattn.attention_with_kvcache(q, kc, vc, bad)
    with pytest.raises(ValueError, match="k_cache has batch 1 but q has batch 2"):
        fastattn.decode_attention(q1, kc[:1], vc[:1], L)


def test_attention_with_kvcache_empty_shapes():
    q = torch.randn(2, 0, 4, 16)
    kc = torch.randn(2, 8, 2, 16)
    out, lse = fastattn.attention_with_kvcache(q, kc, kc.clone(), _seqlens([1, 2], "cpu"), return_lse=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)


# ---- op contracts ------------------------------------------------------------------------
def test_opcheck():
    B, H, Hk, D, ps = 2, 4, 2, 16, 4
    kc = torch.randn(B, 12, Hk, D)
    kp, vp, bt = _to_paged(kc, kc.clone(), ps)
    seqlens = _seqlens([5, 12], "cpu")
    q = torch.randn(B, H, D)
    torch.library.opcheck(torch.ops.fastattn.decode_attention, (q, kp, vp, seqlens, None, 0, bt))
    q4 = torch.randn(B, 3, H, D)
    torch.library.opcheck(torch.ops.fastattn.attention_with_kvcache, (q4, kp, vp, seqlens, bt, None, -1, 0, 0, 0))
    torch.library.opcheck(torch.ops.fastattn.attention_with_kvcache, (q4, kc, kc, seqlens, None, 0.3, 2, 1, 0, 2))
    k = torch.randn(B, 2, Hk, D)
    torch.library.opcheck(torch.ops.fastattn.append_kv, (kp, vp, k, k.clone(), _seqlens([3, 9], "cpu"), bt))
    for check in (True, False):  # the trailing check_capacity argument
        torch.library.opcheck(torch.ops.fastattn.append_kv, (kp, vp, k, k.clone(), _seqlens([3, 9], "cpu"), bt, check))
        torch.library.opcheck(torch.ops.fastattn.append_kv, (kc, kc.clone(), k, k.clone(), _seqlens([3, 9], "cpu"),
                                                             None, check))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_append_kv_check_capacity_flag_cpu(paged):
    # check_capacity=False skips the host read of cache_seqlens on CUDA only: on the CPU the
    # check costs no sync and still runs (a write past the capacity stays a clear error).
    B, Hk, D, ps = 2, 2, 8, 4
    kc = torch.zeros(B, 12, Hk, D)
    vc = torch.zeros_like(kc)
    bt = None
    if paged:
        kc, vc, bt = _to_paged(kc, vc, ps)
    k, v = torch.randn(B, 3, Hk, D), torch.randn(B, 3, Hk, D)
    kc0, vc0 = kc.clone(), vc.clone()
    for check in (True, False):
        for lens, match in (([3, 10], "exceeds the cache capacity"), ([-1, 2], "cache_seqlens must be >= 0")):
            with pytest.raises(ValueError, match=match):
                fastattn.append_kv(kc, vc, k, v, _seqlens(lens, "cpu"), block_table=bt, check_capacity=check)
            with pytest.raises(ValueError, match=match):
                torch.ops.fastattn.append_kv(kc, vc, k, v, _seqlens(lens, "cpu"), bt, check)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)  # nothing written
    fastattn.append_kv(kc, vc, k, v, _seqlens([0, 9], "cpu"), block_table=bt, check_capacity=False)
    ref_k, ref_v = kc0.clone(), vc0.clone()
    reference.append_kv(ref_k, ref_v, k, v, _seqlens([0, 9], "cpu"), bt)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    for bad_flag in (0, None):
        with pytest.raises(TypeError, match="check_capacity must be a bool"):
            fastattn.append_kv(kc, vc, k, v, _seqlens([0, 1], "cpu"), block_table=bt, check_capacity=bad_flag)
    # zero new rows write nothing but the lengths are still checked (they used to pass unread)
    k0, v0 = k[:, :0], v[:, :0]
    for lens, match in (([-5, 2], "cache_seqlens must be >= 0"), ([3, 100], "exceeds the cache capacity")):
        with pytest.raises(ValueError, match=match):
            fastattn.append_kv(kc, vc, k0, v0, _seqlens(lens, "cpu"), block_table=bt)
    kc1, vc1 = kc.clone(), vc.clone()
    fastattn.append_kv(kc, vc, k0, v0, _seqlens([12, 0], "cpu"), block_table=bt)  # full cache, Sn = 0: fine
    assert torch.equal(kc, kc1) and torch.equal(vc, vc1)


def test_not_differentiable():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    kc = torch.randn(1, 4, 2, 8)
    out = fastattn.attention_with_kvcache(q, kc, kc, _seqlens([4], "cpu"))
    assert not out.requires_grad


def test_torch_compile_fullgraph_paged_step():
    """A paged decode step (append + attend) and a multi-token step under
    torch.compile(fullgraph=True) equal eager."""
    B, H, Hk, D, ps = 2, 8, 2, 32, 8
    kc = torch.randn(B, 32, Hk, D)
    kp, vp, bt = _to_paged(kc, kc.clone(), ps)
    seqlens = _seqlens([3, 17], "cpu")

    def step(q, kp, vp, k, v, seqlens, bt):
        fastattn.append_kv(kp, vp, k, v, seqlens, block_table=bt)
        out = fastattn.decode_attention(q, kp, vp, seqlens + 1, block_table=bt)
        multi = fastattn.attention_with_kvcache(q.unsqueeze(1).expand(B, 2, H, D).contiguous(), kp, vp, seqlens + 1,
                                                block_table=bt, window=(4, 0))
        return out, multi

    q = torch.randn(B, H, D)
    k, v = torch.randn(B, 1, Hk, D), torch.randn(B, 1, Hk, D)
    kp2, vp2 = kp.clone(), vp.clone()
    eager = step(q, kp, vp, k, v, seqlens, bt)
    compiled = torch.compile(step, fullgraph=True)(q, kp2, vp2, k, v, seqlens, bt)
    assert torch.equal(kp, kp2) and torch.equal(vp, vp2)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_bad_inputs():
    B, H, Hk, D, ps = 2, 4, 2, 16, 4
    kp = torch.randn(10, ps, Hk, D)
    vp = torch.randn(10, ps, Hk, D)
    bt = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    seqlens = _seqlens([5, 12], "cpu")
    q = torch.randn(B, H, D)
    with pytest.raises(ValueError, match="block_table must be int32"):
        fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt.long())
    with pytest.raises(ValueError, match=r"block_table must have shape \(2, max_pages_per_seq\)"):
        fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt[:1])
    with pytest.raises(ValueError, match="page pool"):
        fastattn.decode_attention(q, kp[0], vp[0], seqlens, block_table=bt)
    with pytest.raises(ValueError, match=r"cache capacity max_pages_per_seq \* page_size"):
        fastattn.decode_attention(q, kp, vp, _seqlens([5, 13], "cpu"), block_table=bt)
    bad = bt.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = 10 is not a page of the pool"):
        fastattn.decode_attention(q, kp, vp, seqlens, block_table=bad)
    bad[1, 2] = -1  # unused by a sequence of length 8: never read, so accepted
    fastattn.decode_attention(q, kp, vp, _seqlens([5, 8], "cpu"), block_table=bad)
    k = torch.randn(B, 2, Hk, D)
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -1 is not a page of the pool"):
        fastattn.append_kv(kp, vp, k, k, _seqlens([0, 7], "cpu"), block_table=bad)
    with pytest.raises(ValueError, match="exceeds the cache capacity max_pages_per_seq"):
        fastattn.append_kv(kp, vp, k, k, _seqlens([0, 11], "cpu"), block_table=bt)
    with pytest.raises(ValueError, match="overlap"):
        fastattn.append_kv(kp, vp, k, k, seqlens, block_table=kp.view(torch.int32)[:2, :3, 0, 0])
    q4 = torch.randn(B, 3, H, D)
    with pytest.raises(ValueError, match="k and v must be given together"):
        fastattn.attention_with_kvcache(q4, kp, vp, seqlens, k=k, block_table=bt)
    with pytest.raises(ValueError, match=r"k must be \(B, Sq, Hk, D\)"):
        fastattn.attention_with_kvcache(q4, kp, vp, seqlens, k=k, v=k, block_table=bt)
    with pytest.raises(ValueError, match=r"q must be \(B, Sq, H, D\)"):
        fastattn.attention_with_kvcache(q, kp, vp, seqlens, block_table=bt)
    with pytest.raises(ValueError, match="window"):
        fastattn.attention_with_kvcache(q4, kp, vp, seqlens, block_table=bt, window=(-2, 0))
    with pytest.raises(ValueError, match=r"plus the 3 new rows|exceeds the cache capacity"):
        k3 = torch.randn(B, 3, Hk, D)
        fastattn.attention_with_kvcache(q4, kp, vp, _seqlens([0, 10], "cpu"), k=k3, v=k3, block_table=bt)
    with pytest.raises(ValueError, match="plus the 3 new rows"):
        torch.ops.fastattn.attention_with_kvcache(q4, kp, vp, _seqlens([0, 10], "cpu"), bt, None, -1, 0, 3, 0)
    with pytest.raises(ValueError, match="num_splits"):
        fastattn.attention_with_kvcache(q4, kp, vp, seqlens, block_table=bt, num_splits=-1)


# ---- CUDA --------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_paged_bad_page_index_is_clamped():
    """CUDA never reads the table on the host: an out-of-range entry is clamped into the pool
    (finite output, no fault); the documented cost is a wrong page, not corrupted memory."""
    dev, D = "cuda", 64
    kp = torch.randn(4, 16, 2, D, dtype=torch.float16, device=dev)
    bt = torch.tensor([[0, 1000], [-7, 2]], dtype=torch.int32, device=dev)
    out = fastattn.decode_attention(torch.randn(2, 4, D, dtype=torch.float16, device=dev), kp, kp,
                                    _seqlens([20, 30], dev), block_table=bt)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_graph_capture_paged_decode_step():
    """A paged decode step (append + decode, num_splits=0) captured once and replayed while the
    block table is updated in place: no host sync inside; every replay matches eager."""
    dev, dtype = "cuda", torch.bfloat16
    B, H, Hk, D, ps = 3, 32, 8, 128, 16
    S_max = 1024
    kc = torch.randn(B, S_max, Hk, D, dtype=dtype, device=dev)
    kp, vp, bt = _to_paged(kc, kc.clone(), ps)
    seqlens = _seqlens([100, 1, 700], dev)
    q = torch.randn(B, H, D, dtype=dtype, device=dev)
    k_new = torch.randn(B, 1, Hk, D, dtype=dtype, device=dev)
    v_new = torch.randn(B, 1, Hk, D, dtype=dtype, device=dev)

    def step():
        fastattn.append_kv(kp, vp, k_new, v_new, seqlens, block_table=bt)
        seqlens.add_(1)
        return fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = step()
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        bt.copy_(bt.roll(1, 0))  # the same pages, dealt to other sequences
        before = seqlens.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(seqlens, before + 1)
        out_e, lse_e = fastattn.decode_attention(q, kp, vp, seqlens, block_table=bt, return_lse=True)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)


def test_cpu_split_partials_reuse_gives_the_same_bits():
    # The CPU split partials come from scratch kept between calls (not fresh memory each call):
    # a call after others that left different partials in it gives the bits it gave first.
    torch.manual_seed(0)

    def call(B, Sq, L):
        q = torch.randn(B, Sq, 8, 64)
        kc, vc = torch.randn(B, L + Sq, 2, 64), torch.randn(B, L + Sq, 2, 64)
        lens = torch.full((B,), L, dtype=torch.int32)
        return lambda: fastattn.attention_with_kvcache(q, kc, vc, lens, num_splits=7, return_lse=True)

    small, big = call(2, 3, 900), call(3, 5, 1300)
    first = small()
    big()
    for a, b in zip(first, small()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sq", [4, 24])
def test_cpu_fp32_long_cache_unsplit_error_is_torchs(sq):
    # One split over a long fp32 cache: each key block's P V is summed from zero and then added
    # to the running output (cpu_gemm.h, as pv_tile in csrc/cpu/decode.cpp); one FMA chain over
    # every key into that output was ~12x torch's fp32 error at a 64k cache, ~15x here. Compared with torch's
    # own error, no absolute slack (its masked path here; its unmasked single-query decode is
    # itself one chain, ~4x this kernel's error now).
    g = torch.Generator().manual_seed(sq)
    L = 16384
    q = torch.randn(1, sq, 4, 64, generator=g)
    kc = torch.randn(1, L, 1, 64, generator=g)
    vc = torch.rand(1, L, 1, 64, generator=g) + 0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = torch.arange(L)[None] <= torch.arange(sq)[:, None] + L - sq  # bottom-right causal
    qt, kt, vt = (t.transpose(1, 2) for t in (q, kc, vc))
    want = sdpa(qt.double(), kt.double(), vt.double(), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    theirs = sdpa(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    got = fastattn.attention_with_kvcache(q, kc, vc, torch.tensor([L], dtype=torch.int32), num_splits=1)
    ours = (got.double() - want).abs().max().item()
    theirs = (theirs.double() - want).abs().max().item()
    # ~2.7-3.3x remains on every CPU tier: the 512 block sums are added to the running output one
    # after another (with the online-softmax rescales), where torch's masked path adds fewer,
    # larger blocks.
    assert ours <= 5 * theirs, (ours, theirs)


def test_attention_with_kvcache_capacity_error_names_it():
    # The append inside attention_with_kvcache reports a full cache under the caller's name,
    # not append_kv's (which the user did not call); the caches are left unchanged.
    q, k = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 1, 16)
    kc, vc = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    with pytest.raises(ValueError, match=r"^fastattn\.attention_with_kvcache \(appending k, v\): appending 2 rows "
                                         r".*exceeds the cache capacity S_max = 4"):
        fastattn.attention_with_kvcache(q, kc, vc, 3, k=k, v=k)
    assert not kc.any() and not vc.any()


def test_attention_with_kvcache_check_capacity_flag():
    # check_capacity is append_kv's flag (False: no host read of cache_seqlens on CUDA); the CPU
    # checks anyway, and a non-bool is refused even without k / v.
    q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 1, 16)
    kc, vc = torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16)
    out = fastattn.attention_with_kvcache(q, kc, vc, 1, k=k, v=k, check_capacity=False)
    torch.testing.assert_close(kc[:, 1:3], k)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        fastattn.attention_with_kvcache(q, kc, vc, 3, k=k, v=k, check_capacity=False)
    with pytest.raises(TypeError, match="check_capacity"):
        fastattn.attention_with_kvcache(q, kc, vc, 3, check_capacity=1)


def test_append_kv_into_a_larger_cache_batch():
    # As attention_with_kvcache / decode_attention: a contiguous cache preallocated for a larger
    # batch than k's takes sequence b at row b and leaves the rows from B on alone; a smaller one
    # is still refused.
    kc, vc = torch.randn(5, 12, 2, 16), torch.randn(5, 12, 2, 16)
    k, v = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    lens = torch.tensor([4, 0], dtype=torch.int32)
    before_k, before_v = kc.clone(), vc.clone()
    fastattn.append_kv(kc, vc, k, v, lens)
    torch.testing.assert_close(kc[0, 4:7], k[0], rtol=0, atol=0)
    torch.testing.assert_close(vc[1, 0:3], v[1], rtol=0, atol=0)
    assert torch.equal(kc[2:], before_k[2:]) and torch.equal(vc[2:], before_v[2:])
    assert torch.equal(kc[0, :4], before_k[0, :4]) and torch.equal(kc[0, 7:], before_k[0, 7:])
    with pytest.raises(ValueError, match="k must be"):
        fastattn.append_kv(kc[:1], vc[:1], k, v, lens)


def test_appending_chunk_length_stays_symbolic():
    # The op typed seqlens_k_add (the appended chunk length Sn) as int: torch.compile(dynamic=True)
    # compiled one graph per chunk length and torch.export refused a dynamic Sq (outside audit).
    # SymInt now, as flash_attn_varlen_fwd's lengths.
    import torch._dynamo.testing
    from torch.export import Dim, export

    class Chunk(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, seqlens, k, v):
            return fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, causal=True)

    def inputs(sq):
        g = torch.Generator().manual_seed(sq)
        return (torch.randn(2, sq, 4, 16, generator=g), torch.randn(2, 32, 2, 16, generator=g),
                torch.randn(2, 32, 2, 16, generator=g), torch.tensor([5, 9], dtype=torch.int32),
                torch.randn(2, sq, 2, 16, generator=g), torch.randn(2, sq, 2, 16, generator=g))

    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(Chunk(), backend=counter, dynamic=True, fullgraph=True)
    for sq in (3, 4, 5, 6):
        a = inputs(sq)
        b = tuple(t.clone() for t in a)
        assert torch.equal(compiled(*a), Chunk()(*b))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # the same rows appended
    assert counter.frame_count == 1
    S = Dim("S", min=1, max=16)
    exported = export(Chunk(), inputs(3), dynamic_shapes=({1: S}, None, None, None, {1: S}, {1: S}))
    a = inputs(7)
    b = tuple(t.clone() for t in a)
    assert torch.equal(exported.module()(*a), Chunk()(*b))


def test_jit_trace_of_an_append_serves_other_chunk_lengths():
    # torch.jit.trace recorded the appended chunk length (an int argument) as a constant: a
    # trace of a decode step read one new row at every chunk length (silently wrong; audit).
    import warnings

    def step(q, k_cache, v_cache, seqlens, k, v):
        return fastattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, causal=True)

    def inputs(sq):
        g = torch.Generator().manual_seed(sq)
        return (torch.randn(2, sq, 4, 16, generator=g), torch.zeros(2, 32, 2, 16), torch.zeros(2, 32, 2, 16),
                torch.tensor([5, 9], dtype=torch.int32), torch.randn(2, sq, 2, 16, generator=g),
                torch.randn(2, sq, 2, 16, generator=g))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's generic warnings)
        traced = torch.jit.trace(step, inputs(1))
    for sq in (1, 4, 7):
        a = inputs(sq)
        b = tuple(t.clone() for t in a)
        assert torch.equal(traced(*a), step(*b))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("strict", [False, True])
def test_export_int_cache_seqlens_from_a_dynamic_dim(strict):
    # An int cache_seqlens taken from a cache's shape is a SymInt while torch.export traces:
    # non-strict export refused it ("must be a torch.Tensor, got SymInt"; audit).
    from torch.export import Dim, export

    class Step(torch.nn.Module):
        def forward(self, q, k_cache, v_cache):
            return fastattn.decode_attention(q, k_cache, v_cache, k_cache.shape[1])

    q = torch.randn(2, 4, 16)
    cap = Dim("cap", min=4, max=64)
    program = export(Step(), (q, torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)),
                     dynamic_shapes=(None, {1: cap}, {1: cap}), strict=strict)
    for n in (5, 50):
        k_cache, v_cache = torch.randn(2, n, 2, 16), torch.randn(2, n, 2, 16)
        assert torch.equal(program.module()(q, k_cache, v_cache), Step()(q, k_cache, v_cache))


@pytest.mark.parametrize("strict", [False, True])
def test_export_cache_batch_as_its_own_dim(strict):
    # A cache preallocated for a larger batch than q's (documented: sequence b is row b), both
    # batches dynamic dims: export refused it (a branch on cache batch > q batch; export audit).
    # The program serves every cache batch >= q's, appends in place, and refuses a smaller one.
    from torch.export import Dim, export

    class Step(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, k, v, lens):
            return fastattn.attention_with_kvcache(q, k_cache, v_cache, lens, k=k, v=v, causal=True)

    def inputs(B, cache_batch, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(B, 1, 4, 16, generator=g), torch.randn(cache_batch, 32, 2, 16, generator=g),
                torch.randn(cache_batch, 32, 2, 16, generator=g), torch.randn(B, 1, 2, 16, generator=g),
                torch.randn(B, 1, 2, 16, generator=g), torch.arange(B, dtype=torch.int32) + 20)

    B, CB = Dim("B", min=1, max=16), Dim("CB", min=1, max=16)
    program = export(Step(), inputs(2, 4, 0), dynamic_shapes=({0: B}, {0: CB}, {0: CB}, {0: B}, {0: B}, {0: B}),
                     strict=strict).module()
    for B_, CB_ in ((3, 8), (4, 4), (1, 16)):
        a, b = inputs(B_, CB_, B_), inputs(B_, CB_, B_)
        assert torch.equal(program(*a), Step()(*b))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # the same rows appended
    with pytest.raises(Exception, match=r"cache.size\(\)\[0\] >= q.size\(\)\[0\]"):  # the program's guard
        program(*inputs(4, 2, 0))
    # static shapes: a smaller cache batch gets the eager check's error
    with pytest.raises(ValueError if not strict else Exception, match="k_cache has batch 2 but q has batch 4"):
        export(Step(), inputs(4, 2, 0), strict=strict)


@pytest.mark.parametrize("call", ["append_kv", "attention_with_kvcache"])
def test_inference_tensor_cache_refused_before_any_write(call):
    # A cache made under torch.inference_mode() cannot be written outside it (torch refuses
    # in-place updates of inference tensors): refused before the kernel writes, the cache
    # unchanged (torch raised from the version bump after the rows were written).
    with torch.inference_mode():
        kc, vc = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)
    k, v = torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)
    lens = torch.tensor([0], dtype=torch.int32)
    run = (lambda: fastattn.append_kv(kc, vc, k, v, lens)) if call == "append_kv" else \
        (lambda: fastattn.attention_with_kvcache(torch.ones(1, 1, 1, 8), kc, vc, lens, k=k, v=v))
    with pytest.raises(RuntimeError, match=f"fastattn.{call}.*k_cache is an inference tensor"):
        run()
    assert not kc.any() and not vc.any()
    with torch.inference_mode():  # where it was made, it is writable
        run()
    assert torch.equal(kc[0, 0], k[0, 0]) and torch.equal(vc[0, 0], v[0, 0])


def test_seqlens_k_add_bounded():
    # cache_seqlens[b] + seqlens_k_add must not overflow (an int64 wrap made the call attend
    # to no key, where the documented clamp gives every cached key).
    q, kc = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 1, 8)
    lens = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqlens_k_add must be in \[0, 2\^31\), got 9223372036854775807"):
        torch.ops.fastattn.attention_with_kvcache(q, kc, kc, lens, None, None, -1, -1, 2 ** 63 - 1, 0, 0.0)
