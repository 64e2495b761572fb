"""Reconstruction quality of a pretrained MoE-MAE on a BigEarthNet-L split.

:class:`MAEEvaluator` (the published class name and constructor) reports, averaged over all
samples of the split:

* ``masked_loss``, ``unmasked_loss``: squared error summed over a patch's p*p*C normalised
  values, averaged over the masked (resp. visible) patches, at the training mask ratio;
* ``mean_patch_baseline_loss``: the masked loss of a model-free guess, for scale: every masked
  patch predicted by the mean patch of its chip's visible patches (per pixel position and
  band, normalised values), with the same masks; see :func:`mean_patch_baseline`. A model
  that has learnt anything about the chips scores clearly below it;
* ``moe_loss``: the encoder's load-balancing loss; ``total_loss``: masked + 0.1 unmasked +
  0.5 MoE, as in training;
* ``full_loss``: mean squared error per normalised value with nothing masked (the published
  definition);
* ``rmse_masked_dn``, ``rmse_full_dn``: per band, the RMSE in reflectance DN of the masked
  patches' reconstruction and of the full reconstruction.

Masks come from a seeded generator, so numbers are identical from run to run (the model is in
``eval()``: no gate noise, no dropout). Losses are averaged per sample (the published script
averaged per batch, which weights a short last batch differently).

Figures (up to ``max_images``): original / masked input / reconstruction / reconstruction with
the visible patches pasted back, as RGB (SR_B4, SR_B3, SR_B2) with a 2-98 percentile stretch.
"""

from __future__ import annotations

from pathlib import Path
import math
from typing import Dict, List, Optional

import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from datasets.bigearthnet import MAX_CHIP_SIZE
from datasets.builders import FORMATS, build_bigearthnet
from models.moe_mae import MOEMAE
from utils.checkpoint import load_pretrained_and_hour
from utils.config import (Field, model_fields, non_negative, positive, seed_range,
                          unit_interval_open, validate)
from utils.data_config import BigEarthNetInfo
from utils.data_utils import rgb_bands, save_figure, stretch, stretch_limits, unnormalize
from utils.errors import UserInputError
from utils.runtime import select_device

# configs/eval_moe_mae.yaml: the published keys, and this project's with their defaults
SCHEMA = {
    "model": model_fields(checkpoint_path=Field("path", must_exist="file"),
                          device=Field("str", "auto")),
    "data": {
        "dataset_path": Field("path", must_exist="dir", help="BEN-L root, or a packed dir"),
        "dataset_csv": Field("path", None, nullable=True, must_exist="file"),
        "num_workers": Field("int", 4, check=non_negative),
        "batch_size": Field("int", 32, check=positive),
        "dataset_format": Field("str", "auto", choices=FORMATS),
        "legacy_hour": Field("bool", None, nullable=True,
                             help="the published first-digit hour; null: the checkpoint's"),
        "skip_invalid": Field("bool", False),
        "max_chip_size": Field("int", MAX_CHIP_SIZE, check=positive),
    },
    "eval": {
        "save_reconstructions_masked": Field("bool", True),
        "save_reconstructions_full": Field("bool", True),
        "reconstructions_dir": Field("path"),
        "max_images": Field("int", 8, check=non_negative),
        "metrics_json": Field("path", None, nullable=True),
        "seed": Field("int", 0, check=seed_range, help="masking noise"),
        "mask_ratio": Field("float", 0.75, check=unit_interval_open),
        "loss_unmasked_weight": Field("float", 0.1, check=non_negative),
        "loss_moe_weight": Field("float", 0.5, check=non_negative),
    },
}


