"""An exact reduction of an L2-regularised linear probe with fewer rows than features.

For the objective of :mod:`classification_models.solver`,
``0.5 ||W||^2 + C * sum_i loss(x_i W + b, y_i)`` with an unpenalised intercept b, only the
part of each weight column in the row space of the (N, D) features matters to the loss, and the
penalty is smallest when the rest is zero: the optimum lies in that N-dimensional space. With
N < D the problem can therefore be solved on N features per row instead of D, exactly:

1. Centre (and scale, for ``--scale``) the features: x_c = (x - mean) / s. The centring moves
   ``mean . w`` into the unpenalised intercept, which changes nothing but conditioning. Append a
   constant column alpha (``CONSTANT`` times the rows' root-mean-square norm):
   a_i = [x_c,i, alpha]. A penalised constant column gets weight zero at the optimum, since the
   intercept does its job without a penalty; it makes the Gram matrix positive definite
   (centring alone leaves the ones vector in its null space).
2. The Gram matrix K = A A^T ((N, N), float32 products summed per entry, kept in float64), its
   Cholesky factor K = L L^T. With Q = A^T L^-T ((D + 1, N), orthonormal columns spanning the
   row space), A = L Q^T: the rows of L are the rows of A in the basis Q, and for v = Q c,
   ``a_i . v = l_i . c`` and ``||v|| = ||c||``.
3. Solve the same objective on the (N, N) features L (any solver: it is a probe like any other,
   now small enough to hold in memory), coefficients (c, b).
4. Map back in one data pass: G = L^-T c ((N, K)), w = X_c^T G, the constant column's weight
   ``alpha * sum(G)`` folded into the intercept (the predictions are unchanged and the penalty
   can only drop), and the centring undone.

Cost: the Gram matrix is N^2 D multiply-adds in large matrix products (the upper triangle, from
``ceil(N D * 4 / chunk_bytes)`` streamed passes with one chunk of rows held), against the
primal solver's hundred-odd memory-bound passes over the D columns; the solver's own passes then
cost N^2 per class. Memory: about 20 N^2 bytes (K and L in float64, L in float32 for the
solver) plus one chunk. :func:`row_space_reduction`
declines (returns None) where the reduction does not pay or is not safe: N >= D, N above
``max_rows``, or a Gram matrix not numerically positive definite (rows that repeat or are
linearly dependent to float32 precision), and the caller solves the primal problem instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from classification_models.rows import RowSource

MAX_ROWS = 11_585  # K and L in float64 up to 1 GiB each
CHUNK_BYTES = 512 << 20  # float32 rows held while the Gram matrix is formed
BLOCK_ROWS = 1024  # rows per streamed block against the chunk (at least): wider products
MIN_PIVOT = 1e-6  # smallest squared Cholesky pivot relative to mean(diag K): float32 products
# The constant column, relative to the rows' root-mean-square norm: large enough for a
# well-conditioned factor, small enough that its gradient (alpha * the residuals' sum) does not
# dominate the gradient at zero that the solver's relative tolerance is measured against.
CONSTANT = 0.1


@dataclass
class RowSpace:
    """The reduced features and what maps coefficients on them back to the original ones.

    features: (N, N) float32, row i = a_i in the orthonormal basis Q of the module docstring.
    factor: (N, N) float64 lower-triangular L. mean, scale: (D,) float64 centring and scaling of
    the source's raw columns (x_c = (x - mean) / scale). offset: (D,) float64, x' - x_c for the
    coordinates x' the coefficients are wanted on. alpha: the constant column.
    """

    source: RowSource
    features: np.ndarray
    factor: torch.Tensor
    mean: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    alpha: float
    seconds: float
    data_passes: int
    block_rows: Optional[int] = None

    def coefficients(self, reduced: np.ndarray) -> np.ndarray:
        """(N + 1, K) coefficients (c; b) on the reduced features -> (D + 1, K) (w; b) on x'."""
        c = torch.as_tensor(reduced[:-1], dtype=torch.float64)
        g = torch.linalg.solve_triangular(self.factor.T, c, upper=True)  # L^-T c
        g32 = g.float()
        w = torch.zeros(self.source.shape[1], c.shape[1], dtype=torch.float64)
        for start, block in _centred_blocks(self.source, self.mean, self.scale, self.block_rows):
            w += (block.T @ g32[start:start + len(block)]).double()
        # a_i . v = x_c,i . w + alpha * (alpha * sum(G)): the constant column's part
        bias = (torch.as_tensor(reduced[-1], dtype=torch.float64) + self.alpha ** 2 * g.sum(dim=0)
                - torch.as_tensor(self.offset) @ w)
        return torch.cat([w, bias[None]], dim=0).numpy()

    def as_dict(self) -> dict:
        return {"rows": int(self.features.shape[0]), "seconds": round(self.seconds, 3),
                "data_passes": self.data_passes}


