"""The MoE-MAE model: published architecture and layout, fast path vs. the reference oracle."""

import json
import re
from pathlib import Path

import pytest
import torch

from models import ops
from models.layout import optimizer_state_for, published_optimizer_state
from models.moe_mae import (CLS_INDEX, MODEL_SIZES, MOEMAE, MAEObjective, MoELayer,
                            NoisyTopKGate, Routing, build_mae, build_model, count_parameters,
                            load_balancing_loss, moe_layers, sincos_position_embedding,
                            use_reference_impl)
from published_model import published_objective, published_parameters

LAYOUT_JSON = Path(__file__).resolve().parents[2] / "shared" / "reference" / \
    "moe_mae_state_dict_layout.json"
# From the published model (also in the layout JSON): size S, 40x40x7 input, patch 4.
PUBLISHED_S_PARAMETERS, PUBLISHED_S_ENCODER_PARAMETERS = 2_537_562, 2_366_798


@pytest.fixture(scope="module")
def layout():
    if not LAYOUT_JSON.exists():
        pytest.skip(f"published state_dict layout not found at {LAYOUT_JSON}")
    return json.loads(LAYOUT_JSON.read_text())


def batch(n=4, seed=0, with_meta=True):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 7, 40, 40, generator=g)
    meta = [torch.randn(n, 2, generator=g) for _ in range(4)] if with_meta else [None] * 4
    return imgs, meta


def mae_of(size="S", seed=0):
    torch.manual_seed(seed)
    return build_mae(size)


# ----------------------------------------------------------------- architecture and layout


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_output_shapes(size):
    mae = mae_of(size).eval()
    dim = MODEL_SIZES[size]["embed_dim"]
    imgs, meta = batch(3)
    with torch.no_grad():
        normed, moe_loss, raw = mae.encoder(imgs, *meta)
        pred, mask, ids_restore, mae_loss = mae(imgs, *meta)
    assert normed.shape == raw.shape == (3, 105, dim)
    assert moe_loss.shape == () and mae_loss.shape == ()
    assert pred.shape == (3, 100, 4 * 4 * 7)
    assert mask.shape == ids_restore.shape == (3, 100)
    assert mae.encoder.embed(imgs, *meta, pooling="cls").shape == (3, dim)
    assert mae.encoder.embed(imgs, *meta, pooling="mean").shape == (3, dim)
    assert mae.encoder.embed(imgs, *meta, pooling="all").shape == (3, 105 * dim)
    assert mae.encoder.embed(imgs, *meta, pooling="meta_cls").shape == (3, 5 * dim)


def test_published_parameter_counts():
    mae = build_mae("S")
    assert count_parameters(mae) == PUBLISHED_S_PARAMETERS
    assert count_parameters(mae.encoder) == PUBLISHED_S_ENCODER_PARAMETERS


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_parameter_counts_match_layout(layout, size):
    mae = build_mae(size)
    assert count_parameters(mae) == layout[size]["num_parameters"]
    assert count_parameters(mae.encoder) == layout[size]["num_encoder_parameters"]


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_published_state_dict_loads_strictly_and_round_trips(layout, size):
    """A state_dict built from the JSON's keys and shapes (shared V/W2 and the patch_embed
    alias get the same tensor, as in a real published checkpoint) loads with strict key
    checking, and state_dict() gives back exactly the same keys, shapes and values."""
    g = torch.Generator().manual_seed(1)
    shapes = layout[size]["state_dict"]
    shared = {}
    published = {}
    for key, shape in shapes.items():
        # one tensor per shared module: experts.<e>.V/W2 of a layer, and the patch_embed alias
        group = key.replace("patch_embed.", "encoder.patch_proj.")
        if ".experts." in group and (".V." in group or ".W2." in group):
            prefix, rest = group.split(".experts.", 1)
            group = prefix + ".experts.*." + rest.split(".", 1)[1]
        if group not in shared:
            shared[group] = torch.randn(shape, generator=g)
        published[key] = shared[group]
    mae = build_mae(size)
    mae.load_state_dict(published, strict=True)
    saved = mae.state_dict()
    assert list(saved) == list(shapes)
    for key, value in published.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_state_dict_has_the_published_keys_shapes_and_order(layout, size):
    state = build_mae(size).state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == \
        list(layout[size]["state_dict"].items())


