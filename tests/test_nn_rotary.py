"""fastattn.nn.RotaryEmbedding: tables, scaling and agreement with Hugging Face LLaMA."""
import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.nn.rotary import rotary_inv_freq

from conftest import ALL_DTYPES, DEVICES, assert_error_ratio

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
YARN_VARIANTS = {  # transformers' keys: the ramp's betas, truncate, and the attention factor's three sources
    "yarn": YARN,
    "yarn_betas_no_truncate": dict(YARN, beta_fast=16.0, beta_slow=2.0, truncate=False),
    "yarn_mscale": dict(YARN, factor=40.0, mscale=0.707, mscale_all_dim=1.0),
    "yarn_attention_factor": dict(YARN, factor=2.0, attention_factor=1.25),
}


def _hf_config(head_dim, theta, scaling, max_pos=16384):
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else dict(scaling, rope_theta=theta)
    params["rope_type"] = params.pop("type", params.get("rope_type"))
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=params)


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (128, 500000.0, LLAMA3),
        (64, 10000.0, dict(LLAMA3, factor=32.0, low_freq_factor=2.0, original_max_position_embeddings=4096)),
        (128, 10000.0, {"rope_type": "linear", "factor": 4.0}),
        (80, 10000.0, {"type": "linear", "factor": 2.0}),
    ],
)
def test_inv_freq_matches_transformers(head_dim, theta, scaling):
    cfg = _hf_config(head_dim, theta, scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    assert attention_factor == 1.0
    ours = rotary_inv_freq(head_dim, theta, scaling)
    torch.testing.assert_close(ours, hf_inv, rtol=1e-6, atol=0)
    mod = fastattn.nn.RotaryEmbedding(head_dim, 64, theta, scaling=scaling)
    torch.testing.assert_close(mod.inv_freq, hf_inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", list(YARN_VARIANTS))
@pytest.mark.parametrize("head_dim", [128, 96])
def test_yarn_tables_match_transformers(variant, head_dim):
    # YaRN: the inverse frequencies and the attention factor that multiplies cos / sin, bit for
    # bit as transformers' rotary embedding (max_position_embeddings = factor * original, as
    # YaRN checkpoints have it; a mismatch only makes transformers warn).
    scaling = YARN_VARIANTS[variant]
    cfg = _hf_config(head_dim, 1000000.0, scaling, max_pos=int(scaling["factor"] * 4096))
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    assert attention_factor != 1.0
    ours = fastattn.nn.RotaryEmbedding(head_dim, 512, 1000000.0, scaling=scaling)
    torch.testing.assert_close(ours.inv_freq, hf_inv, rtol=0, atol=0)
    hf_rope = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(0, 512 * 37, 37).view(1, -1) % 512
    cos, sin = hf_rope(torch.zeros(1), pos)
    torch.testing.assert_close(torch.cat([ours.cos[pos[0]]] * 2, -1), cos[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([ours.sin[pos[0]]] * 2, -1), sin[0], rtol=0, atol=0)


def test_yarn_length_written_as_a_float():
    a = fastattn.nn.RotaryEmbedding(64, 16, scaling=YARN)
    b = fastattn.nn.RotaryEmbedding(64, 16, scaling=dict(YARN, original_max_position_embeddings=4096.0))
    assert torch.equal(a.cos, b.cos) and torch.equal(a.sin, b.sin)


def test_default_inv_freq_matches_transformers():
    cfg = _hf_config(128, 10000.0, None)
    hf_inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    torch.testing.assert_close(rotary_inv_freq(128, 10000.0), hf_inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_matches_hf_llama_apply_rotary_pos_emb(device, dtype, scaling):
    B, S, H, Hk, D = 2, 17, 4, 1, 64
    theta = 500000.0
    cfg = _hf_config(D, theta, scaling)
    hf_rope = LlamaRotaryEmbedding(cfg).to(device)
    ours = fastattn.nn.RotaryEmbedding(D, 256, theta, scaling=scaling, device=device)
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype)
    pos = torch.stack([torch.arange(S), torch.arange(100, 100 + S)]).to(device)

    # HF: (B, heads, S, D) and full-width cos/sin (B, S, D) = cat(freqs, freqs), in q's dtype.
    cos_hf, sin_hf = hf_rope(q, pos)
    # Our tables hold the same fp32 values, half-width.
    cos32, sin32 = hf_rope(q.float(), pos)
    torch.testing.assert_close(torch.cat([ours.cos[pos]] * 2, -1), cos32, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([ours.sin[pos]] * 2, -1), sin32, rtol=0, atol=0)

    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    q2, k2 = ours(q, k, pos)
    true = reference.apply_rotary(q.double(), k.double(), ours.cos.double(), ours.sin.double(), pos)
    if dtype == torch.float32:
        torch.testing.assert_close(q2, q_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k2, k_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # HF in the low dtype is the "plain torch" answer of the error-ratio rule.
    assert_error_ratio(q2, q_hf.transpose(1, 2), true[0], "q")
    assert_error_ratio(k2, k_hf.transpose(1, 2), true[1], "k")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_partial_interleaved_and_growth(device):
    rope = fastattn.nn.RotaryEmbedding(32, max_position_embeddings=8, interleaved=True, device=device)
    assert rope.cos.shape == (8, 16) and rope.cos.dtype == torch.float32
    first_rows = rope.cos.clone()
    q = torch.randn(1, 20, 2, 48, device=device)
    k = torch.randn(1, 20, 1, 48, device=device)
    q2, k2 = rope(q, k)  # S = 20 > 8: the tables grow (doubling) to 32
    assert rope.cos.shape == (32, 16)
    assert torch.equal(rope.cos[:8], first_rows)  # already cached rows are bit-identical
    rq, rk = reference.apply_rotary(q, k, rope.cos, rope.sin, None, True)
    torch.testing.assert_close(q2, rq)
    torch.testing.assert_close(k2, rk)
    assert torch.equal(q2[..., 32:], q[..., 32:])

    # Positions beyond the cache: read on the CPU, or given as max_position.
    pos = torch.arange(90, 110, device=device)
    if device == "cpu":
        rope(q, k, pos)
        assert rope.cos.shape[0] >= 110
    rope2 = fastattn.nn.RotaryEmbedding(32, 8, interleaved=True, device=device)
    q3, _ = rope2(q, k, pos, max_position=110)
    assert rope2.cos.shape == (128, 16)
    torch.testing.assert_close(q3, reference.apply_rotary(q, k, rope2.cos, rope2.sin, pos, True)[0])


def test_dtype_cast_keeps_fp32_tables():
    rope = fastattn.nn.RotaryEmbedding(16, 32)
    ref_cos = rope.cos.clone()
    rope.to(torch.bfloat16)  # casts floating buffers; forward rebuilds them in fp32
    q, k = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16), torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    # The buffers stay fp32 right after the cast (the documented contract: apply_rotary takes
    # fp32 tables only; before, they were bf16 until the next forward rebuilt them).
    for name in ("inv_freq", "cos", "sin"):
        assert getattr(rope, name).dtype == torch.float32, name
    assert torch.equal(rope.cos, ref_cos)
    fastattn.apply_rotary(q, k, rope.cos, rope.sin)
    q2, _ = rope(q, k)
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, ref_cos)
    assert q2.dtype == torch.bfloat16
    assert rope.state_dict() == {}
    rope.half()
    assert rope.sin.dtype == torch.float32 and torch.equal(rope.sin, fastattn.nn.RotaryEmbedding(16, 32).sin)


def test_rope_theta_from_the_scaling_dict():
    """transformers 5's rope_parameters (what config.rope_scaling returns there) carry
    rope_theta: with base left out it is the dict's (it was ignored: base 10000), and a base
    that disagrees is refused."""
    for scaling in (dict(LLAMA3, rope_theta=500000.0), {"rope_type": "default", "rope_theta": 1e6}):
        theta = scaling["rope_theta"]
        want = fastattn.nn.RotaryEmbedding(64, 128, theta, scaling=scaling.get("rope_type") == "llama3" and LLAMA3 or None)
        got = fastattn.nn.RotaryEmbedding(64, 128, scaling=scaling)
        assert got.base == theta and torch.equal(got.inv_freq, want.inv_freq) and torch.equal(got.cos, want.cos)
        assert fastattn.nn.RotaryEmbedding(64, 128, theta, scaling=scaling).base == theta  # agreeing: fine
        with pytest.raises(ValueError, match="disagrees with the scaling dict's rope_theta"):
            fastattn.nn.RotaryEmbedding(64, 128, 10000.0, scaling=scaling)
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    ours = fastattn.nn.RotaryEmbedding(64, 128, scaling=cfg.rope_parameters)
    assert torch.equal(ours.inv_freq, LlamaRotaryEmbedding(cfg).inv_freq)
    with pytest.raises(ValueError, match="rope_theta"):
        fastattn.nn.RotaryEmbedding(64, scaling={"rope_type": "default", "rope_theta": -1.0})
    assert fastattn.nn.RotaryEmbedding(64, 16, torch.tensor(5e5)).base == 5e5  # a 0-d tensor, as before


def test_numpy_integer_sizes():
    np = pytest.importorskip("numpy")
    rope = fastattn.nn.RotaryEmbedding(np.int64(32), np.int32(64))
    assert rope.dim == 32 and type(rope.dim) is int and rope.cached_positions == 64
    assert torch.equal(rope.cos, fastattn.nn.RotaryEmbedding(32, 64).cos)


def test_inplace_forward():
    rope = fastattn.nn.RotaryEmbedding(16, 32)
    q, k = torch.randn(2, 4, 2, 16), torch.randn(2, 4, 1, 16)
    expect = rope(q, k)
    out = rope(q, k, inplace=True)
    assert out[0] is q and torch.equal(q, expect[0]) and torch.equal(k, expect[1])


def test_extra_repr():
    rope = fastattn.nn.RotaryEmbedding(64, 1024, 500000.0, scaling=LLAMA3)
    text = repr(rope)
    assert "dim=64" in text and "max_position_embeddings=1024" in text and "base=500000.0" in text
    assert "interleaved=False" in text and "'rope_type': 'llama3'" in text


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_module(device):
    torch._dynamo.reset()
    rope = fastattn.nn.RotaryEmbedding(64, 64, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, pos):
        q2, k2 = rope(q, k, pos)
        return q2.sum() + k2.sum()

    q = torch.randn(2, 9, 4, 64, device=device, requires_grad=True)
    k = torch.randn(2, 9, 1, 64, device=device, requires_grad=True)
    pos = torch.arange(3, 12, device=device)
    out = f(q, k, pos)
    torch.testing.assert_close(out, sum(t.sum() for t in rope(q, k, pos)))
    out.backward()
    assert q.grad is not None and k.grad is not None


def test_tables_grow_inside_fullgraph_compile():
    # growth under torch.compile(fullgraph=True) (the documented max_position route) failed:
    # the inference-mode test in _build is not traceable
    rope = fastattn.nn.RotaryEmbedding(16, max_position_embeddings=8)
    q, k = torch.randn(1, 16, 2, 16), torch.randn(1, 16, 2, 16)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, p: rope(a, b, p, max_position=40), fullgraph=True, backend="eager")
    pos = torch.arange(16) + 20
    got = f(q, k, pos)
    want = fastattn.nn.RotaryEmbedding(16, max_position_embeddings=64)(q, k, pos)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # (tables traced: may differ by an ulp)


def test_export_with_dynamic_seqlen_and_batch_positions():
    # (B, S) positions compared against (S,) as whole shapes made export guard S != B, and a
    # dynamic S whose range holds B failed with a constraint violation
    from torch.export import Dim

    class Rot(torch.nn.Module):
        def forward(self, q, k, cos, sin, pos):
            return fastattn.apply_rotary(q, k, cos, sin, positions=pos)

    rope = fastattn.nn.RotaryEmbedding(16, max_position_embeddings=64)
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
    s = Dim("s", min=2, max=32)
    pos = torch.arange(8).expand(2, 8).contiguous()
    ep = torch.export.export(Rot(), (q, k, rope.cos, rope.sin, pos), dynamic_shapes=({1: s}, {1: s}, None, None, {1: s}))
    q2, k2, pos2 = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 2, 16), torch.tensor([[3, 4], [5, 6]])
    for a, b in zip(ep.module()(q2, k2, rope.cos, rope.sin, pos2), fastattn.apply_rotary(q2, k2, rope.cos, rope.sin,
                                                                                       positions=pos2)):
        assert torch.equal(a, b)


