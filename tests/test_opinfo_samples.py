"""fastattn's drop-ins against torch's own OpInfo / ModuleInfo sample inputs.

torch's test suite describes each op with an OpInfo (torch.testing._internal.
common_methods_invocations.op_db) whose ``sample_inputs`` / ``error_inputs`` are the inputs
its own tests run. For every op fastattn claims to replace, each sample (every dtype the
OpInfo lists for the CPU, with and without requires_grad, and the OpInfo's non-contiguous
variant of it) goes through torch's op and ours with the same arguments:

* ``nn.functional.scaled_dot_product_attention`` -> ``fastattn.scaled_dot_product_attention``
  (same signature);
* ``nn.functional.rms_norm`` -> ``fastattn.rms_norm`` (its signature normalises the last dim:
  ``rms_norm(x, weight=None, eps=1e-6)``, so the call is translated: the normalized dims of x
  and weight are flattened, and torch's default ``eps=None`` is passed explicitly) and
  ``fastattn.nn.RMSNorm`` (same constructor as ``torch.nn.RMSNorm``);
* ModuleInfo ``torch.nn.RMSNorm`` (common_modules.module_db) -> ``fastattn.nn.RMSNorm``
  (its dtypes plus fp16/bf16);
* the nested-jagged OpInfo of ``nn.functional.rms_norm`` (opinfo/definitions/nested.py,
  njt_op_db) -> both rms_norm drop-ins (SDPA's NJT OpInfo has no samples; jagged batches
  of the OpInfo's shapes are built here instead).

Besides the OpInfo's own samples: those its SDPA sample function builds or loops over but
does not yield (a value head dim != E, enable_gqa=True), a few argument errors of torch's
SDPA (its OpInfo has no error_inputs), torch's default eps at a mean square below it, and
``torch.library.opcheck`` of the kernel ops on the samples' shapes.

Required: torch's output shape and dtype (and, for SDPA, torch's output strides: the README
promises query's layout), values agreeing (fp32/fp64 within torch's tolerances; fp16/bf16 by
the error-ratio rule of docs/DESIGN.md against a float64 run of torch's op, or within torch's
default tolerances of torch's result), the same gradients, and bit-identical results where
fastattn hands the call to torch (dropout, attn_mask, non-4-D / broadcast / nested inputs,
fp64 and complex). For error inputs, ours raises ValueError/RuntimeError/TypeError as torch
raises. Test ids carry a description of the sample (dtype, index, shapes, arguments).
"""
from __future__ import annotations

import functools
import math
import sys
import types
import unittest

import pytest
import torch
import torch.nn.functional as F

import fastattn

from conftest import assert_error_ratio


def _load_torch_testing():
    """op_db and module_db. torch.testing._internal imports `expecttest` (a torch developer
    dependency, not installed with torch); a stand-in that provides the one name the import
    needs is used when it is missing. The import freezes torch.backends' global flags
    (common_utils calls disable_global_flags()) and loads a hypothesis profile of torch's;
    both are undone so other test files in the same session see what they would without it."""
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
            stub.ACCEPT = False
            sys.modules["expecttest"] = stub
    frozen = torch.backends.flags_frozen()
    try:
        import hypothesis
    except ImportError:
        hypothesis = None
    profile = getattr(getattr(hypothesis, "settings", None), "get_current_profile_name", lambda: None)()
    try:
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
    finally:
        if not frozen and torch.backends.flags_frozen():
            # (the flag is a global of the module that defines flags_frozen)
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        if profile is not None:  # common_utils also loads a hypothesis profile of its own
            hypothesis.settings.load_profile(profile)
    return op_db, module_db


try:
    _OP_DB, _MODULE_DB = _load_torch_testing()
except Exception as exc:  # pragma: no cover - a torch build without its testing package
    pytest.skip(f"torch.testing._internal's OpInfo database is not importable: {exc!r}", allow_module_level=True)


def _opinfo(name: str):
    found = [op for op in _OP_DB if op.name == name and op.variant_test_name == ""]
    assert len(found) == 1, f"OpInfo {name!r}: {len(found)} entries"
    return found[0]


