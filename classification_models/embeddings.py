"""Embedding files for the probes: loading, validation, task inference, token pooling, feature
slicing and label-fraction subsets. Shared by ``train_logistic_regression.py`` and
``label_efficiency.py``; every problem with the input raises :class:`UserInputError` naming the
file, key or value.

File format (``.npz``), as written by ``compute_embeddings.py``:

- ``x``: (N, D) float32 or float16 features. For pooling ``all``, D = num_tokens * embed_dim
  (105 * 144 for the S model); an (N, T, E) array is also accepted and flattened to (N, T * E).
- ``y``: (N,) integer class indices (multiclass) or (N, C) 0/1 multi-hot rows (multilabel).
- ``ids``: (N,) str sample ids (optional).
- ``settings``: 0-d str array holding JSON (optional), e.g. ``num_tokens``, ``embed_dim``,
  ``pooling``, ``class_names``, ``use_metadata``, ``checkpoint``.

Files from the published notebooks hold only features and labels, under any of the published
key names: features ``x_train``/``x_val``/``x``/``X`` and labels ``y_train``/``y_val``/``y``/``Y``
(the first present, in that order). Features are converted to float32.

Task inference (``multilabel=None``): 1-D labels are multiclass; 2-D 0/1 labels whose rows each
hold exactly one 1 (one-hot) are multiclass, converted to class indices; other 2-D 0/1 labels are
multilabel. Unlike the published loader, a 2-D row with no 1 is not silently read as class 0: it
makes the file multilabel (or is an error when multiclass is forced).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from classification_models.rows import DEFAULT_CACHE_BYTES, NpzRows
from utils.errors import UserInputError

FEATURE_KEYS = ("x_train", "x_val", "x_test", "x", "X")
LABEL_KEYS = ("y_train", "y_val", "y_test", "y", "Y")
PUBLISHED_NUM_TOKENS = 105  # 4 metadata tokens + CLS + 100 patch tokens; used when a file has no settings
_FINITE_CHECK_ROWS = 4096  # rows per chunk, so the check does not double peak memory


@dataclass
class EmbeddingSplit:
    """One embedding file, ready for a probe.

    x: (N, D) float32 features after optional token pooling and feature slicing.
    y: (N,) int64 class indices (multiclass) or (N, C) uint8 multi-hot rows (multilabel).
    ids: (N,) str sample ids, or None when the file has none.
    settings: the file's embedding settings ({} when it has none).
    stored_x_shape: shape of the features as stored in the file.
    """

    path: Path
    x: np.ndarray
    y: np.ndarray
    multilabel: bool
    ids: Optional[np.ndarray]
    settings: dict = field(default_factory=dict)
    x_key: str = "x"
    y_key: str = "y"
    stored_x_shape: tuple = ()

    @property
    def class_names(self) -> Optional[list]:
        names = self.settings.get("class_names")
        return list(names) if names is not None else None

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    def describe(self) -> dict:
        """JSON-ready summary: path, keys, shapes and the file's embedding settings."""
        return {
            "path": str(self.path),
            "x_key": self.x_key,
            "y_key": self.y_key,
            "stored_x_shape": list(self.stored_x_shape),
            "x_shape": list(self.x.shape),
            "y_shape": list(self.y.shape),
            "embedding_settings": self.settings,
        }


