"""torch.compile on CPU: compiled and eager encoders agree, and a compiled training step trains.

The native kernels are registered operators (models/native.py), so the compiled graph calls
them like built-in ops; a small two-layer model keeps compile time short.
"""

import pytest
import torch

from models import native, ops
from models.moe_mae import MAEObjective, MOEMAE, build_model


def small_mae():
    torch.manual_seed(0)
    return MOEMAE(build_model("XXS", depth=2), decoder_layers=1)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 7, 40, 40, generator=g),
            [torch.randn(n, 2, generator=g) for _ in range(4)], torch.rand(n, 100, generator=g))


@pytest.mark.slow  # compile time: 30 s to minutes on 2 busy cores
def test_compiled_encoder_matches_eager():
    encoder = small_mae().encoder.eval()
    imgs, meta, _ = batch()
    compiled = torch.compile(encoder, dynamic=False)
    with torch.no_grad():
        want = encoder(imgs, *meta)[0]
        got = compiled(imgs, *meta)[0]
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.slow
def test_compiled_training_step_trains_like_eager():
    """Same weights, masks and (eval: no gate noise, no dropout) routing: the compiled step's
    loss and gradients match eager's, and after an optimizer step they still agree."""
    mae = small_mae().eval()
    objective = MAEObjective(mae)
    compiled = torch.compile(objective, dynamic=False)
    imgs, meta, noise = batch()

    def step(fn):
        mae.zero_grad()
        loss = fn(imgs, *meta, noise=noise)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in mae.parameters()]

    loss, grads = step(compiled)
    want_loss, want_grads = step(objective)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    torch.optim.SGD(mae.parameters(), lr=1e-4).step()  # the compiled step sees new weights
    with torch.no_grad():
        after = compiled(imgs, *meta, noise=noise)["loss"]
        torch.testing.assert_close(after, objective(imgs, *meta, noise=noise)["loss"],
                                   rtol=1e-4, atol=1e-5)
    assert after != loss
    if native.library() is not None:
        assert ops.backend_of(mae) == "native"  # the registered kernels were traced
