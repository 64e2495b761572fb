"""Pretrain the MoE-MAE (the published BigEarthNet-L recipe).

    python pretrain_mae.py --config_yaml configs/pretrain_moe_mae.yaml [--resume] \\
        [--set training.epochs=2 --set training.batch_size=64 ...]
    torchrun --nproc_per_node=N pretrain_mae.py --config_yaml ...          # DDP, see README

The config is validated before any work (unknown keys, wrong types, values out of range,
missing files: one line naming the key, exit status 2). Published configs run unchanged; every
other key has a default (see ``SCHEMA``). Outputs go to ``training.weight_path`` under the
published names ``pretrained_{size}_best.pth``, ``pretrained_{size}_last.pth``,
``checkpoint_{size}.pth`` (every ``save_every_n_epochs``) and ``training_metrics_{size}.csv``,
plus ``expert_usage_{size}.csv``, ``training_curves_{size}.png`` and the resolved config
``config_{size}.yaml``. Checkpoints are written atomically and load with
``torch.load(..., weights_only=True)``.

``--resume`` continues from ``pretrained_{size}_last.pth`` (else the published
``checkpoint_{size}.pth``): same learning rate at the same step, the remaining epochs only;
checkpoints of the published code (model, optimizer, scaler, epoch, best loss) resume too.
Checkpoints hold the model and the optimizer state in the published layout (one entry per
published parameter, see models/layout.py), so they resume through the published code too.
A non-finite loss stops the run (exit status 1) within ``training.check_finite_every`` steps
and always before the epoch's checkpoint, keeping the last good checkpoint; the check stays on
the device between reads, so a GPU is not stalled every step. ``mixed_precision``: bf16 or fp16
autocast (fp16 with a ``torch.amp.GradScaler``) on any device, CPU included.

One run per folder: the run holds an exclusive lock on ``training.weight_path/.run.lock`` for
its whole life (a second run into the folder exits 2 naming the holder's pid), and a fresh run
into a folder that holds an earlier run's checkpoints or metrics exits 2 unless ``--resume``
continues it or ``--overwrite`` removes it first. Temporary files that killed runs left behind
are removed at the next start.

Crash consistency: after each epoch the metrics CSVs and the curves are written first, then
``last`` (the commit record: the epoch is done once ``last`` holds it), then ``best`` and the
periodic checkpoint as copies of ``last``. A kill at any instant leaves every file at the last
committed epoch k, or the CSVs one epoch ahead (``--resume`` drops those rows and redoes the
epoch), or ``best``/periodic one epoch behind (``--resume`` copies ``last`` onto them, since
they are ``last`` of epoch k). Resumed runs reproduce the uninterrupted one bit for bit: every
random stream of every process is restored, and nothing else draws from them.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from datasets.bigearthnet import MAX_CHIP_SIZE
from datasets.builders import FORMATS, build_bigearthnet, check_split_source
from models.layout import optimizer_state_for, published_optimizer_state
from models.moe_mae import MAEObjective, build_mae
from models.routing_stats import RoutingCounter
from scheduler.schedulers import WarmupCosineLR
from utils.checkpoint import (FORMAT_VERSION, apply_weights, load_checkpoint,
                              resolve_legacy_hour, rng_state, scaler_state, set_rng_state)
from utils.config import (Field, config_arguments, dump_config, fraction, load_config,
                          model_fields, non_negative, positive, seed_range, unit_interval_open)
from utils.errors import UserInputError, run_cli
from utils.files import (FolderLock, atomic_path, check_output_dir, copy_file,
                         remove_stale_temporaries, torch_save, write_csv, write_text)
from utils.runtime import (Distributed, autocast_dtype, run_on_main, seed_everything,
                           seed_worker, select_device, setup_distributed, teardown_distributed)

SCHEMA = {
    "model": model_fields(mask_ratio=Field("float", 0.75, check=unit_interval_open)),
    "training": {
        # published keys
        "dataset_path": Field("path", must_exist="dir",
                              help="BEN-L root (images/, labels/) or a packed directory"),
        "dataset_csv": Field("path", None, nullable=True, must_exist="file",
                             help="split CSV (raw format only)"),
        "epochs": Field("int", 500, check=positive),
        "batch_size": Field("int", 128, check=positive, help="per process (GPU); see README"),
        "learning_rate": Field("float", 3e-4, check=positive),
        "weight_decay": Field("float", 0.05, check=non_negative),
        "weight_path": Field("path", help="output folder"),
        "num_workers": Field("int", 4, check=non_negative),
        "save_every_n_epochs": Field("int", 5, check=positive),
        # ours
        "dataset_format": Field("str", "auto", choices=FORMATS),
        "val_dataset_path": Field("path", None, nullable=True, must_exist="dir"),
        "val_dataset_csv": Field("path", None, nullable=True, must_exist="file"),
        "warmup_fraction": Field("float", 0.05, check=unit_interval_open,
                                 help="linear warm-up over this fraction of all steps"),
        "min_lr": Field("float", 0.0, check=non_negative),
        "grad_clip": Field("float", 1.0, nullable=True, check=positive),
        "loss_unmasked_weight": Field("float", 0.1, check=non_negative),
        "loss_moe_weight": Field("float", 0.5, check=non_negative),
        "seed": Field("int", 0, check=seed_range),
        "device": Field("str", "auto"),
        "mixed_precision": Field("str", "auto", choices=("auto", "bf16", "fp16", "none"),
                                 help="auto: bf16 (else fp16) on CUDA, off elsewhere; bf16 and "
                                      "fp16 on any device; fp16 with a GradScaler"),
        "compile": Field("bool", False, help="torch.compile the training and validation step"),
        "check_finite_every": Field("int", 50, check=positive,
                                    help="steps between the host's reads of the non-finite "
                                         "check (and at every epoch end)"),
        "legacy_hour": Field("bool", None, nullable=True,
                             help="the published first-digit hour encoding; null: false for a "
                                  "fresh run, the checkpoint's on --resume"),
        "skip_invalid": Field("bool", False, help="skip patches whose image file is missing"),
        "max_chip_size": Field("int", MAX_CHIP_SIZE, check=positive,
                               help="larger chips are errors (not silently cropped)"),
        "collapse_threshold": Field("float", 0.9, check=fraction),
    },
}

METRIC_COLUMNS = ["epoch", "train_loss", "train_m_loss", "train_um_loss", "train_moe_loss",
                  "avg_lr", "val_m_loss", "seconds", "images_per_s"]  # the first six as published
USAGE_COLUMNS = ["epoch", "layer", "expert", "top1_share", "topk_share"]


class NonFiniteLoss(Exception):
    pass


LOCK_FILE = ".run.lock"
# what makes a folder hold a run (any model size); the config alone does not (a run killed in
# its first epoch leaves only that, and may simply be started again)
RUN_OUTPUTS = ("pretrained_*_best.pth", "pretrained_*_last.pth", "checkpoint_*.pth",
               "training_metrics_*.csv", "expert_usage_*.csv", "training_curves_*.png")


class RunFiles(NamedTuple):
    best: Path
    last: Path
    periodic: Path
    metrics: Path
    usage: Path
    curves: Path
    config: Path

    @classmethod
    def in_folder(cls, folder: Path, size: str) -> "RunFiles":
        return cls(folder / f"pretrained_{size}_best.pth", folder / f"pretrained_{size}_last.pth",
                   folder / f"checkpoint_{size}.pth", folder / f"training_metrics_{size}.csv",
                   folder / f"expert_usage_{size}.csv", folder / f"training_curves_{size}.png",
                   folder / f"config_{size}.yaml")

    @property
    def folder(self) -> Path:
        return self.last.parent


# --------------------------------------------------------------------------- set-up


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_arguments("Pretrain the MoE-MAE.")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in training.weight_path")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove an earlier run's checkpoints and metrics in "
                             "training.weight_path and start afresh")
    return parser.parse_args(argv)


def validate(config: dict, resume_run: bool = False, overwrite: bool = False) -> None:
    """Rules that involve several keys or flags; the output folder can be written."""
    model, training = config["model"], config["training"]
    if resume_run and overwrite:
        raise UserInputError("--resume continues the run in training.weight_path, --overwrite "
                             "replaces it: give one of them")
    if model["img_size"] % model["patch_size"]:
        raise UserInputError(f"model.img_size {model['img_size']} is not a multiple of "
                             f"model.patch_size {model['patch_size']}")
    for prefix in ("", "val_"):
        path, csv_file = training[f"{prefix}dataset_path"], training[f"{prefix}dataset_csv"]
        if csv_file and not path:
            raise UserInputError(f"training.{prefix}dataset_csv given without "
                                 f"training.{prefix}dataset_path")
        if path:
            check_split_source(path, csv_file, training["dataset_format"],
                               f"training.{prefix}dataset_path", f"training.{prefix}dataset_csv")
    check_output_dir(training["weight_path"], "training.weight_path")


def claim_folder(files: RunFiles, resume_run: bool, overwrite: bool) -> FolderLock:
    """Lock the run folder for this run's life, remove what killed runs left half-written, and
    refuse (or with ``overwrite`` remove) an earlier run's outputs unless resuming."""
    lock = FolderLock(files.folder, LOCK_FILE, what="training.weight_path").acquire()
    try:
        stale = remove_stale_temporaries(files.folder, [path.name for path in files])
        if stale:
            print(f"removed {len(stale)} temporary file(s) that an interrupted run left in "
                  f"{files.folder}")
        earlier = sorted({path for pattern in RUN_OUTPUTS for path in files.folder.glob(pattern)
                          if path.is_file()})
        if earlier and not resume_run:
            names = ", ".join(path.name for path in earlier[:4])
            names += ", ..." if len(earlier) > 4 else ""
            if not overwrite:
                raise UserInputError(
                    f"training.weight_path {files.folder} holds an earlier run ({names}): pass "
                    f"--resume to continue it, --overwrite to replace it, or choose another "
                    f"folder")
            for path in earlier:
                path.unlink()
            print(f"--overwrite: removed the earlier run's {len(earlier)} file(s) in "
                  f"{files.folder} ({names})")
    except BaseException:
        lock.release()
        raise
    return lock