def test_compile_default_positions_one_graph():
    # With positions=None the sequence length stays symbolic: one graph for every length (the
    # error message of the table check used to format S, which made torch.compile specialise
    # on it: a graph per length, and mark_dynamic refused)
    torch._dynamo.reset()
    rope = fastattn.nn.RotaryEmbedding(16, 64)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda q, k: rope(q, k), backend=count, dynamic=True, fullgraph=True)
    for s in (5, 9, 17):
        q, k = torch.randn(1, s, 2, 16), torch.randn(1, s, 1, 16)
        for got, want in zip(f(q, k), rope(q, k)):
            assert torch.equal(got, want)
    assert len(graphs) == 1


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim=63), ValueError, "dim \\(the rotary width\\) must be a positive even integer"),
        (dict(dim=0), ValueError, "positive even integer"),
        (dict(dim=64, max_position_embeddings=0), ValueError, "max_position_embeddings must be a positive integer"),
        (dict(dim=64, base=-1.0), ValueError, "base must be > 0"),
        (dict(dim=64, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
         "unsupported scaling rope_type 'dynamic'"),
        (dict(dim=64, scaling={"rope_type": "yarn", "factor": 2.0}), ValueError,
         "'yarn' needs 'original_max_position_embeddings'"),
        (dict(dim=64, scaling={"rope_type": "yarn", "original_max_position_embeddings": 64}), ValueError,
         "'yarn' needs 'factor'"),
        (dict(dim=64, scaling=dict(YARN, beta_fast="32")), ValueError, "'beta_fast' must be a finite number"),
        (dict(dim=64, scaling=dict(YARN, truncate=1)), ValueError, "'truncate' must be a bool"),
        (dict(dim=64, scaling=dict(YARN, beta_fast=-2.0)), ValueError, "'beta_fast' must be >= 0"),
        (dict(dim=64, scaling={"factor": 2.0}), ValueError, "'rope_type' \\(or 'type'\\)"),
        (dict(dim=64, scaling={"rope_type": "linear"}), ValueError, "needs 'factor'"),
        (dict(dim=64, scaling={"rope_type": "llama3", "factor": 8.0}), ValueError, "needs 'low_freq_factor'"),
        (dict(dim=64, scaling=dict(LLAMA3, low_freq_factor=4.0)), ValueError, "high_freq_factor > low_freq_factor"),
        (dict(dim=64, scaling="llama3"), TypeError, "scaling must be a dict"),
    ],
)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastattn.nn.RotaryEmbedding(**kwargs)


