"""Throughput of the fast path against the reference (published) computation, same weights.

    python benchmarks/bench_model.py [--rounds 3] [--quick] [--json out.json] [--baseline DIR]
    python benchmarks/bench_model.py --device cuda [--json out.json]

``--device cuda`` (see :func:`device_sweep`): training images/s at batch 128, 512 and 2048 and
inference images/s, eager and ``torch.compile``-d, the fast path (``torch`` backend: SDPA,
fixed-shape expert matmuls) against the reference, in one process on one GPU. The rest of
this docstring describes the CPU method (the default).

Model S, 40x40x7 chips, patch 4, fp32, on whatever device this runs (CPU here):

* training: MAE forward + loss + backward + gradient clipping + AdamW step, batch 64;
* inference: encoder in ``eval()`` under ``inference_mode``, batch 256 (the fast path through
  ``forward_features``, the project's inference entry point, which runs CPU batches in chunks
  of 128 images; the oracle through the published ``encoder(x, ...)`` call). Two extra rows
  separate the effect of chunking: the fast path in one chunk of 256, and the oracle fed
  chunks of 128.

The fast path uses the native CPU kernels of ``models/native.py`` where they build; the rows
"PyTorch ops only" show it without them (the ``torch`` backend of ``models/ops``, as on a
machine without a C++ compiler); the oracle is the ``reference`` backend.

Every workload (implementation x training/inference) runs in its own fresh process, on the
same weights and the same rotating set of input batches (routing varies between batches, as
with real data); a process times its calls after two untimed ones (steady state). Processes
alternate over ``--rounds`` rounds, the fast path and the oracle back to back, and we report
medians over all rounds (and each round's ratio), so a noisy neighbour slows all workloads
alike, and no implementation inherits another's freed memory or cache contents.

``--baseline DIR`` also measures an earlier version of this repository checked out in DIR
(``git worktree add DIR <commit>``) with that version's own ``--worker`` processes, in the same
rounds, each workload's two versions back to back, and prints both versions' images/s and
fast / oracle ratios. The ratio depends on the host (its matmul throughput above all, see the
README), so "not slower than version X" is a statement about two versions measured together on
one host, not about numbers measured on different hosts.

Achieved GFLOP/s use the model's useful FLOPs (attention, a top-2 MoE with V and W2 once per
token: :func:`model_flops`), not the extra work either implementation does, against the best
fp32 matmul throughput measured here (MKL through ``torch.mm``, and oneDNN).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import native, ops  # noqa: E402
from models.moe_mae import MAEObjective, MOEEncoder, build_mae  # noqa: E402
from models.ops.linear import matmul_nt, onednn_available  # noqa: E402
from utils.errors import fail, run_cli  # noqa: E402
from utils.files import write_text  # noqa: E402

# the backend of each implementation (models/ops)
BACKEND = {"fast": "auto", "fast_torch_ops": "torch", "oracle": "reference"}


def model_flops(encoder: MOEEncoder, tokens: int, decoder_tokens: int = 0, decoder=None):
    """Useful forward FLOPs for one image: ``tokens`` tokens through the encoder, plus
    ``decoder_tokens`` through the MAE decoder when given."""

    def layer_flops(layer, n):
        attn, moe = layer.attn, layer.moe
        m, kv = attn.dim, attn.num_groups * attn.head_dim
        projections = 2 * n * (2 * m * m + 2 * m * kv)
        attention = 2 * 2 * n * n * m  # scores and weighted sum over all heads
        gate = 2 * n * m * 2 * moe.num_experts
        experts = 2 * n * (moe.k * m * moe.hidden + 2 * m * moe.hidden)  # k W_e, V, W2
        return projections + attention + gate + experts

    flops = 2 * encoder.num_patches * encoder.in_chans * encoder.patch_size ** 2 \
        * encoder.embed_dim  # patch embedding of every patch, as published
    flops += sum(layer_flops(layer, tokens) for layer in encoder.layers)
    if decoder is not None:
        dim = decoder.decoder_embed.out_features
        flops += 2 * tokens * encoder.embed_dim * dim
        flops += sum(layer_flops(layer, decoder_tokens) for layer in decoder.decoder_layers)
        flops += 2 * encoder.num_patches * dim * decoder.decoder_pred.out_features
    return flops


def matmul_peak(n: int = 2048, reps: int = 10):
    """Best fp32 GFLOP/s of an n x n matmul through torch.mm (MKL on CPU) and oneDNN."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    results = {}
    candidates = {"torch.mm": lambda: a @ b}
    if onednn_available():
        candidates["oneDNN"] = lambda: matmul_nt(a, b)
    for name, fn in candidates.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = 2 * n ** 3 / min(times) / 1e9
    return results


