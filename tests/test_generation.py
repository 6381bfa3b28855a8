"""Generation beyond greedy/sampling (fastattn.models.generation through Llama.generate):
beam search, repetition_penalty and min_new_tokens, each against transformers' generate
token for token on a tiny random fp32 Llama (and Mixtral), on both backends; the KV-cache
row reordering the beams run on; argument errors.

transformers is given an explicit all-ones attention_mask (it would otherwise mask every
prompt token equal to pad_token_id) and its ragged batches are left-padded, ours right-padded;
the comparison maps one layout onto the other."""
from __future__ import annotations

import pytest
import torch

from fastattn.models import KVCache, Llama, PagedKVCache
from fastattn.models import generation
from fastattn.models.llama import paged_kernels_available

from conftest import HAS_CUDA, tiny_llama_config

transformers = pytest.importorskip("transformers")

BACKENDS = ["fastattn", "torch"]
VOCAB = 128
PAD = VOCAB - 1
S = 7  # prompt width
NEW = 16


def hf_config(**overrides):
    return tiny_llama_config(VOCAB, **overrides)


def perturb_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):  # MoE routers: decisive
                p.normal_(0, 0.3)
    model.generation_config.eos_token_id = None  # only the eos ids a test passes
    return model.eval()


def ids_of(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, {backend: our model}) on the same tiny fp32 weights."""
    torch.manual_seed(0)
    hf = perturb_norms(transformers.LlamaForCausalLM(hf_config()))
    path = str(tmp_path_factory.mktemp("llama"))
    hf.save_pretrained(path)
    return hf, {b: Llama.from_pretrained(path, backend=b) for b in BACKENDS}


def theirs(hf, ids, mask=None, max_new_tokens=NEW, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=max_new_tokens, **kw)


def left_padded(ids, lengths):
    """Our right-padded ragged batch as transformers' left-padded one (+ its mask)."""
    B, W = ids.shape
    left = torch.full_like(ids, PAD)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        left[b, W - n:] = ids[b, :n]
        mask[b, W - n:] = 1
    return left, mask


