"""datasets/download.py against a fake Hugging Face Hub on 127.0.0.1 (no network): fresh
downloads land where the loaders read, interrupted transfers resume with a Range request (in
the run, and in a new process after a kill), reruns do nothing, a bad checksum or no network
is one line and exit status 2 with nothing half-unpacked.

The fixture archives are built from the committed sample_dataset, so the downloaded folders
are read with the project's own loaders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datasets import download
from datasets.bigearthnet import BigEarthNetDatasetLS
from datasets.eurosat import EuroSATDatasetLS

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".tar.gz", ".zip", ".pth")


# ------------------------------------------------------------------ fixture repositories


def ben_files() -> dict:
    """bigearthnet-l.tar.gz (bigearthnet-l/{images,labels}) and the split CSVs: 12 patches of
    the synthetic sample, 8/2/2."""
    names = [line.split(",")[0] for line in
             (SAMPLE / "bigearthnet-train.csv").read_text().splitlines()[:12]]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            tar.add(SAMPLE / "images" / f"{name}.tif", f"bigearthnet-l/images/{name}.tif")
            tar.add(SAMPLE / "labels" / f"{name}_labels_metadata.json",
                    f"bigearthnet-l/labels/{name}_labels_metadata.json")
    splits = {"train": names[:8], "val": names[8:10], "test": names[10:]}
    files = {f"bigearthnet-{split}.csv": "".join(f"{n}\n" for n in chosen).encode()
             for split, chosen in splits.items()}
    files["bigearthnet-l.tar.gz"] = buffer.getvalue()
    return files


def eurosat_files() -> dict:
    """eurosat-l.zip (eurosat-l/<Class>/*.tif) for three chips of each sample class, and
    split files naming them as the published splits do (.jpg)."""
    buffer = io.BytesIO()
    chips = []
    with zipfile.ZipFile(buffer, "w") as zipped:
        for folder in sorted(p for p in (SAMPLE / "eurosat_l").iterdir() if p.is_dir()):
            for chip in sorted(folder.glob("*.tif"))[:3]:
                zipped.write(chip, f"eurosat-l/{folder.name}/{chip.name}")
                chips.append(chip.stem)
    files = {f"eurosat-{split}.txt": "".join(f"{c}.jpg\n" for c in chips[i::3]).encode()
             for i, split in enumerate(("train", "val", "test"))}
    files["eurosat-l.zip"] = buffer.getvalue()
    return files


def weight_files() -> dict:
    return {"pretrained_S_best.pth": os.urandom(300_000), "README.md": b"# weights\n"}


class FakeHub(ThreadingHTTPServer):
    """The two Hub endpoints the downloader uses, for one commit of one repository:
    ``/api/<kind>/<repo>/revision/<rev>?blobs=true`` and ``<prefix><repo>/resolve/<commit>/<f>``
    (with Range). ``drop[name] = n``: the next transfer of ``name`` closes after n bytes;
    ``stall[name] = n``: transfers of ``name`` hang after n bytes; ``corrupt``: files served
    with one byte changed (their published checksum stays that of the good file)."""

    daemon_threads = True

    def __init__(self, target: str, files: dict):
        super().__init__(("127.0.0.1", 0), Handler)
        spec = download.TARGETS[target]
        self.api = f"/api/{spec.kind}/{spec.repo}/revision/"
        self.resolve = f"/{'' if spec.kind == 'models' else spec.kind + '/'}{spec.repo}/resolve/"
        self.files = files
        self.drop, self.stall, self.corrupt = {}, {}, set()
        self.requests = []  # (path, Range header or None)
        self.closing = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def revision_info(self) -> dict:
        siblings = []
        for name, data in self.files.items():
            entry = {"rfilename": name, "size": len(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            else:
                entry["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            siblings.append(entry)
        return {"sha": COMMIT, "siblings": siblings}

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        hub = self.server
        hub.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith(hub.api):
            body = json.dumps(hub.revision_info()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self.path[len(hub.resolve + COMMIT) + 1:]
        if not self.path.startswith(hub.resolve + COMMIT + "/") or name not in hub.files:
            self.send_error(404)
            return
        data = hub.files[name]
        if name in hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = int(self.headers["Range"][len("bytes="):].rstrip("-")) \
            if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = hub.drop.pop(name, None)
        stall = hub.stall.get(name)
        if cut is not None or stall is not None:
            self.wfile.write(body[:cut if cut is not None else stall])
            self.wfile.flush()
            if stall is not None:
                hub.closing.wait(60)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def hub():
    servers = []

    def start(target: str, files: dict) -> FakeHub:
        servers.append(FakeHub(target, files))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def run_download(target: str, root: Path, endpoint: str, *extra: str,
                 timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m datasets.download`` in a new process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "datasets.download", target, "--root",
                           str(root), "--endpoint", endpoint, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def leftovers(root: Path) -> list:
    """Temporary folders, partial files and half-unpacked outputs under root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".tmp", ".part")))


def resolve_requests(hub: FakeHub) -> list:
    return [(path.rsplit("/", 1)[1], byte_range) for path, byte_range in hub.requests
            if "/resolve/" in path]


# -------------------------------------------------------------------------- the tests


def test_fresh_bigearthnet_download_is_read_by_the_loader(hub, tmp_path):
    files = ben_files()
    server = hub("bigearthnet-l", files)
    root = tmp_path / "bigearthnet-l"
    result = run_download("bigearthnet-l", root, server.url)
    assert result.returncode == 0, result.stderr
    assert f"complete in {root}" in result.stdout
    for split in ("train", "val", "test"):
        csv = root / f"bigearthnet-{split}.csv"
        assert csv.read_bytes() == files[csv.name]
        dataset = BigEarthNetDatasetLS(csv, root / "bigearthnet-l", supervised=True)
        assert len(dataset) == len(csv.read_text().split())
        image, target = dataset[0][:2]
        assert image.shape[0] == 7 and target.shape == (19,)
    assert not (root / "bigearthnet-l.tar.gz").exists()  # the archive is removed once unpacked
    assert not (root / download.PART_DIR).exists() and leftovers(root) == []
    record = json.loads((root / ".download-bigearthnet-l.json").read_text())
    assert record["commit"] == COMMIT and len(record["outputs"]) == 4
    # default revision "main" is resolved once; every file comes from that commit
    assert any(path.endswith("/revision/main?blobs=true") for path, _ in server.requests)
    assert {name for name, _ in resolve_requests(server)} == set(files)


def test_fresh_eurosat_and_weights_downloads(hub, tmp_path):
    server = hub("eurosat-l", eurosat_files())
    root = tmp_path / "eurosat-l"
    assert download.main(["eurosat-l", "--root", str(root), "--endpoint", server.url]) == 0
    # EuroSAT-L is pinned to the commit the Landsat-Bench loader uses
    assert any(download.TARGETS["eurosat-l"].revision in path for path, _ in server.requests)
    dataset = EuroSATDatasetLS(root / "eurosat-l", root / "eurosat-test.txt")
    assert len(dataset) == len((root / "eurosat-test.txt").read_text().split())
    assert dataset[0][0].shape[0] == 7

    weights = weight_files()
    server = hub("weights", weights)
    os.environ[download.ENDPOINT_ENV] = server.url  # the environment variable works too
    try:
        assert download.main(["weights", "--root", str(tmp_path / "weights")]) == 0
    finally:
        del os.environ[download.ENDPOINT_ENV]
    checkpoint = tmp_path / "weights" / "moe_mae_bigearthnet_ls" / "pretrained_S_best.pth"
    assert checkpoint.read_bytes() == weights["pretrained_S_best.pth"]
    assert {name for name, _ in resolve_requests(server)} == {"pretrained_S_best.pth"}


def test_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path):
    files = ben_files()
    server = hub("bigearthnet-l", files)
    archive = files["bigearthnet-l.tar.gz"]
    server.drop["bigearthnet-l.tar.gz"] = len(archive) // 3
    root = tmp_path / "ben"
    assert download.main(["bigearthnet-l", "--root", str(root), "--endpoint", server.url]) == 0
    transfers = [r for n, r in resolve_requests(server) if n == "bigearthnet-l.tar.gz"]
    assert transfers == [None, f"bytes={len(archive) // 3}-"]
    assert len(list((root / "bigearthnet-l" / "images").iterdir())) == 12


def test_download_killed_mid_transfer_resumes_in_a_new_process(hub, tmp_path):
    weights = weight_files()
    server = hub("weights", weights)
    half = len(weights["pretrained_S_best.pth"]) // 2
    server.stall["pretrained_S_best.pth"] = half
    root = tmp_path / "weights"
    part = root / download.PART_DIR / "pretrained_S_best.pth.part"
    process = subprocess.Popen([sys.executable, "-m", "datasets.download", "weights", "--root",
                                str(root), "--endpoint", server.url], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == half):
            assert time.monotonic() < deadline and process.poll() is None, "no partial file"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (root / "moe_mae_bigearthnet_ls").exists()

    del server.stall["pretrained_S_best.pth"]
    result = run_download("weights", root, server.url)
    assert result.returncode == 0, result.stderr
    assert resolve_requests(server)[-1] == ("pretrained_S_best.pth", f"bytes={half}-")
    checkpoint = root / "moe_mae_bigearthnet_ls" / "pretrained_S_best.pth"
    assert checkpoint.read_bytes() == weights["pretrained_S_best.pth"]
    assert leftovers(root) == []


def test_rerun_does_nothing_and_says_so(hub, tmp_path, capsys):
    server = hub("eurosat-l", eurosat_files())
    root = tmp_path / "eurosat-l"
    args = ["eurosat-l", "--root", str(root), "--endpoint", server.url]
    assert download.main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    served = len(server.requests)
    capsys.readouterr()
    assert download.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert len(server.requests) == served  # not even the revision is asked again
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # an output removed by hand is downloaded again, the others are left alone
    (root / "eurosat-val.txt").unlink()
    assert download.main(args) == 0
    assert [n for n, _ in resolve_requests(server)][-1] == "eurosat-val.txt"
    assert len(resolve_requests(server)) == 5


def test_checksum_mismatch_exits_2_with_nothing_unpacked(hub, tmp_path, exit_status, capsys):
    files = ben_files()
    server = hub("bigearthnet-l", files)
    server.corrupt.add("bigearthnet-l.tar.gz")
    root = tmp_path / "ben"
    args = ["bigearthnet-l", "--root", root, "--endpoint", server.url]
    assert exit_status(download.main, args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: bigearthnet-l.tar.gz: checksum mismatch") and "\n" not in error
    assert hashlib.sha256(files["bigearthnet-l.tar.gz"]).hexdigest() in error
    # nothing in place: no folder, no split file, no temporary folder, no bad .part
    assert sorted(p.name for p in root.iterdir()) in ([], [download.PART_DIR])
    assert not list((root / download.PART_DIR).glob("bigearthnet-l.tar.gz*"))
    assert leftovers(root) == []
    # once the Hub serves the right bytes, the next run completes
    server.corrupt.clear()
    assert exit_status(download.main, args) == 0
    assert (root / "bigearthnet-l" / "images").is_dir() and leftovers(root) == []


def test_offline_exits_2_with_one_line(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    root = tmp_path / "ben"
    result = run_download("bigearthnet-l", root, closed)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot reach {closed}/api/datasets/")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not root.exists() or leftovers(root) == [] and not (root / "bigearthnet-l").exists()


def test_unknown_file_and_output_in_the_way_exit_2(hub, tmp_path, exit_status, capsys):
    files = ben_files()
    del files["bigearthnet-val.csv"]
    server = hub("bigearthnet-l", files)
    root = tmp_path / "ben"
    args = ["bigearthnet-l", "--root", root, "--endpoint", server.url]
    assert exit_status(download.main, args) == 2
    assert "has no file bigearthnet-val.csv" in capsys.readouterr().err
    assert resolve_requests(server) == []  # checked before any transfer

    (tmp_path / "mine" / "bigearthnet-l").mkdir(parents=True)
    assert exit_status(download.main, ["bigearthnet-l", "--root", tmp_path / "mine",
                                       "--endpoint", server.url]) == 2
    assert "was not made by a complete download" in capsys.readouterr().err
