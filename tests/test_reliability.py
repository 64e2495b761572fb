"""Pretraining survives real crashes: bit-exact resume in a new process (single process and
torchrun), a crash-consistent checkpoint set, one run per folder, workers that stop with their
launcher, Ctrl-C and a full disk. Faults are real (SIGKILL, SIGINT, a small tmpfs) in separate
processes; tests/fault_runner.py injects them at exact points."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import pretrain_mae
from utils.files import FolderLock

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"
RUNNER = REPO / "tests" / "fault_runner.py"
SIZE = "XXS"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING_COLUMNS = {"seconds", "images_per_s"}  # the only columns allowed to differ
CHECKPOINTS = ("pretrained_XXS_best.pth", "pretrained_XXS_last.pth", "checkpoint_XXS.pth")


def write_config(folder: Path, chips: int = 8, epochs: int = 2, batch_size: int = 4,
                 **training) -> Path:
    """A tiny run: ``chips`` of the bundled sample, XXS, ``chips / batch_size`` steps."""
    folder.mkdir(parents=True, exist_ok=True)
    split = folder / "split.csv"
    split.write_text("".join((SAMPLE / "bigearthnet-train.csv").read_text()
                             .splitlines(keepends=True)[:chips]))
    config = {
        "model": {"size": SIZE, "img_size": 40, "patch_size": 4, "in_channels": 7},
        "training": {"dataset_path": str(SAMPLE), "dataset_csv": str(split), "epochs": epochs,
                     "batch_size": batch_size, "learning_rate": 0.002, "weight_decay": 0.05,
                     "weight_path": str(folder / "run"), "num_workers": 0,
                     "save_every_n_epochs": 1, "device": "cpu", **training},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pretrain(config: Path, *args, faults=(), torchrun: int = 0, timeout: int = 300):
    """pretrain_mae.py in a new process (through the fault runner when faults are given)."""
    script = [str(RUNNER), *faults, "--"] if faults else [str(REPO / "pretrain_mae.py")]
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={torchrun}"]
    return subprocess.run(launcher + script + ["--config_yaml", str(config), *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def read_rows(path: Path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                for row in csv.DictReader(f)]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tree(a, b, where=""):
    """Plain data with tensors: equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def assert_same_run(reference: Path, other: Path, checkpoints=CHECKPOINTS):
    """Same metrics and usage rows, same checkpoints (weights, optimizer, RNG states, ...)."""
    for name in (f"training_metrics_{SIZE}.csv", f"expert_usage_{SIZE}.csv"):
        assert read_rows(other / name) == read_rows(reference / name), name
    for name in checkpoints:
        expected, got = load(reference / name), load(other / name)
        expected["config"] = got["config"] = None  # the folders differ
        assert_same_tree(expected, got, name)


