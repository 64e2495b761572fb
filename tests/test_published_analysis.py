"""The published expert-analysis API in utils/analysis_utils.py (the functions the published
moe_experiments.ipynb imports): the published signatures, and outputs that agree with the
project's own routing, contribution and ablation maps, on a seeded XXS model (3, 4 and 5
experts in its three stages) and the bundled sample_dataset."""

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from torch.utils.data import DataLoader, Subset, default_collate

import utils.analysis_utils as analysis
from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.builders import build_bigearthnet
from models.moe_mae import NoisyTopKGate, build_mae
from transformation.transformer import CenterCrop40, Compose, ToFloat, ZScoreNormalize
from utils.data_config import BigEarthNetInfo
from utils.data_utils import rgb_bands, stretch, unnormalize

SAMPLE = Path(__file__).resolve().parents[1] / "sample_dataset"
GRID, K, META = 10, 2, 4
CHIPS = 3
LAYERS = (0, 3, 8)  # the first layer of each stage: 3, 4 and 5 experts
BEN_MEAN, BEN_STD = BigEarthNetInfo.STATISTICS["mean"], BigEarthNetInfo.STATISTICS["std"]
EMPTY = inspect.Parameter.empty
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY

# Read from the published utils/analysis_utils.py: (name, default) in order; names after "*"
# are keyword-only.
PUBLISHED_SIGNATURES = {
    "layer_report_simple": [
        ("model", EMPTY), ("imgs", EMPTY), ("meta_week", None), ("meta_hour", None),
        ("meta_lat", None), ("meta_lon", None), ("image_index", 0), ("layer_index", 0),
        ("max_values", np.array([65454.0, 65454.0, 65330.308], dtype=np.float32)),
        ("rgb_bands", (3, 2, 1)), ("device", "cuda")],
    "deterministic_routing": [("model", EMPTY)],
    "encoder_tokens_per_layer": [
        ("encoder", EMPTY), ("imgs", EMPTY), ("meta_week", None), ("meta_hour", None),
        ("meta_lat", None), ("meta_lon", None)],
    "routing_assign_and_usage_for_layer": [
        ("moe_layer", EMPTY), ("x_tokens", EMPTY), ("patch_grid", EMPTY),
        ("num_meta_tokens", 4), ("has_cls", True)],
    "plot_expert_usage_bars": [("usage", EMPTY), ("title", "Expert usage")],
    "plot_routing_assignment_with_dots": [
        ("base_rgb", EMPTY), "*", ("assignment_map", EMPTY), ("num_experts", None),
        ("patch_size", 16), ("title", "Routing: top-1 expert per patch"),
        ("border_color", (1, 1, 1, 0.55)), ("border_lw", 0.6), ("dot_size", 18),
        ("dot_edge_color", "k"), ("dot_edge_lw", 0.25)],
    "get_expert_contributions_for_layer": [("moe_layer", EMPTY), ("x_tokens", EMPTY)],
    "tokens_to_patch_maps": [
        ("contributions", EMPTY), ("patch_grid", EMPTY), ("num_meta_tokens", 4),
        ("has_cls", True)],
    "show_original_plus_expert_heatmaps": [
        ("maps_for_image", EMPTY), ("base_rgb", EMPTY), ("title", ""), ("patch_size", 16),
        ("alpha", 0.4), ("cmap", "plasma"), ("routed_counts", None),
        ("clip_percentile", 99.0), ("show_standalone", True)],
    # + residual_base_tokens, an addition (trailing, default None)
    "compute_ablation_heatmaps": [
        ("layer_moe", EMPTY), ("x_tokens", EMPTY), ("patch_grid", EMPTY),
        ("num_meta_tokens", EMPTY), ("has_cls", True), ("propagate_through", None),
        ("layer_norm", None), ("residual_base_tokens", None)],
    "make_rgb": [
        ("imgs", EMPTY), ("index", EMPTY), ("max_values", EMPTY), ("bands", (3, 2, 1)),
        ("mean", BEN_MEAN), ("std", BEN_STD)],
    "to_rgb_landsat": [
        ("img_tensor", EMPTY), ("max_values", EMPTY), ("bands", (3, 2, 1)),
        ("mean", BEN_MEAN), ("std", BEN_STD)],
    "safe_unnormalize": [("x", EMPTY), ("mean", None), ("std", None)],
    # an addition, the helper behind encoder_tokens_per_layer
    "encoder_layer_states": [
        ("encoder", EMPTY), ("imgs", EMPTY), ("meta_week", None), ("meta_hour", None),
        ("meta_lat", None), ("meta_lon", None)],
}


