"""The model's decode step vouches for its RoPE positions and cache rows on the host, so the
fastattn kernels run with check_positions=False / check_capacity=False (on CUDA each check
is a host sync per layer: ~96 per step of a 32-layer model). These tests check which
variants the model calls, that the host bound still catches a step past the end with a clear
error, and that a direct write to cache.seqlens makes the model re-read the lengths."""
import pytest
import torch

import fastattn
from fastattn.models import Llama, LlamaConfig

VOCAB = 32
LAYERS = 2


def _model(backend="fastattn", max_pos=64):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    return Llama(cfg, backend=backend).eval()


def _ids(B, S):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calls(monkeypatch):
    """Records the check flags of every fastattn.apply_rotary / append_kv call the model makes."""
    log = {"rotary": [], "append": []}
    real_rotary, real_append = fastattn.apply_rotary, fastattn.append_kv

    def rotary(*args, **kw):
        log["rotary"].append(kw.get("check_positions", True))
        return real_rotary(*args, **kw)

    def append(*args, **kw):
        log["append"].append(kw.get("check_capacity", True))
        return real_append(*args, **kw)

    monkeypatch.setattr(fastattn, "apply_rotary", rotary)
    monkeypatch.setattr(fastattn, "append_kv", append)
    return log


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_prefill_and_decode_skip_the_kernel_checks(calls, cache):
    model = _model()
    B, S = 2, 5
    model.setup_cache(B, S + 3, cache=cache, page_size=4)
    logits = model.prefill(_ids(B, S), torch.tensor([5, 3], dtype=torch.int32))
    for _ in range(3):
        logits = model.decode_step(logits.argmax(-1))
    # one call per layer: the prefill, then 3 decode steps, none of them checking
    assert calls["rotary"] == [False] * (4 * LAYERS)
    assert calls["append"] == [False] * (4 * LAYERS)
    assert model.cache.seqlens.tolist() == [8, 6]
    assert model.cache.known_max_seqlen() == 8


def test_decode_logits_unchanged_by_the_flags():
    # Same kernels, same math: the flags only drop the host-side checks.
    model = _model()
    ids = _ids(2, 6)
    ref = _model(backend="torch")
    for m in (model, ref):
        m.setup_cache(2, 9)
    out = [model.prefill(ids), ref.prefill(ids)]
    for _ in range(3):
        tok = out[1].argmax(-1)
        out = [model.decode_step(tok), ref.decode_step(tok)]
        torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["fastattn", "torch"])
@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_decode_past_capacity_is_a_clear_error(backend, cache):
    model = _model(backend)
    model.setup_cache(1, 6, cache=cache, page_size=3)
    logits = model.prefill(_ids(1, 4))
    for _ in range(2):  # rows 4 and 5: the cache is full
        logits = model.decode_step(logits.argmax(-1))
    k_before = torch.stack(model.cache.k)
    with pytest.raises(ValueError, match=r"decode past the end: a sequence already holds 6 tokens.*max_len = 6"):
        model.decode_step(logits.argmax(-1))
    # refused before any work: lengths and cache untouched
    assert model.cache.seqlens.tolist() == [6]
    assert torch.equal(torch.stack(model.cache.k), k_before)


def test_decode_past_the_rope_tables_is_a_clear_error():
    # A paged cache rounds its capacity up to whole pages: 16 rows for max_len 12, past the
    # 12 rows of the RoPE tables. The host bound catches position 12.
    model = _model(max_pos=12)
    model.setup_cache(1, 12, cache="paged", page_size=8)
    assert model.cache.max_len == 16
    logits = model.prefill(_ids(1, 10))
    for _ in range(2):  # positions 10 and 11
        logits = model.decode_step(logits.argmax(-1))
    with pytest.raises(ValueError, match="max_position_embeddings = 12"):
        model.decode_step(logits.argmax(-1))


def test_direct_seqlens_write_is_read_back_once(calls, monkeypatch):
    model = _model()
    cache = model.setup_cache(2, 10)
    logits = model.prefill(_ids(2, 4))
    assert cache.known_max_seqlen() == 4
    cache.seqlens.fill_(9)  # behind the model's back: the host bound no longer holds
    assert cache.known_max_seqlen() is None
    reads = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **kw: reads.append(1) or real_aminmax(t, *a, **kw))
    logits = model.decode_step(logits.argmax(-1))  # reads the lengths once: 9 + 1 fits
    assert len(reads) == 1 and cache.known_max_seqlen() == 10
    assert calls["append"][-LAYERS:] == [False] * LAYERS
    with pytest.raises(ValueError, match="already holds 10 tokens"):
        model.decode_step(logits.argmax(-1))  # known bound: no read
    assert len(reads) == 1
    cache.seqlens.copy_(torch.tensor([3, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache.seqlens must be >= 0, got a minimum of -1"):
        model.decode_step(logits.argmax(-1))
    cache.seqlens = torch.tensor([9, 9], dtype=torch.int32)  # a new tensor: not vouched for either
    assert cache.known_max_seqlen() is None


def test_inference_mode_cache_reads_lengths_each_step(calls):
    # Inference tensors have no version counter: the bound cannot be trusted across steps,
    # so each step reads the lengths once; the kernels still skip their per-layer checks.
    model = _model()
    with torch.inference_mode():
        model.setup_cache(1, 6)
        logits = model.prefill(_ids(1, 4))
        assert model.cache.known_max_seqlen() is None
        logits = model.decode_step(logits.argmax(-1))
        logits = model.decode_step(logits.argmax(-1))
        with pytest.raises(ValueError, match="already holds 6 tokens"):
            model.decode_step(logits.argmax(-1))
    assert calls["append"] == [False] * (3 * LAYERS)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_beam_search_keeps_the_bound(calls, cache):
    model = _model()
    out = model.generate(_ids(2, 4), 4, num_beams=2, cache=cache, page_size=2)
    assert out.shape[0] == 2
    assert calls["rotary"] and not any(calls["rotary"])
    assert calls["append"] and not any(calls["append"])
    assert model.cache.known_max_seqlen() is not None  # reorder_rows kept it


def test_prefill_rejects_bad_prompt_lengths():
    model = _model()
    model.setup_cache(2, 8)
    for bad in ([0, 3], [3, 6]):
        with pytest.raises(ValueError, match=r"prompt_lengths must hold 2 lengths in \[1, 5\]"):
            model.prefill(_ids(2, 5), torch.tensor(bad, dtype=torch.int32))


def test_hf_rotary_skips_the_position_check(monkeypatch):
    fa_hf = pytest.importorskip("fastattn.integrations.transformers")
    seen = []
    real = fastattn.apply_rotary

    def rotary(*args, **kw):
        seen.append(kw.get("check_positions", True))
        return real(*args, **kw)

    monkeypatch.setattr(fastattn, "apply_rotary", rotary)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    ang = torch.randn(2, 3, 4)
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    q2, k2 = fa_hf._hf_rotary_on_fastattn(q, k, cos, sin)
    assert seen == [False]

    def rotate_half(x):
        return torch.cat((-x[..., 4:], x[..., :4]), -1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    torch.testing.assert_close(q2, q * c + rotate_half(q) * s)
    torch.testing.assert_close(k2, k * c + rotate_half(k) * s)
