"""The exact L2-regularised logistic-regression optimum, by full-batch L-BFGS over row blocks.

Objective (the published probe's, scikit-learn's ``LogisticRegression(C=C)``), with the
intercept b not penalised:

- one-vs-rest (multilabel, and binary multiclass), for every label column k separately::

      f_k(w_k, b_k) = 0.5 ||w_k||^2 + C * sum_i [log(1 + exp(z_ik)) - y_ik z_ik],
      z_ik = x_i . w_k + b_k

- multinomial (multiclass with K >= 3 classes; what scikit-learn 1.9's ``LogisticRegression``
  fits for more than two classes with ``lbfgs`` or ``sag``: there is no one-vs-rest option any
  more), one problem over all K classes::

      f(W, b) = 0.5 ||W||_F^2 + C * sum_i [logsumexp_k(z_ik) - z_i,y_i]

Method. L-BFGS (memory 10) with a backtracking line search (Armijo, quadratic interpolation),
run on all columns at once:
every data pass computes ``X @ W`` for all K columns in one matrix product and ``X^T R`` for the
gradient, block by block (a :class:`~classification_models.rows.RowSource`), so memory is bounded
by a block and the threads of the matrix products do the parallel work (on a GPU with
``device="cuda"``: blocks are moved there). Each one-vs-rest column is its own problem with its
own curvature pairs, step and convergence test (a converged column leaves the matrix products);
the multinomial problem is one group. The solver works in standardised coordinates
(``w = u / std``, ``b = c - mean . w``, with the features' column mean and standard deviation):
the same objective, the same optimum, but a much better-conditioned problem for L-BFGS when
feature scales differ or means are far from zero (the intercept no longer fights the weights).
On top of that, a spectral preconditioner (:func:`nystrom_preconditioner`): embeddings are
strongly correlated (a few directions carry most of the variance), so the loss's curvature
along the top eigenvectors of the standardised covariance is hundreds of times that of the
rest, and L-BFGS needs hundreds of passes. A randomised Nystrom sketch (one extra data pass)
estimates the top ``rank`` eigenpairs (U, lambda); the weights on standardised features are
``P u`` with ``P = I + U (diag(s) - 1) U^T`` and ``s = sqrt(lambda_rank / lambda)``, which
flattens those directions down to the bulk of the spectrum.

Convergence: a group stops when the norm of its gradient (with respect to (w, b), the problem's
own variables) is at most ``tol`` times its norm at w = 0, b = 0 (default 1e-5: on nearly
separable embedding files, e.g. 2,000 rows of 15,120 features, 1e-4 still leaves the objective
well above sag's). Data passes run in float32
(loss and gradient sums in float64), so ``tol`` below ~1e-7 is not reachable; the line search
then fails and the group stops with ``line_search_failed``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from classification_models.rows import RowSource

DEFAULT_TOL = 1e-5
PRECOND_RANK = 64  # eigenpairs of the spectral preconditioner (0: none)
HISTORY = 10
ARMIJO = 1e-4
MAX_BACKTRACKS = 30
NOISE = 1e-6  # relative rounding noise of an objective summed from float32 terms
WOLFE_DECREASE, WOLFE_CURVATURE = 0.1, 0.9


@dataclass
class FitReport:
    """What a fit did, JSON-ready via :meth:`as_dict`. Per group (one-vs-rest column, or the
    single multinomial group): objective and gradient norm at the solution, its ratio to the
    gradient norm at zero, converged (gradient test met) or why it stopped."""

    multinomial: bool
    tol: float
    iterations: int = 0
    data_passes: int = 0
    seconds: float = 0.0
    objective: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    grad_norm_at_zero: list = field(default_factory=list)
    status: list = field(default_factory=list)
    theta: Optional[torch.Tensor] = None  # the solution in solver coordinates

    def restate(self, problem: "LogisticProblem", coef: np.ndarray) -> None:
        """Objective and gradient norms (at the solution and at zero) of ``problem``, a problem
        without a change of variables, at ``coef`` ((D+1, K)): for a solution found on an
        equivalent problem (classification_models/row_space.py), two data passes."""
        theta = torch.as_tensor(coef, dtype=torch.float64)
        objective, _, grad = problem.evaluate(theta)
        _, _, grad_at_zero = problem.evaluate(torch.zeros_like(theta))
        self.objective = [float(v) for v in objective]
        self.grad_norm = [float(v) for v in _group_sums(grad * grad, self.multinomial).sqrt()]
        self.grad_norm_at_zero = [float(v) for v in
                                  _group_sums(grad_at_zero * grad_at_zero, self.multinomial).sqrt()]

    @property
    def converged(self) -> bool:
        return all(status == "converged" for status in self.status)

    def as_dict(self) -> dict:
        relative = [g / g0 if g0 > 0 else 0.0 for g, g0 in zip(self.grad_norm, self.grad_norm_at_zero)]
        return {"solver": "lbfgs", "objective_form": "multinomial" if self.multinomial else
                "one-vs-rest", "tol": self.tol, "iterations": self.iterations,
                "data_passes": self.data_passes, "seconds": round(self.seconds, 3),
                "converged": self.converged,
                "final_objective": self.objective,
                "total_objective": float(sum(self.objective)), "grad_norm": self.grad_norm,
                "relative_grad_norm": relative, "status": self.status}


class LogisticProblem:
    """Loss and gradient of the objective of the module docstring, one data pass each.

    source: (N, D) features. targets: (N, K) 0/1 label columns (one-vs-rest) or (N,) class
    indices in [0, K) (multinomial). feature_mean, feature_scale: (D,) the model's own
    standardisation x' = (x - mean) / scale (``--scale``) or None; the penalty applies to the
    coefficients on x'. precond_mean, precond_std: (D,) column mean and std of x' (the solver's
    change of variables; identity when None). spectral: (U (D, r), s (r,)) from
    :func:`nystrom_preconditioner`, or None.
    """

    def __init__(self, source: RowSource, targets: np.ndarray, n_outputs: int, multinomial: bool,
                 C: float = 1.0, feature_mean=None, feature_scale=None, precond_mean=None,
                 precond_std=None, spectral=None, device="cpu",
                 block_rows: Optional[int] = None):
        self.settings = dict(source=source, targets=targets, n_outputs=n_outputs,
                             multinomial=multinomial, C=C, feature_mean=feature_mean,
                             feature_scale=feature_scale, precond_mean=precond_mean,
                             precond_std=precond_std, spectral=spectral, device=device,
                             block_rows=block_rows)
        self.source, self.multinomial, self.C = source, multinomial, float(C)
        self.device = torch.device(device)
        self.block_rows = block_rows
        self.dim, self.n_outputs = source.shape[1], n_outputs
        dtype = torch.int64 if multinomial else torch.float32
        self.targets = torch.as_tensor(np.asarray(targets)).to(dtype).to(self.device)

        def vector(value, default):
            if value is None:
                return torch.full((self.dim,), float(default), dtype=torch.float64)
            return torch.as_tensor(np.asarray(value, dtype=np.float64))

        self.feature_mean, self.feature_scale = vector(feature_mean, 0), vector(feature_scale, 1)
        self.precond_mean, self.precond_std = vector(precond_mean, 0), vector(precond_std, 1)
        self.spectral = None if spectral is None else tuple(
            torch.as_tensor(np.asarray(t, dtype=np.float64)) for t in spectral)
        self.passes = 0

    def replace(self, **changes) -> "LogisticProblem":
        """This problem with some of its constructor arguments changed."""
        return LogisticProblem(**{**self.settings, **changes})

    # change of variables: theta = (u; c) -> (P u; c) -> model (w; b) on x' -> raw (w; b) on x
    def to_model(self, theta: torch.Tensor) -> torch.Tensor:
        return _unstandardise(self._spectral(theta), self.precond_mean, self.precond_std)

    def model_grad_to_theta(self, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`to_model`: a gradient in (w; b) -> a gradient in (u; c)."""
        return self._spectral(_unstandardise_transposed(grad, self.precond_mean, self.precond_std))

    def _spectral(self, theta: torch.Tensor) -> torch.Tensor:
        """(u; c) -> (P u; c), P = I + U (diag(s) - 1) U^T (symmetric: its own transpose)."""
        if self.spectral is None:
            return theta
        basis, factor = self.spectral
        u = theta[:-1] + basis @ ((factor - 1)[:, None] * (basis.T @ theta[:-1]))
        return torch.cat([u, theta[-1:]], dim=0)

    def model_to_raw(self, model: torch.Tensor) -> torch.Tensor:
        return _unstandardise(model, self.feature_mean, self.feature_scale)

    def raw_grad_to_model(self, grad: torch.Tensor) -> torch.Tensor:
        return _unstandardise_transposed(grad, self.feature_mean, self.feature_scale)

    def evaluate(self, theta: torch.Tensor, columns: Optional[torch.Tensor] = None):
        """Objective and gradients at ``theta`` ((D+1, K) float64) for ``columns`` (indices;
        all when None). Returns (objective per group: (k,) one-vs-rest or (1,) multinomial,
        gradient in theta (D+1, k), gradient in (w; b) (D+1, k))."""
        if columns is None:
            columns = torch.arange(theta.shape[1])
        model = self.to_model(theta[:, columns])
        raw = self.model_to_raw(model)
        weights = raw[:-1].float().to(self.device)
        bias = raw[-1].float().to(self.device)
        k = len(columns)
        loss = torch.zeros(1 if self.multinomial else k, dtype=torch.float64, device=self.device)
        grad_w = torch.zeros(self.dim, k, dtype=torch.float64, device=self.device)
        grad_b = torch.zeros(k, dtype=torch.float64, device=self.device)
        targets = self.targets if self.multinomial else self.targets[:, columns.to(self.device)]
        for start, block in self.source.blocks(self.block_rows):
            block = block.to(self.device, non_blocking=True)
            z = torch.addmm(bias, block, weights)
            y = targets[start:start + len(block)]
            if self.multinomial:
                log_norm = torch.logsumexp(z, dim=1)
                loss += (log_norm - z.gather(1, y[:, None])[:, 0]).sum(dtype=torch.float64)
                residual = torch.softmax(z, dim=1)
                residual[torch.arange(len(y), device=self.device), y] -= 1.0
            else:
                loss += (F.softplus(z) - y * z).sum(dim=0, dtype=torch.float64)
                residual = torch.sigmoid(z) - y
            grad_w += (block.T @ residual).double()
            grad_b += residual.sum(dim=0, dtype=torch.float64)
        self.passes += 1
        raw_grad = torch.cat([grad_w, grad_b[None]], dim=0).cpu() * self.C
        model_grad = self.raw_grad_to_model(raw_grad)
        model_grad[:-1] += model[:-1]
        penalty = 0.5 * (model[:-1] ** 2).sum(dim=0)
        objective = loss.cpu() * self.C + (penalty.sum().view(1) if self.multinomial else penalty)
        return objective, self.model_grad_to_theta(model_grad), model_grad


