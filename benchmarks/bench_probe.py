"""The linear probe at the paper's scale: the fast L-BFGS solver against the published sag solver.

    python benchmarks/bench_probe.py [--sizes 2000,8000] [--sag-labels 19,4] [--dim 15120]
        [--cache /tmp/bench_probe] [--skip-sag] [--sag-max-iter 1000]
    python benchmarks/bench_probe.py --benl [--big-rows 269694]

Synthetic embedding files (cached in ``--cache``, made once): low-rank structure plus noise,
like all-token embeddings (rank-24 latent factors mapped to ``--dim`` columns with uneven
column means and scales, plus independent noise), and 19 multilabel targets drawn from a
logistic model of the latent factors (prevalences 3% to 40%).

Rows of the table, each fit in a fresh process (so that peak RSS is the fit's own):

- ``fast``: ``LogisticRegressionModel()`` (L-BFGS, default tolerance, all cores) on all 19
  labels, features streamed from the .npz (held in memory when they fit 1 GiB); with fewer rows
  than features it solves on the row-space reduction (classification_models/row_space.py);
- ``sag``: the published settings, ``LogisticRegressionModel(solver="sag", multilabel=True,
  n_jobs=4, max_iter=1000, seed=0)`` on the features loaded into memory (float32), on the first
  ``--sag-labels`` labels (default all 19); fewer give a lower bound on the speed-up
  (:func:`speed_up`);
- with ``--benl`` (instead of the side-by-side rows): ``fast`` alone on a BEN-L-sized file,
  ``--big-rows`` x ``--dim`` float16 (8.2 GB on disk for 269,694 x 15,120), streamed in blocks,
  with the solver's progress lines (time per data pass) as it runs.

Columns: wall seconds (reading the features and fitting), peak RSS of the process, the final
objective (sum over the 19 labels of ``0.5||w||^2 + C * sum logloss``, computed the same way for
both solvers, in float64 sums over float32 products), micro mAP on a 2,000-row validation file
from the same generator, and, for the fast solver, iterations and data passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script, from any folder

import numpy as np  # noqa: E402

N_LABELS = 19
RANK = 24
BLOCK_ROWS = 4096
VAL_ROWS = 2000


# ------------------------------------------------------------------ synthetic files


def generator_model(dim: int, seed: int = 12345):
    """The fixed parts of the generator: latent-to-feature map, column means and scales,
    latent-to-label weights and biases."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(RANK, dim)).astype(np.float32) / np.sqrt(RANK)
    means = rng.normal(scale=0.5, size=dim).astype(np.float32)
    scales = np.exp(rng.normal(scale=0.5, size=dim)).astype(np.float32)
    label_weights = rng.normal(size=(RANK, N_LABELS)) * 0.6
    prevalence = np.linspace(0.03, 0.4, N_LABELS)
    label_bias = np.log(prevalence / (1 - prevalence)) * 1.6
    return loadings, means, scales, label_weights, label_bias


def write_synthetic(path: Path, n_rows: int, dim: int, dtype: str, seed: int) -> Path:
    """An uncompressed .npz with ``x`` (n_rows, dim) ``dtype`` and ``y`` (n_rows, 19) uint8,
    written block by block (memory does not grow with n_rows), atomically."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    loadings, means, scales, label_weights, label_bias = generator_model(dim)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp")
    labels = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                "shape": (n_rows, dim)})
            for start in range(0, n_rows, BLOCK_ROWS):
                rows = min(BLOCK_ROWS, n_rows - start)
                latent = rng.standard_normal((rows, RANK), dtype=np.float32)
                block = latent @ loadings
                block += rng.standard_normal((rows, dim), dtype=np.float32)
                block *= scales
                block += means
                member.write(block.astype(dtype).tobytes())
                logits = latent @ label_weights + label_bias + rng.logistic(size=(rows, N_LABELS))
                labels.append((logits > 0).astype(np.uint8))
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.concatenate(labels))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ one fit per process


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def label_objectives(model, source, y: np.ndarray, C: float = 1.0) -> list:
    """Per fitted label, the probe objective at the model's coefficients."""
    import torch

    from classification_models.solver import LogisticProblem

    fitted = [j for j, e in enumerate(model.model.estimators_) if hasattr(e, "coef_")]
    coef = np.stack([np.append(model.model.estimators_[j].coef_[0],
                               model.model.estimators_[j].intercept_[0]) for j in fitted], axis=1)
    problem = LogisticProblem(source, y[:, fitted], len(fitted), False, C=C)
    objective, _, _ = problem.evaluate(torch.as_tensor(coef))
    return [float(v) for v in objective]