def assert_same_as_left_padded(ours, hf_out, lengths, per_prompt=1, width=S):
    """ours: right-padded prompts then new tokens then PAD; hf_out: left-padded prompts of
    `width` then new tokens. Row r belongs to prompt r // per_prompt."""
    assert ours.shape == hf_out.shape, (ours.shape, hf_out.shape)
    for r in range(ours.shape[0]):
        n = lengths[r // per_prompt]
        new = hf_out[r, width:]
        assert torch.equal(ours[r, :n], hf_out[r, width - n:width]), r
        assert torch.equal(ours[r, n:n + new.numel()], new), (r, ours[r], hf_out[r])
        assert bool((ours[r, n + new.numel():] == PAD).all()), r


@pytest.fixture(scope="module")
def free_beams(llama):
    """Our 4-beam hypotheses without eos (all four per prompt): eos ids to pick from."""
    _, ours = llama
    return ours["torch"].generate(ids_of(2, S), NEW, num_beams=4, num_return_sequences=4, pad_token_id=PAD)


def eos_from(free, which):
    # token `step` of hypothesis `row`: one that a beam does emit, so hypotheses end early
    return [int(free[row, S + step]) for row, step in which]


BEAM_CASES = {
    "default": ([(1, 5), (6, 8)], dict(num_return_sequences=3)),
    "early_stopping_true": ([(0, 3), (5, 2)], dict(early_stopping=True, num_return_sequences=2)),
    "never_length_penalty_2": ([(6, 8)], dict(early_stopping="never", length_penalty=2.0, num_return_sequences=4)),
    "never_length_penalty_0": ([(4, 1)], dict(early_stopping="never", length_penalty=0.0)),
    "negative_length_penalty": ([(0, 3), (5, 2)], dict(length_penalty=-1.0, num_return_sequences=2)),
    "no_eos": ([], dict(num_return_sequences=2)),
}


# ---- beam search against transformers ------------------------------------------------------
@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_matches_transformers(llama, free_beams, case):
    hf, ours = llama
    which, kw = BEAM_CASES[case]
    eos = eos_from(free_beams, which) or None
    ids = ids_of(2, S)
    expected = theirs(hf, ids, num_beams=4, eos_token_id=eos, **kw)
    R = kw.get("num_return_sequences", 1)
    assert expected.shape[0] == 2 * R
    for backend in BACKENDS:
        out = ours[backend].generate(ids, NEW, num_beams=4, eos_token_id=eos, pad_token_id=PAD, **kw)
        assert torch.equal(out, expected), (backend, out, expected)
    if eos:  # some returned hypotheses ended at an eos id, padded after it
        ends = torch.isin(expected[:, S:], torch.tensor(eos))
        assert bool(ends.any())
        for r, at in ends.nonzero().tolist():
            assert bool((expected[r, S + at + 1:] == PAD).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_batch_of_one(llama, free_beams, backend):
    hf, ours = llama
    ids = ids_of(2, S)[:1]
    eos = eos_from(free_beams, [(0, 3)])
    expected = theirs(hf, ids, num_beams=4, eos_token_id=eos, num_return_sequences=2)
    out = ours[backend].generate(ids, NEW, num_beams=4, eos_token_id=eos, pad_token_id=PAD, num_return_sequences=2)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_ragged_matches_left_padded_transformers(llama, free_beams, backend):
    hf, ours = llama
    ids, lengths = ids_of(2, S), [S, 4]
    left, mask = left_padded(ids, lengths)
    eos = eos_from(free_beams, [(0, 3)])
    kw = dict(num_beams=4, eos_token_id=eos, num_return_sequences=2, repetition_penalty=1.3, min_new_tokens=3)
    expected = theirs(hf, left, mask, **kw)
    out = ours[backend].generate(ids, NEW, prompt_lengths=torch.tensor(lengths), pad_token_id=PAD, **kw)
    assert_same_as_left_padded(out, expected, lengths, per_prompt=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_paged_cache_same_tokens(llama, free_beams, backend):
    _, ours = llama
    model = ours[backend]
    if backend == "fastattn" and not paged_kernels_available():
        pytest.skip("this build has no paged-cache kernels for the fastattn backend")
    ids, lengths = ids_of(2, S), torch.tensor([S, 3])
    kw = dict(num_beams=4, num_return_sequences=4, eos_token_id=eos_from(free_beams, [(0, 3)]), pad_token_id=PAD,
              prompt_lengths=lengths)
    contiguous = model.generate(ids, NEW, **kw)
    paged = model.generate(ids, NEW, cache="paged", page_size=4, **kw)  # pages cross while beams swap
    assert torch.equal(paged, contiguous)
    cache = model.cache
    assert isinstance(cache, PagedKVCache) and cache.batch_size == 8
    assert cache.num_pages_used + cache.num_pages_free == cache.num_pages - 1  # no page lost or shared
    assert len({pg for row in cache.pages for pg in row}) == cache.num_pages_used


def test_beam_search_mixtral(tmp_path):
    """Beam search over mixture-of-experts blocks (the routing of each beam row on its own)."""
    if not hasattr(transformers, "MixtralForCausalLM"):
        pytest.skip("this transformers has no Mixtral")
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = perturb_norms(transformers.MixtralForCausalLM(cfg))
    hf.save_pretrained(str(tmp_path))
    ids = ids_of(2, S, seed=3)
    free = Llama.from_pretrained(str(tmp_path), backend="torch").generate(ids, NEW, num_beams=4,
                                                                         num_return_sequences=4)
    eos = [int(free[0, S + 4])]
    expected = theirs(hf, ids, num_beams=4, eos_token_id=eos, num_return_sequences=2)
    for backend in BACKENDS:
        out = Llama.from_pretrained(str(tmp_path), backend=backend).generate(
            ids, NEW, num_beams=4, eos_token_id=eos, pad_token_id=PAD, num_return_sequences=2)
        assert torch.equal(out, expected), backend


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_beam_search_cuda_graph_matches_eager(llama, backend):
    _, ours = llama
    model = ours[backend].to("cuda")
    try:
        ids = ids_of(2, S).cuda()
        kw = dict(num_beams=4, num_return_sequences=2, prompt_lengths=torch.tensor([S, 5], device="cuda"))
        assert torch.equal(model.generate(ids, NEW, cuda_graph=True, **kw), model.generate(ids, NEW, **kw))
    finally:
        model.to("cpu")
        model.cache = None


# ---- repetition_penalty and min_new_tokens (greedy) -----------------------------------------
GREEDY_IDS, GREEDY_LENGTHS = ids_of(2, S, seed=2), [S, 4]


@pytest.fixture(scope="module")
def greedy_cases(llama):
    """[(generate kwargs, transformers' left-padded output)], computed once for both backends;
    the eos id is one greedy emits at step 1, so min_new_tokens must hold it back."""
    hf, ours = llama
    plain = ours["torch"].generate(GREEDY_IDS, NEW, prompt_lengths=torch.tensor(GREEDY_LENGTHS), pad_token_id=PAD)
    eos = [int(plain[0, S + 1])]
    left, mask = left_padded(GREEDY_IDS, GREEDY_LENGTHS)
    cases = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7), dict(min_new_tokens=5, eos_token_id=eos),
             dict(repetition_penalty=1.5, min_new_tokens=3, eos_token_id=eos)]
    return plain, [(kw, theirs(hf, left, mask, **kw)) for kw in cases]


@pytest.mark.parametrize("backend", BACKENDS)
def test_repetition_penalty_and_min_new_tokens_greedy_match_transformers(llama, greedy_cases, backend):
    _, ours = llama
    plain, cases = greedy_cases
    pl = torch.tensor(GREEDY_LENGTHS)
    for kw, expected in cases:
        out = ours[backend].generate(GREEDY_IDS, NEW, prompt_lengths=pl, pad_token_id=PAD, **kw)
        assert_same_as_left_padded(out, expected, GREEDY_LENGTHS)
        assert out.shape != plain.shape or not torch.equal(out, plain), kw  # the option matters here
        if kw.get("min_new_tokens"):
            assert not set(kw["eos_token_id"]) & set(out[:, S:S + kw["min_new_tokens"]].flatten().tolist())


def test_repetition_penalty_rule():
    scores = torch.tensor([[2.0, -2.0, 0.0, 4.0, -1.0]])
    seen = torch.tensor([[True, True, True, False, False]])
    out = generation.repetition_penalty_(scores.clone(), seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 0.0, 4.0, -1.0]]
    ids = torch.tensor([[3, 1, 3, 0], [2, 2, 2, 2]])
    seen = generation.token_presence(ids, torch.tensor([3, 1]), 5)
    assert seen.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