def test_bad_forward_input():
    rope = fastattn.nn.RotaryEmbedding(64, 16)
    q, k = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    with pytest.raises(ValueError, match="rotary dim R = 2 \\* cos.shape\\[1\\] = 64 exceeds the head dim D = 32"):
        rope(q, k)
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        rope(q, k, torch.arange(4).float())


# ---- issue 13: bounded table growth, clear errors for bad positions ------------------------
def test_table_growth_is_bounded():
    rope = fastattn.nn.RotaryEmbedding(8, 16)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8)
    limit = fastattn.nn.RotaryEmbedding.max_positions
    assert limit == 2**24
    # Used to try to build a 2**41-row table (terabytes) or, at 2**28, silently tens of GB.
    for p in (2**40, 2**28, limit):
        with pytest.raises(ValueError, match=rf"positions: the largest position asked for is {p} .* at most {limit}"):
            rope(q, k, torch.tensor([p]))
        with pytest.raises(ValueError, match=rf"max_position = {p + 1} .* at most {limit}"):
            rope(q, k, torch.tensor([0]), max_position=p + 1)
    assert rope.cached_positions == 16  # nothing was built
    # The bound is a class attribute, overridable per instance; doubling stops at it.
    rope.max_positions = 100
    rope(q, k, torch.tensor([99]))
    assert rope.cached_positions == 100
    with pytest.raises(ValueError, match="positions: the largest position asked for is 100 .* at most 100"):
        rope(q, k, torch.tensor([100]))
    with pytest.raises(ValueError, match=r"positions \(default arange\(S\), S = 101\) .* at most 100"):
        rope(torch.randn(1, 101, 2, 8), torch.randn(1, 101, 1, 8))
    with pytest.raises(ValueError, match="max_position_embeddings = 200 exceeds .* at most 100"):
        type("Small", (fastattn.nn.RotaryEmbedding,), {"max_positions": 100})(8, 200)


