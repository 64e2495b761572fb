"""Run pretrain_mae.py with injected faults, as a separate process (so that a kill is a kill).

    python tests/fault_runner.py [FAULT ...] -- <pretrain_mae.py arguments>
    torchrun --nproc_per_node=2 tests/fault_runner.py [FAULT ...] -- <arguments>

Faults (process 0 only, unless --all-ranks):

    --kill-at-step G       SIGKILL just before training step G (global, 0-based) starts
    --kill-after-write N   SIGKILL right after the N-th output file (1-based) is in place
    --kill-in-write N      SIGKILL while the N-th output is written: its temporary file is
                           complete but has not replaced the destination
    --fail-write N:ERRNO   the N-th write fails with OSError(ERRNO), e.g. 3:ENOSPC
    --log-writes FILE      append "N PATH" for every output written

Outputs are counted where every writer of pretrain_mae.py goes through: the atomic commit of
``utils.files.atomic_path``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain_mae  # noqa: E402
import utils.files  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-after-write", type=int)
    parser.add_argument("--kill-in-write", type=int)
    parser.add_argument("--fail-write")
    parser.add_argument("--log-writes")
    parser.add_argument("--all-ranks", action="store_true")
    split = argv.index("--")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    faults, script_args = parse(sys.argv[1:])
    targeted = faults.all_ranks or int(os.environ.get("RANK", "0")) == 0
    if not targeted:
        run_cli(pretrain_mae.main, script_args)

    real_step = pretrain_mae.WarmupCosineLR.step

    def step(self, global_step):
        if global_step == faults.kill_at_step:
            kill()
        return real_step(self, global_step)

    pretrain_mae.WarmupCosineLR.step = step

    real_atomic_path = utils.files.atomic_path
    fail_at, fail_errno = None, None
    if faults.fail_write:
        number, name = faults.fail_write.split(":")
        fail_at, fail_errno = int(number), getattr(errno, name)
    writes = [0]

    @contextlib.contextmanager
    def counted_atomic_path(path):
        writes[0] += 1
        number = writes[0]
        if faults.log_writes:
            with open(faults.log_writes, "a", encoding="utf-8") as log:
                log.write(f"{number} {path}\n")
        with real_atomic_path(path) as tmp:
            yield tmp
            if number == fail_at:
                raise OSError(fail_errno, os.strerror(fail_errno))
            if number == faults.kill_in_write:
                kill()
        if number == faults.kill_after_write:
            kill()

    utils.files.atomic_path = counted_atomic_path  # torch_save, copy_file, write_csv, ...
    pretrain_mae.atomic_path = counted_atomic_path  # the curves
    run_cli(pretrain_mae.main, script_args)


if __name__ == "__main__":
    main()
