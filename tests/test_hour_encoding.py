"""The hour encoding follows the checkpoint: published-format checkpoints are legacy (first-digit
hour), ours say what they were trained with, an explicit ``legacy_hour`` overrides with a
warning when it differs; and MAEEvaluator on a raw published config dict."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import compute_embeddings
from datasets.builders import build_bigearthnet
from eval.evaluate_mae import MAEEvaluator
from models.moe_mae import build_mae
from utils.checkpoint import apply_weights, checkpoint_legacy_hour, resolve_legacy_hour

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"


@pytest.fixture(scope="module")
def split_csv(tmp_path_factory):
    """The first 8 patches of the sample's test split (a split CSV under the sample root)."""
    rows = (SAMPLE / "bigearthnet-test.csv").read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("split") / "eight.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def model_state():
    with torch.random.fork_rng():  # the test process's global generator is left as it was
        torch.manual_seed(0)
        return build_mae("XXS").state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_state):
    """The same weights as a published-format checkpoint and as ours trained on the true hour."""
    folder = tmp_path_factory.mktemp("ckpt")
    published, ours = folder / "published.pth", folder / "ours.pth"
    torch.save({"epoch": 0, "model_state": model_state, "best_train_loss": 1.0}, published)
    torch.save({"epoch": 0, "model_state": model_state, "legacy_hour": False}, ours)
    return {"published": published, "ours": ours}


def test_published_format_is_legacy_ours_is_what_it_recorded():
    assert checkpoint_legacy_hour({"epoch": 3, "model_state": {}}) is True
    assert checkpoint_legacy_hour({"model_state": {}, "legacy_hour": False}) is False
    assert checkpoint_legacy_hour({"model_state": {}, "legacy_hour": True}) is True
    # this project's checkpoints from before the record: their config says it
    assert checkpoint_legacy_hour({"config": {"training": {"legacy_hour": False}}}) is False


@pytest.mark.parametrize("configured,recorded,expected,warns", [
    (None, None, True, False),    # published format, followed
    (None, False, False, False),  # ours, followed
    (True, True, True, False),
    (False, None, False, True),   # explicit override of a published checkpoint
    (True, False, True, True),
])
def test_explicit_value_overrides_and_a_mismatch_warns_naming_the_checkpoint(
        capsys, configured, recorded, expected, warns):
    checkpoint = {"model_state": {}} if recorded is None else {"legacy_hour": recorded}
    assert resolve_legacy_hour(configured, checkpoint, "runs/x/best.pth") is expected
    err = capsys.readouterr().err
    if warns:
        assert err.startswith("warning: ") and err.count("\n") == 1
        assert "runs/x/best.pth" in err and "legacy_hour" in err
    else:
        assert err == ""


def raw_published_eval_config(checkpoint, split_csv, tmp_path, **data):
    """The published configs/eval_moe_mae.yaml as a dict (paths and device for this machine)."""
    return {
        "model": {"size": "XXS", "img_size": 40, "patch_size": 4, "in_channels": 7,
                  "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "dataset_csv": str(split_csv), "num_workers": 0,
                 "batch_size": 32, **data},
        "eval": {"save_reconstructions_masked": False, "save_reconstructions_full": False,
                 "reconstructions_dir": str(tmp_path / "recon")},
    }


def test_evaluator_completes_a_raw_published_config_and_follows_the_checkpoint(
        checkpoints, split_csv, tmp_path, capsys):
    evaluator = MAEEvaluator(raw_published_eval_config(checkpoints["published"], split_csv, tmp_path), None)
    assert evaluator.config["data"]["dataset_format"] == "auto"  # defaults filled in
    assert evaluator.config["eval"]["mask_ratio"] == 0.75
    assert evaluator.dataset.legacy_hour is True  # the published checkpoint's encoding
    metrics = evaluator.run()
    assert metrics["num_samples"] == len(evaluator.dataset) and np.isfinite(metrics["masked_loss"])
    ours = MAEEvaluator(raw_published_eval_config(checkpoints["ours"], split_csv, tmp_path), None)
    assert ours.dataset.legacy_hour is False and ours.config["data"]["legacy_hour"] is False
    overridden = MAEEvaluator(raw_published_eval_config(checkpoints["ours"], split_csv,
                                                        tmp_path, legacy_hour=True), None)
    assert overridden.dataset.legacy_hour is True
    assert "ours.pth was trained on the true hour" in capsys.readouterr().err


def embed_config(tmp_path, checkpoint, split_csv, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"size": "XXS", "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "splits": {"test": str(split_csv)},
                 "num_workers": 0, "batch_size": 64},
        "embed": {"pooling": "cls", "output_dir": str(tmp_path), "name": name}}))
    return path


def test_embeddings_of_a_published_checkpoint_get_the_legacy_hour(checkpoints, model_state,
                                                                    split_csv, tmp_path,
                                                                    exit_status):
    for name, checkpoint in checkpoints.items():
        config = embed_config(tmp_path, checkpoint, split_csv, name)
        assert exit_status(compute_embeddings.main, ["--config_yaml", config]) == 0
    published, ours = (np.load(tmp_path / f"{name}_test.npz") for name in ("published", "ours"))
    assert json.loads(str(published["settings"]))["legacy_hour"] is True
    assert json.loads(str(ours["settings"]))["legacy_hour"] is False
    # the same weights: the rows differ only by the hour token the loader fed
    encoder = build_mae("XXS").encoder
    apply_weights(encoder, {"model_state": model_state})
    for legacy, result in ((True, published), (False, ours)):
        dataset = build_bigearthnet(SAMPLE, str(split_csv), legacy_hour=legacy)
        imgs, _, *meta = next(iter(torch.utils.data.DataLoader(dataset, batch_size=64)))
        with torch.no_grad():
            expected = encoder.eval().embed(imgs, *meta, pooling="cls", normed=False)
        np.testing.assert_allclose(result["x"], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(published["x"], ours["x"])