def test_bad_positions_named():
    rope = fastattn.nn.RotaryEmbedding(8, 16)
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match=r"positions must be >= 0, got a minimum of -3"):
        rope(q, k, torch.tensor([-3, 40]))
    with pytest.raises(ValueError, match="positions must be int32 or int64, got torch.float32"):
        rope(q, k, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="positions must be int32 or int64, got torch.complex64"):
        rope(q, k, torch.tensor([1j, 2j]))
    with pytest.raises(TypeError, match="positions must be a torch.Tensor"):
        rope(q, k, [0, 1])
    for bad in (2.5, "9", True, [3]):
        with pytest.raises(TypeError, match="max_position must be an int"):
            rope(q, k, torch.tensor([0, 1]), max_position=bad)
    with pytest.raises(ValueError, match="max_position must be >= 0, got -1"):
        rope(q, k, torch.tensor([0, 1]), max_position=-1)
    assert rope.cached_positions == 16


def test_forward_passes_check_positions(monkeypatch):
    import fastattn.nn.rotary as nn_rotary

    seen = []
    real = nn_rotary.F.apply_rotary

    def apply_rotary(*args, **kw):
        seen.append(kw["check_positions"])
        return real(*args, **kw)

    monkeypatch.setattr(nn_rotary.F, "apply_rotary", apply_rotary)
    rope = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=16)
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    pos = torch.tensor([2, 5, 7])
    a = rope(q, k, pos)
    b = rope(q, k, pos, check_positions=False)
    assert seen == [True, False]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_meta_then_to_empty_rebuilds_the_tables():
    # Built on the meta device (a large model's usual first step), then materialised with
    # to_empty(): the non-persistent cos/sin tables came back as uninitialised memory and were
    # used as is (outputs ~1e25 off); they are rebuilt from the configuration, and
    # reset_parameters() rebuilds them on demand (what FSDP-style initialisation calls).
    torch.manual_seed(0)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    fresh = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=16)
    with torch.device("meta"):
        rope = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=16)
    rope.to_empty(device="cpu")
    assert torch.equal(rope.cos, fresh.cos) and torch.equal(rope.sin, fresh.sin)
    for a, b in zip(rope(q, k), fresh(q, k)):
        assert torch.equal(a, b)
    rope.cos.fill_(3.0)
    rope.reset_parameters()
    assert torch.equal(rope.cos, fresh.cos)


