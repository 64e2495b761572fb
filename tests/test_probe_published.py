"""The probes as the published code uses them: the record's published keys, a saved model loaded
and evaluated as the published notebooks do, and embedding files written with the published
notebooks' keys and read as they read them."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, precision_score
from sklearn.multiclass import OneVsRestClassifier

import train_logistic_regression
from classification_models import LogisticRegressionModel
from classification_models.embeddings import load_split
from embed.compute_embed import compute_embeddings
from models.moe_mae import build_mae
from utils.errors import run_cli

PUBLISHED_RECORD_KEYS = {"run_id", "train_npz", "val_npz", "x_shape_train", "y_shape_train",
                         "x_shape_val", "y_shape_val", "multilabel", "feature_slice", "n_jobs",
                         "metrics", "version", "timestamp"}
PUBLISHED_METRICS = ["overall_accuracy", "overall_precision", "average_precision",
                     "overall_recall", "average_recall", "overall_f1", "average_f1"]


def multilabel_file(path, n, seed, dim=12):
    weights = np.random.default_rng(7).normal(size=(4, dim))
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < (0.5, 0.4, 0.3, 0.2)).astype(np.uint8)
    x = (y @ weights + rng.normal(size=(n, dim))).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path, x, y


def run_probe(tmp_path, *extra):
    train, x, y = multilabel_file(tmp_path / "train.npz", 300, 0)
    val, x_val, y_val = multilabel_file(tmp_path / "val.npz", 120, 1)
    test, x_test, y_test = multilabel_file(tmp_path / "test.npz", 100, 2)
    out = tmp_path / "out"
    assert train_logistic_regression.main(["--train", str(train), "--val", str(val), "--test",
                                           str(test), "--out", str(out), "--n-jobs", "1",
                                           "--feature-slice", "0:10", *extra]) == 0
    record_path = next(out.glob("*.json"))
    return (json.loads(record_path.read_text()), joblib.load(record_path.with_suffix(".joblib")),
            (x_val[:, :10], y_val), (x_test[:, :10], y_test))


def test_record_holds_the_published_keys_and_ours(tmp_path):
    record, model, (x_val, y_val), _ = run_probe(tmp_path)
    assert PUBLISHED_RECORD_KEYS <= set(record)
    assert record["train_npz"] == str(tmp_path / "train.npz")
    assert record["val_npz"] == str(tmp_path / "val.npz")
    assert record["x_shape_train"] == [300, 10] and record["y_shape_train"] == [300, 4]
    assert record["x_shape_val"] == [120, 10] and record["y_shape_val"] == [120, 4]
    assert record["multilabel"] is True and record["feature_slice"] == "0:10"
    assert record["n_jobs"] == 1 and record["timestamp"] == record["run_id"]
    assert record["version"] == "simple-1.0"
    y_pred = model.predict(x_val)
    published = record["metrics"]  # the published script's validation metrics ...
    assert published["f1_micro"] == pytest.approx(f1_score(y_val, y_pred, average="micro"))
    assert published["f1_macro"] == pytest.approx(f1_score(y_val, y_pred, average="macro"))
    assert set(published["report"]) >= {"0", "3", "micro avg", "macro avg"}
    # ... next to the project's metrics of every split
    assert record["metrics"]["val"]["map_micro"] == pytest.approx(
        average_precision_score(y_val, model.predict_proba(x_val), average="micro"))
    assert set(record["metrics"]["test"]) >= {"map_micro", "overall_map"}
    fit = record["fit"]
    assert fit["solver"] == "lbfgs" and fit["converged"] and len(fit["grad_norm"]) == 4
    assert all(r <= 1e-4 for r in fit["relative_grad_norm"])


def test_saved_model_is_used_as_the_published_notebooks_use_it(tmp_path):
    _, model, _, (x_test, y_test) = run_probe(tmp_path)
    assert isinstance(model, LogisticRegressionModel)
    assert isinstance(model.model, OneVsRestClassifier)
    assert all(isinstance(e, LogisticRegression) for e in model.model.estimators_)
    # the solver's own decision, from its coefficients ...
    coef = np.stack([e.coef_[0] for e in model.model.estimators_], axis=1)
    bias = np.array([e.intercept_[0] for e in model.model.estimators_])
    solver_pred = (x_test.astype(np.float64) @ coef + bias > 0).astype(int)
    # ... is what scikit-learn's estimator and the published call give
    np.testing.assert_array_equal(model.model.predict(x_test), solver_pred)
    model.multilabel = True
    metrics, y_pred = model.evaluate(x_test, y_test)  # the published notebook's call
    np.testing.assert_array_equal(y_pred, solver_pred)
    for name in PUBLISHED_METRICS + ["overall_map", "average_map"]:
        assert name in metrics, name
    assert metrics["overall_map"] == pytest.approx(
        average_precision_score(y_test, model.predict_proba(x_test), average="micro"))
    assert metrics["average_precision"] == pytest.approx(
        precision_score(y_test, y_pred, average="macro", zero_division=0))
    assert metrics["overall_accuracy"] == pytest.approx(np.mean((y_pred == y_test).all(axis=1)))


def test_sag_solver_still_reproduces_the_published_fit(tmp_path):
    record, model, (x_val, _), _ = run_probe(tmp_path, "--solver", "sag", "--max-iter", "200")
    assert record["fit"] == {"solver": "sag"}
    train = np.load(tmp_path / "train.npz")
    reference = OneVsRestClassifier(LogisticRegression(solver="sag", max_iter=200,
                                                       random_state=0)).fit(
        train["x"][:, :10], train["y"])
    np.testing.assert_allclose(model.predict_proba(x_val), reference.predict_proba(x_val),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("option, value", [("--C", "0"), ("--tol", "-1"), ("--C", "nan")])
def test_bad_solver_numbers_exit_2(tmp_path, capsys, option, value):
    train, _, _ = multilabel_file(tmp_path / "train.npz", 50, 0)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_logistic_regression.main, ["--train", str(train), option, value,
                                                 "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {option} must be > 0, got {float(value)}"


class Chips(torch.utils.data.Dataset):
    """Seeded chips with metadata; multiclass (class indices) or multilabel (multi-hot)."""

    def __init__(self, n, multilabel):
        self.n, self.multilabel = n, multilabel
        self.patch_ids = [f"chip_{i}" for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        target = ((torch.rand(19, generator=g) < 0.3).long() if self.multilabel
                  else torch.tensor(i % 10))
        return (torch.randn(7, 40, 40, generator=g), target,
                *(torch.rand(4, 2, generator=g) * 2 - 1))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_mae("S").encoder.eval()


def test_published_keys_are_read_as_the_published_notebooks_read_them(encoder, tmp_path):
    names = [f"class_{i}" for i in range(10)]
    eurosat = compute_embeddings(encoder, Chips(12, False), tmp_path / "eurosat_test.npz",
                                 keys="published", split="test", progress=False,
                                 settings={"class_names": names})
    ben = compute_embeddings(encoder, Chips(12, True), tmp_path / "ben_test.npz",
                             keys="published", split="test", progress=False)
    eurosat.close(), ben.close()
    ours = compute_embeddings(encoder, Chips(12, True), None, progress=False)

    # explore_embedding_tsne.ipynb: x_test, y_test; CLS columns; labels by argmax of one-hot rows
    test_embeddings = np.load(tmp_path / "eurosat_test.npz")
    x_test, y_test = test_embeddings["x_test"], test_embeddings["y_test"]
    assert x_test.shape == (12, 105 * 144) and x_test[:, 576:720].shape == (12, 144)
    assert y_test.dtype == np.int16 and y_test.shape == (12, 10)
    np.testing.assert_array_equal(np.argmax(y_test, axis=1), np.arange(12) % 10)

    # eval_logistic_regression_bigearthnet.ipynb: token means, then the saved model's evaluate
    test_embeddings = np.load(tmp_path / "ben_test.npz")
    x_test, y_test = test_embeddings["x_test"], test_embeddings["y_test"]
    np.testing.assert_array_equal(x_test, ours["x"])
    np.testing.assert_array_equal(y_test, ours["y"])
    x_test = x_test.reshape(x_test.shape[0], 105, 144).mean(axis=1)
    model = LogisticRegressionModel(multilabel=True, n_jobs=1).fit(x_test, y_test)
    model.multilabel = True
    metrics, y_pred = model.evaluate(x_test, y_test)
    assert y_pred.shape == (12, 19) and 0 <= metrics["overall_map"] <= 1

    # and the project's probes read the published keys too
    split = load_split(tmp_path / "ben_test.npz", pool=True, stream=True)
    assert split.x_key == "x_test" and split.multilabel and split.x.shape == (12, 144)
    np.testing.assert_allclose(split.x.to_array(), x_test, rtol=1e-6, atol=1e-6)
    split = load_split(tmp_path / "eurosat_test.npz")
    assert not split.multilabel and np.array_equal(split.y, np.arange(12) % 10)