class MAEEvaluator:
    """Evaluate ``config["model"]["checkpoint_path"]`` on ``config["data"]``'s split.

    ``config`` holds the sections of configs/eval_moe_mae.yaml: a raw dict as the published
    code passes it (only the published keys) is validated and completed with the defaults of
    ``SCHEMA``; ``self.config`` is the result, with ``data.legacy_hour`` resolved from the
    checkpoint (see utils.checkpoint.resolve_legacy_hour). ``transform`` defaults to the BEN-L
    transform (centre crop, z-score); ``device`` overrides ``model.device``.
    """

    def __init__(self, config: dict, transform=None, device: Optional[torch.device] = None):
        self.config = config = validate(config, SCHEMA, source="MAEEvaluator config")
        model_cfg, data_cfg = config["model"], config["data"]
        self.device = torch.device(device) if device is not None else \
            select_device(model_cfg["device"], key="model.device")
        self.model: MOEMAE
        self.model, data_cfg["legacy_hour"] = load_pretrained_and_hour(
            model_cfg, data_cfg["legacy_hour"], self.device)
        self.dataset = build_bigearthnet(
            data_cfg["dataset_path"], data_cfg["dataset_csv"], data_cfg["dataset_format"],
            img_size=model_cfg["img_size"], legacy_hour=data_cfg["legacy_hour"],
            skip_invalid=data_cfg["skip_invalid"],
            max_chip_size=data_cfg["max_chip_size"])
        if transform is not None:
            self.dataset.transform = transform
        # a private generator: iterating a DataLoader draws a seed from its generator, which
        # would otherwise be the global one
        self.loader = DataLoader(self.dataset, batch_size=data_cfg["batch_size"],
                                 num_workers=data_cfg["num_workers"], shuffle=False,
                                 generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def run(self) -> Dict[str, object]:
        """Metrics over the whole split; saves figures if the config asks for them."""
        eval_cfg = self.config["eval"]
        mae, device = self.model, self.device
        generator = torch.Generator().manual_seed(eval_cfg["seed"])
        bands = len(BigEarthNetInfo.BAND_NAMES)
        sums = {"masked": 0.0, "unmasked": 0.0, "moe": 0.0, "full": 0.0, "baseline": 0.0}
        sq_dn = {"masked": torch.zeros(bands, dtype=torch.float64),
                 "full": torch.zeros(bands, dtype=torch.float64)}
        count_dn = {"masked": torch.zeros(bands, dtype=torch.float64),
                    "full": torch.zeros(bands, dtype=torch.float64)}
        samples, figures = 0, []
        for imgs, _, *meta in self.loader:
            imgs, meta = imgs.to(device), [m.to(device) for m in meta]
            n = imgs.shape[0]
            noise = torch.rand(n, mae.encoder.num_patches, generator=generator).to(device)
            pred, mask, _, moe = mae(imgs, *meta, mask_ratio=eval_cfg["mask_ratio"], noise=noise)
            masked, unmasked = mae.reconstruction_losses(imgs, pred, mask)
            pred_full = mae(imgs, *meta, mask_ratio=0.0)[0]
            sums["masked"] += masked.item() * n
            sums["unmasked"] += unmasked.item() * n
            sums["moe"] += moe.item() * n
            sums["full"] += (pred_full - mae.patchify(imgs)).pow(2).mean().item() * n
            sums["baseline"] += mean_patch_baseline(mae.patchify(imgs), mask).item() * n
            samples += n

            original = self._to_dn(imgs)
            recon = self._to_dn(mae.unpatchify(pred))
            recon_full = self._to_dn(mae.unpatchify(pred_full))
            pixel_mask = self._pixel_mask(mask, imgs)  # 1 where the patch was masked
            sq_dn["masked"] += ((recon - original) ** 2 * pixel_mask).sum((0, 2, 3)).double()
            count_dn["masked"] += pixel_mask.expand_as(original).sum((0, 2, 3)).double()
            sq_dn["full"] += ((recon_full - original) ** 2).sum((0, 2, 3)).double()
            count_dn["full"] += original[:, 0].numel()
            for i in range(n):
                if len(figures) < eval_cfg["max_images"]:
                    figures.append((original[i], pixel_mask[i], recon[i], recon_full[i],
                                    self.dataset_id(samples - n + i)))

        metrics = {f"{k}_loss": v / samples for k, v in sums.items()
                   if k not in ("full", "baseline")}
        metrics["mean_patch_baseline_loss"] = sums["baseline"] / samples
        w_unmasked = eval_cfg["loss_unmasked_weight"]
        w_moe = eval_cfg["loss_moe_weight"]
        metrics["total_loss"] = (metrics["masked_loss"] + w_unmasked * metrics["unmasked_loss"]
                                 + w_moe * metrics["moe_loss"])
        metrics["full_loss"] = sums["full"] / samples
        for kind in ("masked", "full"):
            rmse = (sq_dn[kind] / count_dn[kind].clamp(min=1)).sqrt()
            metrics[f"rmse_{kind}_dn"] = dict(zip(BigEarthNetInfo.BAND_NAMES, rmse.tolist()))
        metrics["num_samples"] = samples
        self._check_finite(metrics)
        metrics["figures"] = self._save_figures(figures)
        return metrics

    def _check_finite(self, metrics: Dict[str, object]) -> None:
        """Non-finite numbers (the model overflows on this data) are an error naming the
        checkpoint, before anything is written."""
        values = {}
        for key, value in metrics.items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            values.update({f"{key}.{sub}" if sub else key: v for sub, v in items})
        bad = [key for key, value in values.items()
               if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise UserInputError(f"{self.config['model']['checkpoint_path']}: the evaluation "
                                 f"gives non-finite {', '.join(bad[:4])}"
                                 f"{', ...' if len(bad) > 4 else ''}; nothing was written")

    def dataset_id(self, index: int) -> str:
        ids = getattr(self.dataset, "patch_ids", None)
        return ids[index] if ids is not None else str(index)

    @staticmethod
    def _to_dn(normalised: torch.Tensor) -> torch.Tensor:
        stats = BigEarthNetInfo.STATISTICS
        return unnormalize(normalised.float().cpu(), stats["mean"], stats["std"])

    def _pixel_mask(self, mask: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) pixel mask."""
        p, grid = self.model.encoder.patch_size, self.model.encoder.patch_grid
        mask = mask.float().cpu().view(-1, 1, grid, grid)
        return mask.repeat_interleave(p, 2).repeat_interleave(p, 3)

    def _save_figures(self, figures) -> List[str]:
        eval_cfg = self.config["eval"]
        out_dir = Path(eval_cfg["reconstructions_dir"])
        saved = []
        for index, (original, pixel_mask, recon, recon_full, patch_id) in enumerate(figures):
            if eval_cfg["save_reconstructions_masked"]:
                pasted = recon * pixel_mask + original * (1 - pixel_mask)
                masked_input = original * (1 - pixel_mask)
                panels = [("original", original), ("masked input", masked_input),
                          ("reconstruction", recon), ("visible patches pasted", pasted)]
                saved.append(save_panels(out_dir / f"result_masked_{index:03d}.png", panels,
                                         patch_id, masked=pixel_mask))
            if eval_cfg["save_reconstructions_full"]:
                panels = [("original", original), ("full reconstruction", recon_full)]
                saved.append(save_panels(out_dir / f"result_full_{index:03d}.png", panels,
                                         patch_id))
        return saved


def mean_patch_baseline(patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked loss of predicting each masked patch by the mean of its chip's visible patches.

    ``patches``: (B, N, p*p*C) normalised target patches (``MOEMAE.patchify``); ``mask``:
    (B, N), 1 where a patch is masked. The prediction for every masked patch of chip b is
    the (p*p*C,) mean over chip b's visible patches; the score is the one of
    ``MOEMAE.reconstruction_losses``: squared error summed over a patch's values, averaged
    over the masked patches of the batch. Returns a 0-d tensor.
    """
    patches, mask = patches.float(), mask.float()
    visible = (1 - mask).unsqueeze(-1)
    mean_patch = ((patches * visible).sum(1, keepdim=True)
                  / visible.sum(1, keepdim=True).clamp(min=1))
    per_patch = (patches - mean_patch).pow(2).sum(-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def save_panels(path: Path, panels, title: str, masked: Optional[torch.Tensor] = None) -> str:
    """One row of RGB panels sharing the original's 2-98 percentile stretch; masked patches
    are shown grey in the masked input."""
    limits = stretch_limits(rgb_bands(panels[0][1]))
    figure = Figure(figsize=(2.6 * len(panels), 2.9))
    for position, (name, image) in enumerate(panels, start=1):
        shown = stretch(rgb_bands(image), limits)
        if name == "masked input" and masked is not None:
            shown[masked[0].numpy() > 0] = 0.5
        axis = figure.add_subplot(1, len(panels), position)
        axis.imshow(shown, interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    figure.suptitle(title, fontsize=8)
    save_figure(figure, path)
    return str(path)