def build_loader(dataset, batch_size: int, num_workers: int, dist: Distributed, device,
                 seed: int, shuffle: bool) -> DataLoader:
    """Shuffled by (seed, epoch) via ``sampler.set_epoch``; worker seeds come from a private
    generator, so the loader never draws from the global RNG (which masking and gate noise
    use, and which a resumed run restores)."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed + dist.rank))


# ------------------------------------------------------------------------- training


def to_device(batch, device):
    imgs, _, *meta = batch
    return (imgs.to(device, non_blocking=True),
            [m.to(device, non_blocking=True) for m in meta])


class NonFiniteWatch:
    """The first step of an epoch whose loss is not finite, recorded on the device so that no
    step waits for the host. :meth:`check` reads it (the host synchronisation; every process
    together under DDP) and raises :class:`NonFiniteLoss`. Updates made after the bad step
    and before the check are lost with the run: the loop checks at the end of every epoch,
    before any checkpoint is written, so none reaches a checkpoint."""

    def __init__(self, steps: int, device):
        self.steps = steps
        self.first_step = torch.full((), steps, dtype=torch.int64, device=device)  # none yet
        self.first_loss = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, step: int, loss: torch.Tensor) -> None:
        new = ~torch.isfinite(loss) & (self.first_step == self.steps)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_loss = torch.where(new, loss.detach().double(), self.first_loss)

    def check(self, epoch: int, dist: Distributed) -> None:
        first = self.first_step.clone()
        if dist.world_size > 1:  # the earliest bad step of any process stops every process
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        first = int(first)
        if first < self.steps:
            where = (f"{self.first_loss.item()} on process {dist.rank}"
                     if int(self.first_step) == first else "on another process")
            raise NonFiniteLoss(f"non-finite loss ({where}) at epoch {epoch + 1}, "
                                f"step {first + 1} of {self.steps}")


def train_one_epoch(objective, loader, optimizer, scheduler, scaler, epoch: int, epochs: int,
                    device, amp_dtype, grad_clip, check_every: int,
                    dist: Distributed) -> Dict[str, float]:
    """One pass over the loader; the learning rate is set before every step from the global
    step. The host reads device values only every ``check_every`` steps and at the end (the
    non-finite check, the progress bar), so a GPU is never stalled per step. Returns the
    epoch's mean losses and learning rate (over all ranks)."""
    objective.train()
    steps = len(loader)
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, masked, unmasked, moe
    watch = NonFiniteWatch(steps, device)
    lr_sum = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", mininterval=1.0, leave=False,
               disable=not (dist.is_main and sys.stderr.isatty()))  # logs get the epoch line
    for step, batch in enumerate(bar):
        lr = scheduler.step(epoch * steps + step)
        lr_sum += lr
        imgs, meta = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            losses = objective(imgs, *meta)
        values = torch.stack([losses["loss"], losses["masked"], losses["unmasked"],
                              losses["moe"]]).detach().double()
        watch.record(step, values[0])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        scaler.step(optimizer)  # fused AdamW: the fp16 inf check stays on the device too
        scaler.update()
        sums += values
        if (step + 1) % check_every == 0 or step == steps - 1:
            watch.check(epoch, dist)
            if not bar.disable:
                mean = (sums / (step + 1)).tolist()
                bar.set_postfix(loss=f"{mean[0]:.4f}", masked=f"{mean[1]:.4f}",
                                unmasked=f"{mean[2]:.4f}", moe=f"{mean[3]:.4f}", lr=f"{lr:.2e}")
    if dist.world_size > 1:
        torch_dist.all_reduce(sums)
    loss, masked, unmasked, moe = (sums / (steps * dist.world_size)).tolist()
    return {"train_loss": loss, "train_m_loss": masked, "train_um_loss": unmasked,
            "train_moe_loss": moe, "avg_lr": lr_sum / steps}