def assert_one_line_error(stderr: str, *fragments):
    """The failure is one ``error:`` line and nothing else: no traceback. Training's own
    ``warning:`` lines (e.g. possible router collapse) may come before it."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ exact resumption


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_in_a_new_process_is_bit_exact(tmp_path):
    config = write_config(tmp_path / "straight", epochs=3)
    assert pretrain(config).returncode == 0

    interrupted = write_config(tmp_path / "killed", epochs=3)
    steps = load(tmp_path / "straight" / "run" / CHECKPOINTS[1])["steps_per_epoch"]
    assert steps == 2
    killed = pretrain(interrupted, faults=["--kill-at-step", str(steps + 1)])  # epoch 2, step 2
    assert killed.returncode == -signal.SIGKILL
    assert load(tmp_path / "killed" / "run" / CHECKPOINTS[1])["epoch"] == 0
    resumed = pretrain(interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_same_run(tmp_path / "straight" / "run", tmp_path / "killed" / "run")


@pytest.mark.slow
def test_torchrun_sigkill_in_epoch_2_then_resume_is_bit_exact_and_only_rank0_writes(tmp_path):
    config = write_config(tmp_path / "straight", chips=16, epochs=3)
    straight = pretrain(config, torchrun=2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert straight.stdout.count("epoch 1/3 |") == 1  # one process reports and writes
    assert "2 process(es), global batch 8" in straight.stdout
    last = load(tmp_path / "straight" / "run" / CHECKPOINTS[1])
    assert last["world_size"] == 2 and len(last["rng_state"]) == 2
    assert last["steps_per_epoch"] == 2

    interrupted = write_config(tmp_path / "killed", chips=16, epochs=3)
    killed = pretrain(interrupted, faults=["--kill-at-step", "3"], torchrun=2)  # epoch 2, step 2
    assert killed.returncode != 0
    assert load(tmp_path / "killed" / "run" / CHECKPOINTS[1])["epoch"] == 0
    resumed = pretrain(interrupted, "--resume", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "straight" / "run", tmp_path / "killed" / "run")


def test_in_process_resume_is_bit_exact(tmp_path, monkeypatch, exit_status):
    straight = write_config(tmp_path / "straight")
    assert exit_status(pretrain_mae.main, ["--config_yaml", straight]) == 0
    interrupted = write_config(tmp_path / "interrupted")
    real_epoch, calls = pretrain_mae.train_one_epoch, []

    def stop_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(pretrain_mae, "train_one_epoch", stop_in_second_epoch)
    assert exit_status(pretrain_mae.main, ["--config_yaml", interrupted]) == 130
    monkeypatch.setattr(pretrain_mae, "train_one_epoch", real_epoch)
    assert exit_status(pretrain_mae.main, ["--config_yaml", interrupted, "--resume"]) == 0
    assert_same_run(tmp_path / "straight" / "run", tmp_path / "interrupted" / "run")


# --------------------------------------------------------------- crash consistency


@pytest.mark.slow
def test_a_kill_between_any_two_writes_resumes_to_the_uninterrupted_set(tmp_path):
    log = tmp_path / "writes.log"
    reference = write_config(tmp_path / "reference")
    assert pretrain(reference, faults=["--log-writes", str(log)]).returncode == 0
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    # epoch 2 (the last): CSVs and curves, then last (the commit record), then best, periodic
    last_epoch = [(int(number), Path(path).name) for number, path in writes[-6:]]
    assert [name for _, name in last_epoch] == [
        f"training_metrics_{SIZE}.csv", f"expert_usage_{SIZE}.csv", f"training_curves_{SIZE}.png",
        f"pretrained_{SIZE}_last.pth", f"pretrained_{SIZE}_best.pth", f"checkpoint_{SIZE}.pth"]

    first_csv = int(writes[1][0])  # epoch 1's metrics (after the config): nothing committed
    assert Path(writes[1][1]).name == f"training_metrics_{SIZE}.csv"
    for number, name in [(first_csv, None)] + last_epoch[:-1]:  # a kill after each write
        folder = tmp_path / f"killed_after_{number}"
        config = write_config(folder)
        killed = pretrain(config, faults=["--kill-after-write", str(number)])
        assert killed.returncode == -signal.SIGKILL
        last = folder / "run" / CHECKPOINTS[1]
        committed = load(last)["epoch"] if last.exists() else None
        assert committed == (None if name is None else 1 if name.endswith(("_last.pth",
                                                                             "_best.pth")) else 0)
        resumed = pretrain(config, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        if committed == 1:  # nothing left to train: the interrupted epoch is completed
            assert "completed the interrupted epoch 2" in resumed.stdout
        assert_same_run(tmp_path / "reference" / "run", folder / "run")

    # a kill in the middle of writing `last`: a stale temporary file, removed at the next start
    folder = tmp_path / "killed_in_last"
    config = write_config(folder)
    killed = pretrain(config, faults=["--kill-in-write", str(last_epoch[3][0])])
    assert killed.returncode == -signal.SIGKILL
    assert len(list((folder / "run").glob(f".pretrained_{SIZE}_last.pth.*.tmp"))) == 1
    resumed = pretrain(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "removed 1 temporary file(s)" in resumed.stdout
    assert not list((folder / "run").glob(".*.tmp"))
    assert_same_run(tmp_path / "reference" / "run", folder / "run")


# ------------------------------------------------------------------ folder ownership


def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder(tmp_path, capsys,
                                                                   exit_status):
    config = write_config(tmp_path, chips=4, epochs=500)
    first = subprocess.Popen([sys.executable, str(REPO / "pretrain_mae.py"), "--config_yaml",
                              str(config)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock = tmp_path / "run" / pretrain_mae.LOCK_FILE
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
                lock.is_file() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert exit_status(pretrain_mae.main, ["--config_yaml", config, *flags]) == 2
            err = capsys.readouterr().err
            assert_one_line_error(err, "is in use by another run", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    FolderLock(tmp_path / "run", pretrain_mae.LOCK_FILE).acquire().release()  # a kill frees it


def test_a_fresh_run_into_a_finished_runs_folder_exits_2_unless_resume_or_overwrite(
        tmp_path, capsys, exit_status):
    config = write_config(tmp_path, chips=4)
    run = tmp_path / "run"
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    assert_one_line_error(capsys.readouterr().err, "holds an earlier run", "--resume",
                          "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # untouched

    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--resume",
                                           "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out

    # --overwrite replaces the run, leaving no old periodic checkpoint beside the new files
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--overwrite", "--set",
                                           "training.epochs=1", "--set",
                                           "training.save_every_n_epochs=5"]) == 0
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out
    assert not (run / f"checkpoint_{SIZE}.pth").exists()
    assert len(read_rows(run / f"training_metrics_{SIZE}.csv")) == 1
    assert not (run / pretrain_mae.LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_killing_the_torchrun_launcher_stops_its_workers(tmp_path):
    config = write_config(tmp_path, chips=8, epochs=500)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "pretrain_mae.py"), "--config_yaml", str(config)], cwd=REPO, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / "run" / CHECKPOINTS[1]).exists():
            time.sleep(0.2)
        workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
                   .read_text().split()]
        assert len(workers) == 2 and launcher.poll() is None
    finally:
        launcher.kill()
        launcher.wait()

    def alive(pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")

    deadline = time.time() + 30
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.2)
    assert not any(map(alive, workers)), "workers kept running after the launcher died"


# ------------------------------------------------------------------- Ctrl-C, full disk


@pytest.mark.parametrize("workers", [0, 2])
def test_sigint_gives_one_line_exit_130_and_intact_files(tmp_path, workers):
    config = write_config(tmp_path, chips=8, epochs=500, num_workers=workers)
    # A new session, so that the signal goes to the whole group, as Ctrl-C in a terminal does.
    # The run starts with SIGINT at its default, as a shell's foreground job does: a suite run
    # in the background has SIGINT ignored, and an ignored signal stays ignored through exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, str(REPO / "pretrain_mae.py"),
                                    "--config_yaml", str(config)], cwd=REPO, env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    run = tmp_path / "run"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / CHECKPOINTS[1]).exists():
            time.sleep(0.1)
        time.sleep(0.5)  # into training (or a checkpoint write)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:  # a failed test leaves no 500-epoch run behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert_one_line_error(stderr, "interrupted")
    last = load(run / CHECKPOINTS[1])
    rows = read_rows(run / f"training_metrics_{SIZE}.csv")
    assert len(rows) in (last["epoch"] + 1, last["epoch"] + 2)  # CSVs are written before last
    assert not list(run.glob(".*.tmp")) and not (run / pretrain_mae.LOCK_FILE).exists()


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_is_one_line_and_keeps_the_written_files(tmp_path, disk):
    """ENOSPC while writing the best checkpoint (after `last`): a real 15 MB tmpfs (mounted in
    a user and mount namespace, where this system allows it), and the fault runner's
    OSError(ENOSPC) on the same write."""
    config = write_config(tmp_path, chips=4, epochs=1)
    run = tmp_path / "run"
    if disk == "tmpfs":
        check = ("import sys, torch; from pathlib import Path; run = Path(sys.argv[1]); "
                 "torch.load(run / 'pretrained_XXS_last.pth', weights_only=True); "
                 "print('LEFT', sorted(p.name for p in run.iterdir()))")
        script = (f"mkdir -p {run} && mount -t tmpfs -o size=15m tmpfs {run} || exit 99; "
                  f"{sys.executable} {REPO / 'pretrain_mae.py'} --config_yaml {config}; "
                  f"echo RC=$?; {sys.executable} -c \"{check}\" {run}")
        if not shutil.which("unshare"):
            pytest.skip("no unshare(1) to mount a small tmpfs")
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
        if result.returncode == 99 or "RC=" not in result.stdout:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()[:200]}")
        assert "RC=2" in result.stdout, result.stdout + result.stderr
        left = result.stdout.split("LEFT", 1)[1]  # last loads; no temporary file is left
        assert "pretrained_XXS_last.pth" in left and ".tmp" not in left
    else:
        result = pretrain(config, faults=["--fail-write", "6:ENOSPC"])  # 6: the best copy
        assert result.returncode == 2
        load(run / CHECKPOINTS[1])
        assert not list(run.glob(".*.tmp"))
    assert_one_line_error(result.stderr, "no space left on device", "pretrained_XXS_best.pth")