def same_default(actual, expected) -> bool:
    if isinstance(expected, np.ndarray):
        return isinstance(actual, np.ndarray) and actual.dtype == expected.dtype and \
            np.array_equal(actual, expected)
    if isinstance(expected, (list, tuple)):
        return list(actual) == list(expected)
    return type(actual) is type(expected) and actual == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIGNATURES))
def test_signature_is_the_published_one(name):
    expected = PUBLISHED_SIGNATURES[name]
    keyword_only_from = expected.index("*") if "*" in expected else len(expected)
    expected = [p for p in expected if p != "*"]
    parameters = list(inspect.signature(getattr(analysis, name)).parameters.values())
    assert [p.name for p in parameters] == [p for p, _ in expected]
    for index, (parameter, (_, default)) in enumerate(zip(parameters, expected)):
        assert (parameter.kind == KEYWORD_ONLY) == (index >= keyword_only_from), parameter.name
        if default is EMPTY:
            assert parameter.default is EMPTY, parameter.name
        else:
            assert same_default(parameter.default, default), parameter.name


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return build_mae("XXS").eval()


@pytest.fixture(scope="module")
def batch():
    """The first CHIPS bundled test chips: imgs (CHIPS, 7, 40, 40) and 4 metas (CHIPS, 2)."""
    dataset = build_bigearthnet(SAMPLE, SAMPLE / "bigearthnet-test.csv", supervised=False)
    imgs, _, *meta = default_collate([dataset[i] for i in range(CHIPS)])
    return imgs, meta


@pytest.fixture(scope="module")
def states(mae, batch):
    imgs, meta = batch
    return analysis.encoder_layer_states(mae.encoder, imgs, *meta)


@pytest.fixture(scope="module")
def tokens(mae, batch):
    imgs, meta = batch
    return analysis.encoder_layer_tokens(mae, imgs, *meta)


@pytest.fixture(scope="module")
def project(mae, batch, tokens):
    """The project's own analysis of LAYERS, ablations after the final norm and at the layer."""
    imgs, meta = batch
    return {(layer, at): analysis.analyze_layer(mae, imgs, *meta, layer=layer, measured_at=at,
                                                tokens=tokens)
            for layer in LAYERS for at in ("final", "layer")}


@pytest.fixture
def shown(monkeypatch):
    """The figures the published functions show, in order."""
    figures = []
    monkeypatch.setattr(analysis, "_show_figure", figures.append)
    return figures


def moe_input(states, layer):
    return states[0][layer]["z_pre_moe"]


# ------------------------------------------------------------------------ tokens, routing


def test_encoder_tokens_per_layer_are_the_layer_outputs(mae, batch, states, tokens):
    imgs, meta = batch
    encoder = mae.encoder
    tokens_by_layer, moe_loss, num_meta = analysis.encoder_tokens_per_layer(encoder, imgs, *meta)
    reference = tokens
    normed, encoder_loss, _ = encoder(imgs, *meta)
    assert num_meta == META and len(tokens_by_layer) == len(encoder.layers) == 9
    assert all(t.shape == (CHIPS, META + 1 + GRID * GRID, encoder.embed_dim) for t in tokens_by_layer)
    for layer in range(8):
        torch.testing.assert_close(tokens_by_layer[layer], reference.outputs[layer])
        torch.testing.assert_close(states[0][layer]["z_pre_moe"], reference.moe_inputs[layer])
        torch.testing.assert_close(states[0][layer]["x_after_attn"], reference.residuals[layer])
    torch.testing.assert_close(tokens_by_layer[-1], normed, rtol=1e-4, atol=1e-5)
    assert moe_loss.item() == pytest.approx(encoder_loss.item(), rel=1e-5) and moe_loss.item() > 0
    assert not moe_loss.requires_grad


@pytest.mark.parametrize("layer", LAYERS)
def test_routing_assignment_and_usage_are_the_project_routing(mae, states, project, layer):
    moe = mae.encoder.layers[layer].moe
    x = moe_input(states, layer)
    assign, usage = analysis.routing_assign_and_usage_for_layer(moe, x, GRID)
    expected = project[layer, "final"]
    assert assign.shape == (CHIPS, GRID, GRID) and usage.shape == (CHIPS, moe.num_experts)
    assert assign.dtype == usage.dtype == np.int64
    np.testing.assert_array_equal(assign, expected.top1.numpy())
    np.testing.assert_array_equal(usage, expected.usage.numpy())
    assert (usage.sum(axis=1) == K * GRID * GRID).all()
    np.testing.assert_allclose((usage / usage.sum(axis=1, keepdims=True)).sum(axis=1), 1.0)
    # tokens without a CLS token: the same patches
    no_cls = torch.cat([x[:, :META], x[:, META + 1:]], dim=1)
    assign_no_cls, usage_no_cls = analysis.routing_assign_and_usage_for_layer(
        moe, no_cls, GRID, has_cls=False)
    np.testing.assert_array_equal(assign_no_cls, assign)
    np.testing.assert_array_equal(usage_no_cls, usage)


