"""Mixed precision: training and inference steps under bf16 and fp16 autocast, on the fast path
and on the reference path, agree with fp32 on the same weights, masks and gate noise.

CPU autocast stands in for a GPU's: the model code is the same for both devices.
"""

import pytest
import torch
import torch.nn as nn

from models.moe_mae import MAEObjective, MOEMAE, build_model, use_reference_impl

PATHS = ("fast", "reference")


def tiny_mae(seed=0):
    """A 3-layer XXS MAE (3, 4 and 5 experts) without dropout, so fp32 and autocast steps see
    the same computation."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mae = MOEMAE(build_model("XXS", depth=3), decoder_layers=1)
    for module in mae.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return mae


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 7, 40, 40, generator=g)
    angles = torch.rand(n, 4, generator=g) * 6.283
    meta = [torch.stack([a.sin(), a.cos()], dim=1) for a in angles.t()]
    mask_noise = torch.rand(n, 100, generator=g)
    return imgs, meta, mask_noise


def training_step(objective, path, dtype=None, scaler=None):
    """One forward and backward pass (gate noise seeded); returns (losses, {name: grad})."""
    imgs, meta, mask_noise = batch()
    objective.zero_grad(set_to_none=True)
    with torch.random.fork_rng(), use_reference_impl(objective, path == "reference"):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = objective(imgs, *meta, noise=mask_noise)
        (losses["loss"] if scaler is None else scaler.scale(losses["loss"])).backward()
    grads = {name: p.grad for name, p in objective.named_parameters()}
    return losses, grads


def flat(grads):
    return torch.cat([g.reshape(-1).float() for g in grads.values()])


@pytest.mark.parametrize("path", PATHS)
def test_bf16_training_step_matches_fp32(path):
    objective = MAEObjective(tiny_mae()).train()
    want_losses, want_grads = training_step(objective, path)
    losses, grads = training_step(objective, path, torch.bfloat16)

    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["loss"].dtype == torch.float32
    assert abs(losses["loss"].item() - want_losses["loss"].item()) <= \
        0.03 * abs(want_losses["loss"].item())
    missing = [name for name, grad in grads.items() if grad is None]
    assert not missing, f"no gradient under bf16 autocast for {missing}"
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all()
               for grad in grads.values())
    cosine = torch.nn.functional.cosine_similarity(flat(grads), flat(want_grads), dim=0)
    assert cosine > 0.98, f"gradient cosine {cosine:.4f} between bf16 and fp32"


@pytest.mark.parametrize("path", PATHS)
def test_fp16_step_with_grad_scaler(path):
    objective = MAEObjective(tiny_mae()).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    losses, grads = training_step(objective, path, torch.float16, scaler)
    assert torch.isfinite(losses["loss"])
    assert all(grad is not None for grad in grads.values())
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # the step was not skipped for inf/NaN gradients
    changed = [name for name, p in objective.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inference_matches_fp32(path, dtype):
    encoder = tiny_mae().encoder.eval()
    imgs, meta, _ = batch()
    with torch.inference_mode(), use_reference_impl(encoder, path == "reference"):
        want = encoder.embed(imgs, *meta, pooling="mean")
        with torch.autocast("cpu", dtype=dtype):
            got = encoder.embed(imgs, *meta, pooling="mean")
    assert torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got.float(), want, dim=1)
    assert cosine.min() > 0.99