def fit_lbfgs(problem: LogisticProblem, tol: float = DEFAULT_TOL, max_iter: int = 1000,
              verbose: bool = False, start: Optional[torch.Tensor] = None
              ) -> tuple[np.ndarray, FitReport]:
    """Minimise ``problem`` from ``start`` (solver coordinates, (D+1, K); zero when None);
    returns ((D+1, K) float64 coefficients on x' with the intercepts in the last row, report)."""
    started = time.perf_counter()
    multinomial, n_cols = problem.multinomial, problem.n_outputs
    report = FitReport(multinomial=multinomial, tol=tol)
    n_groups = 1 if multinomial else n_cols

    def gsum(t):
        return _group_sums(t, multinomial)

    def spread(v, k):  # per-group values -> per-column (k,)
        return v.expand(k) if multinomial else v

    def group_norm(t):
        return gsum(t * t).sqrt()

    theta = torch.zeros(problem.dim + 1, n_cols, dtype=torch.float64)
    f, g, g_model = problem.evaluate(theta)
    g0 = group_norm(g_model)
    if start is not None:
        theta = start.clone()
        f, g, g_model = problem.evaluate(theta)
    g_norm = group_norm(g_model)
    status = ["running"] * n_groups
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    active = torch.ones(n_groups, dtype=torch.bool)

    for iteration in range(max_iter):
        for j in range(n_groups):
            if status[j] == "running" and g_norm[j] <= tol * g0[j]:
                status[j] = "converged"
        active = torch.tensor([s == "running" for s in status])
        if not active.any():
            break
        report.iterations = iteration + 1
        direction = -_two_loop(g, history, gsum, spread, g_norm, n_cols)
        slope = gsum(g * direction)
        not_descent = slope >= 0
        if not_descent.any():  # lost curvature information (float32 noise): steepest descent
            cols = spread(not_descent, n_cols)
            direction[:, cols] = -g[:, cols] / spread(g_norm.clamp_min(1e-300), n_cols)[cols]
            slope = gsum(g * direction)
        columns_active = spread(active, n_cols)
        direction[:, ~columns_active] = 0
        step = torch.ones(n_groups, dtype=torch.float64)
        trial_f, trial_g, trial_gm = f.clone(), g.clone(), g_model.clone()
        pending = active.clone()
        for _ in range(MAX_BACKTRACKS):
            cols = torch.nonzero(spread(pending, n_cols)).flatten()
            point = theta[:, cols] + direction[:, cols] * spread(step, n_cols)[cols]
            fp, gp, gmp = problem.evaluate(_embed(theta, cols, point), cols)
            groups = torch.arange(1) if multinomial else cols
            accepted = _acceptable(fp, f[groups], step[groups], slope[groups],
                                   gsum(gp * direction[:, cols]))
            trial_f[groups] = torch.where(accepted, fp, trial_f[groups])
            accepted_cols = spread(accepted, len(cols))
            trial_g[:, cols[accepted_cols]] = gp[:, accepted_cols]
            trial_gm[:, cols[accepted_cols]] = gmp[:, accepted_cols]
            pending[groups] = ~accepted
            if not pending.any():
                break
            # minimum of the quadratic through f, the slope at 0 and the trial value,
            # kept within [0.1, 0.5] of the failed step
            failed = groups[~accepted]
            tried, rise = step[failed], fp[~accepted] - f[failed] - slope[failed] * step[failed]
            quadratic = -slope[failed] * tried ** 2 / (2 * rise.clamp_min(1e-300))
            step[failed] = torch.minimum(torch.maximum(quadratic, 0.1 * tried), 0.5 * tried)
        for j in torch.nonzero(pending).flatten().tolist():
            status[j] = "line_search_failed"  # no decrease along the direction: float32 floor
        moved = spread(active & ~pending, n_cols)
        s = torch.zeros_like(theta)
        s[:, moved] = direction[:, moved] * spread(step, n_cols)[moved]
        y = torch.zeros_like(theta)
        y[:, moved] = trial_g[:, moved] - g[:, moved]
        theta = theta + s
        g = torch.where(moved[None], trial_g, g)
        g_model = torch.where(moved[None], trial_gm, g_model)
        f = torch.where(active & ~pending, trial_f, f)
        g_norm = group_norm(g_model)
        history.append((s, y, _inverse_curvature(gsum(s * y))))
        if len(history) > HISTORY:
            history.pop(0)
        if verbose:
            print(f"[lbfgs] iter {iteration + 1:4d}  passes {problem.passes:4d}  objective "
                  f"{float(f.sum()):.6e}  max rel grad {float((g_norm / g0.clamp_min(1e-300)).max()):.2e}"
                  f"  running {int(active.sum())}", flush=True)
    else:
        for j in range(n_groups):
            if status[j] == "running":
                status[j] = "converged" if g_norm[j] <= tol * g0[j] else "max_iter"

    report.data_passes = problem.passes
    report.seconds = time.perf_counter() - started
    report.objective = [float(v) for v in f]
    report.grad_norm = [float(v) for v in g_norm]
    report.grad_norm_at_zero = [float(v) for v in g0]
    report.status = status
    report.theta = theta
    return problem.to_model(theta).numpy(), report


