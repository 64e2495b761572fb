"""A patch without a label file (the real BEN-L data has one) is an error only where labels are
read: pretraining, reconstruction evaluation, unsupervised embeddings and the expert analysis
run on such a folder, raw and packed; supervised embeddings stop with the clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import analyze_experts
import compute_embeddings
import eval_mae
import pretrain_mae
from datasets.pack import pack_split

NAMES = ["SYN_MSIL2A_20170613T101031_1_2", "SYN_MSIL2A_20180525T94030_3_4",
         "SYN_MSIL2A_20171208T093351_5_6", "SYN_MSIL2A_20170704T112111_7_8"]
UNLABELLED = NAMES[2]
REAL_UNLABELLED = "S2A_MSIL2A_20171208T093351_82_79"


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_all_unsupervised_uses(tmp_path: Path, root: Path, split: Path, unlabelled: str,
                              capsys, exit_status, packed: bool = False) -> None:
    """Pretraining, evaluation, unsupervised embeddings, analysis; supervised embeddings fail."""
    source = {"dataset_path": str(split if packed else root),
              "dataset_csv": None if packed else str(split)}

    pretrain = write_yaml(tmp_path / "pretrain.yaml", {
        "model": {"size": "XXS"},
        "training": {**source, "epochs": 1, "batch_size": 100, "num_workers": 0,
                     "weight_path": str(tmp_path / "run"), "device": "cpu"}})
    assert exit_status(pretrain_mae.main, ["--config_yaml", pretrain]) == 0
    checkpoint = tmp_path / "run" / "pretrained_XXS_last.pth"

    model = {"size": "XXS", "checkpoint_path": str(checkpoint), "device": "cpu"}
    evaluation = write_yaml(tmp_path / "eval.yaml", {
        "model": model, "data": {**source, "num_workers": 0, "batch_size": 100},
        "eval": {"reconstructions_dir": str(tmp_path / "recon"), "max_images": 0}})
    assert exit_status(eval_mae.main, ["--config_yaml", evaluation]) == 0
    evaluated = json.loads((tmp_path / "recon" / "eval_metrics.json").read_text())

    splits = {"all": str(split)}
    data = {"dataset_path": None if packed else str(root), "splits": splits, "num_workers": 0}
    embed = {"output_dir": str(tmp_path / "emb"), "name": "e"}
    embeddings = write_yaml(tmp_path / "embed.yaml", {
        "model": model, "data": {**data, "supervised": False}, "embed": embed})
    assert exit_status(compute_embeddings.main, ["--config_yaml", embeddings]) == 0
    with np.load(tmp_path / "emb" / "e_all.npz") as npz:
        assert unlabelled in npz["ids"].tolist() and npz["y"].shape == (len(npz["ids"]), 0)
        assert np.isfinite(npz["x"]).all() and evaluated["num_samples"] == len(npz["ids"])
    capsys.readouterr()
    supervised = write_yaml(tmp_path / "supervised.yaml", {
        "model": model, "data": data, "embed": {**embed, "name": "s"}})
    assert exit_status(compute_embeddings.main, ["--config_yaml", supervised]) == 2
    err = capsys.readouterr().err
    assert f"patch {unlabelled}" in err and "skip_invalid" in err

    analysis = write_yaml(tmp_path / "analyze.yaml", {
        "model": model, "data": {"dataset_path": data["dataset_path"], "split": str(split),
                                 "num_workers": 0},
        "analysis": {"num_examples": 1}, "output": {"dir": str(tmp_path / "analysis")}})
    assert exit_status(analyze_experts.main, ["--config_yaml", analysis]) == 0
    out = capsys.readouterr().out
    assert f"note: 1 chip(s) have no label file ({unlabelled})" in out
    assert (tmp_path / "analysis" / "class_usage.csv").is_file()


@pytest.fixture
def root_with_an_unlabelled_patch(tmp_path, make_ben_root):
    root = make_ben_root({name: ["Pastures", "Mixed forest"] for name in NAMES})
    (root / "labels" / f"{UNLABELLED}_labels_metadata.json").unlink()
    split = tmp_path / "split.csv"
    split.write_text("\n".join(NAMES) + "\n")
    return root, split


def test_unsupervised_uses_run_on_a_folder_with_an_unlabelled_patch(
        tmp_path, root_with_an_unlabelled_patch, capsys, exit_status):
    root, split = root_with_an_unlabelled_patch
    run_all_unsupervised_uses(tmp_path, root, split, UNLABELLED, capsys, exit_status)


def test_unsupervised_uses_run_on_a_packed_folder_with_an_unlabelled_patch(
        tmp_path, root_with_an_unlabelled_patch, capsys, exit_status):
    root, split = root_with_an_unlabelled_patch
    packed = pack_split(split, root, tmp_path / "packed", progress=False)
    run_all_unsupervised_uses(tmp_path, root, packed, UNLABELLED, capsys, exit_status,
                              packed=True)


@pytest.mark.slow
def test_unsupervised_uses_run_on_the_real_sample(tmp_path, real_sample, capsys, exit_status):
    run_all_unsupervised_uses(tmp_path, real_sample, real_sample / "samples.csv",
                              REAL_UNLABELLED, capsys, exit_status)
