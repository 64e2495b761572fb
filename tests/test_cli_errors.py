"""Every script: bad output paths and numeric arguments are one line (exit 2) before any work;
the silent surprises (duplicate YAML keys, NaN weights or metrics, non-finite embeddings, ...)
are errors; outputs get the permissions of a plain open() under the umask."""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import analyze_experts
import compute_embeddings
import eval_mae
import label_efficiency
import pretrain_mae
import train_logistic_regression
from datasets import pack
from models.moe_mae import MOEEncoder, build_mae
from utils.errors import UserInputError, run_cli, user_message
from utils.files import (FolderLock, atomic_path, copy_file, make_temp_dir, torch_save,
                         write_json)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"
TEST_CSV = SAMPLE / "bigearthnet-test.csv"


PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")  # tqdm's, which may precede the error


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    with torch.random.fork_rng():  # the test process's global generator is left as it was
        torch.manual_seed(0)
        mae = build_mae("XXS")
    path = tmp_path_factory.mktemp("ckpt") / "pretrained_XXS_best.pth"
    torch.save({"epoch": 0, "model_state": mae.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        y = np.arange(24) % 2
        x = rng.normal(size=(24, 6)).astype(np.float32) + y[:, None]
        np.savez(folder / f"{split}.npz", x=x, y=y, ids=np.array([f"c{i}" for i in range(24)]))
    return folder


def pretrain_yaml(tmp_path, **training):
    return write_yaml(tmp_path / "pretrain.yaml", {
        "model": {"size": "XXS"},
        "training": {"dataset_path": str(SAMPLE), "dataset_csv": str(TEST_CSV), "epochs": 1,
                     "batch_size": 28, "weight_path": str(tmp_path / "run"), "num_workers": 0,
                     "device": "cpu", **training}})


def eval_yaml(tmp_path, checkpoint, **eval_section):
    return write_yaml(tmp_path / "eval.yaml", {
        "model": {"size": "XXS", "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "dataset_csv": str(TEST_CSV), "num_workers": 0,
                 "batch_size": 28},
        "eval": {"reconstructions_dir": str(tmp_path / "recon"), "max_images": 1,
                 **eval_section}})


def embed_yaml(tmp_path, checkpoint, output_dir=None, **data):
    return write_yaml(tmp_path / "embed.yaml", {
        "model": {"size": "XXS", "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "splits": {"test": str(TEST_CSV)},
                 "num_workers": 0, "batch_size": 28, **data},
        "embed": {"output_dir": str(output_dir or tmp_path / "emb"), "name": "e"}})


def analyze_yaml(tmp_path, checkpoint, output_dir=None):
    return write_yaml(tmp_path / "analyze.yaml", {
        "model": {"size": "XXS", "checkpoint_path": str(checkpoint), "device": "cpu"},
        "data": {"dataset_path": str(SAMPLE), "split": str(TEST_CSV), "num_workers": 0,
                 "max_chips": 8},
        "analysis": {"num_examples": 1},
        "output": {"dir": str(output_dir or tmp_path / "analysis")}})


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the output path was checked")


# ------------------------------------------------------------------- output paths


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken"
    path.write_text("a file, not a folder")
    return path


OUTPUT_CASES = {
    # name: (script, work function to forbid, args builder, expected fragment)
    "pretrain weight_path is a file": (
        pretrain_mae, "build_bigearthnet",
        lambda t, c, e, f: ["--config_yaml", pretrain_yaml(t, weight_path=str(f))],
        "training.weight_path {f}: exists and is not a folder"),
    "eval reconstructions_dir is a file": (
        eval_mae, "MAEEvaluator",
        lambda t, c, e, f: ["--config_yaml", eval_yaml(t, c, reconstructions_dir=str(f))],
        "eval.reconstructions_dir {f}: exists and is not a folder"),
    "eval metrics_json is a folder": (
        eval_mae, "MAEEvaluator",
        lambda t, c, e, f: ["--config_yaml", eval_yaml(t, c, metrics_json=str(t))],
        "eval.metrics_json {t}: is a folder"),
    "embed output_dir is a file": (
        compute_embeddings, "load_pretrained_and_hour",
        lambda t, c, e, f: ["--config_yaml", embed_yaml(t, c, output_dir=f)],
        "embed.output_dir {f}: exists and is not a folder"),
    "embed output_dir holds a folder of the output's name": (
        compute_embeddings, "load_pretrained_and_hour",
        lambda t, c, e, f: (t / "emb" / "e_test.npz").mkdir(parents=True) or
        ["--config_yaml", embed_yaml(t, c)],
        "embed.output_dir {t}/emb/e_test.npz: is a folder"),
    "probe --out is a file": (
        train_logistic_regression, "load_split",
        lambda t, c, e, f: ["--train", e / "train.npz", "--test", e / "test.npz", "--out", f],
        "--out {f}: exists and is not a folder"),
    "label efficiency --out is a file": (
        label_efficiency, "load_variants",
        lambda t, c, e, f: ["--train", e / "train.npz", "--test", e / "test.npz", "--out", f],
        "--out {f}: exists and is not a folder"),
    "analysis output.dir is a file": (
        analyze_experts, "load_pretrained_and_hour",
        lambda t, c, e, f: ["--config_yaml", analyze_yaml(t, c, output_dir=f)],
        "output.dir {f}: exists and is not a folder"),
    "pack --out is a file": (
        pack, "BigEarthNetDatasetLS",
        lambda t, c, e, f: ["--csv", TEST_CSV, "--root", SAMPLE, "--out", f],
        "--out {f}: exists and is not a folder"),
    "pack --out is under a file": (
        pack, "BigEarthNetDatasetLS",
        lambda t, c, e, f: ["--csv", TEST_CSV, "--root", SAMPLE, "--out", f / "sub"],
        "--out {f}/sub: {f} is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_output_paths_are_one_line_before_any_work(tmp_path, checkpoint, embeddings, a_file,
                                                       monkeypatch, capsys, exit_status, case):
    module, work, build_args, expected = OUTPUT_CASES[case]
    monkeypatch.setattr(module, work, no_work)
    assert exit_status(module.main, build_args(tmp_path, checkpoint, embeddings, a_file)) == 2
    assert expected.format(t=tmp_path, f=a_file) in one_line(capsys.readouterr().err)


def run_with_read_only_folder(folder: Path, command: list) -> subprocess.CompletedProcess:
    """``command`` in a new process for which ``folder`` is read-only: a read-only tmpfs
    mounted in a user and mount namespace, else (not root) the folder's mode 0555."""
    folder.mkdir(parents=True, exist_ok=True)
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=300)
    if shutil.which("unshare"):
        script = (f"mount -t tmpfs -o ro,size=1m tmpfs {folder} || exit 99; "
                  + " ".join(f"'{part}'" for part in command))
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], **run)
        if result.returncode != 99:
            return result
    if os.geteuid() == 0:
        pytest.skip("no way to make a folder read-only for this (root) process")
    folder.chmod(0o555)
    try:
        return subprocess.run(command, **run)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("script", ["probe", "pretrain"])