@torch.no_grad()
def masked_validation_loss(objective, loader, device, amp_dtype, seed: int,
                           dist: Distributed) -> float:
    """Mean masked loss in eval mode, with the same masks every epoch (seeded noise)."""
    objective.eval()
    mae = unwrap(objective).mae
    generator = torch.Generator().manual_seed(seed + dist.rank)
    total = torch.zeros(2, device=device, dtype=torch.float64)  # summed loss, batches
    for batch in loader:
        imgs, meta = to_device(batch, device)
        noise = torch.rand(imgs.shape[0], mae.encoder.num_patches, generator=generator)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            losses = objective(imgs, *meta, noise=noise.to(device))
        total += torch.stack([losses["masked"].double() * imgs.shape[0],
                              torch.tensor(imgs.shape[0], device=device, dtype=torch.float64)])
    if dist.world_size > 1:
        torch_dist.all_reduce(total)
    return (total[0] / total[1]).item()


def unwrap(objective):
    """The MAEObjective inside torch.compile's and DDP's wrappers."""
    objective = getattr(objective, "_orig_mod", objective)
    return objective.module if isinstance(objective, DistributedDataParallel) else objective


# -------------------------------------------------------------------- checkpoints


def gather_rng_states(dist: Distributed) -> List[dict]:
    states = [None] * dist.world_size
    if dist.world_size > 1:
        torch_dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def checkpoint_dict(mae, optimizer, scaler, epoch, steps_per_epoch, best_loss, best_metric,
                    best_epoch, best_train_loss, rng_states, config, dist) -> dict:
    """What a checkpoint holds; ``legacy_hour`` records the hour encoding the weights were
    trained with (see utils.checkpoint.checkpoint_legacy_hour)."""
    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,  # last completed epoch (0-based), as published
        "global_step": (epoch + 1) * steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "world_size": dist.world_size,
        "model_state": mae.state_dict(),
        "opt_state": published_optimizer_state(mae, optimizer),  # the published layout
        "scaler_state": scaler_state(scaler),
        "best_loss": best_loss,
        "best_metric": best_metric,
        "best_epoch": best_epoch,  # the epoch whose checkpoint pretrained_{size}_best.pth is
        "best_train_loss": best_train_loss,
        "rng_state": rng_states,
        "config": config,
        "legacy_hour": config["training"]["legacy_hour"],
    }