def nystrom_preconditioner(source: RowSource, mean, std, rank: int = PRECOND_RANK,
                           penalty: float = 0.0, seed: int = 0, device="cpu",
                           block_rows: Optional[int] = None):
    """The spectral part of the solver's change of variables, from one data pass.

    Randomised Nystrom approximation (Tropp et al. 2017, the stable variant with a shift) of
    the covariance S = X'^T X' / N of the standardised features x' = (x - mean) / std ((D,)
    each): Y = S Q for a (D, r) orthonormal random Q, then S ~ Y (Q^T Y)^-1 Y^T, whose top
    eigenpairs (U (D, r), lambda (r,)) give the factors s = sqrt((lambda_r + penalty) /
    (lambda + penalty)) (<= 1). ``penalty``: the penalty's curvature relative to the loss's
    (4 / (C N) times the mean curvature of the penalty in the solver's coordinates, the Hessian
    at zero being (C N / 4) S + penalty): it keeps s sensible when the sketch sees the whole,
    rank-deficient spectrum (fewer rows than ``rank``; lambda_r = 0).
    Returns (U, s) as float64 numpy arrays, or None when the sketch is empty (r < 2).
    Draws only from its own generator (``seed``)."""
    n_rows, dim = source.shape
    rank = min(rank, dim, n_rows)
    if rank < 2:
        return None
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    test = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    test32 = test.float().to(device)
    mean32 = torch.as_tensor(np.asarray(mean), dtype=torch.float32).to(device)
    inv_std32 = 1.0 / torch.as_tensor(np.asarray(std), dtype=torch.float32).to(device)
    sketch = torch.zeros(dim, rank, dtype=torch.float64, device=device)
    for _, block in source.blocks(block_rows):
        block = block.to(device, non_blocking=True).sub_(mean32).mul_(inv_std32)
        sketch += (block.T @ (block @ test32)).double()
    sketch = sketch.cpu() / n_rows
    shift = float(np.finfo(np.float32).eps) * dim ** 0.5 * float(torch.linalg.norm(sketch))
    shifted = sketch + shift * test
    core = test.T @ shifted
    factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if int(info) != 0:  # no positive-definite core even with the shift: no spectral part
        return None
    b = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # shifted L^-T
    basis, singular, _ = torch.linalg.svd(b, full_matrices=False)
    eigenvalues = (singular ** 2 - shift).clamp_min(0)
    floor = eigenvalues[-1] + penalty
    if floor <= 0:
        return None
    scale = torch.sqrt(floor / (eigenvalues + penalty).clamp_min(floor))
    return basis.numpy(), scale.numpy()