def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, embeddings, script):
    locked = tmp_path / "locked"
    if script == "probe":
        command = [sys.executable, str(REPO / "train_logistic_regression.py"), "--train",
                   str(embeddings / "train.npz"), "--test", str(embeddings / "test.npz"),
                   "--out", str(locked / "probes")]
        option = "--out"
    else:
        command = [sys.executable, str(REPO / "pretrain_mae.py"), "--config_yaml",
                   str(pretrain_yaml(tmp_path, weight_path=str(locked / "run")))]
        option = "training.weight_path"
    result = run_with_read_only_folder(locked, command)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line(result.stderr)
    assert f"{option} {locked}" in line and f"cannot write in {locked}" in line
    assert result.stdout == ""  # nothing ran


# ---------------------------------------------------------------- numeric arguments


RANGE_CASES = [
    (pretrain_mae, "pretrain", ["--set", "training.seed=4294967296"],
     "'training.seed' must be in [0, 4294967295], got 4294967296"),
    (pretrain_mae, "pretrain", ["--set", "training.seed=-1"], "'training.seed' must be in [0,"),
    (pretrain_mae, "pretrain", ["--set", f"training.batch_size={2 ** 70}"],
     "'training.batch_size' is out of range (more than 64 bits)"),
    (pretrain_mae, "pretrain", ["--set", "model.in_channels=8"],
     "'model.in_channels' must be 7 (the bands SR_B1..SR_B7 the datasets read), got 8"),
    (eval_mae, "eval", ["--set", "eval.seed=-3"], "'eval.seed' must be in [0, 4294967295]"),
    (compute_embeddings, "embed", ["--set", "model.in_channels=3"], "'model.in_channels' must be 7"),
    (compute_embeddings, "embed", ["--set", "data.max_chip_size=0"],
     "'data.max_chip_size' must be > 0"),
    (train_logistic_regression, "probe", ["--seed", "-1"],
     "--seed must be in [0, 4294967295], got -1"),
    (train_logistic_regression, "probe", ["--seed", str(2 ** 40)], "--seed must be in [0,"),
    (train_logistic_regression, "probe", ["--n-jobs", "0"],
     "--n-jobs must be -1 (all cores) or at least 1, got 0"),
    (train_logistic_regression, "probe", ["--probe", "knn", "--k", "0"],
     "--k must be in [1, inf], got 0"),
    (train_logistic_regression, "probe", ["--max-iter", "0"], "--max-iter must be in [1, inf]"),
    (label_efficiency, "probe", ["--seeds", "0,-1"], "--seeds must be in [0, 4294967295], got -1"),
    (label_efficiency, "probe", ["--n-jobs", "-4"], "--n-jobs must be -1 (all cores)"),
    (pack, "pack", ["--workers", "0"], "--workers must be in [1, 1024], got 0"),
    (pack, "pack", ["--max-chip-size", "10"], "--max-chip-size must be in [40, inf], got 10"),
]