class ResumeState(NamedTuple):
    start_epoch: int
    best_loss: float
    best_train_loss: float
    best_epoch: Optional[int] = None
    source: Optional[Path] = None  # the checkpoint resumed from


def find_resume_checkpoint(files: RunFiles, dist: Distributed) -> Optional[Tuple[Path, dict]]:
    """The newest checkpoint of the run (ours or the published format) and its path; None for
    a run killed in its first epoch (metrics written, no checkpoint yet), which starts that
    epoch again."""
    path = next((p for p in (files.last, files.periodic) if p.is_file()), None)
    if path is None and files.metrics.is_file():
        if dist.is_main:
            print(f"no epoch of the run in {files.folder} was completed: starting from the first")
        return None
    if path is None:
        raise UserInputError(f"--resume: no checkpoint in {files.last.parent} (looked for "
                             f"{files.last.name} and {files.periodic.name})")
    checkpoint = load_checkpoint(path, map_location="cpu")
    for key in ("model_state", "opt_state", "epoch"):
        if key not in checkpoint:
            raise UserInputError(f"{path}: cannot resume, the checkpoint has no '{key}'")
    return path, checkpoint


def resume(path: Path, checkpoint: dict, mae, optimizer, scaler, steps_per_epoch: int,
           dist: Distributed) -> ResumeState:
    """Load a checkpoint (see :func:`find_resume_checkpoint`) into model, optimizer and
    scaler; restore this rank's RNG state when the checkpoint has it."""
    saved_steps = checkpoint.get("steps_per_epoch")
    if saved_steps is not None and saved_steps != steps_per_epoch:
        raise UserInputError(
            f"{path}: saved with {saved_steps} steps per epoch, this run has {steps_per_epoch} "
            "(different dataset, batch size or number of processes); the learning-rate "
            "schedule would not continue exactly")
    apply_weights(mae, checkpoint, path)
    try:  # moves the optimizer state to the parameters' device
        optimizer.load_state_dict(optimizer_state_for(mae, optimizer, checkpoint["opt_state"]))
    except (ValueError, KeyError) as exc:
        raise UserInputError(f"{path}: optimizer state does not fit this model ({exc})") from exc
    if checkpoint.get("scaler_state"):
        scaler.load_state_dict(checkpoint["scaler_state"])
    rng_states = checkpoint.get("rng_state")
    if isinstance(rng_states, list) and len(rng_states) == dist.world_size:
        set_rng_state(rng_states[dist.rank])
    elif dist.is_main:
        print(f"note: {path.name} has no random-generator state for this run's "
              f"{dist.world_size} process(es); continuing with fresh seeds")
    best_train = float(checkpoint.get("best_train_loss", math.inf))
    best = float(checkpoint.get("best_loss", best_train))
    best_epoch = checkpoint.get("best_epoch")
    if dist.is_main:
        print(f"resumed from {path} after epoch {checkpoint['epoch'] + 1}")
    return ResumeState(int(checkpoint["epoch"]) + 1, best, best_train,
                       None if best_epoch is None else int(best_epoch), path)