def make_batches(n: int, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 7, 40, 40, generator=g),
             [torch.randn(n, 2, generator=g) for _ in range(4)]) for _ in range(count)]


# name: (training?, implementation, chunk size of inference). Each round runs them in this
# order: the fast path and the oracle back to back, so the two sides of each ratio see the
# same background load.
WORKLOADS = {
    "train_fast": (True, "fast", None),
    "train_oracle": (True, "oracle", None),
    "train_fast_torch_ops": (True, "fast_torch_ops", None),
    "infer_fast": (False, "fast", None),
    "infer_oracle": (False, "oracle", 256),
    "infer_fast_torch_ops": (False, "fast_torch_ops", None),
    "infer_fast_unchunked": (False, "fast", 256),
    "infer_oracle_chunked": (False, "oracle", 128),
}
KINDS = {"training": "train", "inference": "infer"}  # the two ratios: name, workload prefix


def measure(workload: str, calls: int) -> list:
    """Seconds of ``calls`` timed calls of one workload, after two untimed ones, in this
    process (the model, its weights and the batches are the same in every process)."""
    training, implementation, chunk_size = WORKLOADS[workload]
    torch.manual_seed(0)
    mae = build_mae("S").train(training)
    batches = make_batches(64, 4, seed=1) if training else make_batches(256, 3, seed=2)
    if training:
        optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4, weight_decay=0.05,
                                      fused=onednn_available() or None)

        def call(imgs, meta):
            pred, mask, _, moe_loss = mae(imgs, *meta)
            loss_masked, loss_unmasked = mae.reconstruction_losses(imgs, pred, mask)
            loss = loss_masked + 0.1 * loss_unmasked + 0.5 * moe_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
            optimizer.step()
    elif implementation.startswith("fast"):
        def call(imgs, meta):
            mae.encoder.forward_features(imgs, *meta, chunk_size=chunk_size)
    else:
        def call(imgs, meta):
            for start in range(0, len(imgs), chunk_size):
                part = slice(start, start + chunk_size)
                mae.encoder(imgs[part], *(m[part] for m in meta))

    times = []
    with torch.inference_mode(not training), ops.use_backend(mae, BACKEND[implementation]):
        for i in range(calls + 2):
            start = time.perf_counter()
            call(*batches[i % len(batches)])
            if i >= 2:
                times.append(time.perf_counter() - start)
    return times