def row_space_reduction(source: RowSource, mean: np.ndarray, feature_mean=None,
                        feature_scale=None, max_rows: int = MAX_ROWS,
                        chunk_bytes: int = CHUNK_BYTES, device="cpu",
                        block_rows: Optional[int] = None) -> Optional[RowSpace]:
    """The reduction of the module docstring for the probe on x' = (x - feature_mean) /
    feature_scale (both None: x' = x), ``mean``: (D,) column mean of the raw x; None where it
    does not apply (the caller then solves on the D features)."""
    n_rows, dim = source.shape
    if n_rows >= dim or n_rows > max_rows or n_rows < 2:
        return None
    started = time.perf_counter()
    mean = np.asarray(mean, dtype=np.float64)
    scale = (np.ones(dim) if feature_scale is None
             else np.asarray(feature_scale, dtype=np.float64))
    shift = np.zeros(dim) if feature_mean is None else np.asarray(feature_mean, dtype=np.float64)
    device = torch.device(device)
    # float32: each entry is one float32 product summed inside one matrix product
    gram = torch.empty(n_rows, n_rows, dtype=torch.float32)
    chunk_rows = max(1, chunk_bytes // (4 * dim))
    passes = 0
    for chunk_start in range(0, n_rows, chunk_rows):
        chunk_end = min(n_rows, chunk_start + chunk_rows)
        chunk = torch.empty(chunk_end - chunk_start, dim, dtype=torch.float32, device=device)
        passes += 1
        for start, block in _centred_blocks(
                source, mean, scale, block_rows or max(BLOCK_ROWS, source.default_block_rows())):
            end = start + len(block)
            block = block.to(device, non_blocking=True)
            if end > chunk_start and start < chunk_end:  # this block's rows of the chunk
                lo, hi = max(start, chunk_start), min(end, chunk_end)
                chunk[lo - chunk_start:hi - chunk_start] = block[lo - start:hi - start]
            # the chunk's rows up to this block's last one against the block: every entry
            # (i, j) with i <= j once, written to both triangles
            rows = min(end, chunk_end) - chunk_start
            if rows > 0:
                tile = (chunk[:rows] @ block.T).cpu()
                gram[chunk_start:chunk_start + rows, start:end] = tile
                gram[start:end, chunk_start:chunk_start + rows] = tile.T
        del chunk
    gram = gram.double()
    alpha = CONSTANT * float(torch.diagonal(gram).mean().sqrt())
    gram += alpha ** 2
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    pivots = torch.diagonal(factor) ** 2
    if float(pivots.min()) < MIN_PIVOT * float(torch.diagonal(gram).mean()):
        return None
    del gram
    features = factor.float().contiguous().numpy()  # LAPACK's factor is column-major
    return RowSpace(source=source, features=features, factor=factor, mean=mean,
                    scale=scale, offset=(mean - shift) / scale, alpha=alpha,
                    seconds=time.perf_counter() - started, data_passes=passes,
                    block_rows=block_rows)


def _centred_blocks(source: RowSource, mean: np.ndarray, scale: np.ndarray,
                    block_rows: Optional[int]):
    """``source.blocks()`` with each (B, D) block centred and scaled in place: (x - mean) / scale."""
    mean32 = torch.as_tensor(mean, dtype=torch.float32)
    inv_scale32 = torch.as_tensor(1.0 / scale, dtype=torch.float32)
    for start, block in source.blocks(block_rows):
        yield start, block.sub_(mean32).mul_(inv_scale32)
