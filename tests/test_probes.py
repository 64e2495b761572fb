"""Probes on frozen embeddings: train_logistic_regression.py, label_efficiency.py and
classification_models/, on small synthetic embedding files written to tmp_path."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score,
                             precision_recall_fscore_support, precision_score, recall_score)
from sklearn.neighbors import KNeighborsClassifier

import label_efficiency
import train_logistic_regression
from classification_models import KNNModel, LogisticRegressionModel
from classification_models.embeddings import (label_fraction_indices, load_split, pool_tokens,
                                              subset_size)
from utils.errors import UserInputError, run_cli

REPO = Path(__file__).resolve().parents[1]
DIM = 20
CLASS_NAMES = ["forest", "water", "urban", "crops"]
LABEL_NAMES = ["l0", "l1", "l2", "l3", "l4"]


# ---------- synthetic embedding files ----------

def multiclass_data(n, seed, class_sizes=None, dim=DIM, spread=2.5):
    """Gaussian blobs around fixed class centres; noisy enough that accuracy is below 1."""
    centres = np.random.default_rng(123).normal(size=(len(CLASS_NAMES), dim))
    rng = np.random.default_rng(seed)
    y = (np.repeat(np.arange(len(class_sizes)), class_sizes) if class_sizes
         else rng.integers(0, len(CLASS_NAMES), n))
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def multilabel_data(n, seed, dim=DIM, prevalence=(0.5, 0.4, 0.3, 0.2, 0.1)):
    weights = np.random.default_rng(456).normal(size=(len(prevalence), dim))
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(prevalence))) < np.array(prevalence)).astype(np.uint8)
    x = y @ weights + 0.8 * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def write_npz(path, x, y, ids=None, settings=None, x_key="x", y_key="y"):
    arrays = {x_key: x, y_key: y}
    if ids is not None:
        arrays["ids"] = np.asarray(ids)
    if settings is not None:
        arrays["settings"] = np.array(json.dumps(settings))
    np.savez(path, **arrays)
    return path


def sample_ids(n):
    return np.array([f"patch_{i:05d}" for i in range(n)])


@pytest.fixture
def multiclass_files(tmp_path):
    settings = {"pooling": "cls", "class_names": CLASS_NAMES, "dataset": "synthetic"}
    files = {}
    for split, n, seed in (("train", 240, 0), ("val", 120, 1), ("test", 100, 2)):
        x, y = multiclass_data(n, seed)
        files[split] = write_npz(tmp_path / f"mc_{split}.npz", x, y, sample_ids(n), settings)
    return files


@pytest.fixture
def multilabel_files(tmp_path):
    settings = {"pooling": "cls", "class_names": LABEL_NAMES}
    files = {}
    for split, n, seed in (("train", 300, 0), ("val", 150, 1), ("test", 120, 2)):
        x, y = multilabel_data(n, seed)
        files[split] = write_npz(tmp_path / f"ml_{split}.npz", x, y, sample_ids(n), settings)
    return files


def run_probe(argv):
    """Run the probe CLI in-process; return (json record, loaded model)."""
    assert train_logistic_regression.main(argv + ["--n-jobs", "1"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    records = sorted(out.glob("*.json"))
    assert len(records) == 1
    model_path = records[0].with_suffix(".joblib")
    assert model_path.is_file()
    return json.loads(records[0].read_text()), joblib.load(model_path)


def expect_user_error(main, argv, capsys, *fragments):
    """The script exits 2 with one line 'error: ...' that contains every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), err_lines
    for fragment in fragments:
        assert str(fragment) in err_lines[0], (fragment, err_lines[0])
    return err_lines[0]


# ---------- CLI: outputs and metrics ----------