def _acceptable(trial_f, f, step, slope, trial_slope):
    """Armijo sufficient decrease, or, where float32 sums cannot resolve the decrease, Hager and
    Zhang's approximate Wolfe conditions: the objective is not higher beyond its rounding
    noise and the directional derivative has shrunk to a fraction of its value at the start."""
    armijo = trial_f <= f + ARMIJO * step * slope
    noise = NOISE * f.abs()
    approximate_wolfe = ((trial_f <= f + noise) & (trial_slope >= WOLFE_CURVATURE * slope)
                         & (trial_slope <= (2 * WOLFE_DECREASE - 1) * slope))
    return armijo | approximate_wolfe


@contextmanager
def torch_threads(n_jobs: Optional[int]):
    """torch's CPU threads set to ``n_jobs`` (-1: all cores; None: unchanged) while inside."""
    previous = torch.get_num_threads()
    if n_jobs is not None:
        torch.set_num_threads((os.cpu_count() or 1) if n_jobs == -1 else n_jobs)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _group_sums(t: torch.Tensor, multinomial: bool) -> torch.Tensor:
    """(D+1, k) -> per-group sums: (k,) per one-vs-rest column, or (1,) for the multinomial group."""
    return t.sum().view(1) if multinomial else t.sum(dim=0)