def device_sweep(device: str, batches=(128, 512, 2048), infer_batch: int = 2048,
                 calls: int = 5, compiled=(False, True)):
    """Images/s on ``device`` (synchronised timing, after two untimed calls) for every
    (training batch or inference, backend, eager or compiled); returns rows of
    (workload, backend, mode, images/s or an error line)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for backend in ("torch", "reference"):
        for use_compile in compiled:
            mode = "compiled" if use_compile else "eager"
            for batch in (*batches, None):
                training = batch is not None
                n = batch if training else infer_batch
                torch.manual_seed(0)
                mae = ops.set_backend(build_mae("S").to(device).train(training), backend)
                objective = MAEObjective(mae)
                encoder = mae.encoder
                if use_compile:
                    objective, encoder = torch.compile(objective), torch.compile(encoder)
                optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4, weight_decay=0.05)
                g = torch.Generator(device=device).manual_seed(1)
                imgs = torch.randn(n, 7, 40, 40, generator=g, device=device)
                meta = [torch.randn(n, 2, generator=g, device=device) for _ in range(4)]

                def call():
                    if training:
                        loss = objective(imgs, *meta)["loss"]
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    else:
                        with torch.inference_mode():
                            encoder(imgs, *meta)
                workload = f"training, batch {n}" if training else f"inference, batch {n}"
                try:
                    for _ in range(2):
                        call()
                    sync()
                    start = time.perf_counter()
                    for _ in range(calls):
                        call()
                    sync()
                    rows.append((workload, backend, mode, n * calls / (time.perf_counter() - start)))
                except (RuntimeError, torch.OutOfMemoryError) as error:  # report, keep going
                    rows.append((workload, backend, mode, str(error).splitlines()[0][:80]))
                del mae, objective, encoder, optimizer
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def print_sweep(device: str, rows) -> None:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"MoE-MAE S, fp32, {name}, torch {torch.__version__}")
    print()
    print("| workload | backend | mode | images/s |")
    print("|---|---|---|---:|")
    for workload, backend, mode, value in rows:
        shown = f"{value:.0f}" if isinstance(value, float) else value
        print(f"| {workload} | {backend} | {mode} | {shown} |")
    speed = {(w, b, m): v for w, b, m, v in rows if isinstance(v, float)}
    for (w, b, m), v in speed.items():
        if b == "torch" and (w, "reference", m) in speed:
            print(f"fast / reference, {w}, {m}: {v / speed[(w, 'reference', m)]:.2f}x")


def run_worker(script: Path, workload: str, calls: int) -> list:
    """Seconds of one workload measured in a fresh process by ``script`` (this file or a
    baseline's), run from its checkout. A baseline whose worker fails is bad input (one line);
    this file's worker failing is a bug (its traceback)."""
    result = subprocess.run([sys.executable, str(script), "--worker", workload, "--calls",
                             str(calls)], capture_output=True, text=True, cwd=script.parents[1])
    try:
        if result.returncode == 0:
            return json.loads(result.stdout.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pass
    if script == Path(__file__).resolve():
        raise RuntimeError(f"--worker {workload} failed:\n{result.stderr}")
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    fail(f"--baseline {script.parents[1]}: its worker for {workload} failed: {last}")


def baseline_script(checkout: Path) -> Path:
    """The bench_model.py of another checkout (an earlier version of this repository), whose
    ``--worker`` processes measure that version's code. UserInputError if there is none."""
    script = checkout.resolve() / "benchmarks" / "bench_model.py"
    if not script.is_file():
        fail(f"--baseline {checkout}: no benchmarks/bench_model.py there")
    return script


def print_against_baseline(checkout: Path, speeds, round_ratios) -> None:
    """Images/s of every workload in this version and the baseline, and both fast / oracle
    ratios (medians over the rounds, and per round)."""
    this, base = speeds["this version"], speeds["baseline"]
    print()
    print(f"against the baseline {checkout} (its own bench_model.py workers, run in the same "
          "rounds, each workload's two versions back to back):")
    print()
    print("| workload | this version, images/s | baseline, images/s | this / baseline |")
    print("|---|---:|---:|---:|")
    for name in WORKLOADS:
        print(f"| {name} | {this[name]:.0f} | {base[name]:.0f} | {this[name] / base[name]:.2f}x |")
    print()
    for kind, prefix in KINDS.items():
        for version in ("this version", "baseline"):
            s, per_round = speeds[version], round_ratios[version][kind]
            print(f"fast / oracle, {kind}, {version}: "
                  f"{s[f'{prefix}_fast'] / s[f'{prefix}_oracle']:.2f}x (per round "
                  + ", ".join(f"{v:.2f}x" for v in per_round) + ")")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="processes per workload, run in alternation")
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="also measure this checkout of an earlier version (e.g. made with "
                             "git worktree add), in the same rounds (CPU method only)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (the multi-process CPU method) or cuda[:i] (device_sweep)")
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one measurement in this fresh process
        print(json.dumps(measure(args.worker, args.calls)))
        return

    if args.device != "cpu":
        if args.baseline:
            fail("--baseline: only with the CPU method (--device cpu)")
        rows = device_sweep(args.device, calls=2 if args.quick else 5)
        print_sweep(args.device, rows)
        if args.json:
            write_text(args.json, json.dumps([list(r) for r in rows], indent=2))
        return

    rounds = 1 if args.quick else args.rounds
    scripts = {"this version": Path(__file__).resolve()}
    if args.baseline:
        scripts["baseline"] = baseline_script(args.baseline)
    seconds = {version: {name: [] for name in WORKLOADS} for version in scripts}
    round_ratios = {version: {kind: [] for kind in KINDS} for version in scripts}
    for _ in range(rounds):
        this_round = {version: {} for version in scripts}
        for name, (training, _, _) in WORKLOADS.items():
            calls = (2 if args.quick else 8) if training else (1 if args.quick else 3)
            for version, script in scripts.items():  # the versions back to back
                this_round[version][name] = run_worker(script, name, calls)
                seconds[version][name] += this_round[version][name]
        for version, measured in this_round.items():
            for kind, prefix in KINDS.items():
                oracle, fast = (statistics.median(measured[f"{prefix}_{impl}"])
                                for impl in ("oracle", "fast"))
                round_ratios[version][kind].append(oracle / fast)
    speeds = {version: {name: (64 if WORKLOADS[name][0] else 256) / statistics.median(values)
                        for name, values in per_workload.items()}
              for version, per_workload in seconds.items()}
    speed = speeds["this version"]

    peaks = matmul_peak()
    peak = max(peaks.values())
    mae = build_mae("S")
    encoder = mae.encoder
    train_flops = 3 * model_flops(encoder, 5 + 25, 5 + 100, mae)  # forward + 2x backward
    infer_flops = model_flops(encoder, encoder.num_tokens)
    rows = [
        ("training, batch 64", "fast path", speed["train_fast"], train_flops),
        ("training, batch 64", "fast path, PyTorch ops only", speed["train_fast_torch_ops"],
         train_flops),
        ("training, batch 64", "oracle", speed["train_oracle"], train_flops),
        ("inference, batch 256", "fast path", speed["infer_fast"], infer_flops),
        ("inference, batch 256", "fast path, PyTorch ops only", speed["infer_fast_torch_ops"],
         infer_flops),
        ("inference, batch 256", "fast path, one chunk of 256", speed["infer_fast_unchunked"],
         infer_flops),
        ("inference, batch 256", "oracle", speed["infer_oracle"], infer_flops),
        ("inference, batch 256", "oracle, in chunks of 128", speed["infer_oracle_chunked"],
         infer_flops),
    ]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"MoE-MAE S, fp32, {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; medians over {rounds} process(es) per workload")
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print()
    print("| workload | implementation | images/s | GFLOP/s | % of peak |")
    print("|---|---|---:|---:|---:|")
    for workload, impl, ips, flops in rows:
        gflops = ips * flops / 1e9
        print(f"| {workload} | {impl} | {ips:.0f} | {gflops:.0f} | {100 * gflops / peak:.0f}% |")
    if native.library() is None:
        print(f"note: {native.status()}; the fast path ran on PyTorch ops only")
    ratios = {"training": speed["train_fast"] / speed["train_oracle"],
              "training_torch_ops": speed["train_fast_torch_ops"] / speed["train_oracle"],
              "inference_torch_ops": speed["infer_fast_torch_ops"] / speed["infer_oracle"],
              "inference": speed["infer_fast"] / speed["infer_oracle"],
              "inference_unchunked": speed["infer_fast_unchunked"] / speed["infer_oracle"],
              "inference_both_chunked": speed["infer_fast"] / speed["infer_oracle_chunked"]}
    print()
    print(f"fast / oracle: training {ratios['training']:.2f}x, inference "
          f"{ratios['inference']:.2f}x (fast path in one chunk: "
          f"{ratios['inference_unchunked']:.2f}x; both in chunks of 128: "
          f"{ratios['inference_both_chunked']:.2f}x)")
    print(f"fast path on PyTorch ops only / oracle: training {ratios['training_torch_ops']:.2f}x,"
          f" inference {ratios['inference_torch_ops']:.2f}x")
    for kind, values in round_ratios["this version"].items():
        print(f"fast / oracle per round ({kind}): " + ", ".join(f"{v:.2f}x" for v in values))
    if args.baseline:
        print_against_baseline(args.baseline, speeds, round_ratios)
    if args.json:
        write_text(args.json, json.dumps({"images_per_second": speeds, "seconds": seconds,
                                          "ratios": ratios, "round_ratios": round_ratios,
                                          "matmul_peak_gflops": peaks}, indent=2))


if __name__ == "__main__":
    run_cli(main)
