"""What the experts learn: utils/analysis_utils.py, analyze_experts.py and the two analysis
notebooks, on a seeded XXS model (3, 4 and 5 experts in its three stages) and the bundled
sample_dataset."""

import copy
import csv
import importlib.util
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset, default_collate

import analyze_experts
from datasets.builders import build_bigearthnet
from embed.compute_embed import compute_embeddings
from models.moe_mae import build_mae
from utils.analysis_utils import (analyze_layer, encoder_layer_tokens, expert_usage_statistics,
                                  plot_expert_maps, plot_routing_map, plot_tsne, plot_usage_bars,
                                  plot_usage_heatmap, single_labels, tsne_embedding)
from utils.data_config import BigEarthNetInfo
from notebook_runner import code_outputs, run_notebook
from utils.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"
TEST_CSV = SAMPLE / "bigearthnet-test.csv"
GRID, PATCHES, K = 10, 100, 2
CLASSES = BigEarthNetInfo.CLASSES[19]


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return build_mae("XXS").eval()


@pytest.fixture(scope="module")
def dataset():
    return build_bigearthnet(SAMPLE, TEST_CSV, supervised=True, num_classes=19)


@pytest.fixture(scope="module")
def batch(dataset):
    """The first 4 test chips: imgs (4, 7, 40, 40), multi-hot targets (4, 19), 4 metas (4, 2)."""
    imgs, targets, *meta = default_collate([dataset[i] for i in range(4)])
    return imgs, targets, meta


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mae):
    """The seeded XXS model's weights in the published checkpoint format."""
    path = tmp_path_factory.mktemp("ckpt") / "pretrained_XXS_best.pth"
    torch.save({"model_state": mae.state_dict()}, path)
    return path


def expert_output(moe, e, x):
    """Expert e's SwiGLU module (the published per-expert computation) on x (..., dim)."""
    return moe.experts[e](x)


def gate_to_expert_zero(mae, layer):
    """A copy of the model whose layer ``layer`` gate ranks expert 0 first and expert 1 second
    for every token (logits 10, 5, 0, ...: gates 0.9933 and 0.0067)."""
    model = copy.deepcopy(mae)
    gate = model.encoder.layers[layer].moe.gate
    with torch.no_grad():
        gate.Wg.weight.zero_()
        gate.Wg.bias.zero_()
        gate.Wg.bias[:2] = torch.tensor([10.0, 5.0])
    return model


# ------------------------------------------------------------------------------ tokens


def test_layer_tokens_are_the_encoders_own_deterministic_and_keep_the_mode(mae, batch):
    imgs, _, meta = batch
    encoder = mae.encoder
    mae.train()
    try:
        tokens = encoder_layer_tokens(mae, imgs, *meta)
        assert mae.training and all(m.training for m in mae.modules())
    finally:
        mae.eval()
    again = encoder_layer_tokens(mae, imgs, *meta)
    with torch.no_grad():
        normed, _, before_norm = encoder(imgs, *meta)
        assert len(tokens.moe_inputs) == len(tokens.outputs) == len(encoder.layers) == 9
        x = tokens.inputs
        for i, layer in enumerate(encoder.layers):
            assert tokens.moe_inputs[i].shape == (4, 105, 108)
            residual = x + layer.attn(layer.norm1(x))
            torch.testing.assert_close(tokens.moe_inputs[i], layer.norm2(residual))
            x = layer(x)[0]
            torch.testing.assert_close(tokens.outputs[i], x)
    torch.testing.assert_close(tokens.outputs[-1], before_norm)
    torch.testing.assert_close(tokens.normed, normed)
    assert all(torch.equal(a, b) for a, b in zip(tokens.outputs, again.outputs))


# ------------------------------------------------------------------------ one MoE layer