SDPA = _opinfo("nn.functional.scaled_dot_product_attention")
RMS = _opinfo("nn.functional.rms_norm")
RMS_MODULE = [m for m in _MODULE_DB if m.module_cls is torch.nn.RMSNorm][0]

_DTYPE_NAMES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.complex64: "c64", torch.complex128: "c128",
}
_LOW = (torch.float16, torch.bfloat16)
_SAMPLE_SEED = 1234


def _dtypes(info):
    return sorted(info.supported_dtypes("cpu"), key=str)


# ---- describing samples (test ids) ------------------------------------------------------
def _desc_value(v) -> str:
    if isinstance(v, torch.Tensor):
        return "T" + "x".join(map(str, v.shape)) if v.dim() else "T()"
    if isinstance(v, (tuple, list, torch.Size)):
        return "(" + ",".join(_desc_value(e) for e in v) + ")"
    return repr(v)


def _describe(sample, names) -> str:
    parts = [f"{n}={_desc_value(a)}" for n, a in zip(names, (sample.input,) + tuple(sample.args))]
    parts += [f"{k}={_desc_value(v)}" for k, v in sample.kwargs.items()]
    if sample.name:
        parts.append(sample.name)
    return ",".join(parts).replace(" ", "")


_SAMPLE_CACHE = {}


def _samples(info, dtype, requires_grad):
    # Generated once per (op, dtype, requires_grad): sample_inputs inspects the call stack
    # (~0.1 s a call). The tests never modify a sample (gradients come from autograd.grad).
    key = (id(info), dtype, requires_grad)
    if key not in _SAMPLE_CACHE:
        torch.manual_seed(_SAMPLE_SEED)
        _SAMPLE_CACHE[key] = tuple(info.sample_inputs("cpu", dtype, requires_grad=requires_grad))
    return list(_SAMPLE_CACHE[key])


def _params(info, names, extra=None):
    """One pytest param per (dtype, sample index), with the sample's description in its id."""
    out = []
    for dtype in _dtypes(info):
        samples = _samples(info, dtype, requires_grad=False)
        if extra is not None:
            samples += extra("cpu", dtype, False)
        for i, s in enumerate(samples):
            out.append(pytest.param(dtype, i, id=f"{_DTYPE_NAMES[dtype]}-{i:02d}-{_describe(s, names)}"))
    return out


def _tensors_in(sample):
    items = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in items if isinstance(t, torch.Tensor)]


def _double(sample):
    """The sample with every floating tensor as a float64 (complex128) leaf: the truth."""

    def up(t):
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            return t
        wide = t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
        return wide.requires_grad_(t.requires_grad)

    return sample.transform(up)