@pytest.mark.parametrize("module,kind,extra,expected", RANGE_CASES,
                         ids=[f"{case[1]} {' '.join(case[2])}" for case in RANGE_CASES])
def test_numeric_arguments_are_range_checked(tmp_path, checkpoint, embeddings, capsys,
                                             exit_status, module, kind, extra, expected):
    base = {"pretrain": lambda: ["--config_yaml", pretrain_yaml(tmp_path)],
            "eval": lambda: ["--config_yaml", eval_yaml(tmp_path, checkpoint)],
            "embed": lambda: ["--config_yaml", embed_yaml(tmp_path, checkpoint)],
            "probe": lambda: ["--train", embeddings / "train.npz", "--test",
                              embeddings / "test.npz", "--out", tmp_path / "out"],
            "pack": lambda: ["--csv", TEST_CSV, "--root", SAMPLE, "--out", tmp_path / "p"]}
    assert exit_status(module.main, base[kind]() + extra) == 2
    assert expected in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".yaml") == []


# ------------------------------------------------------------------ silent surprises


def test_duplicate_yaml_keys_and_non_utf8_yaml_are_one_line(tmp_path, capsys, exit_status):
    config = tmp_path / "twice.yaml"
    config.write_text(pretrain_yaml(tmp_path).read_text() + "  epochs: 7\n")
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 2
    line = one_line(capsys.readouterr().err)
    assert "key 'epochs' is given twice" in line and "would keep the last one" in line
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(pretrain_yaml(tmp_path).read_bytes() + "# r\xe9sum\xe9\n".encode("latin-1"))
    assert exit_status(pretrain_mae.main, ["--config_yaml", latin1]) == 2
    assert "latin1.yaml: not a UTF-8 text file" in one_line(capsys.readouterr().err)