def test_sampling_with_penalty_is_reproducible(llama):
    _, ours = llama
    model = ours["torch"]
    ids = ids_of(2, S)

    def run():
        g = torch.Generator().manual_seed(7)
        return model.generate(ids, 8, temperature=0.8, top_k=20, generator=g, repetition_penalty=1.2,
                              min_new_tokens=4, eos_token_id=[3])

    assert torch.equal(run(), run())


# ---- the cache rows the beams run on ------------------------------------------------------
def test_kv_cache_reorder_rows():
    torch.manual_seed(0)
    c = KVCache(2, 3, 5, 2, 4, torch.float32, "cpu")
    for kv in c.k + c.v:  # one tensor per layer
        kv.normal_()
    c.seqlens.copy_(torch.tensor([5, 3, 4], dtype=torch.int32))
    k, v = torch.stack(c.k), torch.stack(c.v)  # (layers, B, max_len, Hk, D)
    idx = torch.tensor([2, 2, 0])
    c.reorder_rows(idx)
    assert torch.equal(torch.stack(c.k), k[:, idx]) and torch.equal(torch.stack(c.v), v[:, idx])
    assert c.seqlens.tolist() == [4, 4, 5]
    storage = [t.data_ptr() for t in c.k]
    c.reorder_rows(torch.tensor([1, 0, 2]), upto=2)  # in place, only the first 2 rows of each
    assert [t.data_ptr() for t in c.k] == storage
    got = torch.stack(c.k)
    assert torch.equal(got[:, :, :2], k[:, idx][:, [1, 0, 2], :2]) and torch.equal(got[:, :, 2:], k[:, idx][:, :, 2:])
    c.reorder_rows(torch.tensor([0, 0, 1, 1, 2, 2]))  # expand: new storage of 6 rows
    assert c.batch_size == 6 and c.seqlens.tolist() == [4, 4, 4, 4, 5, 5]


def test_paged_kv_cache_reorder_rows_matches_contiguous():
    torch.manual_seed(0)
    p = PagedKVCache(1, 3, 16, 2, 4, 1, 2, torch.float32, "cpu")
    p.start([5, 3, 6])
    for kv in p.k + p.v:
        kv.normal_()
    p.seqlens.copy_(torch.tensor([5, 3, 6], dtype=torch.int32))

    def dense(c):  # (B, T) rows through the block table, each sequence's valid part
        return [c.k[0][c.block_table[b].long()].reshape(-1, 1, 2)[: c.host_seqlens[b]] for b in range(c.batch_size)]

    before = dense(p)
    used = p.num_pages_used
    p.reorder_rows(torch.tensor([2, 0, 2]))
    after = dense(p)
    assert p.host_seqlens == [6, 5, 6] and p.seqlens.tolist() == [6, 5, 6]
    for got, want in zip(after, [before[2], before[0], before[2]]):
        assert torch.equal(got, want)
    assert p.num_pages_used == used + 1  # row 1 went from 3 tokens (2 pages) to 5 (3 pages of its own)
    pages = [pg for row in p.pages for pg in row]
    assert len(pages) == len(set(pages))  # nothing shared
    with pytest.raises(ValueError, match="index out of"):
        p.reorder_rows(torch.tensor([0, 3, 1]))


