"""fastattn.nn.RMSNorm is a drop-in for torch.nn.RMSNorm."""
import pytest
import torch

import fastattn

from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [16, (4, 16)])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_module(device, shape, eps, affine):
    ours = fastattn.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine, device=device)
    theirs = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine, device=device)
    assert ours.normalized_shape == theirs.normalized_shape
    assert ours.eps == theirs.eps and ours.elementwise_affine == theirs.elementwise_affine
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict())
    full = (3, 4, 16) if isinstance(shape, int) else (3, 4, 16)
    x = torch.randn(full, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert repr(ours).startswith("RMSNorm(")


@pytest.mark.parametrize("device", DEVICES)
def test_residual_forward_and_grad(device):
    m = fastattn.nn.RMSNorm(32, eps=1e-6, device=device)
    x = torch.randn(5, 32, device=device, requires_grad=True)
    r = torch.randn(5, 32, device=device, requires_grad=True)
    y, h = m(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, fastattn.rms_norm(x + r, m.weight, 1e-6))
    (y.sum() + h.sum()).backward()
    assert m.weight.grad is not None and x.grad is not None and r.grad is not None
    torch.testing.assert_close(x.grad, r.grad)


def test_dtype_and_wrong_shape():
    m = fastattn.nn.RMSNorm(8, dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    assert m(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"trailing shape \(8,\)"):
        m(torch.randn(2, 9, dtype=torch.bfloat16))


# ---- issue 13: drop-in gaps ------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [64, (4, 16)])
def test_low_precision_input_fp32_weight(device, dtype, shape):
    # The default of nn.RMSNorm(...) is an fp32 weight; feeding it bf16/fp16 activations
    # (mixed precision, autocast) is what torch.nn.RMSNorm accepts.
    ours = fastattn.nn.RMSNorm(shape, eps=1e-6, device=device)
    theirs = torch.nn.RMSNorm(shape, eps=1e-6, device=device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 64, device=device).reshape(3, 5, *((64,) if shape == 64 else shape)).to(dtype)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.dtype == yb.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    gy = torch.randn_like(ya)
    (ya * gy).sum().backward()
    (yb * gy).sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and xa.grad.dtype == dtype
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-2, atol=1e-2)
    with torch.autocast(device, dtype=dtype):
        assert ours(x).dtype == theirs(x).dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [16, (4, 16)])
@pytest.mark.parametrize("residual", [False, True])
def test_non_contiguous_input(device, shape, residual):
    ours = fastattn.nn.RMSNorm(shape, eps=1e-6, device=device)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    full = (16,) if shape == 16 else (4, 16)
    base = torch.randn(3, *full, 2, device=device)
    base_r = torch.randn(3, *full, 2, device=device)
    xa = base[..., 0].detach().requires_grad_()  # a leaf, and its strided view below
    x = base.detach().clone().requires_grad_()
    r = base_r.detach().clone().requires_grad_() if residual else None
    out = ours(x[..., 0], r[..., 1] if residual else None)
    assert x[..., 0].stride(-1) == 2
    h_ref = xa + base_r[..., 1] if residual else xa
    y_ref = torch.nn.functional.rms_norm(h_ref, full, ours.weight, 1e-6)
    y = out[0] if residual else out
    torch.testing.assert_close(y, y_ref)
    if residual:
        torch.testing.assert_close(out[1], h_ref)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad[..., 0], xa.grad)
    assert torch.all(x.grad[..., 1] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [-1e-6, 0.0, None])