def _grad_out(y: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    real = torch.float64 if y.dtype in (torch.float64, torch.complex128) else torch.float32
    out = torch.randn(y.shape, generator=g, dtype=real)
    if y.is_complex():
        out = torch.complex(out, torch.randn(y.shape, generator=g, dtype=real))
    return out.to(y.dtype)


def _grads(y, leaves, go):
    wanted = [t for t in leaves if t.requires_grad]
    return torch.autograd.grad(y, wanted, go, allow_unused=True)


def _same(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != torch's {theirs.dtype}"


def _agree(ours, theirs, truth, what, tol=None):
    """fp32/fp64/complex: within torch's tolerances (or the OpInfo's override) of torch's
    result. fp16/bf16: the error-ratio rule against the float64 truth, or torch's default
    tolerances of torch's own low-precision result, whichever is looser."""
    _same(ours, theirs, what)
    if ours.dtype in _LOW:
        try:
            torch.testing.assert_close(ours, theirs, equal_nan=True)
            return
        except AssertionError:
            pass
        assert_error_ratio(ours, theirs, truth.to(torch.float64), name=what)
    else:
        kw = dict(rtol=tol[0], atol=tol[1]) if tol and ours.dtype == torch.float32 else {}
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{what}: {m}", **kw)


def _identical(ours, theirs, what):
    """Bit for bit (NaN where torch has NaN): where fastattn hands the call to torch."""
    _same(ours, theirs, what)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ---- scaled_dot_product_attention --------------------------------------------------------
_SDPA_NAMES = ("query", "key", "value")
# The OpInfo's tolerance for fp32 (its toleranceOverride for TestCommon).
_SDPA_FP32_TOL = (5e-6, 5e-5)


def _sdpa_extra(device, dtype, requires_grad):
    """Samples the OpInfo means to cover but does not yield: it builds a value head dim that
    differs from E and then leaves it out (a FIXME in torch), and it loops over enable_gqa
    without passing it. Both are part of what SDPA takes."""
    torch.manual_seed(_SAMPLE_SEED + 1)
    from torch.testing import make_tensor
    from torch.testing._internal.opinfo.core import SampleInput

    def make(*shape):
        return make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad)

    B, L, S, H, E = 4, 3, 6, 4, 8
    out = [SampleInput(make(B, H, L, E), args=(make(B, H, S, E), make(B, H, S, E + 8)), name="diff_v_head_dim")]
    for causal in (False, True):
        out.append(SampleInput(make(B, H, L, E), args=(make(B, 2, S, E), make(B, 2, S, E)),
                               kwargs=dict(is_causal=causal, enable_gqa=True), name="gqa"))
    return out


@functools.lru_cache(maxsize=None)
def _sdpa_samples(dtype, requires_grad):
    return tuple(_samples(SDPA, dtype, requires_grad) + _sdpa_extra("cpu", dtype, requires_grad))


def _sdpa_sample(dtype, index, requires_grad):
    samples = _sdpa_samples(dtype, requires_grad)
    return samples[index]


def _sdpa_on_kernel(sample) -> bool:
    """Whether fastattn computes this sample with its own kernel (else it hands it to torch)."""
    q, k, v = sample.input, *sample.args[:2]
    kw = sample.kwargs
    return (
        q.dim() == 4 and k.dim() == 4 and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and kw.get("attn_mask") is None and kw.get("dropout_p", 0.0) == 0.0
        and q.shape[0] == k.shape[0] and k.shape == v.shape and q.shape[-1] == k.shape[-1]
    )


def _run_sdpa(fn, sample):
    # The OpInfo's op seeds the generator before each call (dropout draws the same mask).
    torch.manual_seed(42)
    return fn(sample.input, *sample.args, **sample.kwargs)


def _check_sdpa(sample, requires_grad):
    theirs = _run_sdpa(F.scaled_dot_product_attention, sample)
    ours = _run_sdpa(fastattn.scaled_dot_product_attention, sample)
    on_kernel = _sdpa_on_kernel(sample)
    what = "output" + ("" if on_kernel else " (delegated to torch)")
    if on_kernel:
        truth_sample = _double(sample)
        truth = _run_sdpa(F.scaled_dot_product_attention, truth_sample)
        _agree(ours, theirs, truth, what, tol=_SDPA_FP32_TOL)
    else:
        _identical(ours, theirs, what)
    # The README: same output layout as torch's (query's).
    strides = [st for n, st in zip(theirs.shape, theirs.stride()) if n > 1]
    assert [st for n, st in zip(ours.shape, ours.stride()) if n > 1] == strides, (
        f"output strides {ours.stride()} != torch's {theirs.stride()}"
    )
    if not requires_grad:
        return
    leaves = _tensors_in(sample)
    go = _grad_out(theirs)
    g_theirs = _grads(theirs, leaves, go)
    g_ours = _grads(ours, leaves, go)
    names = ["query", "key", "value", "attn_mask"]
    if on_kernel:
        truth_leaves = _tensors_in(truth_sample)
        g_truth = _grads(truth, truth_leaves, go.to(truth.dtype))
    for j, (a, b) in enumerate(zip(g_ours, g_theirs)):
        name = f"d{names[j]}"
        if b is None:
            assert a is None or not a.any(), f"{name}: torch gives no gradient, ours is nonzero"
            continue
        assert a is not None, f"{name}: torch gives a gradient, ours gives none"
        if on_kernel:
            _agree(a, b, g_truth[j], name, tol=_SDPA_FP32_TOL)
        else:
            _identical(a, b, name)


_SDPA_PARAMS = _params(SDPA, _SDPA_NAMES, extra=_sdpa_extra)


@pytest.mark.parametrize("dtype, index", _SDPA_PARAMS)
def test_sdpa_sample(dtype, index):
    _check_sdpa(_sdpa_sample(dtype, index, requires_grad=False), requires_grad=False)


@pytest.mark.parametrize("dtype, index", _SDPA_PARAMS)
def test_sdpa_sample_grad(dtype, index):
    _check_sdpa(_sdpa_sample(dtype, index, requires_grad=True), requires_grad=True)


@pytest.mark.parametrize("dtype, index", _SDPA_PARAMS)
def test_sdpa_sample_noncontiguous(dtype, index):
    # The OpInfo's non-contiguous variant: every tensor a strided view (last-dim stride 2)
    # whose gaps hold NaN, which a kernel must not read.
    contiguous = _sdpa_sample(dtype, index, requires_grad=True)
    sample = contiguous.noncontiguous()
    if not (_sdpa_on_kernel(sample) and dtype in _LOW):
        _check_sdpa(sample, requires_grad=True)
        return
    # 16-bit inputs on fastattn's kernel. torch computes non-contiguous 16-bit inputs on its
    # math backend (fp32 inside: here 5-10x smaller dq/dk errors than its own flash kernel
    # gives for the same values laid out contiguously), so torch's accuracy depends on the
    # layout; fastattn's must not: its result (output and gradients) on the strided views
    # equals, bit for bit, its result on the contiguous sample, which test_sdpa_sample_grad
    # holds to the error-ratio rule against torch. The output layout is torch's.
    theirs = _run_sdpa(F.scaled_dot_product_attention, sample)
    ours = _run_sdpa(fastattn.scaled_dot_product_attention, sample)
    ours_c = _run_sdpa(fastattn.scaled_dot_product_attention, contiguous)
    _agree(ours, theirs, _run_sdpa(F.scaled_dot_product_attention, _double(sample)), "output")
    assert torch.equal(ours, ours_c), "output differs from the contiguous sample's"
    assert [st for n, st in zip(ours.shape, ours.stride()) if n > 1] == [
        st for n, st in zip(theirs.shape, theirs.stride()) if n > 1
    ], f"output strides {ours.stride()} != torch's {theirs.stride()}"
    go = _grad_out(ours)
    for name, a, b in zip(("dquery", "dkey", "dvalue"), _grads(ours, _tensors_in(sample), go),
                          _grads(ours_c, _tensors_in(contiguous), go)):
        _same(a, b, name)
        assert torch.equal(a, b), f"{name} differs from the contiguous sample's"


def _sdpa_error_inputs():
    """SDPA's OpInfo defines no error_inputs; these are argument errors torch's SDPA raises
    for inputs shaped like its samples. Ours must raise too (it hands these to torch)."""
    mk = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
    B, L, S, H, E = 4, 3, 6, 4, 8
    return [
        pytest.param((mk(B, H, L, E), mk(B, 3, S, E), mk(B, 3, S, E)), {}, id="heads_not_equal_without_gqa"),
        pytest.param((mk(B, H, L, E), mk(B, 3, S, E), mk(B, 3, S, E)), {"enable_gqa": True},
                     id="gqa_heads_not_dividing"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E + 1), mk(B, H, S, E)), {}, id="key_head_dim_differs"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E, dtype=torch.float64), mk(B, H, S, E)), {}, id="dtype_mismatch"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E), mk(B, H, S, E)), {"attn_mask": mk(L, S + 1)},
                     id="attn_mask_shape"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E), mk(B, H, S, E)), {"is_causal": 1}, id="is_causal_int"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E), mk(B, H, S, E)), {"scale": "0.5"}, id="scale_str"),
        pytest.param((mk(B, H, L, E), mk(B, H, S, E), mk(B, H, S, E)), {"dropout_p": "0.5"}, id="dropout_str"),
    ]