def test_multiclass_cli_metrics_match_sklearn(multiclass_files, tmp_path):
    out = tmp_path / "out"
    record, model = run_probe(["--train", str(multiclass_files["train"]),
                               "--val", str(multiclass_files["val"]),
                               "--test", str(multiclass_files["test"]),
                               "--out", str(out), "--name", "eurosat_cls"])
    assert isinstance(model, LogisticRegressionModel) and not model.multilabel
    assert record["task"] == "multiclass" and record["class_names"] == CLASS_NAMES
    assert record["seed"] == 0 and record["settings"]["probe"] == "logreg"
    assert record["inputs"]["train"]["x_shape"] == [240, DIM]
    assert record["inputs"]["test"]["embedding_settings"]["dataset"] == "synthetic"
    assert next(out.glob("*.json")).name.startswith("eurosat_cls_")

    for split in ("val", "test"):
        data = np.load(multiclass_files[split])
        x, y = data["x"], data["y"]
        y_pred = model.predict(x)
        metrics = record["metrics"][split]
        assert metrics["overall_accuracy"] == pytest.approx(accuracy_score(y, y_pred))
        assert 0.5 < metrics["overall_accuracy"] < 1.0  # learnt something, not trivially
        for average in ("macro", "micro"):
            assert metrics[f"precision_{average}"] == pytest.approx(
                precision_score(y, y_pred, average=average, zero_division=0))
            assert metrics[f"recall_{average}"] == pytest.approx(
                recall_score(y, y_pred, average=average, zero_division=0))
            assert metrics[f"f1_{average}"] == pytest.approx(
                f1_score(y, y_pred, average=average, zero_division=0))
        precision, recall, f1, support = precision_recall_fscore_support(
            y, y_pred, labels=[0, 1, 2, 3], zero_division=0)
        assert list(metrics["per_class"]) == CLASS_NAMES
        for j, name in enumerate(CLASS_NAMES):
            assert metrics["per_class"][name]["f1"] == pytest.approx(f1[j])
            assert metrics["per_class"][name]["recall"] == pytest.approx(recall[j])
            assert metrics["per_class"][name]["support"] == support[j]
        assert metrics["n_samples"] == len(y)


def test_multilabel_cli_metrics_match_sklearn(multilabel_files, tmp_path):
    record, model = run_probe(["--train", str(multilabel_files["train"]),
                               "--val", str(multilabel_files["val"]),
                               "--test", str(multilabel_files["test"]),
                               "--out", str(tmp_path / "out"), "--name", "ben"])
    assert record["task"] == "multilabel" and model.multilabel
    for split in ("val", "test"):
        data = np.load(multilabel_files[split])
        x, y = data["x"], data["y"]
        scores = model.predict_proba(x)
        y_pred = model.predict(x)
        assert scores.shape == y.shape and set(np.unique(y_pred)) <= {0, 1}
        metrics = record["metrics"][split]
        assert metrics["map_micro"] == pytest.approx(average_precision_score(y, scores, average="micro"))
        assert metrics["map_macro"] == pytest.approx(average_precision_score(y, scores, average="macro"))
        assert metrics["map_micro"] > y.mean() + 0.2  # well above the chance level (prevalence)
        assert metrics["f1_micro"] == pytest.approx(f1_score(y, y_pred, average="micro"))
        assert metrics["f1_macro"] == pytest.approx(f1_score(y, y_pred, average="macro"))
        assert metrics["subset_accuracy"] == pytest.approx(accuracy_score(y, y_pred))
        per_class_ap = average_precision_score(y, scores, average=None)
        assert list(metrics["per_class"]) == LABEL_NAMES
        for j, name in enumerate(LABEL_NAMES):
            assert metrics["per_class"][name]["average_precision"] == pytest.approx(per_class_ap[j])
            assert metrics["per_class"][name]["support"] == int(y[:, j].sum())


def test_published_key_names_and_one_hot_labels(tmp_path):
    x, y = multiclass_data(200, 0)
    one_hot = np.eye(4, dtype=np.uint8)[y]
    train = write_npz(tmp_path / "train.npz", x, one_hot, x_key="x_train", y_key="y_train")
    x_val, y_val = multiclass_data(80, 1)
    val = write_npz(tmp_path / "val.npz", x_val, y_val, x_key="X", y_key="Y")
    record, model = run_probe(["--train", str(train), "--val", str(val),
                               "--out", str(tmp_path / "out"), "--multilabel", "false"])
    assert record["task"] == "multiclass" and record["class_names"] is None
    assert record["inputs"]["train"]["x_key"] == "x_train"
    assert list(record["metrics"]["val"]["per_class"]) == ["0", "1", "2", "3"]
    assert record["metrics"]["val"]["overall_accuracy"] == pytest.approx(
        accuracy_score(y_val, model.predict(x_val)))