def test_eps_like_torch_module(device, eps):
    ours = fastattn.nn.RMSNorm(24, eps=eps, device=device)
    theirs = torch.nn.RMSNorm(24, eps=eps, device=device)
    x = torch.randn(4, 24, device=device, dtype=torch.bfloat16) * 1e-2
    x[0] = 0
    torch.testing.assert_close(ours(x), theirs(x), rtol=1.6e-2, atol=1.6e-2, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
def test_double_backward(device, residual):
    # create_graph=True through the module (e.g. a gradient penalty) must give the true
    # second derivative, never zeros.
    theirs = torch.nn.RMSNorm(32, eps=1e-6, device=device, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 32, device=device)
    r = torch.randn(6, 32, device=device)
    results = []
    ours = fastattn.nn.RMSNorm(32, eps=1e-6, device=device)
    ours.load_state_dict(theirs.state_dict())  # fp32 copy of the same weight
    for m, cast in ((ours, torch.float32), (theirs, torch.float64)):
        xx = x.detach().to(cast).requires_grad_()
        rr = r.detach().to(cast).requires_grad_() if residual else None
        if residual:
            y, h = m(xx, rr) if m is ours else (m(xx + rr), xx + rr)
            out = y.pow(3).sum() + h.pow(3).sum()
        else:
            out = m(xx).pow(3).sum()
        (gx,) = torch.autograd.grad(out, xx, create_graph=True)
        gx.pow(2).sum().backward()
        results.append((gx.detach(), xx.grad, m.weight.grad) + ((rr.grad,) if residual else ()))
    for a, b in zip(*results):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_torch_jit_script(unit_offset, affine):
    """torch.jit.script takes the module as it takes torch.nn.RMSNorm (it raised 'cannot
    statically infer the expected size of a list'): the scripted module runs torch's rms_norm
    on the same weight Parameter, equal to the eager module's output (exactly for 16-bit
    inputs, to fp32 rounding for fp32, where the two sum in different orders)."""
    m = fastattn.nn.RMSNorm((6, 8), eps=1e-6, elementwise_affine=affine, unit_offset=unit_offset)
    if affine:
        with torch.no_grad():
            m.weight.normal_(generator=torch.Generator().manual_seed(0))
    scripted = torch.jit.script(m)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 6, 8, generator=g).to(dtype)
        got, want = scripted(x), m(x)
        assert got.dtype == want.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)
    if affine:  # the weight is shared, not copied
        assert [p for p in scripted.parameters()][0] is m.weight


def test_torch_jit_script_leaves_subclasses_alone():
    """The scriptable stand-in is for RMSNorm itself only: a subclass's own forward (the HF
    integration's keeps the HF output dtype) must not be silently replaced by torch's rms_norm."""

    class Doubled(fastattn.nn.RMSNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    m = Doubled(8)
    assert m.__prepare_scriptable__() is m
    assert type(fastattn.nn.RMSNorm(8).__prepare_scriptable__()).__name__ == "_ScriptedRMSNorm"


def test_dtensor_inputs_take_torchs_rms_norm(tmp_path):
    # DTensors (a sharded activation, a module given to distribute_module) went to fastattn's op,
    # which has no sharding rule: torch's NotImplementedError where torch.nn.RMSNorm returns a
    # DTensor (distributed-training audit). They are handed to torch, as nested tensors are.
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x_local, r_local = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
        x, r = distribute_tensor(x_local, mesh, [Shard(0)]), distribute_tensor(r_local, mesh, [Shard(0)])
        w = distribute_tensor(torch.rand(32) + 0.5, mesh, [Replicate()])
        want = torch.nn.functional.rms_norm(x, (32,), w, 1e-6)
        got = fastattn.rms_norm(x, w, 1e-6)
        assert got.placements == want.placements and torch.equal(got.full_tensor(), want.full_tensor())
        y, h = fastattn.rms_norm(x, w, 1e-6, residual=r)
        assert torch.equal(h.full_tensor(), x_local + r_local)
        assert torch.equal(y.full_tensor(), torch.nn.functional.rms_norm(x + r, (32,), w, 1e-6).full_tensor())
        norm = distribute_module(fastattn.nn.RMSNorm(32, eps=1e-6), mesh)
        reference_norm = distribute_module(torch.nn.RMSNorm(32, eps=1e-6), mesh)
        assert torch.equal(norm(x).full_tensor(), reference_norm(x).full_tensor())
    finally:
        dist.destroy_process_group()
