"""The fast probe solver (classification_models/solver.py) and the streamed features it reads
(classification_models/rows.py): scikit-learn's optimum, float16, streaming, bounded memory, and a
saved model that scikit-learn and the published code use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from classification_models import LogisticRegressionModel
from classification_models.row_space import row_space_reduction
from classification_models.rows import ArrayRows, NpzRows, column_stats
from classification_models.solver import nystrom_preconditioner

REPO = Path(__file__).resolve().parents[1]


def standardised_multiclass(n=400, dim=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    logits = x @ rng.normal(size=(dim, classes)) + rng.normal(scale=1.5, size=(n, classes))
    return x.astype(np.float32), logits.argmax(axis=1)


def standardised_multilabel(n=400, dim=8, labels=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    logits = x @ rng.normal(size=(dim, labels)) + rng.logistic(size=(n, labels)) - 0.5
    return x.astype(np.float32), (logits > 0).astype(np.uint8)


def raw_features(n=300, dim=40, labels=4, seed=1):
    """Unscaled, off-centre features (as embeddings are): column means and scales vary."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    x = (latent @ rng.normal(size=(3, dim)) + rng.normal(size=(n, dim))) * rng.uniform(
        0.2, 5, dim) + rng.normal(scale=3, size=dim)
    y = (latent @ rng.normal(size=(3, labels)) + rng.logistic(size=(n, labels)) > 0.3)
    return x.astype(np.float32), y.astype(np.uint8)


def coefficients(estimator) -> np.ndarray:
    """(K, D+1) coefficients with the intercepts in the last column."""
    return np.hstack([estimator.coef_, estimator.intercept_[:, None]])


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- the optimum