def _embed(theta: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = theta.clone()
    out[:, cols] = values
    return out


def _inverse_curvature(ys: torch.Tensor) -> torch.Tensor:
    """1 / (y . s) per group, 0 where there is no positive curvature (a group that did not move)."""
    return torch.where(ys > 0, 1.0 / ys.clamp_min(1e-300), torch.zeros_like(ys))


def _two_loop(g, history, gsum, spread, g_norm, n_cols):
    """The L-BFGS two-loop recursion, per group: an approximation of H^-1 g."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * gsum(s * q)
        q -= spread(alpha, n_cols) * y
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        yy = gsum(y * y)
        gamma = torch.where(yy > 0, gsum(s * y) / yy.clamp_min(1e-300), 1.0 / g_norm.clamp_min(1e-300))
    else:
        gamma = 1.0 / g_norm.clamp_min(1e-300)
    r = spread(gamma, n_cols) * q
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        beta = rho * gsum(y * r)
        r += spread(alpha - beta, n_cols) * s
    return r


def _unstandardise(coef: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(w; b) ((D+1, K)) acting on (x - mean) / scale -> the same model acting on x."""
    w = coef[:-1] / scale[:, None]
    return torch.cat([w, coef[-1:] - mean @ w], dim=0)


def _unstandardise_transposed(grad: torch.Tensor, mean: torch.Tensor,
                              scale: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`_unstandardise`: a gradient in the x model -> in the standardised one."""
    gw = (grad[:-1] - mean[:, None] * grad[-1:]) / scale[:, None]
    return torch.cat([gw, grad[-1:]], dim=0)