def test_task_inference(tmp_path):
    x, y = multiclass_data(50, 0)
    one_hot = np.eye(4, dtype=np.uint8)[y]
    split = load_split(write_npz(tmp_path / "onehot.npz", x, one_hot))
    assert not split.multilabel and np.array_equal(split.y, y)
    forced = load_split(tmp_path / "onehot.npz", multilabel=True)
    assert forced.multilabel and forced.y.shape == (50, 4)

    x_ml, y_ml = multilabel_data(50, 0)
    assert load_split(write_npz(tmp_path / "multihot.npz", x_ml, y_ml)).multilabel
    with pytest.raises(UserInputError, match="not one-hot"):
        load_split(tmp_path / "multihot.npz", multilabel=False)
    with pytest.raises(UserInputError, match="1-D"):
        load_split(write_npz(tmp_path / "indices.npz", x, y), multilabel=True)

    one_hot[3] = 0  # a row with no label: not class 0, as the published loader assumed
    assert load_split(write_npz(tmp_path / "empty_row.npz", x, one_hot)).multilabel


# ---------- kNN ----------

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_equals_sklearn_brute_force_and_beats_chance(metric):
    x, y = multiclass_data(300, 0)
    x_test, y_test = multiclass_data(150, 1)
    model = KNNModel(k=5, metric=metric).fit(x, y)
    scores = model.predict_proba(x_test)
    assert scores.shape == (150, 4)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    reference = KNeighborsClassifier(n_neighbors=5, metric=metric, algorithm="brute").fit(x, y)
    np.testing.assert_array_equal(model.kneighbors(x_test),
                                  reference.kneighbors(x_test, return_distance=False))
    np.testing.assert_array_equal(model.predict(x_test), reference.predict(x_test))
    metrics, y_pred = model.evaluate(x_test, y_test, CLASS_NAMES)
    assert metrics["overall_accuracy"] == pytest.approx(accuracy_score(y_test, y_pred))
    assert metrics["overall_accuracy"] > 0.5  # chance is 0.25


def test_knn_multilabel_scores_are_neighbour_fractions():
    x, y = multilabel_data(300, 0)
    x_test, y_test = multilabel_data(120, 1)
    model = KNNModel(k=5, multilabel=True).fit(x, y)
    scores = model.predict_proba(x_test)
    assert set(np.round(np.unique(scores) * 5, 6)) <= {0, 1, 2, 3, 4, 5}
    np.testing.assert_array_equal(model.predict(x_test), (scores > 0.5).astype(np.uint8))
    metrics, _ = model.evaluate(x_test, y_test)
    assert metrics["map_micro"] == pytest.approx(average_precision_score(y_test, scores, average="micro"))
    assert metrics["map_micro"] > y_test.mean() + 0.2


def test_knn_probe_through_cli(multiclass_files, tmp_path):
    record, model = run_probe(["--train", str(multiclass_files["train"]),
                               "--test", str(multiclass_files["test"]),
                               "--out", str(tmp_path / "out"), "--probe", "knn"])
    assert isinstance(model, KNNModel) and record["settings"]["name"] == "knn"
    data = np.load(multiclass_files["test"])
    assert record["metrics"]["test"]["overall_accuracy"] == pytest.approx(
        accuracy_score(data["y"], model.predict(data["x"])))
    assert record["metrics"]["test"]["overall_accuracy"] > 0.5


# ---------- label-fraction subsets ----------

def test_multiclass_fraction_subsets_are_stratified_and_reproducible():
    class_sizes = [300, 150, 48, 2]
    _, y = multiclass_data(0, 0, class_sizes=class_sizes)
    fraction = 0.05
    first = label_fraction_indices(y, False, fraction, seed=0)
    assert np.array_equal(first, label_fraction_indices(y, False, fraction, seed=0))
    assert not np.array_equal(first, label_fraction_indices(y, False, fraction, seed=1))
    assert len(first) == subset_size(len(y), fraction) == 25
    assert len(np.unique(first)) == len(first)
    counts = np.bincount(y[first], minlength=4)
    assert (counts >= 1).all()  # the class with 2 rows is still there
    assert np.all(np.abs(counts - fraction * np.array(class_sizes)) <= 1.5), counts
    assert np.array_equal(label_fraction_indices(y, False, 1.0, seed=3), np.arange(len(y)))