def published_parameter_names(keys):
    """The published model's ``parameters()`` names: its state_dict keys without the copies
    of shared modules (each layer's V and W2 are expert 0's; patch_embed is
    encoder.patch_proj)."""
    return [k for k in keys if not re.search(r"\.experts\.[1-9]\d*\.(V|W2)\.", k)
            and not k.startswith("patch_embed.")]


def test_the_parameters_are_the_fused_tensors_and_nothing_is_concatenated(monkeypatch):
    mae = mae_of("XXS").train()
    names = [name for name, _ in mae.named_parameters()]
    layer = {name.split(".", 3)[3] for name in names if name.startswith("encoder.layers.0.")}
    assert layer == {"norm1.weight", "norm1.bias", "attn.qkv_weight", "attn.qkv_bias",
                     "attn.out_proj.weight", "attn.out_proj.bias", "norm2.weight",
                     "norm2.bias", "moe.stacked_weight", "moe.stacked_bias", "moe.W2.weight",
                     "moe.W2.bias", "moe.gate.weight", "moe.gate.bias"}
    # per layer, fewer published linears (weight and bias): q/k/v become one (2 fewer), the
    # gate's two one (1 fewer), the E experts' W and V one (E fewer)
    layers = list(mae.encoder.layers) + list(mae.decoder_layers)
    published = len(published_parameter_names(mae.state_dict()))
    assert len(names) == published - sum(2 * (3 + layer.moe.num_experts) for layer in layers)

    def cat_without_parameters(tensors, *args, **kwargs):
        assert not any(isinstance(t, torch.nn.Parameter) for t in tensors)
        return cat(tensors, *args, **kwargs)

    cat = torch.cat
    monkeypatch.setattr(torch, "cat", cat_without_parameters)
    training_step(mae, *batch(2))


