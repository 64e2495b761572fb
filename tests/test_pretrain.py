"""pretrain_mae.py end to end on the bundled sample_dataset (model XXS, small batches).
Crashes, resumption in new processes and torchrun: tests/test_reliability.py."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

import pretrain_mae
from models.moe_mae import MAEObjective, build_mae
from published_model import published_objective, published_parameters

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"
pytestmark = pytest.mark.slow


def write_config(tmp_path, epochs=2, **training):
    config = {
        "model": {"size": "XXS", "img_size": 40, "patch_size": 4, "in_channels": 7},
        "training": {
            "dataset_path": str(SAMPLE),
            "dataset_csv": str(SAMPLE / "bigearthnet-train.csv"),
            "epochs": epochs, "batch_size": 32, "learning_rate": 0.001, "weight_decay": 0.05,
            "weight_path": str(tmp_path / "run"), "num_workers": 0, "save_every_n_epochs": 1,
            "device": "cpu", **training,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path



def small_split(tmp_path, rows=16):
    """The first ``rows`` patches of the sample's train split (a split CSV under SAMPLE)."""
    path = tmp_path / "small.csv"
    path.write_text("\n".join((SAMPLE / "bigearthnet-train.csv").read_text().splitlines()[:rows])
                    + "\n")
    return str(path)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_checkpoints_csvs_figure_and_config(tmp_path, exit_status):
    config = write_config(tmp_path, val_dataset_path=str(SAMPLE),
                          val_dataset_csv=str(SAMPLE / "bigearthnet-val.csv"))
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    run = tmp_path / "run"
    for name in ("pretrained_XXS_best.pth", "pretrained_XXS_last.pth", "checkpoint_XXS.pth",
                 "training_metrics_XXS.csv", "expert_usage_XXS.csv", "training_curves_XXS.png",
                 "config_XXS.yaml"):
        assert (run / name).is_file(), name
    last = torch.load(run / "pretrained_XXS_last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 2 * last["steps_per_epoch"]
    assert {"model_state", "opt_state", "scaler_state", "best_train_loss", "rng_state",
            "config"} <= set(last)
    assert last["config"]["model"]["size"] == "XXS"
    assert last["legacy_hour"] is False  # a fresh run (legacy_hour null) trains on the true hour
    build_mae("XXS").load_state_dict(last["model_state"])  # the published layout
    rows = read_rows(run / "training_metrics_XXS.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["val_m_loss"] for r in rows)
    usage = read_rows(run / "expert_usage_XXS.csv")
    layers = {r["layer"] for r in usage}
    assert "encoder.layers.0" in layers and "decoder_layers.1" in layers
    for epoch in ("0", "1"):  # top-k shares of a layer sum to k = 2
        shares = [float(r["topk_share"]) for r in usage
                  if r["epoch"] == epoch and r["layer"] == "encoder.layers.0"]
        assert sum(shares) == pytest.approx(2.0, abs=1e-3)
    resolved = yaml.safe_load((run / "config_XXS.yaml").read_text())
    assert resolved["training"]["warmup_fraction"] == 0.05  # defaults are filled in


def test_masked_loss_falls(tmp_path, exit_status):
    config = write_config(tmp_path, epochs=5, seed=1)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    masked = [float(r["train_m_loss"]) for r in
              read_rows(tmp_path / "run" / "training_metrics_XXS.csv")]
    assert masked[-1] < 0.6 * masked[0], masked


def test_resume_from_a_published_checkpoint(tmp_path, exit_status):
    config = write_config(tmp_path, epochs=3)
    run = tmp_path / "run"
    run.mkdir()
    with torch.random.fork_rng():  # leaves the test process's global generator as it was
        torch.manual_seed(0)
        mae = build_mae("XXS")
        weights = published_parameters(mae)  # an optimizer over the published parameters
        optimizer = torch.optim.AdamW(weights.parameters(), lr=1e-3, weight_decay=0.05)
        published_objective(mae, weights)(torch.randn(2, 7, 40, 40))["loss"].backward()
        optimizer.step()
    published = {"epoch": 0, "model_state": weights.state_dict(),
                 "opt_state": optimizer.state_dict(),
                 "scaler_state": torch.amp.GradScaler("cpu").state_dict(),
                 "best_train_loss": 50.0}
    torch.save(published, run / "checkpoint_XXS.pth")
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--resume"]) == 0
    assert [r["epoch"] for r in read_rows(run / "training_metrics_XXS.csv")] == ["1", "2"]
    last = torch.load(run / "pretrained_XXS_last.pth", weights_only=True)
    assert last["epoch"] == 2
    assert last["legacy_hour"] is True  # the published checkpoint's encoding is kept


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys, exit_status):
    config = write_config(tmp_path)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("training.batchsize=8", "unknown key 'training.batchsize' (did you mean 'batch_size'?)"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("training.epochs=two", "'training.epochs' must be an integer"),
    ("model.mask_ratio=1.0", "'model.mask_ratio' must be in [0, 1)"),
    ("training.batch_size=0", "'training.batch_size' must be > 0"),
    ("training.dataset_csv=/no/such/split.csv", "file not found: /no/such/split.csv"),
    ("model.size=L", "'model.size' must be one of S, XS, XXS"),
])
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, override, message, exit_status):
    config = write_config(tmp_path)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_recipe_config_is_the_published_recipe():
    config = pretrain_mae.load_config(
        REPO / "configs" / "pretrain_moe_mae.yaml", pretrain_mae.SCHEMA,
        [f"training.dataset_path={SAMPLE}",
         f"training.dataset_csv={SAMPLE / 'bigearthnet-train.csv'}"])
    assert config["model"] == {"size": "S", "img_size": 40, "patch_size": 4, "in_channels": 7,
                               "mask_ratio": 0.75}
    training = config["training"]
    assert (training["learning_rate"], training["weight_decay"], training["batch_size"],
            training["epochs"], training["warmup_fraction"], training["grad_clip"],
            training["loss_unmasked_weight"], training["loss_moe_weight"]) == \
        (3e-4, 0.05, 128, 500, 0.05, 1.0, 0.1, 0.5)