def test_nan_weights_are_refused_naming_the_checkpoint(tmp_path, checkpoint, capsys,
                                                       exit_status):
    state = torch.load(checkpoint, weights_only=True)
    state["model_state"]["encoder.layers.0.norm1.weight"][0] = float("nan")
    poisoned = tmp_path / "nan.pth"
    torch.save(state, poisoned)
    assert exit_status(eval_mae.main, ["--config_yaml", eval_yaml(tmp_path, poisoned)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{poisoned}: 1 weight tensor(s) hold NaN or inf" in line
    assert not (tmp_path / "recon" / "eval_metrics.json").exists()
    assert exit_status(compute_embeddings.main,
                       ["--config_yaml", embed_yaml(tmp_path, poisoned)]) == 2
    assert "hold NaN or inf" in one_line(capsys.readouterr().err)


def test_non_finite_metrics_are_never_written_as_nan(tmp_path, checkpoint, capsys, exit_status):
    state = torch.load(checkpoint, weights_only=True)
    state["model_state"]["decoder_pred.weight"] *= 1e30  # finite weights, overflowing outputs
    overflowing = tmp_path / "overflow.pth"
    torch.save(state, overflowing)
    assert exit_status(eval_mae.main, ["--config_yaml", eval_yaml(tmp_path, overflowing)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{overflowing}: the evaluation gives non-finite masked_loss" in line
    assert not (tmp_path / "recon").exists()

    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None],
                                                             "c": 2.5}


def test_non_finite_embeddings_are_refused_naming_the_ids(tmp_path, checkpoint, monkeypatch,
                                                          capsys, exit_status):
    real_embed = MOEEncoder.embed

    def poisoned(self, imgs, *args, **kwargs):
        rows = real_embed(self, imgs, *args, **kwargs)
        rows[1] = float("nan")  # the second chip of every batch
        return rows

    monkeypatch.setattr(MOEEncoder, "embed", poisoned)
    assert exit_status(compute_embeddings.main,
                       ["--config_yaml", embed_yaml(tmp_path, checkpoint)]) == 2
    line = one_line(capsys.readouterr().err)
    second = TEST_CSV.read_text().splitlines()[1].split(",")[0]
    assert "non-finite embeddings (NaN or inf) for 1 sample(s)" in line and second in line
    assert not list((tmp_path / "emb").iterdir())  # no file, no parts left


def test_a_corrupt_metrics_csv_on_resume_is_one_line(tmp_path, capsys, exit_status):
    config = pretrain_yaml(tmp_path)
    assert exit_status(pretrain_mae.main, ["--config_yaml", config]) == 0
    metrics = tmp_path / "run" / "training_metrics_XXS.csv"
    metrics.write_text(metrics.read_text().replace("\n0,", "\nzero,", 1))
    capsys.readouterr()
    assert exit_status(pretrain_mae.main, ["--config_yaml", config, "--resume", "--set",
                                           "training.epochs=2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{metrics} cannot be continued" in line and "line 2 has no valid epoch" in line


def test_the_packer_owns_its_destination_and_clears_what_killed_packers_left(tmp_path, capsys,
                                                                             exit_status):
    out = tmp_path / "packed"
    stale = make_temp_dir(tmp_path, "packed")  # as a killed packer leaves it
    (stale / "images.npy").write_bytes(b"\0" * 1000)
    with FolderLock(tmp_path, ".packed.lock", what="--out"):  # another packer at work
        assert exit_status(pack.main, ["--csv", TEST_CSV, "--root", SAMPLE, "--out", out]) == 2
        assert "is in use by another run" in one_line(capsys.readouterr().err)
    assert stale.exists()
    assert exit_status(pack.main, ["--csv", TEST_CSV, "--root", SAMPLE, "--out", out]) == 0
    assert "removed 1 temporary folder(s)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


# ------------------------------------------------------------------------- run_cli


def test_worker_errors_are_unwrapped_to_the_original_line():
    wrapped = UserInputError(
        "Caught UserInputError in DataLoader worker process 1.\nOriginal Traceback (most recent "
        "call last):\n  File \"x.py\", line 3, in f\n    raise UserInputError(message)\n"
        "utils.errors.UserInputError: patch P: image I is float32, expected uint16\n")
    assert user_message(wrapped) == "patch P: image I is float32, expected uint16"
    assert user_message(UserInputError("plain\n  message")) == "plain message"


@pytest.mark.parametrize("raised,code,text", [
    (KeyboardInterrupt(), 130, "error: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.npz"), 2,
     "error: no space left on device: /data/out.npz (free some space"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2, "error: read-only file system: "
                                                                 "/ro/x"),
])
def test_run_cli_turns_interrupts_and_file_errors_into_one_line(capsys, raised, code, text):
    def main(argv):
        raise raised

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [])
    assert exit_info.value.code == code
    assert one_line(capsys.readouterr().err).startswith(text)


class PressesCtrlC:
    """Pickles as ``OrderedDict(step=7)``, sending this process SIGINT while torch.save
    writes it."""

    def __reduce__(self):
        signal.raise_signal(signal.SIGINT)
        return collections.OrderedDict, ([("step", 7)],)


def test_ctrl_c_during_torch_save_waits_for_a_complete_file(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        torch_save({"weights": torch.arange(1000.0), "progress": PressesCtrlC()}, path)
    # the interrupt came after the write: the file is whole, and nothing else is left
    saved = torch.load(path, weights_only=True)
    assert saved["progress"] == {"step": 7} and torch.equal(saved["weights"], torch.arange(1000.0))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_bugs_keep_their_traceback():
    def main(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_cli(main, [])


# -------------------------------------------------------------------- permissions


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def test_atomic_outputs_get_the_umask_permissions(tmp_path, umask):
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        umask(mask)
        folder = tmp_path / f"m{mask:o}"
        torch_save({"a": torch.ones(2)}, folder / "c.pth")
        copy_file(folder / "c.pth", folder / "copy.pth")
        write_json(folder / "j.json", {})
        with atomic_path(folder / "t.txt") as tmp:
            tmp.write_text("x")
        assert [mode(folder / n) for n in ("c.pth", "copy.pth", "j.json", "t.txt")] == \
            [file_mode] * 4
        assert mode(make_temp_dir(folder, "d")) == dir_mode
    (tmp_path / "m22" / "t.txt").chmod(0o600)  # a replaced file keeps its own mode
    write_json(tmp_path / "m22" / "t.txt", {})
    assert mode(tmp_path / "m22" / "t.txt") == 0o600


@pytest.mark.slow
def test_every_scripts_outputs_are_0644_under_umask_022(tmp_path, checkpoint, embeddings, umask,
                                                        exit_status):
    umask(0o022)
    assert exit_status(pretrain_mae.main, ["--config_yaml", pretrain_yaml(tmp_path)]) == 0
    assert exit_status(eval_mae.main, ["--config_yaml", eval_yaml(tmp_path, checkpoint)]) == 0
    assert exit_status(compute_embeddings.main,
                       ["--config_yaml", embed_yaml(tmp_path, checkpoint)]) == 0
    assert exit_status(train_logistic_regression.main,
                       ["--train", embeddings / "train.npz", "--test", embeddings / "test.npz",
                        "--out", tmp_path / "probe", "--max-iter", "50"]) == 0
    assert exit_status(label_efficiency.main,
                       ["--train", embeddings / "train.npz", "--test", embeddings / "test.npz",
                        "--out", tmp_path / "le", "--fractions", "0.5,1", "--seeds", "0",
                        "--max-iter", "50"]) == 0
    assert exit_status(pack.main, ["--csv", TEST_CSV, "--root", SAMPLE, "--out",
                                   tmp_path / "packed"]) == 0
    assert exit_status(analyze_experts.main,
                       ["--config_yaml", analyze_yaml(tmp_path, checkpoint)]) == 0
    outputs = [p for p in tmp_path.rglob("*") if p.suffix != ".yaml" or p.parent != tmp_path]
    files = [p for p in outputs if p.is_file()]
    assert len(files) > 20 and {p.parent.name for p in files} >= {
        "run", "recon", "emb", "probe", "le", "packed", "analysis"}
    assert {str(p.relative_to(tmp_path)): mode(p) for p in files if mode(p) != 0o644} == {}
    assert all(mode(p) == 0o755 for p in outputs if p.is_dir())
