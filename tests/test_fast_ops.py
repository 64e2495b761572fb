"""Ops of the fast backends (models/ops): oneDNN linear, dropout, the hand-written expert
mixture, and choosing a backend."""

import pytest
import torch
import torch.nn.functional as F

from models import native, ops
from models.moe_mae import MoELayer, build_mae
from models.ops.dropout import native_dropout, torch_dropout
from models.ops.experts import fused_expert_mixture
from models.ops.linear import linear, onednn_available, reference_linear

needs_onednn = pytest.mark.skipif(not onednn_available(),
                                  reason="this PyTorch build has no usable oneDNN linear")


@needs_onednn
def test_onednn_linear_matches_f_linear_with_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 50, 40, generator=g)
    y = linear(x, w, b)
    assert "_Linear" in y.grad_fn.next_functions[0][0].name()  # the oneDNN Function ran
    fast = torch.autograd.grad(y, (x, w, b), grad_out)
    y_ref = F.linear(x, w, b)
    ref = torch.autograd.grad(y_ref, (x, w, b), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_linear_falls_back_to_torch_outside_fp32_cpu():
    x, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    x32, w32 = x.float(), w.float()
    assert torch.equal(reference_linear(x32, w32), F.linear(x32, w32))


def test_backend_is_chosen_for_the_whole_model_and_restored():
    mae = build_mae("XXS")
    default = ops.backend_of(mae)
    assert default == ("native" if native.library() is not None else "torch")
    with ops.use_backend(mae, "reference"):
        assert ops.backend_of(mae) == "reference"
        assert all(m.ops.name == "reference" for m in mae.modules() if hasattr(m, "ops"))
    assert ops.backend_of(mae) == default
    assert ops.backend_of(ops.set_backend(mae, "torch")) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'blas'"):
        ops.set_backend(mae, "blas")


def kept_scale(p, use_native):
    if use_native:
        return native.dropout_threshold(p)[1]
    return 65536 / (65536 - round(p * 65536))


# the native kernel where it builds, and the PyTorch fallback
DROPOUT_PATHS = [pytest.param(True, marks=pytest.mark.skipif(native.library() is None,
                                                             reason=native.status())), False]


@pytest.mark.parametrize("use_native", DROPOUT_PATHS)
def test_dropout_drops_p_and_keeps_the_expectation(use_native):
    x = torch.ones(200_000)
    dropout = native_dropout if use_native else torch_dropout
    torch.manual_seed(0)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    values = y.unique()
    assert len(values) == 2 and values[0] == 0
    assert values[1].item() == pytest.approx(kept_scale(0.1, use_native))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, training=True), y)  # seeded
    assert not torch.equal(dropout(x, 0.1, training=True), y)  # a new mask
    assert dropout(x, 0.1, training=False) is x


@pytest.mark.parametrize("use_native", DROPOUT_PATHS)
def test_dropout_gradient_is_the_mask(use_native):
    x = torch.randn(1000, requires_grad=True)
    dropout = native_dropout if use_native else torch_dropout
    y = dropout(x, 0.25, training=True)
    (grad,) = torch.autograd.grad(y.sum(), x)
    kept = y != 0
    assert 150 < (~kept).sum() < 350
    assert torch.allclose(grad[kept], torch.full_like(grad[kept], kept_scale(0.25, use_native)))
    assert (grad[~kept] == 0).all()


@pytest.mark.skipif(native.library() is None, reason=native.status())
def test_native_dropout_mask_has_no_visible_structure():
    """Neighbouring elements and rows are independent: the drop rate of every lane of 16 and
    of pairs of neighbours matches p and p^2."""
    torch.manual_seed(1)
    dropped = native_dropout(torch.ones(4096, 144), 0.5, training=True) == 0
    lanes = dropped.view(-1, 16).float().mean(0)
    assert ((lanes - 0.5).abs() < 0.01).all()
    both = (dropped[:, 1:] & dropped[:, :-1]).float().mean().item()
    assert both == pytest.approx(0.25, abs=0.005)
    rows = (dropped[1:] & dropped[:-1]).float().mean().item()
    assert rows == pytest.approx(0.25, abs=0.005)


@pytest.mark.parametrize("num_experts,k", [(3, 2), (5, 2), (4, 3)])
def test_expert_mixture_gradcheck(num_experts, k):
    """Double precision, so this checks the hand-written backward formulas themselves."""
    torch.manual_seed(0)
    layer = MoELayer(12, 6, num_experts, k=k).double().eval()
    x = torch.randn(30, 12, dtype=torch.double, requires_grad=True)
    routing = layer.gate(x)
    gates = routing.topk_gates.detach().clone().requires_grad_()
    params = tuple(t.detach().clone().requires_grad_() for t in layer.stacked_weights())

    def mixture(x, gates, *p):
        return fused_expert_mixture(x, routing.topk_idx, gates, *p)

    assert torch.autograd.gradcheck(mixture, (x, gates, *params))
    args = (x, routing, *layer.stacked_weights(), 0.0, False)
    torch.testing.assert_close(ops.get("torch").expert_mixture(*args),
                               ops.get("reference").expert_mixture(*args))