@pytest.mark.parametrize("layer,experts", [(0, 3), (4, 4), (8, 5)])
def test_map_shapes_and_usage_counts(mae, batch, layer, experts):
    imgs, _, meta = batch
    result = analyze_layer(mae, imgs, *meta, layer=layer)
    assert result.num_experts == experts
    assert result.top1.shape == (4, GRID, GRID) and result.top1.dtype == torch.int64
    assert result.topk_idx.shape == (4, PATCHES, K)
    assert result.gates.shape == (4, PATCHES, experts)
    assert result.usage.shape == (4, experts)
    assert result.contributions.shape == result.ablations.shape == (4, experts, GRID, GRID)
    assert result.usage.sum(dim=1).tolist() == [K * PATCHES] * 4
    for chip in range(4):  # counts from the routed expert ids, one chip at a time
        counts = np.bincount(result.topk_idx[chip].flatten().numpy(), minlength=experts)
        assert result.usage[chip].tolist() == counts.tolist()
    # the top-1 map is the first choice of each patch, in image order (row-major patches)
    assert torch.equal(result.top1.flatten(1), result.topk_idx[..., 0])
    assert torch.equal(result.top1, result.gates.argmax(-1).view(4, GRID, GRID))
    torch.testing.assert_close(result.chip_shares().sum(1), torch.ones(4, dtype=torch.float64))