def test_shared_module_grows_its_tables_safely_across_threads():
    # One module shared by threads (a server's model): while one call grows the tables, another
    # that needs only the cached rows read a new cos with the old sin in between the two
    # assignments ("sin must have cos's shape"). Each call now uses one consistent pair.
    import threading

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    want = fastattn.nn.RotaryEmbedding(64, max_position_embeddings=4)(q, k)
    errors, wrong = [], []
    for _ in range(6):
        rope = fastattn.nn.RotaryEmbedding(64, max_position_embeddings=4)
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    got = rope(q, k)
                except ValueError as e:
                    errors.append(str(e))
                    continue
                if not all(torch.equal(a, b) for a, b in zip(got, want)):
                    wrong.append(1)

        t = threading.Thread(target=reader)
        t.start()
        rope(q[:, :1], k[:, :1], positions=torch.tensor([1 << 16]))  # grows the tables
        stop.set()
        t.join()
    assert not errors and not wrong, (len(errors), errors[:1], len(wrong))


def test_functional_call_substitutes_the_tables():
    # torch.func.functional_call / stack_module_state swap the module's buffers: forward must use
    # the substituted cos / sin (a cos of ones and a sin of zeros rotate by nothing).
    rope = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=16)
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    tables = {"cos": torch.ones(16, 4), "sin": torch.zeros(16, 4), "inv_freq": rope.inv_freq}
    out_q, out_k = torch.func.functional_call(rope, tables, (q, k))
    assert torch.equal(out_q, q) and torch.equal(out_k, k)
    assert not torch.equal(rope(q, k)[0], q)


