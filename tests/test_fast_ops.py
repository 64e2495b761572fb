"""Kernels of the fast path: oneDNN linear, dropout, and the hand-written expert mixture."""

import pytest
import torch
import torch.nn.functional as F

from models import fast_ops
from models.fast_moe import expert_mixture
from models.moe_mae import MoELayer

needs_onednn = pytest.mark.skipif(not fast_ops.onednn_available(),
                                  reason="this PyTorch build has no usable oneDNN linear")


@needs_onednn
def test_onednn_linear_matches_f_linear_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 50, 40, generator=g)
    with fast_ops.use_backend("onednn"):
        y = fast_ops.linear(x, w, b)
        fast = torch.autograd.grad(y, (x, w, b), grad_out)
    y_ref = F.linear(x, w, b)
    ref = torch.autograd.grad(y_ref, (x, w, b), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_linear_falls_back_to_torch_outside_fp32_cpu():
    x, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(fast_ops.linear(x, w), F.linear(x, w))
    with fast_ops.use_backend("torch"):
        x32, w32 = x.float(), w.float()
        assert torch.equal(fast_ops.linear(x32, w32), F.linear(x32, w32))
    with pytest.raises(ValueError, match="backend"):
        with fast_ops.use_backend("blas"):
            pass


def test_dropout_drops_p_and_keeps_the_expectation():
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = fast_ops.dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0
    assert values[1].item() == pytest.approx(65536 / (65536 - 6554))
    torch.manual_seed(0)
    assert torch.equal(fast_ops.dropout(x, 0.1, training=True), y)  # seeded
    assert fast_ops.dropout(x, 0.1, training=False) is x


def test_dropout_gradient_is_the_mask():
    x = torch.randn(1000, requires_grad=True)
    y = fast_ops.dropout(x, 0.25, training=True)
    (grad,) = torch.autograd.grad(y.sum(), x)
    kept = y != 0
    assert torch.allclose(grad[kept], torch.full_like(grad[kept], 65536 / (65536 - 16384)))
    assert (grad[~kept] == 0).all()


@pytest.mark.parametrize("num_experts,k", [(3, 2), (5, 2), (4, 3)])
def test_expert_mixture_gradcheck(num_experts, k):
    """Double precision, so this checks the hand-written backward formulas themselves."""
    torch.manual_seed(0)
    layer = MoELayer(12, 6, num_experts, k=k).double().eval()
    x = torch.randn(30, 12, dtype=torch.double, requires_grad=True)
    routing = layer.gate(x)
    gates = routing.topk_gates.detach().clone().requires_grad_()
    w = [e.W.weight for e in layer.experts]
    b = [e.W.bias for e in layer.experts]
    params = (*w, *b, layer.V.weight, layer.V.bias, layer.W2.weight, layer.W2.bias)

    def mixture(x, gates, *p):
        E = num_experts
        return expert_mixture(x, routing.topk_idx, gates, p[:E], p[E:2 * E], *p[2 * E:])

    assert torch.autograd.gradcheck(mixture, (x, gates, *params))
    torch.testing.assert_close(layer.combine(x, routing), layer.combine_reference(x, routing))