def test_published_config_runs_unchanged(tmp_path, exit_status):
    """A config with only the published keys: every other key takes its default."""
    published = tmp_path / "published.yaml"
    published.write_text(yaml.safe_dump({
        "model": {"size": "XXS", "img_size": 40, "patch_size": 4, "in_channels": 7},
        "training": {"dataset_path": str(SAMPLE),
                     "dataset_csv": str(SAMPLE / "bigearthnet-train.csv"), "epochs": 1,
                     "batch_size": 64, "learning_rate": 0.0003, "weight_decay": 0.05,
                     "weight_path": str(tmp_path / "run"), "num_workers": 0,
                     "save_every_n_epochs": 5}}))
    assert exit_status(pretrain_mae.main, ["--config_yaml", published]) == 0
    assert (tmp_path / "run" / "pretrained_XXS_best.pth").is_file()


@pytest.mark.parametrize("check_every,poisoned_call,calls_run,last_epoch", [
    (4, 8, 10, 0),   # epoch 2, step 2 of 6: found at the check after step 4
    (50, 6, 6, None),  # the last step of epoch 1: found before its checkpoint is written
])
def test_non_finite_loss_stops_and_no_checkpoint_holds_the_bad_update(
        tmp_path, monkeypatch, capsys, exit_status, check_every, poisoned_call, calls_run,
        last_epoch):
    config = write_config(tmp_path, epochs=3, check_finite_every=check_every,
                          dataset_csv=small_split(tmp_path, rows=48), batch_size=8)
    real_forward = MAEObjective.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == poisoned_call:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(MAEObjective, "forward", poisoned)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 1
    err = capsys.readouterr().err
    epoch, step = divmod(poisoned_call - 1, 6)
    assert "non-finite loss (nan on process 0)" in err
    assert f"epoch {epoch + 1}, step {step + 1} of 6" in err
    assert len(calls) == calls_run  # no step waits for the host, none runs past the bound
    run = tmp_path / "run"
    if last_epoch is None:
        assert not list(run.glob("*.pth")) and "Last good checkpoint: none" in err
        return
    for name in ("pretrained_XXS_last.pth", "pretrained_XXS_best.pth", "checkpoint_XXS.pth"):
        checkpoint = torch.load(run / name, weights_only=True)
        assert checkpoint["epoch"] == last_epoch
        assert all(torch.isfinite(v).all() for v in checkpoint["model_state"].values())
    assert len(read_rows(run / "training_metrics_XXS.csv")) == last_epoch + 1


def test_a_checkpoint_resumes_through_the_published_resume(tmp_path, exit_status):
    """What the published ``--resume`` does with ``checkpoint_{size}.pth``: model, optimizer
    and GradScaler states load (a disabled scaler's empty state would be refused), and
    training continues from them."""
    config = write_config(tmp_path, epochs=1, dataset_csv=small_split(tmp_path), batch_size=8)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint_XXS.pth", map_location="cpu")
    mae = build_mae("XXS")
    model = published_parameters(mae)  # the published model's parameters, in its layout
    model.load_state_dict(checkpoint["model_state"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    optimizer.load_state_dict(checkpoint["opt_state"])
    scaler = torch.amp.GradScaler(device="cpu")
    scaler.load_state_dict(checkpoint["scaler_state"])
    assert checkpoint["epoch"] + 1 == 1 and checkpoint["best_train_loss"] < float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loss = published_objective(mae, model)(torch.randn(4, 7, 40, 40))["loss"]
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0  # finite gradients: no back-off
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision,epochs", [("bf16", 2), ("fp16", 1)])
def test_mixed_precision_run_on_cpu(tmp_path, exit_status, precision, epochs):
    """CPU autocast stands in for a GPU: the whole loop under bf16, and fp16 with a GradScaler
    whose state the checkpoint keeps."""
    config = write_config(tmp_path, epochs=epochs, mixed_precision=precision,
                          dataset_csv=small_split(tmp_path), batch_size=8)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    rows = read_rows(tmp_path / "run" / "training_metrics_XXS.csv")
    assert len(rows) == epochs
    assert all(0 < float(r["train_loss"]) < float("inf") for r in rows)
    last = torch.load(tmp_path / "run" / "pretrained_XXS_last.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model_state"].values())
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(last["scaler_state"])
    if precision == "fp16":  # the run's scaler, not a fresh one: it counted its steps
        assert last["scaler_state"]["_growth_tracker"] > 0 or scaler.get_scale() != 65536.0