def test_contributions_are_gated_expert_norms_and_zero_for_unused_experts(mae, batch):
    imgs, _, meta = batch
    layer = 5
    tokens = encoder_layer_tokens(mae, imgs, *meta)
    result = analyze_layer(mae, imgs, *meta, layer=layer, tokens=tokens)
    moe = mae.encoder.layers[layer].moe
    patches = tokens.moe_inputs[layer][:, 5:]  # (4, 100, dim)
    unused = result.gates == 0  # (4, 100, E)
    assert unused.sum() == 4 * PATCHES * (result.num_experts - K)
    contributions = result.contributions.flatten(2).transpose(1, 2)  # (4, 100, E)
    assert torch.all(contributions[unused] == 0)
    assert torch.all(contributions[~unused] > 0)
    with torch.no_grad():
        for e in range(result.num_experts):
            expected = result.gates[..., e] * expert_output(moe, e, patches).norm(dim=-1)
            torch.testing.assert_close(contributions[..., e], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_ablating_an_unused_expert_changes_nothing_at_the_layer(mae, batch, renormalize):
    imgs, _, meta = batch
    layer = 7
    tokens = encoder_layer_tokens(mae, imgs, *meta)
    result = analyze_layer(mae, imgs, *meta, layer=layer, measured_at="layer",
                           renormalize=renormalize, tokens=tokens)
    ablations = result.ablations.flatten(2).transpose(1, 2)  # (4, 100, E)
    unused = result.gates == 0
    assert torch.all(ablations[unused] == 0)
    assert torch.all(ablations[~unused] > 0)
    if not renormalize:  # removing g_e f_e changes y by exactly g_e f_e
        torch.testing.assert_close(result.ablations, result.contributions, rtol=1e-4, atol=1e-6)
        return
    # renormalised with k = 2: without one of its experts, a patch gets the other one in full
    moe = mae.encoder.layers[layer].moe
    patches = tokens.moe_inputs[layer][:, 5:]
    with torch.no_grad():
        outputs = torch.stack([expert_output(moe, e, patches) for e in range(moe.num_experts)], 2)
    first, second = result.topk_idx[..., 0], result.topk_idx[..., 1]
    pick = lambda idx: outputs.gather(2, idx[..., None, None].expand(-1, -1, 1, 108))[:, :, 0]
    y = (result.gates.unsqueeze(-1) * outputs).sum(2)
    expected_first = (y - pick(second)).norm(dim=-1)
    torch.testing.assert_close(ablations.gather(2, first[..., None])[..., 0], expected_first,
                               rtol=1e-4, atol=1e-5)


def test_ablation_after_the_final_norm_goes_through_the_remaining_layers(mae, batch):
    imgs, _, meta = batch
    layer = 6
    encoder = mae.encoder
    tokens = encoder_layer_tokens(mae, imgs, *meta)
    result = analyze_layer(mae, imgs, *meta, layer=layer, measured_at="final", tokens=tokens)
    moe = encoder.layers[layer].moe
    x = tokens.moe_inputs[layer]
    with torch.no_grad():
        gates = moe.gate(x.reshape(-1, 108)).gates.view(4, 105, -1)
        # an expert that some token of every chip uses, so that ablating it changes each chip
        used_in_every_chip = ((gates > 0).any(dim=1).all(dim=0)).nonzero().flatten()
        assert len(used_in_every_chip), "no expert of layer 6 is used by every chip"
        expert = int(used_in_every_chip[-1])
        terms = [gates[..., e:e + 1] * expert_output(moe, e, x) for e in range(moe.num_experts)]

        def final(moe_output):
            out = tokens.residuals[layer] + moe_output
            for later in encoder.layers[layer + 1:]:
                out = later(out)[0]
            return encoder.norm(out)

        change = final(sum(terms)) - final(sum(terms) - terms[expert])
    expected = change.norm(dim=-1)[:, 5:].view(4, GRID, GRID)
    torch.testing.assert_close(result.ablations[:, expert], expected, rtol=1e-3, atol=1e-5)
    # attention spreads the change: patches that do not use the expert move too
    assert torch.all(result.ablations[:, expert] > 0)


def test_batch_results_equal_per_sample_results(mae, batch):
    imgs, _, meta = batch
    for measured_at in ("layer", "final"):
        whole = analyze_layer(mae, imgs, *meta, layer=3, measured_at=measured_at,
                              renormalize=True)
        for chip in range(4):
            single = analyze_layer(mae, imgs[chip:chip + 1], *(m[chip:chip + 1] for m in meta),
                                   layer=3, measured_at=measured_at, renormalize=True)
            assert torch.equal(single.top1[0], whole.top1[chip])
            assert torch.equal(single.usage[0], whole.usage[chip])
            for name in ("gates", "contributions", "ablations"):
                torch.testing.assert_close(getattr(single, name)[0], getattr(whole, name)[chip],
                                           rtol=1e-4, atol=1e-5)


def test_layer_and_measurement_are_checked(mae, batch):
    imgs, _, meta = batch
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        analyze_layer(mae, imgs, *meta, layer=9)
    with pytest.raises(ValueError, match="measured_at"):
        analyze_layer(mae, imgs, *meta, layer=0, measured_at="decoder")


def test_a_gate_that_sends_every_token_to_expert_zero_shows_in_maps_and_statistics(
        mae, batch, dataset):
    imgs, _, meta = batch
    layer = 4  # 4 experts
    model = gate_to_expert_zero(mae, layer)
    result = analyze_layer(model, imgs, *meta, layer=layer, measured_at="layer")
    assert torch.all(result.top1 == 0)
    assert result.usage.tolist() == [[PATCHES, PATCHES, 0, 0]] * 4
    first_gate = 1 / (1 + math.exp(-5))  # softmax of the logits 10 and 5
    torch.testing.assert_close(result.gates[..., 0], torch.full((4, PATCHES), first_gate))
    assert torch.all(result.contributions[:, 2:] == 0) and torch.all(result.ablations[:, 2:] == 0)
    assert torch.all(result.contributions[:, :2] > 0)
    assert result.contributions[:, 0].mean() > result.contributions[:, 1].mean()

    chips = Subset(dataset, range(10))
    stats = expert_usage_statistics(model, DataLoader(chips, batch_size=4), class_names=CLASSES)
    np.testing.assert_allclose(stats.top1_share[layer], [1, 0, 0, 0])
    np.testing.assert_allclose(stats.topk_share[layer], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(stats.chip_share_std[layer], 0, atol=1e-12)
    assert stats.usage_entropy[layer] == pytest.approx(math.log(2) / math.log(4))
    probs = torch.tensor([10.0, 5.0, 0.0, 0.0], dtype=torch.float64).softmax(0)
    assert stats.gate_entropy[layer] == pytest.approx(
        float(-(probs * probs.log()).sum()) / math.log(4))
    carried = stats.class_chips > 0
    np.testing.assert_allclose(stats.class_share[layer][carried],
                               np.tile([0.5, 0.5, 0, 0], (carried.sum(), 1)))
    assert np.isnan(stats.class_share[layer][~carried]).all()
    others = [i for i in range(9) if i != layer]
    assert all(stats.top1_share[i].max() < 1 for i in others)  # the other layers still mix


# ---------------------------------------------------------------- dataset statistics


def test_usage_statistics_match_the_per_chip_counts(mae, dataset):
    chips = Subset(dataset, range(10))
    stats = expert_usage_statistics(mae, DataLoader(chips, batch_size=4), class_names=CLASSES)
    imgs, targets, *meta = default_collate([dataset[i] for i in range(10)])
    assert stats.num_chips == 10 and stats.k == K
    assert stats.class_chips.tolist() == targets.sum(0).tolist()
    for layer in range(9):
        result = analyze_layer(mae, imgs, *meta, layer=layer, measured_at="layer")
        usage = result.usage.double()
        np.testing.assert_allclose(stats.topk_share[layer], (usage.sum(0) / usage.sum()).numpy())
        top1 = np.bincount(result.top1.flatten().numpy(), minlength=result.num_experts)
        np.testing.assert_allclose(stats.top1_share[layer], top1 / top1.sum())
        np.testing.assert_allclose(stats.chip_share_std[layer],
                                   result.chip_shares().std(0, unbiased=False).numpy(), atol=1e-9)
        for cls in np.flatnonzero(targets.sum(0).numpy()):  # every chip carrying the class
            carrying = usage[targets[:, cls] > 0].sum(0)
            np.testing.assert_allclose(stats.class_share[layer][cls],
                                       (carrying / carrying.sum()).numpy())
        assert 0 < stats.usage_entropy[layer] <= 1 and 0 < stats.gate_entropy[layer] <= 1
    rows = stats.usage_rows()
    assert len(rows) == 3 * 3 + 3 * 4 + 3 * 5
    assert stats.usage_matrix().shape == (9, 5) and np.isnan(stats.usage_matrix()[0, 3:]).all()
    class_rows = stats.class_rows()
    assert len(class_rows) == 9 * 19 and class_rows[0]["expert_4"] == ""


def test_usage_statistics_with_class_indices_and_without_labels(mae, batch):
    imgs, _, meta = batch
    labels = torch.tensor([2, 0, 2, 1])
    stats = expert_usage_statistics(mae, [(imgs, labels, *meta)],
                                    class_names=["a", "b", "c", "d"])
    usage = analyze_layer(mae, imgs, *meta, layer=2, measured_at="layer").usage.double()
    assert stats.class_chips.tolist() == [1, 1, 2, 0]
    class_c = usage[[0, 2]].sum(0)  # chips 0 and 2 carry class 2
    np.testing.assert_allclose(stats.class_share[2][2], (class_c / class_c.sum()).numpy())
    assert np.isnan(stats.class_share[2][3]).all()
    images_only = expert_usage_statistics(mae, [imgs])  # no labels, no metadata
    assert images_only.class_share is None and images_only.class_rows() == []
    assert images_only.num_chips == 4


# ----------------------------------------------------------------------------- figures


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written_for_a_tiny_model(mae, batch, dataset, tmp_path):
    imgs, targets, meta = batch
    result = analyze_layer(mae, imgs, *meta, layer=8)
    stats = expert_usage_statistics(mae, DataLoader(Subset(dataset, range(6)), batch_size=6))
    routing = plot_routing_map(imgs[0], result.top1[0], 5, tmp_path / "routing.png")
    contribution = plot_expert_maps(imgs[0], result.contributions[0], "contribution",
                                    tmp_path / "contribution.png")
    ablation = plot_expert_maps(imgs[0], result.ablations[0], "ablation", tmp_path / "ablation.png")
    shares = result.chip_shares()
    bars = plot_usage_bars(shares.mean(0), shares.std(0), tmp_path / "bars.png")
    heatmap = plot_usage_heatmap(stats, tmp_path / "heatmap.png")
    coords = tsne_embedding(np.random.default_rng(0).normal(size=(12, 60)), perplexity=3)
    tsne = plot_tsne({"a": coords, "b": coords}, targets.repeat(3, 1).numpy(), CLASSES,
                     tmp_path / "tsne.png")
    for figure, name in ((routing, "routing"), (contribution, "contribution"),
                         (ablation, "ablation"), (bars, "bars"), (heatmap, "heatmap"),
                         (tsne, "tsne")):
        assert isinstance(figure, Figure) and is_png(tmp_path / f"{name}.png"), name
    assert len(contribution.axes) == 5 * 3 + 1  # a row per expert, and one colour bar
    legend = [text.get_text() for text in routing.axes[0].get_legend().get_texts()]
    assert legend == [f"expert {e} ({(result.top1[0] == e).float().mean():.0%})" for e in range(5)]
    assert plot_usage_bars([0.5, 0.5], path=None).axes  # no path: nothing written, a figure back


def test_routing_map_of_a_collapsed_gate_names_expert_zero(mae, batch):
    imgs, _, meta = batch
    result = analyze_layer(gate_to_expert_zero(mae, 1), imgs, *meta, layer=1)
    figure = plot_routing_map(imgs[0], result.top1[0], 3)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["expert 0 (100%)", "expert 1 (0%)", "expert 2 (0%)"]


def test_single_labels_and_tsne():
    multi_hot = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1]])
    # chips per class 3, 2, 2: the rarest label of each row, ties to the lower index
    assert single_labels(multi_hot).tolist() == [1, 0, 2, -1, 1]
    assert single_labels(np.array([3, 1])).tolist() == [3, 1]
    x = np.random.default_rng(0).normal(size=(30, 80)).astype(np.float32)
    coords = tsne_embedding(x, seed=1, perplexity=5)
    assert coords.shape == (30, 2)
    np.testing.assert_array_equal(coords, tsne_embedding(x, seed=1, perplexity=5))
    with pytest.raises(ValueError, match="at least 4"):
        tsne_embedding(x[:3])


