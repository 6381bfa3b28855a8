"""The paged KV cache and attention_with_kvcache, in GB/s of KV cache read (and % of the copy
bandwidth measured in the same run) or TFLOP/s for a chunked-prefill step.

test_decode_paged (op "decode_attention+paged"): fastattn.decode_attention over a page pool
    against itself over the contiguous cache holding the same tokens ("fastattn-contiguous"),
    so the speedup summary line of each page size is contiguous time / paged time (target:
    >= 0.87, paged within 15%). The batch: B = 8 sequences with ragged lengths drawn around
    4k (fixed seed, not multiples of the page size), H = 32 query heads, Hk = 8 (GQA), D = 128;
    page sizes 1, 16 and 256; the pool holds exactly the pages the batch needs, handed out in a
    shuffled order, so consecutive pages of a sequence are scattered through the pool. Bytes:
    the valid K and V rows, sum_b len_b * Hk * D * 2 * element size (q and out are negligible),
    the same for both layouts.

test_attention_with_kvcache: fastattn.attention_with_kvcache (Sq new queries per sequence over
    a cache of L = 4096 keys, bottom-right causal, no append: the keys are already cached), B = 8,
    H = 32, Hk = 8, D = 128, with Sq in 1, 4, 16, 128 on a contiguous cache ("/contiguous") and
    Sq 1 and 16 (all four on CUDA) on a shuffled page-16 pool ("/page16"); on the CPU the
    Sq = 128 rows use B = 2 so the suite stays minutes. Against
      sdpa: F.scaled_dot_product_attention(enable_gqa=True), as bench_decode, on the equivalent
          dense keys [0, L) (the cache itself, sliced; for the paged rows, the dense tensors the
          pool was filled from), with the bottom-right causal mask as a boolean attn_mask (its
          is_causal is top-left when Sq != Sk); Sq = 1 sees every key, so no mask there.
      fastattn-decode (Sq = 1 only): fastattn.decode_attention on the same cache, the kernel the
          Sq = 1 step must match (target: within 10%).
    Sq <= 16 is a decode-like step (op "attention_with_kvcache", GB/s of K and V read plus q
    read and out written): memory-bound on a GPU, but not on every CPU (at Sq = 16 a step
    does ~2 * Sq FLOP per K/V byte in fp32, above a CPU's FLOP-to-bandwidth balance of ~5:
    there its "% of copy" understates it; Sq = 16 fp32 runs near the GEMM rate). Sq = 128 is a chunked-prefill step (op
    "attention_with_kvcache+chunked_prefill"), reported in TFLOP/s (4 * d * h per visible
    (query, key) pair: sum over the Sq queries of L - Sq + 1 + i keys) with its GB/s recorded
    too; a separate op, so that its own plot panel is in TFLOP/s.
fp32 and bf16 on the CPU (as bench_decode), bf16 on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import fastattn

from fastattn.benchmarks.plugin import DEVICE, TINY

if TINY:
    # (B, min len, max len, H, Hk, D)
    DECODE_BATCHES = [(2, 40, 64, 4, 2, 32)]
    PAGE_SIZES = [1, 16, 256]
    DTYPES = [torch.float32]
    # (B, L, H, Hk, D)
    KV_SHAPES = [(2, 64, 4, 2, 32)]
    SQ_LAYOUTS = [(1, None), (4, None), (16, None), (1, 16), (4, 16)]  # (Sq, page size or None)
else:
    DECODE_BATCHES = [(8, 3584, 4608, 32, 8, 128)]
    PAGE_SIZES = [1, 16, 256]
    DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.bfloat16]
    KV_SHAPES = [(8, 4096, 32, 8, 128)]
    SQ_LAYOUTS = [(1, None), (4, None), (16, None), (128, None), (1, 16), (16, 16)]
    if DEVICE == "cuda":
        SQ_LAYOUTS += [(4, 16), (128, 16)]
# The chunked-prefill step (Sq = 128) on the CPU runs at batch 2 (its 4 * 8 * 128 * 4096 * 32 * 128
# FLOPs at batch 8 take seconds per call on a few cores: the suite must stay minutes).
CPU_CHUNKED_PREFILL_BATCH = 2
DECODE_IMPLS = ["fastattn", "fastattn-contiguous"]
KV_IMPLS = ["fastattn", "fastattn-decode", "sdpa"]
# Sq at or above this: a chunked-prefill step, reported in TFLOP/s (tiny: Sq = 16 takes that path)
CHUNKED_PREFILL_SQ = 16 if TINY else 64


def _dtype_id(d):
    return str(d).replace("torch.", "")


def _lengths(b, lo, hi):
    g = torch.Generator().manual_seed(0)
    return torch.randint(lo, hi + 1, (b,), generator=g).tolist()


def _paged_copy(kc, vc, lens, page_size):
    """A shuffled page pool holding rows [0, lens[b]) of the dense caches kc/vc (B, S, Hk, D):
    (k_pool, v_pool, block_table). The pool has exactly sum_b ceil(lens[b] / page_size) pages,
    handed out in a random order; unused block_table entries point at page 0."""
    B, _, hk, d = kc.shape
    npages = [-(-n // page_size) for n in lens]
    order = torch.randperm(sum(npages), generator=torch.Generator().manual_seed(2))
    table = torch.zeros(B, max(npages), dtype=torch.int64)
    k_pool = kc.new_zeros(sum(npages), page_size, hk, d)
    v_pool = vc.new_zeros(sum(npages), page_size, hk, d)
    start = 0
    for b, n in enumerate(lens):
        table[b, :npages[b]] = order[start:start + npages[b]]
        start += npages[b]
        t = torch.arange(n)
        pages, offs = table[b, t // page_size].to(kc.device), (t % page_size).to(kc.device)
        k_pool[pages, offs] = kc[b, :n]
        v_pool[pages, offs] = vc[b, :n]
    return k_pool, v_pool, table.to(device=kc.device, dtype=torch.int32)


def _decode_id(s):
    b, lo, hi, h, hk, d = s
    return f"b{b}-len{lo}..{hi}-h{h}-hk{hk}-d{d}"


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=lambda p: f"page{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("batch", DECODE_BATCHES, ids=_decode_id)
def test_decode_paged(bench, impl, page_size, dtype, batch):
    B, lo, hi, H, Hk, D = batch
    lens = _lengths(B, lo, hi)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    kc = torch.randn(B, max(lens), Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    vc = torch.randn(B, max(lens), Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    q = torch.randn(B, H, D, device=DEVICE, dtype=dtype, generator=gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    if impl == "fastattn":
        k_pool, v_pool, table = _paged_copy(kc, vc, lens, page_size)
        del kc, vc

        def fn():
            return fastattn.decode_attention(q, k_pool, v_pool, seqlens, block_table=table)
    else:
        def fn():
            return fastattn.decode_attention(q, kc, vc, seqlens)
    # Bytes that must move: the valid K and V rows, the same in both layouts.
    nbytes = 2 * sum(lens) * Hk * D * torch.finfo(dtype).bits // 8
    bench(fn, op="decode_attention+paged", impl=impl, shape=f"B{B}xS{lo}..{hi}xH{H}/{Hk}xD{D}/page{page_size}",
          dtype=dtype, bytes=nbytes, seqlens=lens, page_size=page_size)


def _kv_id(s):
    b, n, h, hk, d = s
    return f"b{b}-L{n}-h{h}-hk{hk}-d{d}"


def _sq_id(s):
    sq, page = s
    return f"sq{sq}-{'contiguous' if page is None else f'page{page}'}"


@pytest.mark.parametrize("impl", KV_IMPLS)
@pytest.mark.parametrize("sq_layout", SQ_LAYOUTS, ids=_sq_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", KV_SHAPES, ids=_kv_id)
def test_attention_with_kvcache(bench, impl, sq_layout, dtype, shape):
    B, L, H, Hk, D = shape
    Sq, page_size = sq_layout
    if Sq >= CHUNKED_PREFILL_SQ and DEVICE == "cpu" and not TINY:
        B = min(B, CPU_CHUNKED_PREFILL_BATCH)
    if impl == "fastattn-decode" and Sq != 1:
        pytest.skip("decode_attention takes one query per sequence: measured at Sq = 1 only")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    cap = L + max(Sq, 16)  # a cache with room for the step's own keys, as a generation loop has
    kc = torch.randn(B, cap, Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    vc = torch.randn(B, cap, Hk, D, device=DEVICE, dtype=dtype, generator=gen)
    q = torch.randn(B, Sq, H, D, device=DEVICE, dtype=dtype, generator=gen)
    seqlens = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
    if impl == "sdpa":
        # The equivalent dense keys [0, L), (B, Hk, L, D) views of the cache memory (for the
        # paged rows: the tensors the pool is filled from), (B, H, Sq, D) queries.
        q4, k4, v4 = q.transpose(1, 2), kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2)
        mask = None
        if Sq > 1:  # bottom-right causal: query i sees keys j <= L - Sq + i
            i = torch.arange(Sq, device=DEVICE).view(-1, 1)
            mask = torch.arange(L, device=DEVICE).view(1, -1) <= i + (L - Sq)

        def fn():
            return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, enable_gqa=True)
    else:
        kcache, vcache, table = kc, vc, None
        if page_size is not None:
            kcache, vcache, table = _paged_copy(kc, vc, [L] * B, page_size)
            del kc, vc
        if impl == "fastattn-decode":
            q3 = q[:, 0]

            def fn():
                return fastattn.decode_attention(q3, kcache, vcache, seqlens, block_table=table)
        else:
            def fn():
                return fastattn.attention_with_kvcache(q, kcache, vcache, seqlens, block_table=table, causal=True)
    layout = "contiguous" if page_size is None else f"page{page_size}"
    # Bytes that must move: the K and V rows [0, L), q read and out written.
    nbytes = 2 * B * L * Hk * D * torch.finfo(dtype).bits // 8 + 2 * q.nbytes
    extra = {}
    op = "attention_with_kvcache"
    if Sq >= CHUNKED_PREFILL_SQ:
        op += "+chunked_prefill"
        # visible (query, key) pairs: query i sees keys [0, L - Sq + i]
        extra["flops"] = 4 * B * H * D * (Sq * (L - Sq + 1) + Sq * (Sq - 1) // 2)
    bench(fn, op=op, impl=impl, shape=f"B{B}xL{L}xSq{Sq}xH{H}/{Hk}xD{D}/{layout}", dtype=dtype, bytes=nbytes,
          seqlen_q=Sq, page_size=page_size, **extra)
