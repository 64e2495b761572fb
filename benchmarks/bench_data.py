"""Samples per second of the BEN-L loaders: GeoTIFFs (raw) versus the packed memory map.

    python benchmarks/bench_data.py [--root DIR] [--csv CSV] [--repeats N] [--siblings N]

Uses ``../shared/data/bigearthnet_l_sample`` (the real tiles) when present, else the bundled
``sample_dataset``; packs the split into a temporary folder first. Everything runs in one
process with the model's transform ``Compose([ToFloat(), CenterCrop(40), ZScoreNormalize(...)])``.
Rows:

* one rasterio open + read per sample: the floor of a loader that opens each GeoTIFF once;
* raw loader, first epoch: ``BigEarthNetDatasetLS``, also reprojecting each chip's centre;
* raw loader, later epochs: latitude/longitude come from its per-patch cache;
* packed loader: ``PackedBigEarthNetDataset``.

``--siblings N`` runs on a copy of the split whose ``images/`` folder also holds N empty files,
as the full dataset's folders hold 270k chips (GDAL lists the folder on every plain open).

Each row is the best of ``--repeats`` rounds (interleaved, so that a busy machine slows the rows
alike); a round times passes over the split for at least 0.2 s and keeps the fastest pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script, from any folder

import rasterio  # noqa: E402
import torch  # noqa: E402

from datasets.bigearthnet import BigEarthNetDatasetLS  # noqa: E402
from datasets.pack import PackedBigEarthNetDataset, pack_split  # noqa: E402
from transformation.transformer import CenterCrop, Compose, ToFloat, ZScoreNormalize  # noqa: E402
from utils.data_config import BigEarthNetInfo  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402

REAL_SAMPLE = REPO.parent / "shared" / "data" / "bigearthnet_l_sample"
SAMPLE_DATASET = REPO / "sample_dataset"
TARGET_RATIO = 50
MIN_ROUND_SECONDS = 0.2


def epoch_seconds(dataset, count: int) -> float:
    """Seconds to get every item of ``dataset`` once."""
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return time.perf_counter() - start


def fastest_pass(one_pass: Callable[[], float]) -> float:
    """The fastest of the passes (each returning its seconds) made within MIN_ROUND_SECONDS."""
    times = []
    while sum(times) < MIN_ROUND_SECONDS:
        times.append(one_pass())
    return min(times)


def copy_with_siblings(csv_file: Path, root: Path, siblings: int, tmp: Path) -> Path:
    """A copy of the chips and labels under ``tmp``, with ``siblings`` empty files in images/."""
    copy = tmp / "root"
    (copy / "images").mkdir(parents=True)
    (copy / "labels").mkdir()
    for name in (root / "images").iterdir():
        shutil.copyfile(name, copy / "images" / name.name)
    for name in (root / "labels").iterdir():
        shutil.copyfile(name, copy / "labels" / name.name)
    for i in range(siblings):
        (copy / "images" / f"other_{i:07d}.tif").touch()
    shutil.copyfile(csv_file, copy / csv_file.name)
    return copy


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="BEN-L root (default: the real sample if present, "
                                       "else sample_dataset)")
    parser.add_argument("--csv", help="split CSV (default: ROOT/samples.csv)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per loader; the best counts")
    parser.add_argument("--siblings", type=int, default=0, help="empty files added to images/")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.siblings < 0:
        raise UserInputError(f"--repeats must be >= 1 and --siblings >= 0, got {args.repeats} "
                             f"and {args.siblings}")
    root = Path(args.root) if args.root else (REAL_SAMPLE if (REAL_SAMPLE / "samples.csv").is_file()
                                              else SAMPLE_DATASET)
    csv_file = Path(args.csv) if args.csv else root / "samples.csv"
    statistics = BigEarthNetInfo.STATISTICS
    transform = Compose([ToFloat(), CenterCrop(40),
                         ZScoreNormalize(statistics["mean"], statistics["std"])])

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real sample has one patch without labels: skipped
        if args.siblings:
            root = copy_with_siblings(csv_file, root, args.siblings, Path(tmp))
            csv_file = root / csv_file.name
        make_raw = lambda: BigEarthNetDatasetLS(csv_file, root, transform=transform,
                                                skip_invalid=True)
        raw = make_raw()
        count = len(raw)
        paths = [raw.image_path(patch) for patch in raw.patch_ids]
        packed_dir = pack_split(csv_file, root, Path(tmp) / "packed", skip_invalid=True,
                                progress=False)
        packed = PackedBigEarthNetDataset(packed_dir, transform=transform)

        def floor() -> float:
            start = time.perf_counter()
            for path in paths:
                with rasterio.open(path) as src:
                    src.read()
            return time.perf_counter() - start

        passes = {"floor": floor,
                  "raw_first": lambda: epoch_seconds(make_raw(), count),  # empty cache
                  "raw_later": lambda: epoch_seconds(raw, count),
                  "packed": lambda: epoch_seconds(packed, count)}
        epoch_seconds(raw, count)  # fill its cache
        best = {name: [] for name in passes}
        for _ in range(args.repeats):
            for name, one_pass in passes.items():
                best[name].append(fastest_pass(one_pass))
    rate = {name: count / min(times) for name, times in best.items()}

    siblings = f", images/ holding {args.siblings:,} other files" if args.siblings else ""
    print(f"data: {root} ({count} patches from {csv_file.name}{siblings}); single process, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, rasterio {rasterio.__version__}, "
          f"best of {args.repeats}\n")
    print("| loader | samples/s | µs/sample |")
    print("|---|---:|---:|")
    rows = [("one rasterio open + read per sample (floor)", "floor"),
            ("raw loader, first epoch (reprojects)", "raw_first"),
            ("raw loader, later epochs (cached lat/lon)", "raw_later"),
            ("packed loader", "packed")]
    for label, name in rows:
        print(f"| {label} | {rate[name]:,.0f} | {1e6 / rate[name]:,.1f} |")
    ratio = rate["packed"] / rate["raw_later"]
    print(f"\npacked / raw: {ratio:.0f}x (target >= {TARGET_RATIO}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); "
          f"raw / floor: {rate['raw_later'] / rate['floor']:.2f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
