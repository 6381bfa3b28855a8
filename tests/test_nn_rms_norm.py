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