def test_tables_built_under_inference_mode_are_ordinary():
    # A module made or grown under torch.inference_mode (generation past its tables) keeps
    # ordinary tensors, so later training steps neither fail nor copy the tables each call.
    with torch.inference_mode():
        m = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=4)
        x = torch.randn(1, 10, 2, 8)
        m(x, x)
    assert m.cached_positions >= 10
    assert not (m.cos.is_inference() or m.sin.is_inference() or m.inv_freq.is_inference())
    q = torch.randn(1, 10, 2, 8, requires_grad=True)
    q_rot, _ = m(q, torch.randn(1, 10, 2, 8))
    q_rot.sum().backward()
    assert q.grad is not None


def test_non_reentrant_checkpoint_with_table_growth():
    # The op saves the tables for backward: they must be this call's rows only, or a
    # recomputation after later calls grew the tables saves a bigger table and torch's
    # non-reentrant checkpoint refuses the metadata mismatch.
    from torch.utils.checkpoint import checkpoint

    def loss(rope, q1, k1, q2, k2):
        a, _ = rope(q1, k1)  # 20 positions: the tables grow 16 -> 32 rows
        b, _ = rope(q2, k2, torch.arange(100).flip(0), max_position=100)  # -> 128 rows
        return a.square().sum() + b.square().sum()

    torch.manual_seed(0)
    q1, k1 = torch.randn(1, 20, 2, 64, requires_grad=True), torch.randn(1, 20, 1, 64)
    q2, k2 = torch.randn(1, 100, 2, 64, requires_grad=True), torch.randn(1, 100, 1, 64)
    want = torch.autograd.grad(loss(fastattn.nn.RotaryEmbedding(64, max_position_embeddings=16), q1, k1, q2, k2),
                               (q1, q2))
    rope = fastattn.nn.RotaryEmbedding(64, max_position_embeddings=16)
    got = torch.autograd.grad(checkpoint(loss, rope, q1, k1, q2, k2, use_reentrant=False), (q1, q2))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_max_position_zero_bounds_like_any_other():
    # max_position is an exclusive bound of the positions: 1 refused position 5, 0 passed it
    # through to the whole table (review).
    rope = fastattn.nn.RotaryEmbedding(8, max_position_embeddings=16)
    q = torch.randn(1, 1, 2, 8)
    for bound in (0, 1):
        with pytest.raises(ValueError, match="positions must lie in"):
            rope(q, q, torch.tensor([5]), max_position=bound)
    empty = torch.randn(1, 0, 2, 8)
    assert rope(empty, empty, torch.zeros(1, 0, dtype=torch.long), max_position=0)[0].shape == empty.shape
