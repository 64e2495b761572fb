"""Does the pretraining loop keep the model busy? The full loop against the bare model step.

    python benchmarks/bench_train_loop.py [--images 4096] [--epochs 3] [--workers 4]

1. Packs the BEN-L sample (``../shared/data/bigearthnet_l_sample`` when present, else
   ``sample_dataset``'s train split) with ``datasets.pack`` and repeats it to ``--images`` chips,
   so that per-epoch work (CSV rows, the loss figure, three checkpoint files) is spread over an
   epoch of realistic length; on the real 269,695-chip split it weighs far less still.
2. Bare step: the training step of ``bench_model.py`` (model S, fp32, batch 64: forward, loss,
   backward, clipping, AdamW) on batches already in memory.
3. Full loop: ``pretrain_mae.py``'s ``main`` on the packed copy (model S, batch 64, the default
   4 DataLoader workers). Images/s = images trained / wall time of ``main``: data loading,
   progress, CSVs, figure and checkpoint writes included.

Prints both throughputs and their ratio (target: the loop reaches >= 80% of the bare step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pretrain_mae  # noqa: E402
from datasets.pack import IMAGES_FILE, INFO_FILE, METADATA_FILE, pack_split  # noqa: E402
from models.moe_mae import MAEObjective, build_mae  # noqa: E402

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "bigearthnet_l_sample"


def packed_sample(folder: Path, images: int) -> Path:
    """Pack the sample, then repeat its chips to ``images`` (writing a second packed dir)."""
    if SHARED_SAMPLE.is_dir():
        source = pack_split(SHARED_SAMPLE / "samples.csv", SHARED_SAMPLE, folder / "sample",
                            skip_invalid=True)
    else:
        sample = REPO / "sample_dataset"
        source = pack_split(sample / "bigearthnet-train.csv", sample, folder / "sample")
    source = Path(source or folder / "sample")
    chips = np.load(source / IMAGES_FILE, mmap_mode="r")
    repeats = -(-images // len(chips))
    target = folder / "repeated"
    target.mkdir()
    np.save(target / IMAGES_FILE, np.concatenate([chips] * repeats)[:images])
    with np.load(source / METADATA_FILE) as metadata:
        np.savez(target / METADATA_FILE, **{k: np.concatenate([metadata[k]] * repeats)[:images]
                                             for k in metadata.files})
    info = json.loads((source / INFO_FILE).read_text())
    info["count"] = images
    (target / INFO_FILE).write_text(json.dumps(info))
    return target


def bare_step_images_per_second(batch_size: int, steps: int = 12) -> float:
    torch.manual_seed(0)
    objective = MAEObjective(build_mae("S")).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-4, weight_decay=0.05, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 7, 40, 40, generator=g),
                [torch.randn(batch_size, 2, generator=g) for _ in range(4)]) for _ in range(4)]
    times = []
    for step in range(steps + 2):
        imgs, meta = batches[step % 4]
        start = time.perf_counter()
        loss = objective(imgs, *meta)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        if step >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        packed = packed_sample(folder, args.images)
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"size": "S"},
            "training": {"dataset_path": str(packed), "epochs": args.epochs,
                         "batch_size": args.batch_size, "num_workers": args.workers,
                         "weight_path": str(folder / "run"), "save_every_n_epochs": 1,
                         "device": "cpu"}}))
        bare = bare_step_images_per_second(args.batch_size)
        start = time.perf_counter()
        pretrain_mae.main(["--config_yaml", str(config)])
        loop = args.images * args.epochs / (time.perf_counter() - start)

    print(f"\nMoE-MAE S, fp32, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.workers} workers, {args.epochs} epochs of {args.images} packed chips")
    print("| measurement | images/s |")
    print("|---|---:|")
    print(f"| bare training step (bench_model) | {bare:.0f} |")
    print(f"| full pretraining loop (pretrain_mae.py) | {loop:.0f} |")
    print(f"\nloop / bare step: {loop / bare:.0%} (target >= 80%)")


if __name__ == "__main__":
    main()