def test_paged_kv_cache_expands_rows_to_beams():
    torch.manual_seed(0)
    p = PagedKVCache(1, 2, 6, 2, 4, 1, 2, torch.float32, "cpu")  # 5 usable pages: too few for 4 beams
    p.start([3, 2])
    p.k[0].normal_()
    p.seqlens.copy_(torch.tensor([3, 2], dtype=torch.int32))

    def dense(c):
        return [c.k[0][c.block_table[b].long()].reshape(-1, 1, 2)[: c.host_seqlens[b]] for b in range(c.batch_size)]

    before = dense(p)
    owned = list(p.pages[1])
    p.reorder_rows(torch.tensor([1, 1, 1]), max_lengths=[5, 5, 6])  # row 0 dropped, row 1 to 3 beams
    assert p.batch_size == 3 and p.host_seqlens == [2, 2, 2] and p.seqlens.tolist() == [2, 2, 2]
    assert p.pages[0] == owned  # the first beam takes the source's pages over, the others get copies
    for got in dense(p):
        assert torch.equal(got, before[1])
    assert p.num_pages == 1 + 3 + 3 + 3  # enlarged to hold every beam at its cap
    p.grow(4)  # to 6 tokens: 3 pages each, from the pool
    assert p.num_pages_free == 0 and len({pg for row in p.pages for pg in row}) == 9
    with pytest.raises(ValueError, match="max_lengths"):
        p.reorder_rows(torch.tensor([0, 1]), max_lengths=[1, 6])


# ---- argument errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(num_beams=0), "num_beams must be an int >= 1"),
    (dict(num_beams=2.0), "num_beams must be an int >= 1"),
    (dict(num_beams=2, temperature=0.7), "beam search .* is deterministic"),
    (dict(num_beams=2, top_k=5), "beam search .* is deterministic"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences must be an int in \[1, num_beams=2\]"),
    (dict(num_return_sequences=2), r"num_return_sequences must be an int in \[1, num_beams=1\]"),
    (dict(num_beams=2, early_stopping="always"), "early_stopping must be True, False or 'never'"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be a non-negative int"),
])
def test_generate_option_errors(llama, kw, match):
    _, ours = llama
    with pytest.raises(ValueError, match=match):
        ours["torch"].generate(ids_of(1, 3), 2, **kw)


def test_numpy_integer_options(llama):
    # The README's rule for integer arguments (Python and NumPy integers) holds for generate and
    # setup_cache too: the same tokens as with Python ints.
    np = pytest.importorskip("numpy")
    _, ours = llama
    model = ours["torch"]
    ids = ids_of(2, S)
    i = np.int64
    assert torch.equal(
        model.generate(ids, i(3), num_beams=i(2), num_return_sequences=i(2), min_new_tokens=i(1), page_size=i(4),
                       cache="paged"),
        model.generate(ids, 3, num_beams=2, num_return_sequences=2, min_new_tokens=1, page_size=4, cache="paged"))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(ids, 3, temperature=0.8, top_k=i(5), generator=g1),
                       model.generate(ids, 3, temperature=0.8, top_k=5, generator=g2))
    cache = model.setup_cache(i(2), np.int32(9))
    assert cache.batch_size == 2 and type(cache.batch_size) is int
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            model.setup_cache(bad, 9)
    model.cache = None


def test_zero_new_tokens_and_defaults(llama):
    _, ours = llama
    model = ours["torch"]
    ids = ids_of(2, S)
    assert torch.equal(model.generate(ids, 0, num_beams=3, num_return_sequences=2), ids.repeat_interleave(2, 0))
    # num_beams=1 with the new options at their defaults is the plain greedy path
    assert torch.equal(model.generate(ids, 4, repetition_penalty=1.0, min_new_tokens=0), model.generate(ids, 4))


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_generate_under_autocast(llama, cache):
    # An fp32 model under CPU autocast: the projections give bf16 k/v, so the cache holds bf16
    # (as transformers' caches); it was allocated fp32 and the append refused the dtypes.
    hf, ours = llama
    ids = ids_of(2, S)
    if cache == "paged" and not paged_kernels_available():
        pytest.skip("this build lacks the paged-cache kernels")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = {b: m.generate(ids, 6, cache=cache) for b, m in ours.items()}
        assert ours["fastattn"].cache.k[0].dtype == torch.bfloat16
        want = theirs(hf, ids, max_new_tokens=6)
    assert torch.equal(got["fastattn"], got["torch"]) and torch.equal(got["fastattn"], want)
    # Outside autocast the next generate sets up an fp32 cache again.
    assert torch.equal(ours["fastattn"].generate(ids, 2), theirs(hf, ids, max_new_tokens=2))
    assert ours["fastattn"].cache.k[0].dtype == torch.float32
