"""Scene mapping speed and memory: map_scene.py against the bare encoder on the same chips, and
the peak RSS of mapping a 7,000 x 7,000 scene.

    flock /tmp/bench.lock python benchmarks/bench_scene.py [--size S] [--side 7000]

1. chips/s: a synthetic scene is mapped by map_scene.py in a new process (reading, fill/QA
   checks, metadata, encoder, writing); the bare encoder then embeds exactly the chips it
   mapped, already normalised and in memory, in batches of the same size. The ratio is the
   tool's share of the encoder's speed (goal >= 80%).
2. peak RSS: map_scene.py on a ``--side`` x ``--side`` 7-band scene (stride ``--rss-stride``)
   in a new process, ``ru_maxrss``; the scene's pixels are printed beside it.
Random weights (speed does not depend on them). Runs on the CPU here; on a GPU machine the tool
batches on the GPU (model.device auto), not measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets.builders import bigearthnet_transform  # noqa: E402
from datasets.landsat_scene import open_scene  # noqa: E402
from models.moe_mae import build_mae  # noqa: E402
from sample_dataset.generate_scene import generate_scene  # noqa: E402
from utils.runtime import run_script_with_peak_rss  # noqa: E402

def run_tool(scene: Path, out: Path, checkpoint: Path, size: str, stride: int,
             batch_size: int) -> tuple:
    """map_scene.py in a new process; (its record, its peak RSS in bytes)."""
    args = [str(REPO / "map_scene.py"), "--config_yaml", str(REPO / "configs/map_scene.yaml"),
            "--set", f"scene.path={scene}", "--set", f"output.dir={out}",
            "--set", f"model.checkpoint_path={checkpoint}", "--set", f"model.size={size}",
            "--set", f"scene.stride={stride}", "--set", f"embed.batch_size={batch_size}",
            "--set", "output.quicklook=false"]
    result, rss = run_script_with_peak_rss(args[0], args[1:], cwd=REPO)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return json.loads((out / "map_scene.json").read_text()), rss


def bare_encoder_rate(scene_dir: Path, record: dict, checkpoint: Path, size: str,
                      batch_size: int) -> float:
    """chips/s of encoder.embed alone on the chips the tool mapped (same batches)."""
    import rasterio

    scene = open_scene(scene_dir)
    with rasterio.open(record["outputs_dir"] / "embeddings.tif") as src:
        mapped = np.argwhere(~np.isnan(src.read(1)))
    stride = record["grid"]["stride"]
    transform = bigearthnet_transform(40)
    chips = torch.stack([transform(torch.from_numpy(
        scene.read(r * stride, c * stride, 40, 40).astype(np.int32))) for r, c in mapped])
    meta = torch.zeros(len(chips), 2)
    mae = build_mae(size)
    mae.load_state_dict(torch.load(checkpoint, weights_only=True)["model_state"])
    encoder = mae.encoder.eval()
    with torch.inference_mode():
        encoder.embed(chips[:batch_size], meta[:batch_size], meta[:batch_size],
                      meta[:batch_size], meta[:batch_size], pooling="cls", normed=False)
        start = time.perf_counter()
        for i in range(0, len(chips), batch_size):
            m = meta[i:i + batch_size]
            encoder.embed(chips[i:i + batch_size], m, m, m, m, pooling="cls", normed=False)
        return len(chips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="S", choices=("S", "XS", "XXS"))
    parser.add_argument("--speed-side", type=int, default=800, help="scene of the speed test")
    parser.add_argument("--side", type=int, default=7000, help="scene of the memory test")
    parser.add_argument("--rss-stride", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
          f"(not measured on a GPU), model {args.size}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "model.pth"
        torch.save({"model_state": build_mae(args.size).state_dict()}, checkpoint)

        speed_scene = tmp / "speed_scene"
        generate_scene(speed_scene, args.speed_side, args.speed_side)
        record, _ = run_tool(speed_scene, tmp / "speed_out", checkpoint, args.size, 40,
                             args.batch_size)
        record["outputs_dir"] = tmp / "speed_out"
        tool_rate = record["chips_per_second"]
        bare_rate = bare_encoder_rate(speed_scene, record, checkpoint, args.size,
                                      args.batch_size)
        print(f"speed: {args.speed_side}x{args.speed_side} scene, {record['counts']['mapped']} "
              f"chips mapped (stride 40): map_scene {tool_rate:.1f} chips/s, bare encoder "
              f"{bare_rate:.1f} chips/s -> {100 * tool_rate / bare_rate:.0f}% (goal >= 80%)")

        big = tmp / "big_scene"
        generate_scene(big, args.side, args.side, layout="stack", region_size=700)
        big_record, rss = run_tool(next(big.glob("*_SR.TIF")), tmp / "big_out", checkpoint,
                                   args.size, args.rss_stride, args.batch_size)
        pixels = args.side * args.side * 7 * 2
        print(f"memory: {args.side}x{args.side} scene ({pixels / 2**20:.0f} MiB of pixels), "
              f"stride {args.rss_stride}, {big_record['counts']['mapped']} chips mapped: peak "
              f"RSS {rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