def worker(args) -> None:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import average_precision_score

    from classification_models import LogisticRegressionModel
    from classification_models.rows import NpzRows

    started = time.perf_counter()
    y = np.load(args.train)["y"][:, :args.labels]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if args.worker == "sag":
            x = np.load(args.train)["x"].astype(np.float32, copy=False)
            model = LogisticRegressionModel(solver="sag", multilabel=True, n_jobs=4,
                                            max_iter=args.sag_max_iter, seed=0).fit(x, y)
            del x
        else:
            source = NpzRows(args.train, "x").cached()
            model = LogisticRegressionModel(multilabel=True, n_jobs=-1,
                                            verbose=args.progress).fit(source, y)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    not_converged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    val = np.load(args.val)
    scores = model.predict_proba(val["x"].astype(np.float32))
    if y.shape[1] == 1:  # scikit-learn's one-vs-rest of one label: (N, 2), [1 - p, p]
        scores = scores[:, -1:]
    objectives = label_objectives(model, NpzRows(args.train, "x"), y)
    result = {"solver": args.worker, "labels": int(y.shape[1]), "seconds": seconds,
              "peak_rss_gb": peak / 1e9, "objective": sum(objectives),
              "objectives": objectives,
              "map_micro": float(average_precision_score(val["y"][:, :args.labels], scores,
                                                         average="micro")),
              "not_converged_fits": not_converged}
    if model.fit_report and "iterations" in model.fit_report:
        result.update(iterations=model.fit_report["iterations"],
                      data_passes=model.fit_report["data_passes"],
                      row_space=model.fit_report["row_space"])
    print(json.dumps(result), flush=True)


def run_worker(solver: str, train: Path, val: Path, sag_max_iter: int,
               labels: int = N_LABELS, progress: bool = False) -> dict:
    """One fit in a fresh process; its last stdout line is the result. ``progress``: the
    solver's per-iteration lines are passed through, with the seconds since the start."""
    command = [sys.executable, __file__, "--worker", solver, "--train", str(train),
               "--val", str(val), "--sag-max-iter", str(sag_max_iter), "--labels", str(labels)]
    if progress:
        command.append("--progress")
    started, last = time.perf_counter(), ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        for line in process.stdout:
            last = line.strip() or last
            if progress and line.startswith("[lbfgs]"):
                print(f"  {time.perf_counter() - started:7.0f} s {line.rstrip()}", flush=True)
        stderr = process.stderr.read()
    if process.returncode != 0:
        raise SystemExit(f"{solver} worker failed:\n{stderr[-3000:]}")
    return json.loads(last)


