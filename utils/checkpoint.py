"""Checkpoints: plain data only, loadable with ``torch.load(..., weights_only=True)``.

A training checkpoint is a dict with the published keys (``model_state``, ``opt_state``,
``scaler_state``, ``epoch``, ``best_train_loss``) plus ours (``format_version``,
``global_step``, ``steps_per_epoch``, ``best_loss``, ``best_metric``, ``rng_state``,
``config``, ``legacy_hour``). Weights-only files from elsewhere load too: :func:`model_state_from` accepts the
published ``{"model_state": ...}`` dict, ``{"model": ...}``, ``{"state_dict": ...}`` or a bare
state_dict, and :func:`filter_state_dict` maps foreign key layouts onto our model (DDP's
``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes, an MAE checkpoint into a bare
encoder, an encoder checkpoint into an MAE).

The hour encoding follows the checkpoint: :func:`checkpoint_legacy_hour` tells which encoding
a checkpoint was trained with, :func:`resolve_legacy_hour` what a script's ``legacy_hour`` key
(null: the checkpoint's) makes of it.
"""

from __future__ import annotations

import random
from pathlib import Path
import sys
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from models.moe_mae import MOEMAE, build_mae
from utils.errors import UserInputError

FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, disallowed (pickled) objects
        raise UserInputError(f"{path}: cannot load as a weights-only checkpoint "
                             f"({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(checkpoint, dict):
        raise UserInputError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    return checkpoint


def model_state_from(checkpoint: Mapping, path="checkpoint") -> Dict[str, torch.Tensor]:
    """The model's state_dict inside a checkpoint dict (or the dict itself)."""
    for key in ("model_state", "model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise UserInputError(f"{path}: no model weights (looked for 'model_state', 'model', "
                         f"'state_dict' or a bare state_dict); keys: {list(checkpoint)[:8]}")


def filter_state_dict(state: Mapping[str, torch.Tensor],
                      model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a foreign state_dict's keys onto ``model``'s (see the module docstring)."""
    state = {_strip_prefixes(k): v for k, v in state.items()}
    expected = model.state_dict().keys()
    has_encoder = any(k.startswith("encoder.") for k in expected)
    if not has_encoder and any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    elif has_encoder and not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    if "encoder.patch_proj.weight" in state and "patch_embed.weight" in expected:
        state.setdefault("patch_embed.weight", state["encoder.patch_proj.weight"])
        state.setdefault("patch_embed.bias", state["encoder.patch_proj.bias"])
    return state


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_weights(model: nn.Module, path, map_location="cpu", strict: bool = True) -> dict:
    """Load a checkpoint file's weights into ``model``; returns the checkpoint dict."""
    checkpoint = load_checkpoint(path, map_location)
    apply_weights(model, checkpoint, path, strict)
    return checkpoint


def apply_weights(model: nn.Module, checkpoint: Mapping, path="checkpoint",
                  strict: bool = True) -> None:
    """Copy a loaded checkpoint's weights into ``model``. A model built for another size, or a
    checkpoint of another model, fails with one line naming the file and a few of the missing,
    unexpected or mis-shaped keys."""
    state = filter_state_dict(model_state_from(checkpoint, path), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatches (e.g. {'; '.join(mis_shaped[:2])})")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise UserInputError(f"{path}: weights do not fit this model (wrong model size?): "
                             + "; ".join(problems))
    check_finite_weights(state, path)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)


def check_finite_weights(state: Mapping[str, torch.Tensor], path="checkpoint") -> None:
    """Every floating-point tensor of a state_dict is finite: a checkpoint holding NaN or inf
    (a diverged run's, a damaged file) is an error naming the file and a few tensors, instead
    of NaN metrics, embeddings and figures downstream."""
    bad = [key for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point()
           and not torch.isfinite(value).all()]
    if bad:
        raise UserInputError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. "
                             f"{', '.join(bad[:3])}); the checkpoint is unusable")


def scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """``scaler.state_dict()``; for a disabled scaler (bf16 or full precision), a fresh
    enabled scaler's instead of the empty dict, since the published ``--resume`` calls
    ``GradScaler.load_state_dict``, which refuses an empty state."""
    return (scaler if scaler.is_enabled() else torch.amp.GradScaler("cpu")).state_dict()


def load_pretrained(model_config: Mapping, device="cpu",
                    checkpoint: Optional[Mapping] = None) -> MOEMAE:
    """The MAE of a config's ``model`` section (size, img_size, patch_size, in_channels) with
    the weights of its ``checkpoint_path``, on ``device``, in ``eval()``. ``checkpoint``: that
    file's dict when the caller has loaded it already (see :func:`resolve_legacy_hour`)."""
    mae = build_mae(model_config["size"], model_config["img_size"], model_config["patch_size"],
                    model_config["in_channels"])
    path = model_config["checkpoint_path"]
    apply_weights(mae, load_checkpoint(path) if checkpoint is None else checkpoint, path)
    return mae.to(device).eval()


def load_pretrained_and_hour(model_config: Mapping, legacy_hour: Optional[bool],
                             device="cpu") -> Tuple[MOEMAE, bool]:
    """:func:`load_pretrained`, and the hour encoding to feed the model: a config's
    ``legacy_hour`` resolved against the checkpoint (:func:`resolve_legacy_hour`)."""
    path = model_config["checkpoint_path"]
    checkpoint = load_checkpoint(path)
    return (load_pretrained(model_config, device, checkpoint),
            resolve_legacy_hour(legacy_hour, checkpoint, str(path)))


def load_model(model: nn.Module, checkpoint_path, device="cpu") -> nn.Module:
    """Published helper: load weights (ours or the published format), move to ``device``,
    switch to ``eval()``."""
    load_weights(model, checkpoint_path, map_location="cpu")
    return model.to(device).eval()


# ------------------------------------------------------------------------ hour encoding


def checkpoint_legacy_hour(checkpoint: Mapping) -> bool:
    """Whether ``checkpoint`` was trained with the published hour encoding (the first digit of
    the hour): its ``legacy_hour`` record (pretrain_mae.py writes it), else the
    ``training.legacy_hour`` of the config it holds (this project's checkpoints from before the
    record), else True: the published format, whose weights were trained on the first digit."""
    if "legacy_hour" in checkpoint:
        return bool(checkpoint["legacy_hour"])
    config = checkpoint.get("config")
    training = config.get("training") if isinstance(config, Mapping) else None
    recorded = training.get("legacy_hour") if isinstance(training, Mapping) else None
    return recorded if isinstance(recorded, bool) else True


def resolve_legacy_hour(configured: Optional[bool], checkpoint: Mapping, source: str) -> bool:
    """The hour encoding to feed a checkpoint's model: ``configured`` (a config's
    ``legacy_hour``) when given, else the checkpoint's. A configured value that differs from
    the checkpoint's is honoured with a one-line warning naming ``source`` (the checkpoint)."""
    trained = checkpoint_legacy_hour(checkpoint)
    if configured is None:
        return trained
    if configured != trained:
        names = {True: "the published first-digit hour", False: "the true hour"}
        print(f"warning: legacy_hour is {str(configured).lower()} but {source} was trained on "
              f"{names[trained]}: its hour token differs from training", file=sys.stderr)
    return configured


# -------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain data (tensors, ints)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss,
                         np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