def load_split(path, multilabel: Optional[bool] = None, pool: bool = False,
               feature_slice: Optional[str] = None, stream: bool = False,
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> EmbeddingSplit:
    """Load and validate one embedding file.

    multilabel: None infers the task from the labels (see the module docstring); True/False
        forces it (pass the training split's task when loading an evaluation file).
    pool: average the features over tokens, (N, T * E) -> (N, E); T and E come from the file's
        settings (``num_tokens``, ``embed_dim``), else T = 105 as in the published protocol.
    feature_slice: "a:b" column range taken after pooling (see :func:`slice_features`).
    stream: ``x`` is a :class:`~classification_models.rows.RowSource` read from the file in
        row blocks (stored dtype kept; pooling and slicing applied per block), held in memory
        only when the (pooled, sliced) features fit ``cache_bytes``; else ``x`` is an (N, D)
        float32 array.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserInputError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserInputError(f"{path}: expected an .npz archive, found a single array")
    with archive:
        keys = list(archive.keys())
        x_key = _find_key(keys, FEATURE_KEYS, "x_")
        y_key = _find_key(keys, LABEL_KEYS, "y_")
        missing = [f"{what} (one of {', '.join(names)})"
                   for what, names, key in (("features", FEATURE_KEYS, x_key),
                                            ("labels", LABEL_KEYS, y_key)) if key is None]
        if missing:
            raise UserInputError(f"{path}: no {' and no '.join(missing)}; keys found: {keys}")
        y = _read_array(archive, y_key, path)
        ids = _read_array(archive, "ids", path) if "ids" in keys else None
        settings = _read_settings(archive, path) if "settings" in keys else {}

    rows = _feature_rows(path, x_key)
    stored_x_shape = rows.member.shape
    if y.shape[:1] != stored_x_shape[:1]:
        raise UserInputError(f"{path}: '{x_key}' has {stored_x_shape[0]} rows but '{y_key}' has "
                             f"{y.shape[0] if y.ndim else 0}")
    if ids is not None and ids.shape != (stored_x_shape[0],):
        raise UserInputError(f"{path}: 'ids' has shape {ids.shape}, expected ({stored_x_shape[0]},)")
    y, multilabel = coerce_labels(y, multilabel, path)

    layout = None
    if pool:
        layout = (stored_x_shape[1:] if len(stored_x_shape) == 3
                  else token_layout(rows.shape[1], settings, path))
    columns = None
    if feature_slice:
        columns = resolve_columns(layout[1] if layout else rows.shape[1], feature_slice, path)
    x = rows.view(pool_tokens=layout, columns=columns)
    if stream:
        x = x.cached(cache_bytes)
        _check_finite_rows(x.stats().bad_rows, len(x), path)
    else:
        x = x.to_array().astype(np.float32, copy=False)
        _check_finite(x, path)
    return EmbeddingSplit(path=path, x=x, y=y, multilabel=multilabel, ids=ids, settings=settings,
                          x_key=x_key, y_key=y_key, stored_x_shape=tuple(stored_x_shape))


def _find_key(keys: list, names: tuple, prefix: str) -> Optional[str]:
    """The first of ``names`` present, else the only key starting with ``prefix`` (the
    published notebooks' ``x_<split>`` / ``y_<split>``)."""
    found = next((k for k in names if k in keys), None)
    if found is None:
        candidates = [k for k in keys if k.startswith(prefix)]
        found = candidates[0] if len(candidates) == 1 else None
    return found


def _feature_rows(path: Path, key: str) -> NpzRows:
    try:
        rows = NpzRows(path, key)
    except (ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise UserInputError(f"{path}: key '{key}' cannot be read as a numeric C-order array "
                             f"without pickle ({exc})") from exc
    shape, dtype = rows.member.shape, rows.member.dtype
    if len(shape) not in (2, 3) or shape[0] == 0:
        raise UserInputError(f"{path}: '{key}' must have shape (N, D) or (N, tokens, dim) with "
                             f"N > 0, got {shape}")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise UserInputError(f"{path}: '{key}' must be numeric, got dtype {dtype}")
    return rows


def _read_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # object arrays need pickle, which we never enable
        raise UserInputError(f"{path}: key '{key}' cannot be read without pickle ({exc})") from exc


def _read_settings(archive, path: Path) -> dict:
    raw = _read_array(archive, "settings", path)
    text = raw.item() if raw.ndim == 0 else None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        settings = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise UserInputError(f"{path}: 'settings' must be a 0-d string array holding a JSON object")
    return settings


def _check_finite(x: np.ndarray, path: Path) -> None:
    flat = x.reshape(x.shape[0], -1)
    bad_rows = sum(int((~np.isfinite(flat[i:i + _FINITE_CHECK_ROWS]).all(axis=1)).sum())
                   for i in range(0, flat.shape[0], _FINITE_CHECK_ROWS))
    _check_finite_rows(bad_rows, flat.shape[0], path)


def _check_finite_rows(bad_rows: int, n_rows: int, path: Path) -> None:
    if bad_rows:
        raise UserInputError(f"{path}: {bad_rows} of {n_rows} rows have non-finite "
                             "features (NaN or inf)")


def coerce_labels(y: np.ndarray, multilabel: Optional[bool], path) -> tuple[np.ndarray, bool]:
    """Return (labels, multilabel): (N,) int64 class indices or (N, C) uint8 multi-hot rows."""
    if y.ndim == 1:
        if multilabel:
            raise UserInputError(f"{path}: multilabel requested but the labels are 1-D "
                                 "(class indices); multilabel needs (N, C) 0/1 rows")
        return _as_class_indices(y, path), False
    if y.ndim != 2:
        raise UserInputError(f"{path}: labels must be (N,) class indices or (N, C) 0/1 rows, "
                             f"got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise UserInputError(f"{path}: 2-D labels must hold only 0 and 1 (multi-hot or one-hot)")
    labels_per_row = y.sum(axis=1)
    one_hot = bool((labels_per_row == 1).all())
    if multilabel is None:
        multilabel = not one_hot
    if multilabel:
        return y.astype(np.uint8), True
    if not one_hot:
        bad = int((labels_per_row != 1).sum())
        raise UserInputError(f"{path}: multiclass requested but {bad} label rows do not hold "
                             "exactly one 1 (not one-hot); use --multilabel true")
    return y.argmax(axis=1).astype(np.int64), False


def _as_class_indices(y: np.ndarray, path) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    raise UserInputError(f"{path}: 1-D labels must be integer class indices, got dtype {y.dtype}")


def token_layout(dim: int, settings: dict, path) -> tuple[int, int]:
    """(T, E) of (N, T * E) per-token features: T and E from ``settings`` (``num_tokens``,
    ``embed_dim``) when present, else T = 105 (the published default) and E = D / 105."""
    pooling = settings.get("pooling", "all")
    if pooling != "all":
        raise UserInputError(f"{path}: --pool needs per-token embeddings (pooling 'all'), "
                             f"but this file was computed with pooling '{pooling}'")
    num_tokens = int(settings.get("num_tokens", PUBLISHED_NUM_TOKENS))
    if num_tokens <= 0 or dim % num_tokens:
        raise UserInputError(f"{path}: --pool: feature dimension {dim} is not a multiple of "
                             f"{num_tokens} tokens")
    embed_dim = dim // num_tokens
    if "embed_dim" in settings and int(settings["embed_dim"]) != embed_dim:
        raise UserInputError(f"{path}: --pool: feature dimension {dim} != num_tokens "
                             f"{num_tokens} x embed_dim {settings['embed_dim']}")
    return num_tokens, embed_dim


def pool_tokens(x: np.ndarray, settings: dict, path) -> np.ndarray:
    """Mean over tokens: (N, T * E) or (N, T, E) -> (N, E) float32 (T, E: :func:`token_layout`)."""
    if x.ndim == 3:
        return x.mean(axis=1, dtype=np.float32)
    num_tokens, embed_dim = token_layout(x.shape[1], settings, path)
    return x.reshape(len(x), num_tokens, embed_dim).mean(axis=1, dtype=np.float32)


def parse_feature_slice(spec: str) -> tuple[Optional[int], Optional[int]]:
    """'a:b', 'a:' or ':b' -> (a, b) with None for an empty side; integers may be negative."""
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UserInputError(f"bad --feature-slice '{spec}': use 'start:end' with integers, "
                             "e.g. '576:720'") from None


def resolve_columns(dim: int, spec: str, path) -> tuple[int, int]:
    """The column range (start, stop) that ``spec`` 'start:end' selects of ``dim`` columns,
    Python slice semantics (negative counts from the end), except that bounds outside [-D, D]
    or an empty range are errors, not clipped."""
    start, end = parse_feature_slice(spec)
    for bound in (start, end):
        if bound is not None and not -dim <= bound <= dim:
            raise UserInputError(f"bad --feature-slice '{spec}': {path} has {dim} features")
    columns = range(dim)[slice(start, end)]
    if len(columns) == 0:
        raise UserInputError(f"bad --feature-slice '{spec}': selects no columns of the "
                             f"{dim} features in {path}")
    return columns.start, columns.stop


def slice_features(x: np.ndarray, spec: str, path) -> np.ndarray:
    """Columns ``spec`` ('start:end', see :func:`resolve_columns`) of (N, D) features."""
    start, stop = resolve_columns(x.shape[1], spec, path)
    return np.ascontiguousarray(x[:, start:stop])


def check_compatible(train: EmbeddingSplit, other: EmbeddingSplit) -> None:
    """An evaluation split must have the training split's feature dimension and label space."""
    if other.x.shape[1] != train.x.shape[1]:
        raise UserInputError(f"feature dimension mismatch: {train.path} has {train.x.shape[1]} "
                             f"features, {other.path} has {other.x.shape[1]} (after pooling/slicing)")
    if train.multilabel and other.y.shape[1] != train.y.shape[1]:
        raise UserInputError(f"label mismatch: {train.path} has {train.y.shape[1]} label columns, "
                             f"{other.path} has {other.y.shape[1]}")
    if train.class_names and other.class_names and train.class_names != other.class_names:
        raise UserInputError(f"class_names differ between {train.path} and {other.path}")


def label_indicator(y: np.ndarray, multilabel: bool) -> tuple[np.ndarray, int]:
    """(N, L) bool label matrix and the number of real label columns.

    Multiclass: one column per class present. Multilabel: the C label columns, then one extra
    "no label" column when some rows carry none (so every row carries at least one column).
    """
    if not multilabel:
        classes = np.unique(y)
        return y[:, None] == classes[None, :], len(classes)
    indicator = y.astype(bool)
    unlabelled = ~indicator.any(axis=1)
    if unlabelled.any():
        return np.concatenate([indicator, unlabelled[:, None]], axis=1), y.shape[1]
    return indicator, y.shape[1]


def subset_size(n_rows: int, fraction: float) -> int:
    """round(fraction * n_rows), at least 1 (halves round up)."""
    return max(1, min(n_rows, math.floor(fraction * n_rows + 0.5)))


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise UserInputError(f"--train-fraction must be in (0, 1], got {fraction}")


def label_fraction_indices(y: np.ndarray, multilabel: bool, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, label-stratified subset of ``subset_size(N, fraction)`` rows.

    y: (N,) class indices or (N, C) multi-hot rows. The same (y, fraction, seed) always gives the
    same rows; fraction 1 gives all rows. One method serves both tasks (a class is a label):

    1. coverage: for each label, rarest first, put one random row carrying it in the subset, so
       every label is present whenever the subset has room for it;
    2. iterative stratification (Sechidis et al., 2011) of the remaining rows into the subset
       and the rest: take the label with the fewest unassigned rows; send each of its unassigned
       rows (in random order) to the side that still wants more of that label (its count times
       fraction, resp. 1 - fraction, minus what it holds), ties to the side with more room,
       then at random; a side that is full takes nothing more, so the size is exact.
    Deciding each row at its rarest label keeps every label near its share in the subset, also
    for rows with many labels; rows without labels count as one more label. For multiclass this
    is a stratified sample with per-class counts within about one of fraction * class count.
    """
    check_fraction(fraction)
    n_rows = len(y)
    n_take = subset_size(n_rows, fraction)
    if n_take == n_rows:
        return np.arange(n_rows)
    indicator, n_labels = label_indicator(y, multilabel)
    label_counts = indicator.sum(axis=0)
    subset_wants = label_counts * (n_take / n_rows)
    rest_wants = label_counts - subset_wants
    room = {True: n_take, False: n_rows - n_take}  # keyed by "goes to the subset"
    in_subset = np.zeros(n_rows, dtype=bool)
    assigned = np.zeros(n_rows, dtype=bool)
    rng = np.random.default_rng(seed)

    def assign(row: int, to_subset: bool) -> None:
        assigned[row] = True
        in_subset[row] = to_subset
        room[to_subset] -= 1
        wants = subset_wants if to_subset else rest_wants
        wants -= indicator[row]

    for label in np.argsort(label_counts[:n_labels], kind="stable"):
        if room[True] == 0:
            break
        if label_counts[label] and not in_subset[indicator[:, label]].any():
            assign(int(rng.choice(np.flatnonzero(indicator[:, label] & ~assigned))), True)

    unassigned_counts = indicator[~assigned].sum(axis=0)
    while room[True] and room[False]:
        label = int(np.argmin(np.where(unassigned_counts > 0, unassigned_counts, n_rows + 1)))
        rows = rng.permutation(np.flatnonzero(indicator[:, label] & ~assigned))
        for row in rows:
            if not (room[True] and room[False]):
                to_subset = room[True] > 0
            elif subset_wants[label] != rest_wants[label]:
                to_subset = subset_wants[label] > rest_wants[label]
            elif room[True] != room[False]:
                to_subset = room[True] > room[False]
            else:
                to_subset = bool(rng.integers(2))
            assign(int(row), to_subset)
        unassigned_counts -= indicator[rows].sum(axis=0)
    if room[True]:  # the rest is full: every row still unassigned belongs to the subset
        in_subset[~assigned] = True
    return np.flatnonzero(in_subset)


def check_training_labels(y: np.ndarray, multilabel: bool, path, class_names=None,
                          context: str = "") -> list[str]:
    """Raise on labels a probe cannot learn from; return warnings (one line each) otherwise.

    Multiclass: a single class is an error (logistic regression needs two).
    Multilabel: a label column that is constant in training (all 0 or all 1) is a warning, not
    an error: small label fractions of BigEarthNet often miss rare labels, and sklearn's
    OneVsRestClassifier then fits a constant predictor for that column (score always 0 or 1;
    kNN gives the same). Only when every column is constant is it an error.
    """
    where = f"{path}{context}"
    if not multilabel:
        classes = np.unique(y)
        if len(classes) < 2:
            name = _label_name(int(classes[0]), class_names)
            raise UserInputError(f"{where}: the training labels hold a single class ({name}); "
                                 "a classifier needs at least two")
        return []
    positives = y.sum(axis=0)
    never = [_label_name(j, class_names) for j in np.flatnonzero(positives == 0)]
    always = [_label_name(j, class_names) for j in np.flatnonzero(positives == len(y))]
    if len(never) + len(always) == y.shape[1]:
        raise UserInputError(f"{where}: every label column is constant in the training labels; "
                             "nothing to learn")
    warnings = []
    if never:
        warnings.append(f"{where}: label column(s) never present in training, scored 0: "
                        + ", ".join(never))
    if always:
        warnings.append(f"{where}: label column(s) present in every training row, scored 1: "
                        + ", ".join(always))
    return warnings


def _label_name(index: int, class_names) -> str:
    if class_names and 0 <= index < len(class_names):
        return f"{index} ({class_names[index]})"
    return str(index)