def checkpoint_epoch(path: Path) -> Optional[int]:
    """The ``epoch`` of a checkpoint file (memory-mapped, so cheap), None if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # missing, not a checkpoint, no epoch
        return None


def finish_interrupted_epoch(files: RunFiles, state: ResumeState, save_every: int) -> None:
    """Bring ``best`` and the periodic checkpoint up to the committed ``last`` when a kill fell
    between the write of ``last`` and their copies (see the module docstring)."""
    if state.source != files.last:
        return
    epoch = state.start_epoch - 1
    if state.best_epoch == epoch and checkpoint_epoch(files.best) != epoch:
        copy_file(files.last, files.best)
        print(f"completed the interrupted epoch {epoch + 1}: {files.best.name} from "
              f"{files.last.name}")
    elif state.best_epoch is not None and checkpoint_epoch(files.best) != state.best_epoch:
        print(f"warning: {files.best} is not the checkpoint of the best epoch "
              f"({state.best_epoch + 1}) that {files.last.name} records", file=sys.stderr)
    if (epoch + 1) % save_every == 0 and checkpoint_epoch(files.periodic) != epoch:
        copy_file(files.last, files.periodic)
        print(f"completed the interrupted epoch {epoch + 1}: {files.periodic.name} from "
              f"{files.last.name}")


# -------------------------------------------------------------------------- outputs


def read_csv_rows(path: Path, before_epoch: int) -> List[dict]:
    """Rows of an earlier run's CSV for epochs < before_epoch (no duplicates on resume)."""
    if not path.is_file():
        return []
    problem = f"{path} cannot be continued; restore it, or remove it to start it afresh"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserInputError(f"{problem} ({exc})") from None
    kept = []
    for line, row in enumerate(rows, start=2):
        try:
            epoch = int(row["epoch"])
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"{problem}: line {line} has no valid epoch") from None
        if epoch < before_epoch:
            kept.append(row)
    return kept


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def plot_curves(path: Path, rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure, (losses, lr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("train_loss", "total"), ("train_m_loss", "masked"),
                       ("train_um_loss", "unmasked"), ("train_moe_loss", "MoE"),
                       ("val_m_loss", "validation masked")):
        values = [_number(r.get(key)) for r in rows]
        if not all(np.isnan(values)):
            losses.plot(epochs, values, marker=".", label=label)
    losses.set_yscale("log")
    losses.set_xlabel("epoch")
    losses.set_ylabel("loss")
    losses.legend()
    losses.grid(True, alpha=0.3)
    lr.plot(epochs, [_number(r.get("avg_lr")) for r in rows], marker=".")
    lr.set_xlabel("epoch")
    lr.set_ylabel("mean learning rate")
    lr.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config_yaml, SCHEMA, args.set)
    validate(config, args.resume, args.overwrite)
    model_cfg, train_cfg = config["model"], config["training"]
    dist = setup_distributed()
    files = RunFiles.in_folder(Path(train_cfg["weight_path"]), model_cfg["size"])
    lock = None
    try:
        # process 0 owns the folder; its refusal stops every process with the same line
        lock = run_on_main(dist, lambda: claim_folder(files, args.resume, args.overwrite))
        return run(config, model_cfg, train_cfg, files, args.resume, dist)
    finally:
        if lock is not None:
            lock.release()
        teardown_distributed(dist)