def test_multilabel_fraction_subsets_cover_rare_labels():
    _, y = multilabel_data(400, 0, prevalence=(0.6, 0.4, 0.2, 0.0, 0.0))
    y[[7, 50, 301], 3] = 1  # a rare label: 3 of 400 rows
    y[[11, 12], 4] = 1  # rarer still
    y[20:30] = 0  # some rows carry no label
    fraction = 0.02
    subsets = [label_fraction_indices(y, True, fraction, seed) for seed in (0, 0, 1, 2)]
    assert np.array_equal(subsets[0], subsets[1])
    assert not np.array_equal(subsets[0], subsets[2])
    assert not np.array_equal(subsets[2], subsets[3])
    for subset in subsets:
        assert len(subset) == subset_size(400, fraction) == 8
        assert (y[subset].sum(axis=0) >= 1).all()
    larger = label_fraction_indices(y, True, 0.5, seed=0)
    # the exact size is absorbed by the commonest label, processed last
    np.testing.assert_allclose(y[larger].sum(axis=0), 0.5 * y.sum(axis=0), rtol=0.1, atol=2)
    unlabelled = y.sum(axis=1) == 0
    assert abs(unlabelled[larger].sum() - 0.5 * unlabelled.sum()) <= 2


def test_train_fraction_cli_uses_the_seeded_subset(multiclass_files, tmp_path):
    argv = ["--train", str(multiclass_files["train"]), "--val", str(multiclass_files["val"]),
            "--train-fraction", "0.25", "--seed", "3"]
    record, model = run_probe(argv + ["--out", str(tmp_path / "a")])
    train = np.load(multiclass_files["train"])
    rows = label_fraction_indices(train["y"], False, 0.25, seed=3)
    assert record["n_train"] == len(rows) == 60
    expected = LogisticRegressionModel(seed=3).fit(train["x"][rows], train["y"][rows])
    val = np.load(multiclass_files["val"])
    np.testing.assert_allclose(model.predict_proba(val["x"]), expected.predict_proba(val["x"]),
                               rtol=1e-5, atol=1e-6)


# ---------- --pool ----------

def test_pool_flag_forms(tmp_path):
    tokens, embed_dim = 3, 4
    settings = {"pooling": "all", "num_tokens": tokens, "embed_dim": embed_dim}
    x, y = multiclass_data(120, 0, dim=tokens * embed_dim)
    x_val, y_val = multiclass_data(50, 1, dim=tokens * embed_dim)  # fewer rows than train
    train = write_npz(tmp_path / "train.npz", x, y, settings=settings)
    val = write_npz(tmp_path / "val.npz", x_val, y_val, settings=settings)
    base = ["--train", str(train), "--val", str(val)]

    bare, model = run_probe(["--pool"] + base + ["--out", str(tmp_path / "bare")])
    assert bare["settings"]["pool"] is True
    assert bare["inputs"]["train"]["x_shape"] == [120, embed_dim]
    assert bare["inputs"]["val"]["x_shape"] == [50, embed_dim]
    pooled_val = x_val.reshape(50, tokens, embed_dim).mean(axis=1)
    assert bare["metrics"]["val"]["overall_accuracy"] == pytest.approx(
        accuracy_score(y_val, model.predict(pooled_val)))

    explicit, _ = run_probe(base + ["--out", str(tmp_path / "true"), "--pool", "true"])
    assert explicit["inputs"]["val"]["x_shape"] == [50, embed_dim]
    assert explicit["metrics"]["val"] == bare["metrics"]["val"]
    off, _ = run_probe(base + ["--pool", "false", "--out", str(tmp_path / "false")])
    assert off["settings"]["pool"] is False
    assert off["inputs"]["train"]["x_shape"] == [120, tokens * embed_dim]


def test_pool_without_settings_assumes_105_tokens(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 105 * 2)).astype(np.float32)
    np.testing.assert_allclose(pool_tokens(x, {}, "f.npz"), x.reshape(6, 105, 2).mean(axis=1),
                               rtol=1e-6)
    with pytest.raises(UserInputError, match="not a multiple of 105"):
        pool_tokens(x[:, :200], {}, "f.npz")
    with pytest.raises(UserInputError, match="pooling 'cls'"):
        pool_tokens(x, {"pooling": "cls"}, "f.npz")