@pytest.mark.parametrize("classes", [4, 2])
def test_multiclass_optimum_equals_sklearn(classes):
    x, y = standardised_multiclass(classes=classes)
    reference = LogisticRegression(tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
    model = LogisticRegressionModel(tol=1e-7, n_jobs=1).fit(x, y)
    assert isinstance(model.model, LogisticRegression)
    assert model.fit_report["objective_form"] == ("multinomial" if classes > 2 else "one-vs-rest")
    assert model.fit_report["converged"]
    fitted = coefficients(model.model)
    expected = coefficients(reference)
    if classes > 2:  # the multinomial intercepts are defined up to a common shift
        fitted[:, -1] -= fitted[:, -1].mean()
        expected[:, -1] -= expected[:, -1].mean()
    assert relative_difference(fitted, expected) < 1e-4
    np.testing.assert_array_equal(model.predict(x), reference.predict(x))


def test_multilabel_optimum_equals_sklearn_one_vs_rest():
    x, y = standardised_multilabel()
    reference = OneVsRestClassifier(LogisticRegression(tol=1e-10, max_iter=10_000)).fit(
        x.astype(np.float64), y)
    model = LogisticRegressionModel(multilabel=True, tol=1e-7, n_jobs=1).fit(x, y)
    assert model.fit_report["objective_form"] == "one-vs-rest" and model.fit_report["converged"]
    for ours, theirs in zip(model.model.estimators_, reference.estimators_):
        assert relative_difference(coefficients(ours), coefficients(theirs)) < 1e-4
    np.testing.assert_array_equal(model.predict(x), reference.predict(x))


def numpy_gradient_norms(x, y, estimators, C=1.0):
    """Per label: |gradient of 0.5||w||^2 + C sum logloss| in float64, computed from scratch."""
    norms = []
    for j, estimator in enumerate(estimators):
        w, b = estimator.coef_[0], estimator.intercept_[0]
        residual = 1 / (1 + np.exp(-(x.astype(np.float64) @ w + b))) - y[:, j]
        norms.append(np.linalg.norm(np.append(w + C * x.T @ residual, C * residual.sum())))
    return np.array(norms)


@pytest.mark.parametrize("n, dim", [(300, 40), (60, 200)])  # solved on D, and on N features
def test_gradient_at_the_solution_is_small_on_raw_features(n, dim):
    x, y = raw_features(n=n, dim=dim)
    model = LogisticRegressionModel(multilabel=True, n_jobs=1).fit(x, y)  # default tolerance
    assert (model.fit_report["row_space"] is not None) == (n < dim)
    at_solution = numpy_gradient_norms(x, y, model.model.estimators_)
    zero = LogisticRegression()
    zero.coef_, zero.intercept_ = np.zeros((1, x.shape[1])), np.zeros(1)
    at_zero = numpy_gradient_norms(x, y, [zero] * y.shape[1])
    assert np.all(at_solution <= 1e-3 * at_zero), at_solution / at_zero
    report = model.fit_report
    np.testing.assert_allclose(report["grad_norm"], at_solution, rtol=0.05, atol=1e-3 * at_zero.min())
    assert len(report["final_objective"]) == y.shape[1] and report["iterations"] > 0


def test_float16_features_give_the_float32_optimum():
    x, y = raw_features()
    half = x.astype(np.float16)
    model_half = LogisticRegressionModel(multilabel=True, n_jobs=1).fit(half, y)
    model_full = LogisticRegressionModel(multilabel=True, n_jobs=1).fit(half.astype(np.float32), y)
    for a, b in zip(model_half.model.estimators_, model_full.model.estimators_):
        np.testing.assert_allclose(coefficients(a), coefficients(b), rtol=1e-6, atol=1e-7)
    blocks = list(ArrayRows(half).raw_blocks(64))
    assert blocks[0][1].dtype == np.float16 and blocks[0][1].base is not None  # views, no copy


@pytest.mark.parametrize("compressed", [False, True])
def test_streamed_file_gives_the_in_memory_result(tmp_path, compressed):
    x, y = raw_features()
    path = tmp_path / "emb.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x.astype(np.float16), y=y)
    source = NpzRows(path, "x")
    assert (source.member.data_offset is None) == compressed
    np.testing.assert_array_equal(source.to_array(), x.astype(np.float16))
    stats = column_stats(source, block_rows=37)
    np.testing.assert_allclose(stats.mean, x.astype(np.float16).astype(np.float64).mean(0),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.var, x.astype(np.float16).astype(np.float64).var(0),
                               rtol=1e-7)
    streamed = LogisticRegressionModel(multilabel=True, tol=1e-7, n_jobs=1, block_rows=37)
    streamed.fit(source, y)
    in_memory = LogisticRegressionModel(multilabel=True, tol=1e-7, n_jobs=1)
    in_memory.fit(x.astype(np.float16), y)
    for a, b in zip(streamed.model.estimators_, in_memory.model.estimators_):
        assert relative_difference(coefficients(a), coefficients(b)) < 1e-4
    np.testing.assert_array_equal(streamed.predict(source), in_memory.predict(x))


def test_scale_fits_on_standardised_features_with_a_published_scaler():
    x, y = raw_features()
    model = LogisticRegressionModel(multilabel=True, scale=True, tol=1e-7, n_jobs=1).fit(x, y)
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit(x.astype(np.float64))
    np.testing.assert_allclose(model.scaler.mean_, scaled.mean_, rtol=1e-6)
    np.testing.assert_allclose(model.scaler.scale_, scaled.scale_, rtol=1e-6)
    reference = OneVsRestClassifier(LogisticRegression(tol=1e-10, max_iter=10_000)).fit(
        scaled.transform(x.astype(np.float64)), y)
    for ours, theirs in zip(model.model.estimators_, reference.estimators_):
        assert relative_difference(coefficients(ours), coefficients(theirs)) < 1e-4
    np.testing.assert_array_equal(model.predict(x), reference.predict(scaled.transform(x)))


# ------------------------------------------- fewer rows than features: the row space


def sklearn_reference(x, y, task):
    estimator = LogisticRegression(tol=1e-10, max_iter=10_000)
    if task == "multilabel":
        estimator = OneVsRestClassifier(estimator)
    return estimator.fit(x.astype(np.float64), y)


def estimator_coefficients(model, multiclass: bool) -> np.ndarray:
    """(K, D+1) coefficients of a fitted LogisticRegression or one-vs-rest of them; multinomial
    intercepts shifted to mean zero (they are defined up to a common shift)."""
    estimators = [model] if isinstance(model, LogisticRegression) else model.estimators_
    coef = np.vstack([coefficients(e) for e in estimators])
    if multiclass and len(coef) > 2:
        coef[:, -1] -= coef[:, -1].mean()
    return coef


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("task", ["multilabel", "multiclass", "binary"])
def test_fewer_rows_than_features_reach_sklearns_optimum_through_the_row_space(task, scale):
    if task == "multilabel":
        x, y = standardised_multilabel(n=80, dim=200)
    else:
        x, y = standardised_multiclass(n=80, dim=200, classes=4 if task == "multiclass" else 2)
    x = x * 0.5 + 0.2  # not exactly standardised: --scale changes something
    model = LogisticRegressionModel(multilabel=task == "multilabel", scale=scale, tol=1e-7,
                                    n_jobs=1).fit(x, y)
    assert model.fit_report["row_space"]["rows"] == 80 and model.fit_report["converged"]
    seen = model.scaler.transform(x) if scale else x
    reference = sklearn_reference(seen, y, task)
    multiclass = task != "multilabel"
    assert relative_difference(estimator_coefficients(model.model, multiclass),
                               estimator_coefficients(reference, multiclass)) < 1e-4
    np.testing.assert_array_equal(model.predict(x), reference.predict(seen))
    primal = LogisticRegressionModel(multilabel=task == "multilabel", scale=scale, tol=1e-7,
                                     n_jobs=1, row_space=False).fit(x, y)
    assert primal.fit_report["row_space"] is None
    assert relative_difference(estimator_coefficients(model.model, multiclass),
                               estimator_coefficients(primal.model, multiclass)) < 1e-4


def test_row_space_features_give_every_prediction_of_the_original_features(tmp_path):
    """L L^T is the Gram matrix of the centred rows plus the constant column, streamed in
    chunks of rows; coefficients (c, b) on the rows of L map to (w, b') on x with the same
    predictions and a penalty no larger."""
    x, _ = raw_features(n=50, dim=90)
    path = tmp_path / "wide.npz"
    np.savez(path, x=x.astype(np.float16))
    source = NpzRows(path, "x")
    x64 = source.to_array().astype(np.float64)
    mean = x64.mean(axis=0)
    chunked = row_space_reduction(source, mean, chunk_bytes=7 * 90 * 4, block_rows=5)
    whole = row_space_reduction(ArrayRows(x.astype(np.float16)), mean)
    assert chunked.data_passes == 8 and whole.data_passes == 1  # ceil(50 / 7) chunks
    np.testing.assert_allclose(chunked.features, whole.features, rtol=0,  # float32 products
                               atol=1e-5 * np.abs(whole.features).max())
    factor = chunked.factor.numpy()
    augmented = np.hstack([x64 - mean, np.full((50, 1), chunked.alpha)])
    np.testing.assert_allclose(factor @ factor.T, augmented @ augmented.T, rtol=1e-5,
                               atol=1e-5 * np.abs(augmented @ augmented.T).max())
    reduced = np.random.default_rng(0).normal(size=(51, 3))
    coef = chunked.coefficients(reduced)
    assert coef.shape == (91, 3)
    np.testing.assert_allclose(x64 @ coef[:-1] + coef[-1], factor @ reduced[:-1] + reduced[-1],
                               rtol=1e-4, atol=1e-4)
    assert np.all((coef[:-1] ** 2).sum(axis=0) <= (reduced[:-1] ** 2).sum(axis=0) * (1 + 1e-5))


def test_repeated_rows_fall_back_to_the_features():
    x, y = standardised_multilabel(n=40, dim=100)
    x, y = np.vstack([x, x[:10]]), np.vstack([y, y[:10]])  # 10 rows twice: K is singular
    assert row_space_reduction(ArrayRows(x), x.mean(axis=0)) is None
    model = LogisticRegressionModel(multilabel=True, tol=1e-7, n_jobs=1).fit(x, y)
    assert model.fit_report["row_space"] is None and model.fit_report["converged"]
    reference = sklearn_reference(x, y, "multilabel")
    assert relative_difference(estimator_coefficients(model.model, False),
                               estimator_coefficients(reference, False)) < 1e-4


def test_nystrom_sketch_finds_the_top_eigenpairs_of_the_standardised_covariance():
    x, _ = raw_features(n=2000, dim=60)  # rank-3 structure plus noise
    stats = column_stats(ArrayRows(x))
    std = np.sqrt(stats.var)
    standardised = (x.astype(np.float64) - stats.mean) / std
    eigenvalues, eigenvectors = np.linalg.eigh(standardised.T @ standardised / len(x))
    basis, factor = nystrom_preconditioner(ArrayRows(x), stats.mean, std, rank=12)
    np.testing.assert_allclose(basis.T @ basis, np.eye(12), atol=1e-8)
    assert np.all((factor > 0) & (factor <= 1)) and factor[-1] == 1
    # the three spikes (eigenvalues 9 to 14, the rest about 1 and below) are found, and the
    # preconditioner brings their curvature (s^2 lambda) down to the bulk of the spectrum
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    assert eigenvalues[2] > 5 * eigenvalues[3]
    assert np.linalg.svd(basis[:, :3].T @ eigenvectors[:, :3])[1].min() > 0.99
    flattened = factor[:3] ** 2 * eigenvalues[:3]
    assert np.all((flattened > 0.25 * eigenvalues[3]) & (flattened < 1.1 * eigenvalues[3]))


def test_spectral_preconditioner_keeps_the_optimum_and_saves_passes():
    x, y = raw_features(n=600, dim=80)
    plain = LogisticRegressionModel(multilabel=True, tol=1e-6, n_jobs=1, precond_rank=0).fit(x, y)
    spectral = LogisticRegressionModel(multilabel=True, tol=1e-6, n_jobs=1).fit(x, y)
    # both stop at a gradient norm of 1e-6 of the one at zero: the same objective, and
    # coefficients as close as that tolerance allows on these unscaled features (the last
    # digits depend on the BLAS kernels of the machine)
    np.testing.assert_allclose(spectral.fit_report["final_objective"],
                               plain.fit_report["final_objective"], rtol=1e-7)
    for a, b in zip(plain.model.estimators_, spectral.model.estimators_):
        assert relative_difference(coefficients(a), coefficients(b)) < 1e-3
    assert spectral.fit_report["data_passes"] < 0.8 * plain.fit_report["data_passes"], (
        spectral.fit_report["data_passes"], plain.fit_report["data_passes"])


def test_constant_label_gets_sklearns_constant_predictor():
    x, y = standardised_multilabel()
    y[:, 1] = 0
    model = LogisticRegressionModel(multilabel=True, n_jobs=1).fit(x, y)
    assert type(model.model.estimators_[1]).__name__ == "_ConstantPredictor"
    assert np.all(model.predict_proba(x)[:, 1] == 0)
    assert len(model.fit_report["final_objective"]) == y.shape[1] - 1


# ---------------------------------------------------------------- bounded memory

PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from classification_models import LogisticRegressionModel
    from classification_models.rows import NpzRows
    path = sys.argv[1]
    y = np.load(path)["y"]
    model = LogisticRegressionModel(multilabel=True, max_iter=3, n_jobs=1)
    model.fit(NpzRows(path, "x"), y)  # streamed: never cached in memory
    assert model.fit_report["data_passes"] >= 3
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            print(int(line.split()[1]) * 1024)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_of_a_fit_does_not_grow_with_the_rows(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_RSS_SCRIPT.format(repo=str(REPO)))
    rng = np.random.default_rng(0)
    dim = 3000

    def peak_rss(n):
        path = tmp_path / f"{n}.npz"
        x = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
        np.savez(path, x=x, y=(x[:, :4] > 0).astype(np.uint8))
        del x
        result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                                text=True, check=True)
        return int(result.stdout.split()[-1]), path.stat().st_size

    # 32,000 rows: 192 MB of float16 features, 4x the smaller file; holding them (let alone
    # their float32 copy) would add far more than the tens of MB of run-to-run noise
    small, _ = peak_rss(8000)
    large, large_size = peak_rss(32000)
    assert large - small < large_size / 2, (small, large, large_size)