def run(config, model_cfg, train_cfg, files: RunFiles, resume_run: bool,
        dist: Distributed) -> int:
    device = select_device(train_cfg["device"], dist.local_rank, key="training.device")
    amp_dtype = autocast_dtype(device, train_cfg["mixed_precision"])
    seed_everything(train_cfg["seed"] + dist.rank)
    resumed = find_resume_checkpoint(files, dist) if resume_run else None
    if resumed is None:  # a fresh run trains on the true hour unless told otherwise
        train_cfg["legacy_hour"] = bool(train_cfg["legacy_hour"])
    else:  # a resumed run keeps the encoding it was trained with unless told otherwise
        train_cfg["legacy_hour"] = resolve_legacy_hour(train_cfg["legacy_hour"], resumed[1],
                                                       str(resumed[0]))

    def dataset(prefix):
        return build_bigearthnet(train_cfg[f"{prefix}dataset_path"],
                                 train_cfg[f"{prefix}dataset_csv"], train_cfg["dataset_format"],
                                 img_size=model_cfg["img_size"],
                                 legacy_hour=train_cfg["legacy_hour"],
                                 skip_invalid=train_cfg["skip_invalid"],
                                 max_chip_size=train_cfg["max_chip_size"])

    loader = build_loader(dataset(""), train_cfg["batch_size"], train_cfg["num_workers"], dist,
                          device, train_cfg["seed"], shuffle=True)
    val_loader = None
    if train_cfg["val_dataset_path"]:
        val_loader = build_loader(dataset("val_"), train_cfg["batch_size"],
                                  train_cfg["num_workers"], dist, device, train_cfg["seed"],
                                  shuffle=False)

    mae = build_mae(model_cfg["size"], model_cfg["img_size"], model_cfg["patch_size"],
                    model_cfg["in_channels"], mask_ratio=model_cfg["mask_ratio"]).to(device)
    objective = MAEObjective(mae, train_cfg["loss_unmasked_weight"], train_cfg["loss_moe_weight"])
    optimizer = torch.optim.AdamW(mae.parameters(), lr=train_cfg["learning_rate"],
                                  weight_decay=train_cfg["weight_decay"],
                                  fused=True if device.type in ("cpu", "cuda") else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    epochs, steps_per_epoch = train_cfg["epochs"], len(loader)
    total_steps = epochs * steps_per_epoch
    scheduler = WarmupCosineLR(optimizer, total_steps, train_cfg["learning_rate"],
                               int(train_cfg["warmup_fraction"] * total_steps),
                               train_cfg["min_lr"])

    state = ResumeState(0, math.inf, math.inf)
    if resumed is not None:
        state = resume(*resumed, mae, optimizer, scaler, steps_per_epoch, dist)
        del resumed  # its tensors are in the model and the optimizer now
    best_metric = "val_m_loss" if val_loader is not None else "train_loss"
    if dist.world_size > 1:
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if train_cfg["compile"]:  # checkpoints keep the plain keys: they are written from mae
        objective = torch.compile(objective)

    metric_rows = read_csv_rows(files.metrics, state.start_epoch)
    usage_rows = read_csv_rows(files.usage, state.start_epoch)
    if dist.is_main:
        files.config.parent.mkdir(parents=True, exist_ok=True)
        write_text(files.config, dump_config(config))
        print(f"device {device}, {dist.world_size} process(es), global batch "
              f"{train_cfg['batch_size'] * dist.world_size}, {steps_per_epoch} steps per epoch, "
              f"mixed precision {amp_dtype or 'off'}")
    if dist.is_main:
        finish_interrupted_epoch(files, state, train_cfg["save_every_n_epochs"])
    if state.start_epoch >= epochs:
        if dist.is_main:
            print(f"nothing to do: all {epochs} epochs are done (training.epochs)")
        return 0

    best_loss, best_train_loss = state.best_loss, state.best_train_loss
    best_epoch = state.best_epoch
    counter = RoutingCounter(mae)
    for epoch in range(state.start_epoch, epochs):
        loader.sampler.set_epoch(epoch)
        counter.reset()
        start = time.perf_counter()
        try:
            metrics = train_one_epoch(objective, loader, optimizer, scheduler, scaler, epoch,
                                      epochs, device, amp_dtype, train_cfg["grad_clip"],
                                      train_cfg["check_finite_every"], dist)
        except NonFiniteLoss as exc:
            last_good = files.last if files.last.is_file() else None
            print(f"error: {exc}; stopping. Last good checkpoint: "
                  f"{last_good or 'none (no epoch completed)'}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
        counter.all_reduce()
        if val_loader is not None:
            metrics["val_m_loss"] = masked_validation_loss(objective, val_loader, device,
                                                           amp_dtype, train_cfg["seed"], dist)
        images = len(loader.sampler) * dist.world_size
        metrics.update(epoch=epoch, seconds=round(seconds, 2),
                       images_per_s=round(images / seconds, 1))
        best_train_loss = min(best_train_loss, metrics["train_loss"])
        improved = metrics[best_metric] < best_loss
        best_loss = min(best_loss, metrics[best_metric])
        best_epoch = epoch if improved else best_epoch
        rng_states = gather_rng_states(dist)
        if not dist.is_main:
            continue

        metric_rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v)
                            for k, v in metrics.items()})
        write_csv(files.metrics, metric_rows, METRIC_COLUMNS)
        for layer, share in counter.shares().items():
            for expert in range(len(share["top1"])):
                usage_rows.append({"epoch": epoch, "layer": layer, "expert": expert,
                                   "top1_share": f"{share['top1'][expert]:.4f}",
                                   "topk_share": f"{share['topk'][expert]:.4f}"})
        write_csv(files.usage, usage_rows, USAGE_COLUMNS)
        plot_curves(files.curves, metric_rows)

        # last is the commit record; best and periodic are copies of it (module docstring)
        torch_save(checkpoint_dict(mae, optimizer, scaler, epoch, steps_per_epoch, best_loss,
                                   best_metric, best_epoch, best_train_loss, rng_states, config,
                                   dist), files.last)
        if improved:
            copy_file(files.last, files.best)
        if (epoch + 1) % train_cfg["save_every_n_epochs"] == 0:
            copy_file(files.last, files.periodic)
        val_text = f" | val masked {metrics['val_m_loss']:.4f}" if val_loader else ""
        print(f"epoch {epoch + 1}/{epochs} | loss {metrics['train_loss']:.4f} (masked "
              f"{metrics['train_m_loss']:.4f}, unmasked {metrics['train_um_loss']:.4f}, MoE "
              f"{metrics['train_moe_loss']:.4f}){val_text} | lr {metrics['avg_lr']:.2e} | "
              f"{metrics['images_per_s']:.0f} img/s{' | new best' if improved else ''}",
              flush=True)
        # the decoder's balancing losses are not trained (as published): watch the encoder
        for line in counter.collapsed(train_cfg["collapse_threshold"], prefix="encoder."):
            print(f"warning: possible router collapse at epoch {epoch + 1}: {line}",
                  file=sys.stderr)
    counter.remove()
    if dist.world_size > 1:
        torch_dist.barrier()
    if dist.is_main:
        print("outputs:")
        for path in files:
            if path.exists():
                print(f"  {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