def test_feature_slice_takes_columns(multiclass_files, tmp_path):
    record, model = run_probe(["--train", str(multiclass_files["train"]),
                               "--val", str(multiclass_files["val"]),
                               "--out", str(tmp_path / "out"), "--feature-slice", "5:15"])
    assert record["inputs"]["train"]["x_shape"] == [240, 10]
    val = np.load(multiclass_files["val"])
    assert record["metrics"]["val"]["overall_accuracy"] == pytest.approx(
        accuracy_score(val["y"], model.predict(val["x"][:, 5:15])))


# ---------- clear errors ----------

def test_error_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    expect_user_error(train_logistic_regression.main,
                      ["--train", str(missing), "--out", str(tmp_path)], capsys, missing, "not found")


def test_error_missing_keys(tmp_path, capsys):
    path = tmp_path / "odd.npz"
    np.savez(path, features=np.zeros((4, 3)), y=np.zeros(4))
    expect_user_error(train_logistic_regression.main, ["--train", str(path)], capsys,
                      path, "features", "'features'", "'y'")


def test_error_feature_dimension_mismatch(multiclass_files, tmp_path, capsys):
    x, y = multiclass_data(30, 5, dim=DIM + 1)
    wide = write_npz(tmp_path / "wide.npz", x, y)
    expect_user_error(train_logistic_regression.main,
                      ["--train", str(multiclass_files["train"]), "--test", str(wide)], capsys,
                      multiclass_files["train"], wide, DIM, DIM + 1)


def test_error_non_finite_features(tmp_path, capsys):
    x, y = multiclass_data(40, 0)
    x[[1, 5, 9], 2] = np.nan
    x[9, 3] = np.inf
    bad = write_npz(tmp_path / "nan.npz", x, y)
    expect_user_error(train_logistic_regression.main, ["--train", str(bad)], capsys,
                      bad, "3 of 40 rows", "non-finite")


def test_error_single_class(tmp_path, capsys):
    x, _ = multiclass_data(40, 0)
    single = write_npz(tmp_path / "single.npz", x, np.full(40, 2),
                       settings={"class_names": CLASS_NAMES})
    expect_user_error(train_logistic_regression.main, ["--train", str(single)], capsys,
                      single, "single class", "urban")


