"""Download BigEarthNet-L, EuroSAT-L or the published weights from Hugging Face, ready to use.

    python -m datasets.download bigearthnet-l --root /data/bigearthnet-l
    python -m datasets.download eurosat-l --root /data/eurosat-l
    python -m datasets.download weights --root weights
    [--revision REV] [--endpoint URL]   (or the HF_ENDPOINT environment variable)

What lands in ``--root`` is the layout the loaders and configs read:

* ``bigearthnet-l``: ``ROOT/bigearthnet-l/{images,labels}/`` (``training.dataset_path``) and
  ``ROOT/bigearthnet-{train,val,test}.csv`` (the split CSVs), from the Landsat-Bench dataset
  ``isaaccorley/bigearthnet-l`` (archive ``bigearthnet-l.tar.gz``);
* ``eurosat-l``: ``ROOT/eurosat-l/<ClassName>/*.tif`` (``data.dataset_path`` of the EuroSAT
  configs) and ``ROOT/eurosat-{train,val,test}.txt``, from ``isaaccorley/eurosat-l``
  (archive ``eurosat-l.zip``);
* ``weights``: ``ROOT/moe_mae_bigearthnet_ls/pretrained_S_best.pth`` (the published
  checkpoint, see weights/README.md), from the model
  ``albughdadim/lightweight-metadata-aware-mixture-of-experts-mae-landsat``.

Revision: EuroSAT-L is pinned to the commit the Landsat-Bench loader downloads from. For
BigEarthNet-L and the weights no commit has been published, so their default ``main`` is
resolved to its commit once, when the download starts; every file then comes from that one
commit, and the commit is recorded in ``ROOT/.download-<target>.json``. ``--revision`` pins
any commit (or branch, or tag).

Verification: no checksums of these files are published beside them (the Landsat-Bench
loaders carry one md5, the same for both archives, so it cannot be right for both). Each file
is therefore checked against what the Hub's API publishes for the resolved commit
(``/api/<datasets|models>/<repo>/revision/<commit>?blobs=true``): its size and, for a Git LFS
file (the archives, the checkpoint), the sha256 of its content; for a small file kept in Git
(the split files), its Git blob id (the sha1 of ``"blob <size>\\0"`` + content).

Behaviour:

* resumable: a file is downloaded to ``ROOT/.download/<name>.part``; an interrupted transfer
  (a dropped connection, a killed process) continues from the bytes already there with an
  HTTP ``Range`` request, within the run (a few attempts) or at the next run;
* verified before anything is unpacked: all files of the target are downloaded and checked
  first; a file that does not match is removed (the next run downloads it again) and the run
  stops with exit status 2, leaving the destination as it was;
* unpacked atomically: an archive is extracted into a temporary folder in ``ROOT``, its layout
  checked, and the folder renamed into place; a plain file is renamed from its ``.part``;
  each finished output is recorded, and the archive removed;
* idempotent: when the record says every output is in place, a rerun does nothing (it does
  not even go online) and says so;
* errors (offline, an unknown revision, a file the Hub does not list, a bad checksum, an
  output in the way) are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from utils.errors import UserInputError, run_cli
from utils.files import (FolderLock, check_output_dir, make_temp_dir,
                         remove_stale_temporaries, write_json)

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"  # the variable huggingface_hub reads too
TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
ATTEMPTS = 5  # transfers of one file within a run; each continues where the last one stopped
PART_DIR = ".download"


@dataclass(frozen=True)
class RemoteFile:
    """A file of the Hub repository and where it goes under ``--root``.

    ``unpack_to``: for an archive, the folder (under root) its content becomes; ``expect``
    names entries that folder must hold (checks that the archive is the one the loaders
    read). For a plain file, ``dest`` is its path under root (default: its name)."""

    name: str
    dest: Optional[str] = None
    unpack_to: Optional[str] = None
    expect: Tuple[str, ...] = ()

    @property
    def output(self) -> str:
        return self.unpack_to or self.dest or self.name


@dataclass(frozen=True)
class Target:
    repo: str
    kind: str  # "datasets" or "models": the Hub's URL prefix for the repository type
    revision: str
    files: Tuple[RemoteFile, ...]


def _splits(pattern: str) -> Tuple[RemoteFile, ...]:
    return tuple(RemoteFile(pattern.format(split)) for split in ("train", "val", "test"))


TARGETS: Dict[str, Target] = {
    "bigearthnet-l": Target(
        "isaaccorley/bigearthnet-l", "datasets", "main",
        (RemoteFile("bigearthnet-l.tar.gz", unpack_to="bigearthnet-l",
                    expect=("images", "labels")),) + _splits("bigearthnet-{}.csv")),
    "eurosat-l": Target(
        "isaaccorley/eurosat-l", "datasets", "40282cda59fa453cf4a7a3ccaf4dfc6b353eb58b",
        (RemoteFile("eurosat-l.zip", unpack_to="eurosat-l", expect=("Forest", "SeaLake")),)
        + _splits("eurosat-{}.txt")),
    "weights": Target(
        "albughdadim/lightweight-metadata-aware-mixture-of-experts-mae-landsat", "models",
        "main",
        (RemoteFile("pretrained_S_best.pth",
                    dest="moe_mae_bigearthnet_ls/pretrained_S_best.pth"),)),
}


@dataclass(frozen=True)
class Published:
    """What the Hub publishes about one file at a commit."""

    size: int
    sha256: Optional[str]  # LFS files
    git_blob: Optional[str]  # files kept in Git


# ---------------------------------------------------------------------------- HTTP


def _unreachable(url: str, exc: BaseException) -> UserInputError:
    reason = getattr(exc, "reason", None) or exc
    return UserInputError(f"cannot reach {url} ({reason}); check the network connection, "
                          f"or --endpoint / {ENDPOINT_ENV}")


def _open(url: str, headers: Optional[Dict[str, str]] = None):
    """urlopen with the project's error lines: offline and HTTP errors are UserInputError."""
    request = urllib.request.Request(url, headers={"User-Agent": "moe-mae-download",
                                                   **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        hint = {401: " (the repository is private or gated: it needs a login)",
                404: " (no such repository, revision or file)"}.get(exc.code, "")
        raise UserInputError(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(url, exc) from None


def resolve(endpoint: str, target: Target, revision: str) -> Tuple[str, Dict[str, Published]]:
    """The commit ``revision`` names and what the Hub publishes about each file there."""
    url = f"{endpoint}/api/{target.kind}/{target.repo}/revision/{revision}?blobs=true"
    try:
        with _open(url) as response:
            info = json.loads(response.read())
        commit = info["sha"]
        published = {}
        for sibling in info.get("siblings", []):
            lfs = sibling.get("lfs") or {}
            published[sibling["rfilename"]] = Published(
                int(lfs.get("size", sibling.get("size", -1))), lfs.get("sha256"),
                None if lfs else sibling.get("blobId"))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{url}: not the Hub's revision information ({exc})") from None
    except (http.client.HTTPException, OSError) as exc:
        raise _unreachable(url, exc) from None
    for file in target.files:
        entry = published.get(file.name)
        if entry is None:
            raise UserInputError(f"{target.repo} at revision {revision} ({commit}) has no "
                                 f"file {file.name}")
        if entry.size < 0 or not (entry.sha256 or entry.git_blob):
            raise UserInputError(f"{url}: the Hub publishes no size and checksum for "
                                 f"{file.name}, so it cannot be verified")
    return commit, published


def file_url(endpoint: str, target: Target, commit: str, name: str) -> str:
    prefix = "" if target.kind == "models" else f"{target.kind}/"
    return f"{endpoint}/{prefix}{target.repo}/resolve/{commit}/{name}"


def fetch(url: str, part: Path, size: int, label: str) -> None:
    """Download ``url`` (``size`` bytes) into ``part``, continuing the bytes already there
    with a Range request; retries a dropped connection up to ATTEMPTS times."""
    part.parent.mkdir(parents=True, exist_ok=True)
    failure: Optional[BaseException] = None
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not a prefix of this file (another revision): start again
            part.unlink()
            have = 0
        if have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        before = have
        try:
            with _open(url, headers) as response:
                if have and response.status != 206:  # the server ignored the Range
                    have = 0
                with open(part, "ab" if have else "wb", buffering=0) as out, \
                        tqdm(total=size, initial=have, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=label, leave=False,
                             disable=None) as bar:  # a bar on a terminal, none in logs
                    while True:
                        chunk = response.read1(CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
        except UserInputError as exc:
            if not before:
                raise  # the first request failed: offline, or the file is not there
            failure = exc
        except (http.client.HTTPException, OSError) as exc:  # dropped mid-transfer
            failure = exc
        else:
            if have >= size:
                return
            failure = ConnectionError(f"the connection closed after {have} of {size} bytes")
        if have == before:
            time.sleep(min(2 ** attempt, 10))  # no progress: give the network a moment
    done = part.stat().st_size if part.exists() else 0
    raise UserInputError(f"{url}: download interrupted after {done} of {size} bytes "
                         f"({failure}); run the command again to continue it")


def verify(part: Path, name: str, published: Published, commit: str) -> None:
    """``part`` has the size and checksum the Hub publishes; otherwise it is removed."""
    size = part.stat().st_size
    digest = hashlib.sha256() if published.sha256 else hashlib.sha1(b"blob %d\0" % size)
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    got = digest.hexdigest()
    expected, what = ((published.sha256, "sha256") if published.sha256
                      else (published.git_blob, "git blob id"))
    if size != published.size or got != expected:
        part.unlink()
        raise UserInputError(
            f"{name}: checksum mismatch ({size} bytes, {what} {got}; the Hub publishes "
            f"{published.size} bytes, {what} {expected} at commit {commit}); the download "
            f"was removed and nothing was unpacked; run the command again to download it anew")


# ------------------------------------------------------------------------- unpacking


def unpack(archive: Path, file: RemoteFile, root: Path) -> None:
    """Extract ``archive`` into ``root/file.unpack_to`` atomically: into a temporary folder
    first; its single top-level folder (or, with several entries, the folder itself) is
    checked for ``file.expect`` and renamed into place."""
    temp = make_temp_dir(root, file.unpack_to)
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(temp)  # drops absolute paths and ".." components
            else:
                with tarfile.open(archive) as tarred:
                    tarred.extractall(temp, filter="data")  # refuses paths outside temp
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise UserInputError(f"{archive}: cannot unpack ({exc})") from None
        entries = [entry for entry in temp.iterdir()
                   if not entry.name.startswith(".") and entry.name != "__MACOSX"]
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() else temp
        missing = [name for name in file.expect if not (content / name).exists()]
        if missing:
            raise UserInputError(f"{file.name}: the archive does not hold the expected "
                                 f"layout (no {', '.join(missing)} in it)")
        os.replace(content, root / file.unpack_to)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------- command


def record_path(root: Path, name: str) -> Path:
    return root / f".download-{name}.json"


def read_record(root: Path, name: str) -> dict:
    path = record_path(root, name)
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable: treat as absent, the outputs are checked anew


def download(name: str, root: Path, endpoint: str, revision: Optional[str] = None) -> bool:
    """Bring target ``name`` into ``root``; returns False when it was complete already."""
    target = TARGETS[name]
    revision = revision or target.revision
    record = read_record(root, name)
    if record.get("revision") not in (None, revision) and record.get("commit") != revision:
        record = {}  # another revision was asked for: its record does not count
    done = record.get("outputs", {})
    todo = [f for f in target.files if f.output not in done or not (root / f.output).exists()]
    if not todo:
        print(f"{name}: already complete in {root} ({target.repo} at {record.get('commit')}); "
              f"nothing to do")
        return False
    in_the_way = [str(root / f.output) for f in todo if (root / f.output).exists()]
    if in_the_way:
        raise UserInputError(f"{in_the_way[0]} exists but was not made by a complete download "
                             f"of {name}; move it away or choose another --root")

    commit, published = resolve(endpoint, target, revision)
    if record.get("commit") not in (None, commit):
        record, done = {}, {}
    print(f"{name}: {target.repo} at {commit} -> {root}", flush=True)
    parts = root / PART_DIR
    for file in todo:  # download and verify everything before anything is unpacked
        part = parts / f"{file.name}.part"
        fetch(file_url(endpoint, target, commit, file.name), part, published[file.name].size,
              file.name)
        verify(part, file.name, published[file.name], commit)
    for file in todo:
        part = parts / f"{file.name}.part"
        if file.unpack_to:
            unpack(part, file, root)
            part.unlink()
        else:
            (root / file.output).parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, root / file.output)
        done[file.output] = published[file.name].sha256 or published[file.name].git_blob
        write_json(record_path(root, name), {"repo": target.repo, "revision": revision,
                                             "commit": commit, "outputs": done})
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    print(f"{name}: complete in {root}: " + ", ".join(f.output for f in target.files))
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.download",
        description="Download BigEarthNet-L, EuroSAT-L or the published MoE-MAE weights from "
                    "Hugging Face into the layout the loaders read.")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--root", type=Path, required=True,
                        help="destination folder (e.g. /data/bigearthnet-l, weights)")
    parser.add_argument("--revision", default=None,
                        help="commit, branch or tag (default: the pinned revision, see the "
                             "module docstring)")
    parser.add_argument("--endpoint", default=None,
                        help=f"Hub URL (default: ${ENDPOINT_ENV} or {DEFAULT_ENDPOINT})")
    args = parser.parse_args(argv)
    endpoint = (args.endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
    check_output_dir(args.root, "--root")
    args.root.mkdir(parents=True, exist_ok=True)
    with FolderLock(args.root, f".download-{args.target}.lock", "--root"):
        remove_stale_temporaries(args.root, [f.unpack_to for f in TARGETS[args.target].files
                                             if f.unpack_to])
        download(args.target, args.root, endpoint, args.revision)
    return 0


if __name__ == "__main__":
    run_cli(main)