def test_a_token_count_that_does_not_fit_the_grid_is_an_error(mae, states):
    with pytest.raises(ValueError, match="patch_grid \\*\\* 2 = 64"):
        analysis.routing_assign_and_usage_for_layer(mae.encoder.layers[0].moe,
                                                    moe_input(states, 0), 8)


def test_deterministic_routing_removes_the_noise_and_restores_the_modes(mae, states):
    model = build_mae("XXS").train()
    model.load_state_dict(mae.state_dict())
    gate = model.encoder.layers[0].moe.gate
    x = moe_input(states, 0).reshape(-1, model.encoder.embed_dim)
    clean = x @ gate.Wg.weight.t() + gate.Wg.bias
    torch.manual_seed(1)
    noisy = [gate(x).topk_idx for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # training mode: noise in every call
    with analysis.deterministic_routing(model):
        assert all(not g.training for g in model.modules() if isinstance(g, NoisyTopKGate))
        assert model.encoder.layers[0].moe.dropout.training  # only the gates change mode
        routing = [gate(x) for _ in range(2)]
    assert torch.equal(routing[0].topk_idx, routing[1].topk_idx)
    torch.testing.assert_close(routing[0].topk_idx, clean.topk(K, dim=-1).indices)
    assert all(module.training for module in model.modules())


# --------------------------------------------------------------- contributions, ablations


@pytest.mark.parametrize("layer", LAYERS)
def test_contribution_maps_are_the_project_maps(mae, states, project, layer):
    moe = mae.encoder.layers[layer].moe
    contributions = analysis.get_expert_contributions_for_layer(moe, moe_input(states, layer))
    assert contributions.shape == (CHIPS, META + 1 + GRID * GRID, moe.num_experts)
    assert torch.isfinite(contributions).all() and (contributions >= 0).all()
    maps = analysis.tokens_to_patch_maps(contributions, GRID)
    assert len(maps) == CHIPS and all(len(m) == moe.num_experts for m in maps)
    assert all(m.shape == (GRID, GRID) and isinstance(m, np.ndarray) for row in maps for m in row)
    stacked = np.array(maps)  # (CHIPS, E, G, G)
    np.testing.assert_allclose(stacked, project[layer, "final"].contributions.numpy(), rtol=1e-6)
    # zero exactly where a patch does not route to the expert
    routed = project[layer, "final"].gates.numpy() > 0  # (CHIPS, patches, E)
    assert np.array_equal(stacked.reshape(CHIPS, moe.num_experts, -1).transpose(0, 2, 1) > 0, routed)


def test_tokens_to_patch_maps_needs_the_patch_tokens_only():
    values = torch.arange(2 * 14 * 3, dtype=torch.float32).view(2, 14, 3)  # (B, L, E)
    with pytest.raises(ValueError, match="leave 10 patch tokens, not patch_grid"):
        analysis.tokens_to_patch_maps(values, 3, has_cls=False)
    maps = analysis.tokens_to_patch_maps(values, 3, has_cls=False, num_meta_tokens=5)
    np.testing.assert_array_equal(maps[1][2], values[1, 5:, 2].view(3, 3).numpy())


@pytest.mark.parametrize("layer", LAYERS)
def test_ablation_maps_are_the_project_maps(mae, states, project, layer):
    encoder = mae.encoder
    moe = encoder.layers[layer].moe
    x = moe_input(states, layer)
    final = analysis.compute_ablation_heatmaps(
        moe, x, GRID, META, propagate_through=encoder.layers[layer + 1:], layer_norm=encoder.norm,
        residual_base_tokens=states[0][layer]["x_after_attn"])
    assert isinstance(final, np.ndarray) and final.shape == (CHIPS, moe.num_experts, GRID, GRID)
    assert np.isfinite(final).all() and (final >= 0).all() and final.max() > 0
    np.testing.assert_allclose(final, project[layer, "final"].ablations.numpy(), atol=2e-5)
    at_layer = analysis.compute_ablation_heatmaps(moe, x, GRID, META)
    np.testing.assert_allclose(at_layer, project[layer, "layer"].ablations.numpy(), atol=1e-6)
    np.testing.assert_allclose(at_layer, project[layer, "layer"].contributions.numpy(),
                               atol=1e-6)


# ------------------------------------------------------------------------------- RGB


def test_safe_unnormalize(batch):
    img = batch[0][0]
    assert analysis.safe_unnormalize(img) is img
    assert analysis.safe_unnormalize(img, mean=BEN_MEAN) is img
    torch.testing.assert_close(analysis.safe_unnormalize(img, BEN_MEAN, BEN_STD),
                               unnormalize(img, BEN_MEAN, BEN_STD))


def test_rgb_is_the_stretched_true_colour_chip(batch):
    imgs = batch[0]
    rgb = analysis.make_rgb(imgs, 2, max_values=np.array([65454.0, 65454.0, 65330.308]))
    assert rgb.shape == (40, 40, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    np.testing.assert_array_equal(rgb, analysis.to_rgb_landsat(
        imgs[2], max_values=np.array([65454.0, 65454.0, 65330.308])))
    # one scale for the three bands: the project's true-colour chip with a 1-99 stretch
    raw = rgb_bands(unnormalize(imgs[2], BEN_MEAN, BEN_STD))
    expected = stretch(raw, tuple(np.percentile(raw, (1, 99))))
    np.testing.assert_allclose(analysis.to_rgb_landsat(imgs[2], max_values=65454.0), expected,
                               atol=1e-5)
    # bands the chip lacks are left out
    two_bands = analysis.to_rgb_landsat(imgs[2], max_values=[1.0, 1.0], bands=(3, 2, 11))
    assert two_bands.shape == (40, 40, 2)
    # a chip that is not z-scored, as it is
    flat = analysis.to_rgb_landsat(torch.full((7, 4, 4), 0.5), 1.0, mean=None, std=None)
    np.testing.assert_array_equal(flat, np.full((4, 4, 3), 0.5, dtype=np.float32))


# --------------------------------------------------------------------------- figures


def test_usage_bars_show_the_mean_share_per_expert(shown):
    usage = np.array([[100, 50, 50], [120, 40, 40]])
    assert analysis.plot_expert_usage_bars(usage, title="layer 0") is None
    (figure,) = shown
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    np.testing.assert_allclose(heights, [0.55, 0.225, 0.225])
    assert sum(heights) == pytest.approx(1.0)
    assert figure.axes[0].get_title() == "layer 0"


def test_routing_dots_one_per_patch_coloured_by_expert(shown, batch):
    rgb = analysis.make_rgb(batch[0], 0, max_values=[65454.0] * 3)
    assignment = np.arange(GRID * GRID).reshape(GRID, GRID) % 3
    analysis.plot_routing_assignment_with_dots(rgb, assignment_map=assignment, patch_size=4)
    (figure,) = shown
    (dots,) = [c for c in figure.axes[0].collections if isinstance(c, PathCollection)]
    assert len(dots.get_offsets()) == GRID * GRID
    np.testing.assert_allclose(dots.get_offsets()[:2], [[2, 2], [6, 2]])  # patch centres
    colors = analysis.expert_colors(3)
    np.testing.assert_allclose(dots.get_facecolors()[:3], [colors[0], colors[1], colors[2]])
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["E0 (34%)", "E1 (33%)", "E2 (33%)"]
    with pytest.raises(ValueError, match="10x10 patches of 16 pixels cover 160x160"):
        analysis.plot_routing_assignment_with_dots(rgb, assignment_map=assignment)


def test_heatmaps_one_row_per_expert_on_one_clipped_scale(shown, batch):
    rgb = analysis.make_rgb(batch[0], 0, max_values=[65454.0] * 3)
    maps = [np.linspace(0, 1, 100).reshape(10, 10) * (e + 1) for e in range(3)]
    analysis.show_original_plus_expert_heatmaps(maps, rgb, title="t", patch_size=4,
                                                routed_counts=[5, 0, 7], clip_percentile=90.0)
    analysis.show_original_plus_expert_heatmaps(maps, rgb, patch_size=4, show_standalone=False,
                                                clip_percentile=None)
    standalone, overlay_only = shown
    assert len(standalone.axes) == 3 * 3 + 1 and len(overlay_only.axes) == 3 * 2 + 1
    top = np.percentile(np.concatenate([m.ravel() for m in maps]), 90.0)
    heat = standalone.axes[3 * 2 + 2].get_images()[0]  # expert 2, map alone
    assert heat.get_clim() == pytest.approx((0.0, top))
    np.testing.assert_allclose(heat.get_array(), np.clip(maps[2], 0.0, top))
    assert [standalone.axes[3 * e + 1].get_title() for e in range(3)] == \
        ["Expert 0 (tokens: 5)", "Expert 1 (tokens: 0): no tokens", "Expert 2 (tokens: 7)"]
    assert overlay_only.axes[5].get_images()[1].get_clim() == pytest.approx((0.0, 3.0))


# ------------------------------------------------------------------------ layer report


def test_layer_report_simple(mae, batch, project, shown):
    imgs, meta = batch
    model = build_mae("XXS").train()
    model.load_state_dict(mae.state_dict())
    report = analysis.layer_report_simple(model, imgs, *meta, image_index=1, layer_index=8,
                                          device="cpu")
    assert set(report) == {"num_experts", "usage_image", "moe_loss"}
    assert report["num_experts"] == 5
    np.testing.assert_array_equal(report["usage_image"], project[8, "final"].usage[1].numpy())
    assert report["usage_image"].sum() == K * GRID * GRID
    assert report["moe_loss"] == pytest.approx(mae.encoder(imgs, *meta)[1].item(), rel=1e-5)
    assert all(module.training for module in model.modules())  # modes restored
    # usage bars, routing dots, contributions, ablations
    assert len(shown) == 4
    contribution = shown[2].axes[2].get_images()[0].get_array()  # expert 0, map alone
    expected = project[8, "final"].contributions[1, 0].numpy()
    top = np.percentile(project[8, "final"].contributions[1].numpy(), 99.0)
    np.testing.assert_allclose(contribution, np.clip(expected, 0, top), rtol=1e-5)
    assert "Ablation" in shown[3].get_suptitle()


def test_layer_report_simple_bad_arguments(mae, batch):
    imgs, meta = batch
    with pytest.raises(ValueError, match="image_index 3 does not exist: the batch has 3 chips"):
        analysis.layer_report_simple(mae, imgs, *meta, image_index=3, device="cpu")
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        analysis.layer_report_simple(mae, imgs, *meta, layer_index=9, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pass device='cpu'"):
            analysis.layer_report_simple(mae, imgs, *meta)


def published_loader(csv_file, root, batch_size):
    """The published notebook's dataset and transforms (unsupervised: no label is read)."""
    transform = Compose([ToFloat(), CenterCrop40(), ZScoreNormalize(BEN_MEAN, BEN_STD)])
    dataset = BigEarthNetDatasetLS(csv_file, root, transform=transform, supervised=False)
    return dataset, lambda subset: DataLoader(subset, batch_size=batch_size, shuffle=False)


def test_layer_report_on_a_folder_with_an_unlabelled_patch(tmp_path, mae, shown):
    sample, _ = published_loader(SAMPLE / "bigearthnet-test.csv", SAMPLE, 3)
    names = sample.patch_ids[:3]
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name in names:
        shutil.copy(sample.image_path(name), tmp_path / "images")
    for name in names[1:]:  # the first patch has no label file
        shutil.copy(sample.label_path(name), tmp_path / "labels")
    (tmp_path / "samples.csv").write_text("\n".join(names) + "\n")
    dataset, loader = published_loader(tmp_path / "samples.csv", tmp_path, 3)
    imgs, labels, *meta = next(iter(loader(dataset)))
    assert len(imgs) == 3 and labels.numel() == 0
    report = analysis.layer_report_simple(mae, imgs, *meta, image_index=0, layer_index=8,
                                          device="cpu")
    assert report["num_experts"] == 5 and report["usage_image"].sum() == K * GRID * GRID
    assert len(shown) == 4


def test_layer_report_on_the_real_tiles(real_sample, mae, shown):
    dataset, loader = published_loader(real_sample / "samples.csv", real_sample, 3)
    unlabelled = [i for i, name in enumerate(dataset.patch_ids)
                  if not dataset.label_path(name).exists()]
    assert len(unlabelled) == 1
    imgs, _, *meta = next(iter(loader(Subset(dataset, unlabelled + [0, 1]))))
    report = analysis.layer_report_simple(mae, imgs, *meta, image_index=0, layer_index=7,
                                          device="cpu")
    assert report["num_experts"] == 5 and report["usage_image"].sum() == K * GRID * GRID
    assert np.isfinite(report["moe_loss"]) and len(shown) == 4
