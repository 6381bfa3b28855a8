"""The reference LLaMA model on a paged KV cache: the same tokens as the contiguous cache for
every page size, pages allocated only as sequences grow, the allocator's bookkeeping, errors.

Tiny random models (hidden 64, 2 layers, vocab 128; no transformers needed). The fastattn
backend runs once this build has the paged kernels (fastattn.attention_with_kvcache);
before that its cases skip, and the torch backend (fastattn.reference) covers the paths."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fastattn import reference
from fastattn.models import Llama, LlamaConfig, PagedKVCache
from fastattn.models.llama import _append_kv, paged_kernels_available

from conftest import HAS_CUDA

VOCAB = 128
PAGE_SIZES = [1, 3, 16, 256]
# a skewed right-padded batch: one long prompt, short ones
LENGTHS = [29, 2, 15, 1, 7]

needs_paged_kernels = pytest.mark.skipif(not paged_kernels_available(),
                                         reason="this fastattn build has no paged-cache kernels yet")
BACKENDS = [pytest.param("fastattn", marks=needs_paged_kernels), "torch"]


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    base.update(kw)
    return LlamaConfig(**base)


def random_model(backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kw), backend=backend).eval()
    # larger weights than the 0.02 init: confident, varied greedy tokens, so a cache bug shows
    model.reset_parameters(std=0.15)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_norm.weight.add_(torch.randn(64) * 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


def with_backend(model, backend, dtype=torch.float32, device="cpu"):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    m.backend = backend
    return m


def skewed_batch(lengths=LENGTHS, seed=1, device="cpu"):
    S = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), S), generator=torch.Generator().manual_seed(seed))
    return ids.to(device), torch.tensor(lengths, device=device)


def pages_for(lengths, page_size):
    return sum(math.ceil(n / page_size) for n in lengths)


# ---- tokens: paged == contiguous ----------------------------------------------------------
@pytest.fixture(scope="module")
def contiguous_runs(model):
    """backend -> the contiguous-cache tokens of the skewed batch (computed once)."""
    runs = {}

    def get(backend):
        if backend not in runs:
            ids, lengths = skewed_batch()
            runs[backend] = with_backend(model, backend).generate(ids, 9, prompt_lengths=lengths,
                                                                  pad_token_id=VOCAB - 1)
        return runs[backend]

    return get


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_tokens_equal_contiguous_fp32(model, contiguous_runs, backend, page_size):
    m = with_backend(model, backend)
    ids, lengths = skewed_batch()
    contiguous = contiguous_runs(backend)
    paged = m.generate(ids, 9, prompt_lengths=lengths, pad_token_id=VOCAB - 1, cache="paged", page_size=page_size)
    assert isinstance(m.cache, PagedKVCache) and m.cache.page_size == page_size
    assert paged.shape == contiguous.shape == (len(LENGTHS), max(LENGTHS) + 9)
    assert torch.equal(paged, contiguous)
    # the new tokens vary (a model that always says the same token would hide a cache bug)
    for b, n in enumerate(LENGTHS):
        assert len(set(contiguous[b, n:n + 9].tolist())) >= 3
    assert m.cache.num_pages_used == pages_for([n + 8 for n in LENGTHS], page_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_with_attention_mask(model, contiguous_runs, backend):
    m = with_backend(model, backend)
    ids, lengths = skewed_batch()
    mask = (torch.arange(ids.shape[1]).view(1, -1) < lengths.view(-1, 1)).long()
    out = m.generate(ids, 9, attention_mask=mask, pad_token_id=VOCAB - 1, cache="paged", page_size=5)
    assert torch.equal(out, contiguous_runs(backend))
    assert m.cache.host_seqlens == [n + 8 for n in LENGTHS]


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_tokens_equal_one_by_one(model, backend):
    """Each sequence of the ragged paged batch gets what it gets alone, without a cache."""
    m = with_backend(model, backend)
    ids, lengths = skewed_batch()
    out = m.generate(ids, 6, prompt_lengths=lengths, cache="paged", page_size=4)
    with torch.no_grad():
        for b, n in enumerate(LENGTHS):
            seq = ids[b : b + 1, :n]
            for _ in range(6):
                seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(out[b, : n + 6], seq[0])


@pytest.mark.parametrize("page_size", [3, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_tokens_equal_contiguous_bf16(model, backend, page_size):
    m = with_backend(model, backend, dtype=torch.bfloat16)
    ids, lengths = skewed_batch()
    contiguous = m.generate(ids, 8, prompt_lengths=lengths)
    paged = m.generate(ids, 8, prompt_lengths=lengths, cache="paged", page_size=page_size)
    assert torch.equal(paged, contiguous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_eos_stops_like_contiguous(model, backend):
    m = with_backend(model, backend)
    ids, lengths = skewed_batch()
    free_run = m.generate(ids, 10, prompt_lengths=lengths)
    eos = int(free_run[1, LENGTHS[1] + 2])  # sequence 1 emits it at its third new token
    contiguous = m.generate(ids, 10, prompt_lengths=lengths, eos_token_id=eos)
    paged = m.generate(ids, 10, prompt_lengths=lengths, eos_token_id=eos, cache="paged", page_size=2)
    assert torch.equal(paged, contiguous)
    assert int(paged[1, LENGTHS[1] + 2]) == eos and (paged[1, LENGTHS[1] + 3:] == eos).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_logits_equal_contiguous_step_by_step(model, backend):
    """prefill, then decode_step on forced tokens: the same logits on both caches."""
    m = with_backend(model, backend)
    ids, lengths = skewed_batch()
    forced = torch.randint(0, VOCAB, (5, len(LENGTHS)), generator=torch.Generator().manual_seed(7))
    logits = {}
    for kind in ("contiguous", "paged"):
        m.setup_cache(len(LENGTHS), max(LENGTHS) + 5, cache=kind, page_size=3)
        steps = [m.prefill(ids, lengths.to(torch.int32))]
        steps += [m.decode_step(tok) for tok in forced]
        logits[kind] = torch.stack(steps)
        assert m.cache.seqlens.tolist() == [n + 5 for n in LENGTHS]
    assert (logits["paged"] - logits["contiguous"]).abs().max().item() <= 1e-5


# ---- memory: pages follow the tokens held ----------------------------------------------------
def test_pages_held_follow_the_tokens(model):
    m = with_backend(model, "torch")
    lengths, new, p = [40, 3, 5, 1], 6, 16
    ids, lens = skewed_batch(lengths)
    m.generate(ids, new, prompt_lengths=lens, cache="paged", page_size=p)
    cache = m.cache
    held = [n + new - 1 for n in lengths]  # the last new token is sampled, never appended
    assert cache.host_seqlens == held == cache.seqlens.tolist() == [45, 8, 10, 6]
    # pages = sum ceil(len_b / 16) = 3 + 1 + 1 + 1; the pool: sum ceil((len_b + 6 - 1) / 16) + the null page
    assert cache.num_pages_used == pages_for(held, p) == 6
    assert cache.num_pages == 1 + pages_for(held, p) == 7
    assert cache.num_pages_free == 0  # 7 - the null page - 6 held
    page_bytes = 2 * 2 * p * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 kv heads, head dim 16, fp32
    assert cache.page_bytes == page_bytes
    assert cache.bytes_used == 6 * page_bytes and cache.bytes_total == 7 * page_bytes
    # the contiguous cache holds B * max_len rows: 4 * (40 + 6 - 1) = 180 token rows against 6 * 16 = 96
    m.generate(ids, new, prompt_lengths=lens)
    contiguous = m.cache
    assert contiguous.k[0].shape[0] * contiguous.k[0].shape[1] == 180
    assert contiguous.bytes_total == 180 * page_bytes // p
    assert cache.num_pages_used * p == 96 < 180


def test_pages_allocated_only_at_page_boundaries(model):
    m = with_backend(model, "torch")
    lengths, p = [7, 1, 3], 3
    ids, lens = skewed_batch(lengths)
    cache = m.setup_cache(3, 7 + 8, cache="paged", page_size=p, max_lengths=[n + 8 for n in lengths])
    assert cache.num_pages == 1 + pages_for([15, 9, 11], p) == 1 + 5 + 3 + 4
    assert cache.block_table.shape == (3, 5) and cache.block_table.dtype == torch.int32
    m.prefill(ids, lens.to(torch.int32))
    assert cache.num_pages_used == pages_for(lengths, p) == 3 + 1 + 1
    used = [cache.num_pages_used]
    for _ in range(8):
        m.decode_step(torch.zeros(3, dtype=torch.long))
        used.append(cache.num_pages_used)
        assert cache.num_pages_used == pages_for(cache.host_seqlens, p)
    # lengths 7,1,3 -> 8,2,4 (seq 2 crosses 3) -> 9,3,5 -> 10,4,6 (seqs 0 and 1 cross 9 and 3)
    # -> 11,5,7 -> 12,6,8 -> 13,7,9 -> 14,8,10 -> 15,9,11: the whole pool, and never more
    assert used == [5, 6, 6, 8, 9, 9, 11, 12, 12]
    assert cache.num_pages_free == 0
    table = cache.block_table.tolist()
    owned = [table[b][: len(cache.pages[b])] for b in range(3)]
    assert owned == cache.pages
    flat = [pg for row in owned for pg in row]
    assert len(flat) == len(set(flat)) and 0 not in flat  # no page shared; the null page never handed out
    assert all(pg == 0 for b in range(3) for pg in table[b][len(cache.pages[b]):])  # unused -> null page
    # a fresh generate gives every page back first
    m.generate(ids, 1, prompt_lengths=lens, cache="paged", page_size=p)
    assert m.cache.num_pages_used == pages_for(lengths, p)


def test_paged_cache_reused_when_it_fits(model):
    m = with_backend(model, "torch")
    ids, lens = skewed_batch()
    first = m.generate(ids, 5, prompt_lengths=lens, cache="paged", page_size=4)
    cache = m.cache
    short = m.generate(ids[:, :3], 2, prompt_lengths=lens.clamp(max=3), cache="paged", page_size=4)
    assert m.cache is cache  # smaller run, same pool
    again = m.generate(ids, 5, prompt_lengths=lens, cache="paged", page_size=4)
    assert m.cache is cache and torch.equal(again, first)
    assert torch.equal(short, m.generate(ids[:, :3], 2, prompt_lengths=lens.clamp(max=3)))


def test_out_of_pages_and_too_long_are_clear_errors(model):
    m = with_backend(model, "torch")
    ids, lens = skewed_batch([4, 2])
    m.setup_cache(2, 8, cache="paged", page_size=2, max_lengths=[4, 2])  # 1 + 2 + 1 pages
    m.prefill(ids, lens.to(torch.int32))
    with pytest.raises(RuntimeError, match="out of pages"):
        m.decode_step(torch.zeros(2, dtype=torch.long))
    cache = PagedKVCache(1, 1, num_pages=10, page_size=2, max_pages_per_seq=2, num_kv_heads=1, head_dim=2,
                         dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="more than its 2 pages of 2"):
        cache.start([5])


# ---- the torch backend's paged write is the reference's ---------------------------------------
def test_paged_append_matches_reference():
    g = torch.Generator().manual_seed(3)
    B, Sn, Hk, D, p, pages = 3, 4, 2, 8, 3, 12
    table = torch.tensor([[5, 2, 9, 0], [1, 7, 0, 0], [11, 3, 4, 8]], dtype=torch.int32)
    start = torch.tensor([2, 0, 5], dtype=torch.int32)
    k, v = torch.randn(B, Sn, Hk, D, generator=g), torch.randn(B, Sn, Hk, D, generator=g)
    ours = [torch.zeros(pages, p, Hk, D) for _ in range(2)]
    theirs = [torch.zeros(pages, p, Hk, D) for _ in range(2)]
    _append_kv("torch", ours[0], ours[1], k, v, start, table)
    reference.append_kv(theirs[0], theirs[1], k, v, start, block_table=table)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    rows = reference.paged_rows(ours[0], table, 9)  # (B, 9, Hk, D)
    for b in range(B):
        s = int(start[b])
        assert torch.equal(rows[b, s : s + Sn], k[b])


# ---- argument errors -------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [0, -1, 1.5, True, "16"])
def test_bad_page_size(model, page_size):
    ids, lens = skewed_batch([3, 2])
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        model.generate(ids, 2, prompt_lengths=lens, cache="paged", page_size=page_size)
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        model.setup_cache(2, 8, cache="paged", page_size=page_size)


def test_bad_cache_kind(model):
    ids, _ = skewed_batch([3, 2])
    with pytest.raises(ValueError, match="cache must be one of"):
        model.generate(ids, 2, cache="ring")
    with pytest.raises(ValueError, match=r"max_lengths must hold 2 lengths in \[0, 8\]"):
        model.setup_cache(2, 8, cache="paged", max_lengths=[9, 1])


@pytest.mark.skipif(paged_kernels_available(), reason="this build has the paged kernels")
def test_fastattn_backend_without_paged_kernels_says_so(model):
    m = with_backend(model, "fastattn")
    ids, lens = skewed_batch([3, 2])
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        m.generate(ids, 2, prompt_lengths=lens, cache="paged")


def test_capture_decode_step_on_a_paged_cpu_cache_needs_cuda(model):
    m = with_backend(model, "torch")
    m.setup_cache(2, 8, cache="paged", page_size=4)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        m.capture_decode_step()


# ---- CUDA ------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_paged_equals_contiguous_and_graphs(backend, page_size):
    # head_dim 64: both CUDA attention kernels take it (flash 32..256, decode 64..256), not the
    # tiny model's 16. The fp32 run below has no CUDA attention kernel: the fastattn backend
    # runs its attention the torch way (llama._attention_kernels_take), and must still agree.
    model = random_model(head_dim=64)
    m = with_backend(model, backend, dtype=torch.bfloat16, device="cuda")
    ids, lengths = skewed_batch(device="cuda")
    contiguous = m.generate(ids, 12, prompt_lengths=lengths)
    paged = m.generate(ids, 12, prompt_lengths=lengths, cache="paged", page_size=page_size)
    assert torch.equal(paged, contiguous)
    graphed = m.generate(ids, 12, prompt_lengths=lengths, cache="paged", page_size=page_size, cuda_graph=True)
    assert torch.equal(graphed, paged)
    held = [n + 11 for n in LENGTHS]
    assert m.cache.host_seqlens == held == m.cache.seqlens.tolist()
    assert m.cache.num_pages_used == pages_for(held, page_size)
    m32 = with_backend(model, backend, device="cuda")
    assert torch.equal(m32.generate(ids, 9, prompt_lengths=lengths, cache="paged", page_size=page_size),
                       m32.generate(ids, 9, prompt_lengths=lengths))