# ------------------------------------------------------------------- script, notebooks


def run_script(args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze_experts.main, [str(a) for a in args])
    return exit_info.value.code


def script_args(checkpoint, out, *extra):
    args = ["--config_yaml", REPO / "configs" / "analyze_experts.yaml",
            "--set", "model.size=XXS", "--set", f"model.checkpoint_path={checkpoint}",
            "--set", "model.device=cpu", "--set", f"output.dir={out}",
            "--set", "data.max_chips=12", "--set", "analysis.num_examples=2",
            "--set", "analysis.layer=7"]
    for item in extra:
        args += ["--set", item]
    return args


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_analyze_experts_writes_its_outputs(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert run_script(script_args(checkpoint, out)) == 0
    printed = capsys.readouterr().out
    assert str(out / "expert_usage.csv") in printed and "12 chips, 9 layers" in printed
    expected = ["expert_usage.csv", "usage_heatmap.png", "class_usage.csv",
                "usage_bars_layer07.png", "analysis_config.yaml"] + [
        f"{kind}_layer07_chip{chip:03d}.png" for kind in ("routing", "contribution", "ablation")
        for chip in range(2)]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert all(is_png(out / name) for name in expected if name.endswith(".png"))
    usage = read_csv(out / "expert_usage.csv")
    assert len(usage) == 36
    for layer in range(9):
        rows = [r for r in usage if int(r["layer"]) == layer]
        assert sum(float(r["topk_share"]) for r in rows) == pytest.approx(1.0)
        assert all(r["chips"] == "12" for r in rows)
    classes = read_csv(out / "class_usage.csv")
    assert len(classes) == 9 * 19 and classes[0]["class"] == CLASSES[0]


@pytest.mark.slow
def test_analyze_experts_rejects_bad_input_in_one_line(checkpoint, tmp_path, capsys):
    assert run_script(script_args(tmp_path / "missing.pth", tmp_path / "a")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert run_script(script_args(checkpoint, tmp_path / "b", "analysis.layer=9")) == 2
    assert "analysis.layer: 9 does not exist" in capsys.readouterr().err
    assert run_script(script_args(checkpoint, tmp_path / "c", "analysis.ablation_at=decoder")) == 2


def outputs(notebook, kind: str):
    """Printed text (kind 'text') or the number of PNG images (kind 'png') of a notebook."""
    items = code_outputs(notebook)
    if kind == "png":
        return sum("image/png" in output.get("data", {}) for output in items)
    return "\n".join(output.get("text", "") for output in items)


def test_analysis_notebooks_default_to_the_demo_checkpoint():
    for name in ("expert_analysis", "explore_embedding_tsne"):
        notebook = nbformat.read(REPO / f"{name}.ipynb", as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "runs/demo/pretrain/pretrained_S_best.pth" in code[0].source, name


@pytest.mark.slow
def test_expert_analysis_notebook_runs(checkpoint):
    notebook = run_notebook("expert_analysis", f"""
CHECKPOINT = {str(checkpoint)!r}
MODEL_SIZE = "XXS"
DATASET_PATH = "sample_dataset"
SPLIT_CSV = "sample_dataset/bigearthnet-test.csv"
NUM_CHIPS = 2
LAYERS = [0, 8]
RENORMALIZE = True
ABLATION_AT = "final"
STATS_MAX_CHIPS = 12
DEVICE = "cpu"
""")
    text = outputs(notebook, "text")
    assert "layer 0: 3 experts" in text and "layer 8: 5 experts" in text
    # routing maps (2 layers x 2 chips), contributions, ablations, usage bars, heatmap
    assert outputs(notebook, "png") == 4 + 2 + 2 + 2 + 1


@pytest.mark.slow
def test_expert_analysis_notebook_stops_without_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match="run `make demo` first"):
        run_notebook("expert_analysis", f"""
CHECKPOINT = {str(tmp_path / "missing.pth")!r}
MODEL_SIZE = "XXS"
DATASET_PATH = "sample_dataset"
SPLIT_CSV = "sample_dataset/bigearthnet-test.csv"
NUM_CHIPS = 2
LAYERS = [0]
RENORMALIZE = False
ABLATION_AT = "layer"
STATS_MAX_CHIPS = 4
DEVICE = "cpu"
""")


@pytest.mark.slow
def test_tsne_notebook_reads_an_npz_and_embeds_the_other_set_itself(mae, checkpoint, dataset,
                                                                       tmp_path):
    with_metadata = tmp_path / "with_metadata.npz"
    compute_embeddings(mae.encoder, Subset(dataset, range(40)), with_metadata, pooling="cls",
                       use_metadata=True, progress=False).close()
    notebook = run_notebook("explore_embedding_tsne", f"""
EMBEDDINGS_WITH_METADATA = {str(with_metadata)!r}
EMBEDDINGS_WITHOUT_METADATA = None
CHECKPOINT = {str(checkpoint)!r}
MODEL_SIZE = "XXS"
DATASET_PATH = "sample_dataset"
SPLIT_CSVS = ["sample_dataset/bigearthnet-test.csv"]
MAX_CHIPS = 40
POOLING = "cls"
NORMED = False
SEED = 0
PERPLEXITY = 10.0
DEVICE = "cpu"
""")
    text = outputs(notebook, "text")
    assert "with metadata: x (40, 108), labels (40, 19)" in text
    assert "metadata replaced by zeros: x (40, 108), labels (40, 19)" in text
    assert "nearest neighbours share the label" in text
    assert outputs(notebook, "png") == 1


def test_architecture_diagram_script_draws_the_png(tmp_path):
    script = REPO / "figs" / "make_architecture_diagram.py"
    spec = importlib.util.spec_from_file_location("make_architecture_diagram", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--size", "XXS", "--out", str(tmp_path / "diagram.png")]) == 0
    assert is_png(tmp_path / "diagram.png")
    texts = [text.get_text() for text in module.draw("S").axes[0].texts]
    assert "encoder: 15 pre-norm layers, width 144" in texts