def test_multilabel_constant_column_warns_and_all_constant_fails(tmp_path, capsys):
    x, y = multilabel_data(200, 0)
    y[:, 2] = 0
    y[:, 4] = 1
    path = write_npz(tmp_path / "const.npz", x, y, settings={"class_names": LABEL_NAMES})
    record, model = run_probe(["--train", str(path), "--test", str(path),
                               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "never present in training, scored 0: 2 (l2)" in err
    assert "present in every training row, scored 1: 4 (l4)" in err
    scores = model.predict_proba(x)
    assert np.all(scores[:, 2] == 0) and np.all(scores[:, 4] == 1)

    y[:] = 0
    y[:, 1] = 1
    constant = write_npz(tmp_path / "all_const.npz", x, y)
    expect_user_error(train_logistic_regression.main,
                      ["--train", str(constant), "--multilabel", "true"], capsys,
                      constant, "every label column is constant")


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1", "nan"])
def test_error_fraction_outside_range(multiclass_files, capsys, fraction):
    expect_user_error(train_logistic_regression.main,
                      ["--train", str(multiclass_files["train"]), "--train-fraction", fraction],
                      capsys, "--train-fraction", "(0, 1]", fraction)


@pytest.mark.parametrize("spec, fragment", [("abc", "start:end"), ("15:5", "selects no columns"),
                                            ("0:999", "has 20 features"), ("1:2:3", "start:end")])
def test_error_bad_feature_slice(multiclass_files, capsys, spec, fragment):
    expect_user_error(train_logistic_regression.main,
                      ["--train", str(multiclass_files["train"]), "--feature-slice", spec],
                      capsys, f"'{spec}'", fragment)


# ---------- label_efficiency.py ----------

def test_label_efficiency_variants_csv_and_plot(tmp_path):
    x, y = multiclass_data(200, 0)
    x_test, y_test = multiclass_data(80, 1)
    ids, test_ids = sample_ids(200), sample_ids(80)
    noise = np.random.default_rng(9)
    files = {}
    for variant, extra_noise in (("meta_on", 0.0), ("meta_off", 2.0)):
        files[variant] = (
            write_npz(tmp_path / f"{variant}_train.npz",
                      x + extra_noise * noise.normal(size=x.shape).astype(np.float32), y, ids),
            write_npz(tmp_path / f"{variant}_test.npz", x_test, y_test, test_ids))
    out = tmp_path / "curves"
    argv = ["--variant", f"meta_on={files['meta_on'][0]},{files['meta_on'][1]}",
            "--variant", f"meta_off={files['meta_off'][0]},{files['meta_off'][1]}",
            "--fractions", "0.05,0.25,1.0", "--seeds", "0,1", "--out", str(out), "--n-jobs", "1"]
    assert label_efficiency.main(argv) == 0

    with open(out / "label_efficiency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2
    assert list(rows[0])[:5] == ["variant", "fraction", "seed", "n_train", "n_test"]
    assert {"overall_accuracy", "f1_macro", "precision_micro"} <= set(rows[0])
    for row in rows:
        assert int(row["n_train"]) == subset_size(200, float(row["fraction"]))
        assert int(row["n_test"]) == 80
    keys = {(r["variant"], r["fraction"], r["seed"]) for r in rows}
    assert len(keys) == len(rows)
    # the headline metric of one row, recomputed from scratch on the same subset
    row = next(r for r in rows if r["variant"] == "meta_on" and r["fraction"] == "0.25"
               and r["seed"] == "1")
    subset = label_fraction_indices(y, False, 0.25, seed=1)
    model = LogisticRegressionModel(seed=1).fit(x[subset], y[subset])
    assert float(row["overall_accuracy"]) == pytest.approx(
        accuracy_score(y_test, model.predict(x_test)))
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_efficiency_single_variant_multilabel_and_id_mismatch(tmp_path, capsys):
    x, y = multilabel_data(150, 0)
    x_test, y_test = multilabel_data(60, 1)
    train = write_npz(tmp_path / "train.npz", x, y, sample_ids(150))
    test = write_npz(tmp_path / "test.npz", x_test, y_test, sample_ids(60))
    out = tmp_path / "out"
    assert label_efficiency.main(["--train", str(train), "--test", str(test), "--out", str(out),
                                  "--name", "ben", "--fractions", "0.1,1", "--seeds", "0",
                                  "--n-jobs", "1"]) == 0
    with open(out / "ben.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["fraction"]) for r in rows] == [("default", "0.1"), ("default", "1.0")]
    assert {"map_micro", "map_macro", "subset_accuracy"} <= set(rows[0])
    assert (out / "ben.png").is_file()

    shuffled = write_npz(tmp_path / "other.npz", x, y, sample_ids(150)[::-1])
    expect_user_error(label_efficiency.main,
                      ["--variant", f"a={train},{test}", "--variant", f"b={shuffled},{test}",
                       "--out", str(out)], capsys, train, shuffled, "sample ids")


# ---------- real subprocess runs ----------

def run_script(script, args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_scripts_run_as_subprocesses(multiclass_files, tmp_path):
    done = run_script("train_logistic_regression.py",
                      ["--train", multiclass_files["train"], "--val", multiclass_files["val"],
                       "--out", tmp_path / "cli", "--name", "sub", "--n-jobs", "1"])
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cli").glob("sub_*.joblib"))) == 1
    assert "overall_accuracy" in done.stdout

    failed = run_script("train_logistic_regression.py",
                        ["--train", multiclass_files["train"], "--train-fraction", "2"])
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == ["error: --train-fraction must be in (0, 1], got 2.0"]

    curves = run_script("label_efficiency.py",
                        ["--train", multiclass_files["train"], "--test", multiclass_files["test"],
                         "--fractions", "0.5,1", "--seeds", "0", "--out", tmp_path / "le",
                         "--n-jobs", "1"])
    assert curves.returncode == 0, curves.stderr
    assert (tmp_path / "le" / "label_efficiency.csv").is_file()
    assert (tmp_path / "le" / "label_efficiency.png").is_file()
