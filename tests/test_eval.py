"""Reconstruction evaluation: eval_mae.py and eval/evaluate_mae.py on the bundled sample."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import eval_mae
from models.moe_mae import build_mae

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory):
    """Model weights in the published checkpoint format (only its keys)."""
    with torch.random.fork_rng():  # leaves the test process's global generator as it was
        torch.manual_seed(0)
        mae = build_mae("XXS")
    path = tmp_path_factory.mktemp("ckpt") / "pretrained_XXS_best.pth"
    torch.save({"epoch": 0, "model_state": mae.state_dict(), "opt_state": {},
                "best_train_loss": 1.0}, path)
    return path


def published_config(tmp_path, checkpoint, out="recon"):
    """Exactly the keys of the published eval YAML."""
    config = {
        "model": {"size": "XXS", "img_size": 40, "patch_size": 4, "in_channels": 7,
                  "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "dataset_csv": str(SAMPLE / "bigearthnet-val.csv"),
                 "num_workers": 0, "batch_size": 16},
        "eval": {"save_reconstructions_masked": True, "save_reconstructions_full": True,
                 "reconstructions_dir": str(tmp_path / out)},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path



def test_published_config_prints_the_five_lines_writes_json_and_figures(
        tmp_path, published_checkpoint, capsys, exit_status):
    config = published_config(tmp_path, published_checkpoint)
    assert exit_status(eval_mae.main, ["--config_yaml", config, "--set", "eval.max_images=3"]) == 0
    out = capsys.readouterr().out.splitlines()
    for index, name in enumerate(["Masked Loss", "Unmasked Loss", "MoE Loss", "Total Loss",
                                  "Full Loss"]):
        assert out[index].startswith(f"{name}: ")
    metrics = json.loads((tmp_path / "recon" / "eval_metrics.json").read_text())
    assert metrics["num_samples"] == 56
    assert metrics["total_loss"] == pytest.approx(
        metrics["masked_loss"] + 0.1 * metrics["unmasked_loss"] + 0.5 * metrics["moe_loss"])
    assert set(metrics["rmse_masked_dn"]) == {f"SR_B{i}" for i in range(1, 8)}
    assert all(v > 0 for v in metrics["rmse_full_dn"].values())
    figures = sorted(p.name for p in (tmp_path / "recon").glob("*.png"))
    assert figures == [f"result_{kind}_{i:03d}.png" for kind in ("full", "masked")
                       for i in range(3)]


def test_metrics_are_deterministic_across_runs(tmp_path, published_checkpoint, exit_status):
    runs = []
    for name in ("a", "b"):
        config = published_config(tmp_path, published_checkpoint, name)
        assert exit_status(eval_mae.main, ["--config_yaml", config, "--set", "eval.max_images=0"]) == 0
        metrics = json.loads((tmp_path / name / "eval_metrics.json").read_text())
        runs.append({k: v for k, v in metrics.items() if k not in ("config", "figures")})
    assert runs[0] == runs[1]
    other_seed = tmp_path / "c"
    config = published_config(tmp_path, published_checkpoint, "c")
    assert exit_status(eval_mae.main, ["--config_yaml", config, "--set", "eval.max_images=0",
                                       "--set", "eval.seed=1"]) == 0
    assert json.loads((other_seed / "eval_metrics.json").read_text())["masked_loss"] != \
        runs[0]["masked_loss"]


def test_evaluation_errors_are_one_line(tmp_path, published_checkpoint, capsys, exit_status):
    config = published_config(tmp_path, published_checkpoint)
    assert exit_status(eval_mae.main, ["--config_yaml", config, "--set", "model.size=S"]) == 2
    assert "weights do not fit this model" in capsys.readouterr().err
    assert exit_status(eval_mae.main,
                       ["--config_yaml", config, "--set", "eval.mask_ratio=1.5"]) == 2
    assert "'eval.mask_ratio' must be in [0, 1)" in capsys.readouterr().err


def test_mean_patch_baseline_predicts_the_visible_mean_patch():
    from eval.evaluate_mae import mean_patch_baseline

    # one chip, four 2-value patches; patches 0 and 3 masked: the guess is the mean of the
    # visible [1, 2] and [3, 4], i.e. [2, 3]; squared errors 4 + 9 and 0 + 4, mean 8.5
    patches = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [2.0, 5.0]]])
    mask = torch.tensor([[1, 0, 0, 1]])
    assert mean_patch_baseline(patches, mask).item() == pytest.approx(8.5)
    # scored as the model's masked loss: a model that predicts that guess scores the same
    with torch.random.fork_rng():  # leaves the global generator as it was
        mae = build_mae("XXS")
    imgs = torch.randn(3, 7, 40, 40, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(3, mae.encoder.num_patches, generator=torch.Generator().manual_seed(1))
            < 0.75).long()
    target = mae.patchify(imgs)
    visible = (1 - mask).unsqueeze(-1)
    guess = ((target * visible).sum(1, keepdim=True) / visible.sum(1, keepdim=True)
             ).expand_as(target)
    masked_loss, _ = mae.reconstruction_losses(imgs, guess, mask)
    assert mean_patch_baseline(target, mask).item() == pytest.approx(masked_loss.item())


def test_eval_metrics_carry_the_mean_patch_baseline(tmp_path, published_checkpoint, exit_status):
    config = published_config(tmp_path, published_checkpoint)
    assert exit_status(eval_mae.main, ["--config_yaml", config, "--set", "eval.max_images=0"]) == 0
    metrics = json.loads((tmp_path / "recon" / "eval_metrics.json").read_text())
    # the synthetic chips vary within a chip: the guess is far from perfect, but finite
    assert 0 < metrics["mean_patch_baseline_loss"] < float("inf")
    assert metrics["mean_patch_baseline_loss"] != metrics["masked_loss"]
