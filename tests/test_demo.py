"""make demo's pipeline (demo.py) end to end, with fewer pretraining epochs."""

import json
from pathlib import Path

import pytest

import demo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_demo_pipeline_probes_beat_the_majority_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the configs name sample_dataset relative to the repository
    assert demo.main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, result in summary["probes"].items():
        assert result["beats_baseline"] and result["probe"] > result["majority_baseline"], name
    for folder in summary["outputs"].values():
        assert any(Path(folder).iterdir()), folder
    assert (tmp_path / "reconstruction" / "eval_metrics.json").is_file()
    assert "beats the majority-class baseline" in capsys.readouterr().out


def test_majority_baseline():
    import numpy as np

    train = np.array([0, 1, 1, 2])
    assert demo.majority_baseline(train, np.array([1, 1, 0, 2])) == 0.5
    multi_train = np.array([[1, 0], [1, 1], [1, 0], [0, 0]])
    multi_test = np.array([[1, 0], [0, 1]])
    # every test chip scores the labels 0.75 and 0.25 (training frequencies): over the four
    # (chip, label) pairs, the two scored 0.75 hold one positive (precision 1/2 at recall 1/2),
    # all four hold two (precision 2/4 at recall 1): micro AP = 0.5 * 1/2 + 0.5 * 2/4
    assert demo.majority_baseline(multi_train, multi_test) == pytest.approx(0.5)


def test_demo_pretraining_step_runs_again_over_an_earlier_demo(tmp_path, monkeypatch, capsys,
                                                               exit_status):
    """`make demo` twice: the second pretraining replaces the first run's outputs instead of
    refusing the folder (one XXS epoch each, for speed)."""
    import pretrain_mae

    monkeypatch.chdir(REPO)
    args = demo.pretraining_args(tmp_path, epochs=1) + ["--set", "model.size=XXS"]
    assert exit_status(pretrain_mae.main, args) == 0
    first = (tmp_path / "pretrain" / "pretrained_XXS_best.pth").stat().st_mtime_ns
    assert exit_status(pretrain_mae.main, args) == 0
    assert "--overwrite: removed the earlier run" in capsys.readouterr().out
    assert (tmp_path / "pretrain" / "pretrained_XXS_best.pth").stat().st_mtime_ns > first