@pytest.mark.parametrize("args, kwargs", _sdpa_error_inputs())
def test_sdpa_error_input(args, kwargs):
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as ours:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    assert str(ours.value), f"empty message (torch: {theirs.value!r})"


# ---- rms_norm ----------------------------------------------------------------------------
_RMS_NAMES = ("input", "normalized_shape", "weight", "eps")


def _shape_tuple(normalized_shape):
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def ours_rms_norm(x, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm(x, normalized_shape, weight, eps) written with
    fastattn.rms_norm, which normalises the last dim: the normalized dims of x (and weight)
    are flattened into one, and torch's default eps (None) is passed as such (fastattn's own
    default is 1e-6)."""
    shape = _shape_tuple(normalized_shape)
    if len(shape) == 1:
        return fastattn.rms_norm(x, weight, eps)
    if x.is_nested:
        pytest.skip("not expressible as fastattn.rms_norm: a nested tensor's trailing dims cannot be flattened")
    nd, n = len(shape), math.prod(shape)
    if tuple(x.shape[x.dim() - nd:]) != shape:
        pytest.skip("not expressible as fastattn.rms_norm: x's trailing dims are not normalized_shape")
    lead = x.shape[: x.dim() - nd]
    y = fastattn.rms_norm(x.reshape(*lead, n), None if weight is None else weight.reshape(-1), eps)
    return y.reshape(x.shape)


def _rms_sample(dtype, index, requires_grad):
    return _samples(RMS, dtype, requires_grad)[index]


def _rms_delegated(x) -> bool:
    # fp64 and complex are computed by torch's rms_norm (no such kernels).
    return x.dtype == torch.float64 or x.is_complex()


def _check_rms(sample, ours_fn, theirs_fn, requires_grad):
    theirs = theirs_fn(sample)
    ours = ours_fn(sample)
    delegated = _rms_delegated(sample.input)
    if delegated:
        _identical(ours, theirs, "output (delegated to torch)")
    else:
        truth_sample = _double(sample)
        truth = theirs_fn(truth_sample)
        _agree(ours, theirs, truth, "output")
    if not requires_grad:
        return
    leaves = _tensors_in(sample)
    go = _grad_out(theirs)
    g_theirs = _grads(theirs, leaves, go)
    g_ours = _grads(ours, leaves, go)
    if not delegated:
        g_truth = _grads(truth, _tensors_in(truth_sample), go.to(truth.dtype))
    for j, (a, b) in enumerate(zip(g_ours, g_theirs)):
        name = ("dinput", "dweight")[j]
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, f"{name}: torch gives a gradient, ours gives none"
        if delegated:
            _identical(a, b, name)
        else:
            _agree(a, b, g_truth[j], name)


def _functional(fn):
    return lambda s: fn(s.input, *s.args, **s.kwargs)


def _rms_module(cls, sample):
    """cls (torch.nn.RMSNorm or fastattn.nn.RMSNorm) built from the sample's arguments, in
    the sample's dtype, with the sample's weight (a copy: module parameters are leaves of
    their own)."""
    x, normalized_shape, *rest = (sample.input, *sample.args)
    weight = rest[0] if rest else None
    eps = rest[1] if len(rest) > 1 else sample.kwargs.get("eps")
    m = cls(normalized_shape, eps=eps, elementwise_affine=weight is not None, dtype=x.dtype)
    if weight is not None:
        m.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return m


def _module_leaves(x, m):
    return [x] + ([m.weight] if m.weight is not None else [])


_RMS_PARAMS = _params(RMS, _RMS_NAMES)


@pytest.mark.parametrize("dtype, index", _RMS_PARAMS)
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["fwd", "grad"])
def test_rms_norm_sample(dtype, index, noncontiguous, requires_grad):
    sample = _rms_sample(dtype, index, requires_grad)
    if noncontiguous:
        sample = sample.noncontiguous()
    _check_rms(sample, _functional(ours_rms_norm), _functional(F.rms_norm), requires_grad)


@pytest.mark.parametrize("dtype, index", _RMS_PARAMS)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["fwd", "grad"])
def test_nn_rms_norm_sample(dtype, index, requires_grad):
    sample = _rms_sample(dtype, index, requires_grad)
    tm, om = _rms_module(torch.nn.RMSNorm, sample), _rms_module(fastattn.nn.RMSNorm, sample)
    assert dict(tm.state_dict()).keys() == dict(om.state_dict()).keys()
    theirs, ours = tm(sample.input), om(sample.input)
    delegated = _rms_delegated(sample.input)
    if delegated:
        _identical(ours, theirs, "output (delegated to torch)")
    else:
        truth_sample = _double(sample)
        truth_m = _rms_module(torch.nn.RMSNorm, truth_sample)
        truth = truth_m(truth_sample.input)
        _agree(ours, theirs, truth, "output")
    if not requires_grad:
        return
    go = _grad_out(theirs)
    g_theirs = torch.autograd.grad(theirs, _module_leaves(sample.input, tm), go)
    g_ours = torch.autograd.grad(ours, _module_leaves(sample.input, om), go)
    if not delegated:
        g_truth = torch.autograd.grad(truth, _module_leaves(truth_sample.input, truth_m), go.to(truth.dtype))
    for j, (name, a, b) in enumerate(zip(("dinput", "dweight"), g_ours, g_theirs)):
        if delegated:
            _identical(a, b, name)
        else:
            _agree(a, b, g_truth[j], name)


def _rms_error_params():
    torch.manual_seed(_SAMPLE_SEED)
    out = []
    for i, e in enumerate(RMS.error_inputs("cpu")):
        out.append(pytest.param(i, id=f"{i:02d}-{_describe(e.sample_input, _RMS_NAMES)}"))
    return out


# What fastattn.nn.RMSNorm's message must say for each of torch's error inputs.
_OURS_RMS_ERRORS = {
    "Expected normalized_shape to be at least 1-dimensional": "normalized_shape must have at least one dimension",
    "Expected weight to be of same shape as normalized_shape": "weight must have normalized_shape",
    "Given normalized_shape=": "expected input with trailing shape",
}


@pytest.mark.parametrize("index", _rms_error_params())
def test_rms_norm_error_input(index):
    torch.manual_seed(_SAMPLE_SEED)
    err = list(RMS.error_inputs("cpu"))[index]
    s = err.sample_input
    with pytest.raises(err.error_type, match=err.error_regex):
        F.rms_norm(s.input, *s.args, **s.kwargs)
    # The module, built as torch's would be for this call (the sample's weight assigned).
    x, normalized_shape, weight, eps = s.input, *s.args
    for cls in (torch.nn.RMSNorm, fastattn.nn.RMSNorm):
        m = cls(normalized_shape, eps=eps, elementwise_affine=weight is not None)
        if weight is not None:
            m.weight = torch.nn.Parameter(weight.detach().clone())
        if cls is torch.nn.RMSNorm:
            with pytest.raises(err.error_type):
                m(x)
        else:
            with pytest.raises((ValueError, RuntimeError, TypeError), match=_OURS_RMS_ERRORS[err.error_regex]):
                m(x)
    # The functional form, where it can be written with fastattn.rms_norm at all.
    shape = _shape_tuple(normalized_shape)
    if shape and tuple(x.shape[x.dim() - len(shape):]) == shape:
        with pytest.raises((ValueError, RuntimeError, TypeError), match="weight"):
            ours_rms_norm(x, normalized_shape, weight, eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32, torch.bfloat16],
                         ids=["fp64", "c128", "fp32", "bf16"])
def test_rms_norm_default_eps_is_torchs(dtype):
    """The OpInfo's sample without optional arguments (x (1, 2), normalized_shape (2,)),
    scaled so that its mean square (~1e-16) is far below the fp32 epsilon, where the result
    depends on eps. torch's default (eps=None) is the epsilon of its accumulation type: the
    float64 one (2**-52) for float64 and complex128 inputs, the fp32 one (2**-23) for float32
    and the 16-bit types. (fastattn used 2**-23 for float64 too: 2.9e-6 instead of 0.067.)"""
    (sample,) = [s for s in _samples(RMS, dtype, False) if not s.kwargs and len(s.args) == 1]
    x = (sample.input.to(torch.complex128 if dtype.is_complex else torch.float64) * 1e-8).to(dtype)
    theirs = F.rms_norm(x, sample.args[0])
    for ours in (fastattn.rms_norm(x, None, None),
                 fastattn.nn.RMSNorm(sample.args[0], elementwise_affine=False)(x),
                 fastattn.rms_norm(x, None, None, residual=torch.zeros_like(x))[0]):
        _same(ours, theirs, "output")
        torch.testing.assert_close(ours, theirs, rtol=1e-2 if dtype in _LOW else 1e-6, atol=0)


# ---- nested (jagged) tensors: torch's NJT OpInfo samples (opinfo/definitions/nested.py) ---
def _njt_rms():
    try:
        from torch.testing._internal.opinfo.definitions.nested import njt_op_db
    except Exception:  # pragma: no cover
        return None
    found = [op for op in njt_op_db if op.name == "nn.functional.rms_norm" and op.variant_test_name == ""]
    return found[0] if found else None


NJT_RMS = _njt_rms()
_NJT_PARAMS = [] if NJT_RMS is None else _params(NJT_RMS, _RMS_NAMES)


def _torch_then_ours(theirs_fn, ours_fn):
    """(theirs, ours), or None when torch raises: then ours must raise the same (it is
    torch's own code that runs)."""
    try:
        theirs = theirs_fn()
    except RuntimeError as exc:
        with pytest.raises(type(exc), match="^" + __import__("re").escape(str(exc).splitlines()[0])):
            ours_fn()
        return None
    return theirs, ours_fn()


def _njt_equal(a, b, what):
    assert a.is_nested == b.is_nested and a.dtype == b.dtype, f"{what}: {a.dtype} vs torch's {b.dtype}"
    pieces_a, pieces_b = (a.unbind(), b.unbind()) if a.is_nested else ([a], [b])
    assert len(pieces_a) == len(pieces_b), what
    for pa, pb in zip(pieces_a, pieces_b):
        _identical(pa, pb, what)


@pytest.mark.skipif(NJT_RMS is None, reason="this torch has no NJT OpInfo for rms_norm")
@pytest.mark.parametrize("dtype, index", _NJT_PARAMS)
@pytest.mark.parametrize("which", ["functional", "module"])
def test_rms_norm_nested_sample(dtype, index, which):
    # fastattn hands nested tensors to torch's rms_norm: the result must be torch's, bit for
    # bit, gradients included (it raised NotImplementedError from the kernel op before).
    # (torch's NJT autograd has no complex support: complex samples run forward only)
    requires_grad = not dtype.is_complex
    sample = _samples(NJT_RMS, dtype, requires_grad)[index]
    x, ns, w = sample.input, sample.kwargs["normalized_shape"], sample.kwargs["weight"]
    theirs = F.rms_norm(x, ns, w)
    if which == "functional":
        ours = ours_rms_norm(x, ns, w)
        weight_leaf = w
    else:
        m = fastattn.nn.RMSNorm(ns, dtype=dtype)
        m.weight = torch.nn.Parameter(w.detach().clone())
        ours = m(x)
        weight_leaf = m.weight
    _njt_equal(ours, theirs, "output (delegated to torch)")
    if not requires_grad:
        return
    go = theirs.detach() * 0.5 + 1
    # torch's NJT backward has limits of its own (complex, weight grads over tensors with
    # holes): where torch raises, ours raises the same.
    grads = _torch_then_ours(lambda: torch.autograd.grad(theirs, [x, w], go),
                             lambda: torch.autograd.grad(ours, [x, weight_leaf], go))
    if grads is not None:
        (dx_t, dw_t), (dx_o, dw_o) = grads
        _njt_equal(dx_o, dx_t, "dinput")
        torch.testing.assert_close(dw_o, dw_t, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sdpa_nested_jagged(dtype, is_causal):
    """SDPA's NJT OpInfo has no samples (torch: "does not support NJT"), but torch's SDPA takes
    jagged batches: the OpInfo's 4-D shapes (4 heads, head dim 8) with ragged lengths. Ours
    hands them to torch (it raised NotImplementedError from the kernel op before)."""
    torch.manual_seed(_SAMPLE_SEED)
    lengths = (3, 1, 6, 4)

    def njt():
        return torch.nested.nested_tensor_from_jagged(
            torch.randn(sum(lengths), 4, 8, dtype=dtype), offsets
        ).transpose(1, 2).detach().requires_grad_()

    offsets = torch.tensor((0,) + tuple(torch.tensor(lengths).cumsum(0).tolist()))
    q, k, v = njt(), njt(), njt()
    # (torch has no CPU backend for causal jagged batches: then both raise its error)
    outs = _torch_then_ours(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                            lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    if outs is None:
        return
    theirs, ours = outs
    _njt_equal(ours, theirs, "output (delegated to torch)")
    go = theirs.detach() * 0.5 + 1
    for name, a, b in zip(("dquery", "dkey", "dvalue"), torch.autograd.grad(ours, (q, k, v), go),
                          torch.autograd.grad(theirs, (q, k, v), go)):
        _njt_equal(a, b, name)


# ---- ModuleInfo torch.nn.RMSNorm ---------------------------------------------------------
def _module_inputs(dtype, requires_grad):
    torch.manual_seed(_SAMPLE_SEED)
    return RMS_MODULE.module_inputs_func(RMS_MODULE, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                         training=True)


_MODULE_PARAMS = [
    pytest.param(dtype, i, id=f"{_DTYPE_NAMES[dtype]}-{i:02d}-{mi.desc}")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for i, mi in enumerate(_module_inputs(dtype, False))
]


@pytest.mark.parametrize("dtype, index", _MODULE_PARAMS)
def test_nn_rms_norm_module_input(dtype, index):
    mi = _module_inputs(dtype, True)[index]
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    (x,) = mi.forward_input.args
    g = torch.Generator().manual_seed(3)
    mods = []
    for cls, dt in ((torch.nn.RMSNorm, dtype), (fastattn.nn.RMSNorm, dtype), (torch.nn.RMSNorm, torch.float64)):
        m = cls(*args, **kwargs, dtype=dt)
        if m.weight is not None:  # random, not ones: the weight must be applied
            with torch.no_grad():
                m.weight.copy_((torch.rand(m.weight.shape, generator=g.manual_seed(3)) + 0.5).to(dtype))
        mods.append(m)
    tm, om, truth_m = mods
    assert repr(tm).replace("RMSNorm", "") == repr(om).replace("RMSNorm", "")
    theirs, ours = tm(x), om(x)
    x64 = x.detach().double().requires_grad_()
    truth = truth_m(x64)
    if dtype == torch.float64:
        _identical(ours, theirs, "output (delegated to torch)")
    else:
        _agree(ours, theirs, truth, "output")
    go = _grad_out(theirs)
    for name, a, b, t in zip(("dinput", "dweight"), torch.autograd.grad(ours, _module_leaves(x, om), go),
                             torch.autograd.grad(theirs, _module_leaves(x, tm), go),
                             torch.autograd.grad(truth, _module_leaves(x64, truth_m), go.double())):
        if dtype == torch.float64:
            _identical(a, b, name)
        else:
            _agree(a, b, t, name)


# ---- opcheck of the custom ops on the samples' shapes ------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_on_sample_shapes(dtype):
    seen = set()
    for s in _samples(SDPA, dtype, False) + _sdpa_extra("cpu", dtype, False):
        if not _sdpa_on_kernel(s) or s.input.shape[1] % s.args[0].shape[1]:
            continue
        q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in (s.input, *s.args[:2]))
        right = max(q.shape[1] - k.shape[1], 0) if s.kwargs.get("is_causal") else -1
        key = (tuple(q.shape), tuple(k.shape), right)
        if key in seen:
            continue
        seen.add(key)
        torch.library.opcheck(torch.ops.fastattn.flash_attn_fwd, (q, k, v, q.shape[-1] ** -0.5, -1, right))
    for s in _samples(RMS, dtype, False):
        x, shape = s.input, _shape_tuple(s.args[0])
        w = s.args[1] if len(s.args) > 1 else None
        if x.numel() == 0:
            continue
        n = math.prod(shape)
        x2 = x.reshape(-1, n).detach().requires_grad_()
        w2 = None if w is None else w.reshape(n).detach().requires_grad_()
        eps = s.kwargs.get("eps", 1e-6)
        torch.library.opcheck(torch.ops.fastattn.rms_norm_fwd, (x2, w2, eps))