def sag_result(train: Path, val: Path, sag_max_iter: int, labels: int, cache: Path) -> dict:
    """The sag row, measured once per (file, labels, max_iter) and kept in ``cache``: sag is
    deterministic (seed 0) and takes tens of minutes to hours here, so a rerun of the benchmark
    (e.g. after a change to the fast solver) reuses it; the row says when it was measured."""
    path = cache / f"sag_{train.stem}_{labels}labels_{sag_max_iter}iter.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = run_worker("sag", train, val, sag_max_iter, labels)
    result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def speed_up(fast: dict, sag: dict) -> str:
    """The comparison line. The fast solver fits all 19 labels; sag may fit only the first k
    (``--sag-labels``). sag's per-label fits are independent and the same whichever labels are
    fitted, so on the same cores all 19 take at least as long as k of them: with k < 19 the
    ratio is a lower bound on the speed-up. Objectives are compared on sag's k labels."""
    k = sag["labels"]
    ratio = sag["seconds"] / fast["seconds"]
    gap = sum(fast["objectives"][:k]) - sag["objective"]
    if k == N_LABELS:
        return f"{'':<38} speed-up {ratio:.1f}x, objective fast - sag = {gap:+.3e}"
    return (f"{'':<38} speed-up at least {ratio:.1f}x (sag on {k} of the {N_LABELS} labels, the "
            f"fast solver on all), objective on those {k}: fast - sag = {gap:+.3e}")


def row(label: str, result: dict) -> str:
    if "iterations" in result:
        extra = f"  iters {result['iterations']:4d}  passes {result['data_passes']:4d}"
        if result.get("row_space"):
            extra += f"  (row space: {result['row_space']['seconds']:.1f} s)"
    else:
        extra = f"  unconverged fits {result['not_converged_fits']}"
    label = f"{label} ({result['labels']} labels)" if result["labels"] != N_LABELS else label
    return (f"{label:<38} {result['seconds']:9.1f} s  peak RSS {result['peak_rss_gb']:5.2f} GB  "
            f"objective {result['objective']:.6e}  micro mAP {result['map_micro']:.4f}{extra}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,8000", help="rows of the side-by-side files")
    parser.add_argument("--big-rows", type=int, default=269694)
    parser.add_argument("--dim", type=int, default=15120)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bench_probe"))
    parser.add_argument("--skip-sag", action="store_true")
    parser.add_argument("--benl", action="store_true",
                        help="only the fast solver on the BEN-L-sized file")
    parser.add_argument("--sag-max-iter", type=int, default=1000)
    parser.add_argument("--sag-labels", default="",
                        help="per size, the labels sag fits, e.g. '19,4' (default all 19): sag "
                             "on 8,000 rows x 19 labels takes hours on 2 cores")
    parser.add_argument("--labels", type=int, default=N_LABELS, help=argparse.SUPPRESS)
    parser.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("fast", "sag"), help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--val", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    print(f"bench_probe: {os.cpu_count()} cores, dim {args.dim}, {N_LABELS} labels; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    val = write_synthetic(args.cache / f"val_{VAL_ROWS}x{args.dim}_float32.npz", VAL_ROWS,
                          args.dim, "float32", seed=1)
    sizes = [int(n) for n in args.sizes.split(",") if n]
    labels = [int(n) for n in args.sag_labels.split(",") if n] or [N_LABELS] * len(sizes)
    for n_rows, n_labels in zip(sizes, labels) if not args.benl else ():
        train = write_synthetic(args.cache / f"train_{n_rows}x{args.dim}_float32.npz", n_rows,
                                args.dim, "float32", seed=2)
        fast = run_worker("fast", train, val, args.sag_max_iter)
        print(row(f"{n_rows} rows  fast (lbfgs)", fast), flush=True)
        if not args.skip_sag:
            sag = sag_result(train, val, args.sag_max_iter, n_labels, args.cache)
            print(row(f"{n_rows} rows  sag (published)", sag) + f"  (measured {sag['measured']})",
                  flush=True)
            print(speed_up(fast, sag), flush=True)
    if args.benl:
        started = time.perf_counter()
        big = write_synthetic(args.cache / f"train_{args.big_rows}x{args.dim}_float16.npz",
                              args.big_rows, args.dim, "float16", seed=3)
        print(f"{args.big_rows} x {args.dim} float16 file: {big.stat().st_size / 1e9:.2f} GB "
              f"(ready after {time.perf_counter() - started:.0f} s)", flush=True)
        result = run_worker("fast", big, val, args.sag_max_iter, progress=True)
        print(row(f"{args.big_rows} rows fast (lbfgs)", result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