def test_the_forward_computes_with_the_loaded_published_tensors():
    """All experts of a layer loaded with expert 0's W: the mixture is expert 0's published
    SwiGLU, computed here from the loaded tensors themselves."""
    torch.manual_seed(0)
    moe = MoELayer(16, 8, num_experts=4).eval()
    state = moe.state_dict()
    for e in range(1, 4):
        state[f"experts.{e}.W.weight"] = state["experts.0.W.weight"]
        state[f"experts.{e}.W.bias"] = state["experts.0.W.bias"]
    state = {k: torch.randn_like(v) if k.startswith("experts.0.") else v.clone()
             for k, v in state.items()}
    for e in range(1, 4):  # the copies: the published V and W2 are shared
        for name in ("W.weight", "W.bias", "V.weight", "V.bias", "W2.weight", "W2.bias"):
            state[f"experts.{e}.{name}"] = state[f"experts.0.{name}"]
    moe.load_state_dict(state, strict=True)
    x = torch.randn(1, 30, 16)
    linear = torch.nn.functional.linear
    want = linear(torch.nn.functional.silu(
        linear(x, state["experts.0.W.weight"], state["experts.0.W.bias"]))
        * linear(x, state["experts.0.V.weight"], state["experts.0.V.bias"]),
        state["experts.0.W2.weight"], state["experts.0.W2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], want, rtol=1e-5, atol=1e-5)
        for backend in ("reference", "torch"):
            with ops.use_backend(moe, backend):
                torch.testing.assert_close(moe(x)[0], want, rtol=1e-5, atol=1e-5)


def test_published_training_and_ours_agree_and_their_optimizer_states_convert_exactly(layout):
    """AdamW over published-layout parameters (tests/published_model.py) and over ours, two
    steps from the same weights: the same weights, and our optimizer state in the published
    layout is the published optimizer's, bit for bit, both ways."""
    mae = mae_of("XXS").train()
    published = published_parameters(mae)
    assert [n for n, _ in published.named_parameters()] == \
        published_parameter_names(layout["XXS"]["state_dict"])
    ours = torch.optim.AdamW(mae.parameters(), lr=1e-3, weight_decay=0.05)
    theirs = torch.optim.AdamW(published.parameters(), lr=1e-3, weight_decay=0.05)
    objectives = (MAEObjective(mae), published_objective(mae, published))
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        imgs, noise = torch.randn(4, 7, 40, 40, generator=g), torch.rand(4, 100, generator=g)
        for objective, optimizer in zip(objectives, (ours, theirs)):
            with torch.random.fork_rng():
                torch.manual_seed(step)  # the same gate noise and dropout
                loss = objective(imgs, noise=noise)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for key, value in mae.state_dict().items():
        assert torch.equal(value, published.state_dict()[key]), key

    def assert_equal_states(a, b):
        assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
        for i, state in b["state"].items():
            assert state.keys() == a["state"][i].keys()
            assert all(torch.equal(a["state"][i][k], v) for k, v in state.items()), i

    saved = published_optimizer_state(mae, ours)
    assert_equal_states(saved, theirs.state_dict())
    fresh = torch.optim.AdamW(published_parameters(mae).parameters(), lr=1e-3)
    fresh.load_state_dict(saved)  # what a published --resume does with our checkpoint
    assert_equal_states(fresh.state_dict(), theirs.state_dict())
    for state in (saved, ours.state_dict()):  # either layout back into ours
        resumed = torch.optim.AdamW(mae.parameters(), lr=1e-3)
        resumed.load_state_dict(optimizer_state_for(mae, resumed, state))
        assert_equal_states(resumed.state_dict(), ours.state_dict())
    with pytest.raises(ValueError, match="optimizer state has"):
        optimizer_state_for(mae, ours, {"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_expert_layout_follows_the_published_schedule():
    encoder = build_model("S")
    assert encoder.experts_config == [3] * 5 + [4] * 5 + [5] * 5
    assert encoder.dh_list[0] == 144 and encoder.dh_list[-1] == 72
    assert [layer.moe.num_experts for layer in encoder.layers] == encoder.experts_config


# ------------------------------------------------------------------------------- training


def training_step(mae, imgs, meta):
    pred, mask, _, moe_loss = mae(imgs, *meta)
    loss_masked, loss_unmasked = mae.reconstruction_losses(imgs, pred, mask)
    loss = loss_masked + 0.1 * loss_unmasked + 0.5 * moe_loss
    loss.backward()
    return loss


def test_patch_position_embeddings_start_as_2d_sine_cosine():
    """Encoder and decoder patch positions start from MAE's fixed 2-D sine-cosine table
    (learned from there): what lets the demo learn spatial structure on 168 chips."""
    grid, dim = 10, 144
    table = sincos_position_embedding(grid, dim)
    assert table.shape == (grid * grid, dim)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    # the first half depends on the row only, the second half on the column only
    assert torch.equal(table[:, :dim // 2], table[rows * grid, :dim // 2])
    assert torch.equal(table[:, dim // 2:], table[cols, dim // 2:])
    assert torch.allclose(table[:, 0], torch.sin(rows.float()))  # frequency 1
    assert torch.allclose(table[:, dim // 4], torch.cos(rows.float()))
    assert len({tuple(r) for r in table.tolist()}) == grid * grid  # every position distinct
    mae = mae_of("XXS")
    encoder = mae.encoder
    patches = encoder.pos_embed[0, encoder.num_meta_tokens + 1:]
    assert torch.equal(patches, sincos_position_embedding(encoder.patch_grid, encoder.embed_dim))
    decoder_dim = mae.decoder_pos_embed.shape[-1]
    assert torch.equal(mae.decoder_pos_embed[0],
                       sincos_position_embedding(encoder.patch_grid, decoder_dim))
    assert encoder.pos_embed.requires_grad and mae.decoder_pos_embed.requires_grad
    with pytest.raises(ValueError, match="dim % 4"):
        sincos_position_embedding(grid, 142)


def test_every_parameter_receives_a_gradient():
    mae = mae_of().train()
    loss = training_step(mae, *batch(8))
    assert torch.isfinite(loss)
    missing = [name for name, p in mae.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters())


def starve_expert(moe: MoELayer, expert: int):
    """Make the gate never pick ``expert``: a huge negative bias on its logit."""
    with torch.no_grad():
        moe.gate.Wg.bias[expert] = -1e4


def test_a_batch_where_an_expert_gets_no_token_still_trains():
    mae = mae_of().train()
    name, moe = next(moe_layers(mae.encoder))
    starve_expert(moe, 2)
    imgs, meta = batch(8)
    routed = []
    handle = moe.gate.register_forward_hook(lambda m, i, out: routed.append(out.topk_idx))
    loss = training_step(mae, imgs, meta)
    handle.remove()
    assert not (routed[0] == 2).any(), f"{name}: expert 2 still received tokens"
    assert torch.isfinite(loss)
    # the unused expert's rows of the stacked weight get a zero gradient, so DDP sees every
    # parameter
    rows = {piece.key: piece.rows for piece in moe.published_layout()}
    assert moe.stacked_weight.grad[rows["experts.2.W.weight"]].abs().max() == 0
    assert moe.stacked_weight.grad[rows["experts.0.W.weight"]].abs().max() > 0
    assert all(p.grad is not None for p in mae.parameters())


def test_fast_gradients_match_the_reference():
    """The hand-written backward passes (expert mixture, oneDNN linears) against autograd of
    the published computation. eval(): no gate noise and no dropout, so both paths route
    identically; losses include the load-balancing term."""
    mae = mae_of().eval()
    imgs, meta = batch(4)
    noise = torch.rand(4, 100, generator=torch.Generator().manual_seed(3))

    def grads(reference):
        mae.zero_grad()
        with use_reference_impl(mae, reference):
            pred, mask, _, moe_loss = mae(imgs, *meta, noise=noise)
            loss_masked, loss_unmasked = mae.reconstruction_losses(imgs, pred, mask)
            (loss_masked + 0.1 * loss_unmasked + 0.5 * moe_loss).backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in mae.named_parameters()}

    fast, reference = grads(False), grads(True)
    scale = max(g.abs().max() for g in reference.values())
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4,
                                   atol=1e-5 * scale, msg=name)


# ---------------------------------------------------------------------- fast path = oracle


@pytest.mark.parametrize("size", ["S", "XXS"])
def test_fast_path_equals_reference_in_eval(size):
    mae = mae_of(size).eval()
    imgs, meta = batch(8, seed=2)
    noise = torch.rand(8, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast_tokens = mae.encoder(imgs, *meta)[0]
        fast_pred = mae(imgs, *meta, noise=noise)[0]
        with use_reference_impl(mae):
            ref_tokens = mae.encoder(imgs, *meta)[0]
            ref_pred = mae(imgs, *meta, noise=noise)[0]
    assert (fast_tokens - ref_tokens).abs().max() <= 1e-5
    assert (fast_pred - ref_pred).abs().max() <= 1e-5


def test_use_reference_impl_restores_the_fast_path():
    mae = mae_of("XXS")
    default = ops.backend_of(mae)
    assert default != "reference"
    with use_reference_impl(mae):
        assert ops.backend_of(mae) == "reference"
    assert ops.backend_of(mae) == default


def test_eval_is_bit_identical_while_training_routing_is_noisy():
    mae = mae_of().eval()
    imgs, meta = batch(4)
    noise = torch.rand(4, 100)
    with torch.no_grad():
        first = mae.encoder(imgs, *meta)[0]
        second = mae.encoder(imgs, *meta)[0]
        pred_a = mae(imgs, *meta, noise=noise)[0]
        pred_b = mae(imgs, *meta, noise=noise)[0]
    assert torch.equal(first, second) and torch.equal(pred_a, pred_b)

    gate: NoisyTopKGate = mae.encoder.layers[0].moe.gate
    tokens = torch.randn(500, gate.Wg.in_features)
    gate.train()
    noisy_a, noisy_b = gate(tokens), gate(tokens)
    assert not torch.equal(noisy_a.noisy_logits, noisy_b.noisy_logits)
    assert not torch.equal(noisy_a.topk_idx, noisy_b.topk_idx)
    gate.eval()
    assert torch.equal(gate(tokens).noisy_logits, gate(tokens).clean_logits)


# ------------------------------------------------------------------------ masking and loss


@pytest.mark.parametrize("ratio,kept", [(0.0, 100), (0.75, 25)])
def test_mask_ratio(ratio, kept):
    mae = mae_of("XXS").eval()
    imgs, meta = batch(3)
    with torch.no_grad():
        pred, mask, ids_restore, moe_loss = mae(imgs, *meta, mask_ratio=ratio)
        latent = mae.forward_encoder(imgs, *meta, mask_ratio=ratio)[0]
    assert latent.shape[1] == 5 + kept
    assert (mask.sum(1) == 100 - kept).all()
    assert pred.shape == (3, 100, 112) and torch.isfinite(pred).all()
    assert torch.isfinite(moe_loss)
    loss_masked, loss_unmasked = mae.reconstruction_losses(imgs, pred, mask)
    assert torch.isfinite(loss_masked) and torch.isfinite(loss_unmasked)
    if ratio == 0.0:
        assert loss_masked == 0


def test_masking_noise_makes_masks_reproducible():
    mae = mae_of("XXS")
    noise = torch.rand(2, 100)
    keep_a, restore_a, mask_a = mae.random_masking(2, 0.75, noise)
    keep_b, restore_b, mask_b = mae.random_masking(2, 0.75, noise.clone())
    assert torch.equal(keep_a, keep_b) and torch.equal(mask_a, mask_b)
    # kept patches are the 25 with the smallest noise, and ids_restore inverts the shuffle
    assert torch.equal(keep_a.sort(1).values, noise.argsort(1)[:, :25].sort(1).values)
    shuffle = noise.argsort(1)
    assert torch.equal(shuffle.gather(1, restore_a), torch.arange(100).expand(2, -1))
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 1.0)


def test_reconstruction_losses_average_over_masked_and_visible_patches():
    mae = mae_of("XXS")
    imgs = torch.zeros(1, 7, 40, 40)
    pred = torch.zeros(1, 100, 112)
    pred[0, :10] = 1.0  # squared error 112 per patch on the first 10 patches
    mask = torch.zeros(1, 100)
    mask[0, :20] = 1  # masked: 10 wrong + 10 right; visible: 80 right
    loss_masked, loss_unmasked = mae.reconstruction_losses(imgs, pred, mask)
    assert loss_masked.item() == pytest.approx(112 * 10 / 20)
    assert loss_unmasked.item() == 0


def test_patchify_matches_unfold_and_unpatchify_inverts_it():
    mae = mae_of("XXS")
    imgs = torch.randn(2, 7, 40, 40)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 100, 112)
    # patch 1 is the second 4x4 block of the first row, channel-major inside the patch
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].reshape(-1))
    assert torch.equal(mae.unpatchify(patches), imgs)


def test_moe_loss_is_finite_and_positive():
    mae = mae_of().train()
    imgs, meta = batch(4)
    for _ in range(2):
        _, _, _, moe_loss = mae(imgs, *meta)
        assert torch.isfinite(moe_loss) and moe_loss > 0
    mae.eval()
    with torch.no_grad():
        moe_loss = mae.encoder(imgs, *meta)[1]
    assert torch.isfinite(moe_loss) and moe_loss > 0


def test_load_balancing_uses_shazeers_thresholds():
    """E=3, k=2, one token with noisy logits (3, 2, 1): experts 0 and 1 are in the top 2, so
    their threshold is the 3rd largest (1); expert 2 is outside, its threshold is the 2nd
    largest (2)."""
    clean = torch.tensor([[2.5, 2.0, 0.0]])
    noisy = torch.tensor([[3.0, 2.0, 1.0]])
    scale = torch.tensor([[1.0, 2.0, 0.5]])
    topk_vals, topk_idx = noisy.topk(2)
    routing = Routing.build(topk_idx, topk_vals.softmax(-1), clean, noisy, scale)
    normal = torch.distributions.Normal(0.0, 1.0)
    load = normal.cdf(torch.tensor([(2.5 - 1.0) / 1.0, (2.0 - 1.0) / 2.0, (0.0 - 2.0) / 0.5]))
    gates = torch.tensor([topk_vals.softmax(-1)[0, 0], topk_vals.softmax(-1)[0, 1], 0.0])

    def cv(v):
        return v.std(unbiased=False) / (v.mean() + 1e-6)

    expected = 0.01 * cv(gates) + 0.01 * cv(load)
    torch.testing.assert_close(load_balancing_loss(routing), expected)


# ------------------------------------------------------------------------------ embeddings


def test_missing_metadata_behaves_as_zeros():
    mae = mae_of("XXS").eval()
    imgs, _ = batch(3)
    zeros = [torch.zeros(3, 2) for _ in range(4)]
    with torch.no_grad():
        assert torch.equal(mae.encoder(imgs)[0], mae.encoder(imgs, *zeros)[0])
        noise = torch.rand(3, 100)
        assert torch.equal(mae(imgs, noise=noise)[0], mae(imgs, *zeros, noise=noise)[0])


def test_metadata_changes_the_embedding():
    encoder = mae_of("XXS").encoder.eval()
    imgs, meta = batch(3)
    with torch.no_grad():
        assert not torch.allclose(encoder.embed(imgs, *meta), encoder.embed(imgs))


def test_cls_pooling_is_token_4_of_all_tokens():
    encoder = mae_of().encoder.eval()
    imgs, meta = batch(5)
    dim = encoder.embed_dim
    with torch.no_grad():
        all_tokens = encoder.embed(imgs, *meta, pooling="all")
        cls = encoder.embed(imgs, *meta, pooling="cls")
        raw = encoder.forward_features(imgs, *meta, normed=False)
        normed = encoder(imgs, *meta)[0]
    assert torch.equal(cls, all_tokens[:, CLS_INDEX * dim:(CLS_INDEX + 1) * dim])
    assert torch.equal(cls, all_tokens.view(5, 105, dim)[:, 4])
    torch.testing.assert_close(encoder.norm(raw), normed)


def test_chunked_inference_matches_one_batch():
    encoder = mae_of("XXS").encoder.eval()
    imgs, meta = batch(10)
    with torch.no_grad():
        whole = encoder.forward_features(imgs, *meta, chunk_size=10)
        chunked = encoder.forward_features(imgs, *meta, chunk_size=3)
        pooled = encoder.embed(imgs, *meta, pooling="mean", chunk_size=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, whole.mean(1), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    encoder = build_model("XXS")
    with pytest.raises(ValueError, match="pooling"):
        encoder.embed(torch.zeros(1, 7, 40, 40), pooling="max")
    with pytest.raises(ValueError, match="model size"):
        build_model("L")
    with pytest.raises(ValueError, match="patch_size"):
        build_model("S", img_size=42)
    assert isinstance(MOEMAE(build_model("XXS")), MOEMAE)


# ------------------------------------------------------ what the published analysis reads


def test_gate_and_experts_offer_the_published_analysis_interface():
    """The published analysis unpacks ``gates, _, topk_idx, *_ = moe.gate(x)``, calls
    ``moe.experts[e](x)``, ``gate.Wg(x)``, ``gate.Wnoise(x)`` and replaces ``gate.forward`` by a
    function returning that 5-tuple (its deterministic routing); layers must keep working."""
    mae = mae_of("XXS").eval()
    layer = mae.encoder.layers[0]
    moe, gate = layer.moe, layer.moe.gate
    x = torch.randn(2, 105, 108, generator=torch.Generator().manual_seed(5))
    flat = x.reshape(-1, 108)
    with torch.no_grad():
        gates, noisy, topk_idx, noise_scale, clean = moe.gate(flat)[:5]
        assert gates.shape == (210, moe.num_experts) and topk_idx.shape == (210, gate.k)
        torch.testing.assert_close(gates.sum(1), torch.ones(210))
        assert torch.equal((gates > 0).sum(1), torch.full((210,), gate.k))
        torch.testing.assert_close(clean, gate.Wg(flat), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(noise_scale, torch.nn.functional.softplus(gate.Wnoise(flat)),
                                   rtol=1e-5, atol=1e-5)
        assert len(moe.experts) == moe.num_experts
        mixed = sum(gates[:, e:e + 1] * moe.experts[e](flat) for e in range(moe.num_experts))
        want, _ = moe(x)
        torch.testing.assert_close(mixed.view_as(x), want, rtol=1e-4, atol=1e-5)

        def published_forward(tokens):  # what the published deterministic routing installs
            logits = gate.Wg(tokens)
            vals, idx = logits.topk(gate.k, dim=-1)
            dense = tokens.new_zeros(logits.shape).scatter(-1, idx, vals.softmax(-1))
            return dense, logits, idx, torch.nn.functional.softplus(gate.Wnoise(tokens)), logits

        out, loss = layer(x)
        gate.forward = published_forward
        try:
            out_published, loss_published = layer(x)
        finally:
            del gate.forward
    torch.testing.assert_close(out_published, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_published, loss, rtol=1e-4, atol=1e-6)
