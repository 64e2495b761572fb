"""Embeddings at dataset scale: compute_embed.py and compute_embeddings.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import compute_embeddings
from embed.compute_embed import compute_embeddings as embed_dataset
from embed.compute_embed import compute_geomoemae_embeddings
from models.moe_mae import build_mae

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dataset"


class RandomChips(torch.utils.data.Dataset):
    """Seeded synthetic BEN-L-like items, made on the fly (the dataset holds no pixels):
    (img (7, 40, 40), 19-class multi-hot target, 4 (sin, cos) metas)."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed
        self.patch_ids = [f"chip_{i}" for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = torch.randn(7, 40, 40, generator=g)
        target = (torch.rand(19, generator=g) < 0.2).long()
        return (img, target, *(torch.rand(4, 2, generator=g) * 2 - 1))

    @property
    def imgs(self):
        return torch.stack([self[i][0] for i in range(self.n)])


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_mae("S").encoder.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint in the published format: only the keys the published code saved."""
    torch.manual_seed(0)
    mae = build_mae("S")
    path = tmp_path_factory.mktemp("ckpt") / "pretrained_S_best.pth"
    torch.save({"epoch": 3, "model_state": mae.state_dict(), "best_train_loss": 1.0}, path)
    return path


@pytest.mark.parametrize("pooling,width", [("all", 105 * 144), ("cls", 144), ("mean", 144),
                                           ("meta_cls", 5 * 144)])
def test_pooling_shapes(encoder, tmp_path, pooling, width):
    data = RandomChips(10)
    out = embed_dataset(encoder, data, tmp_path / f"{pooling}.npz", pooling=pooling,
                        batch_size=4, progress=False)
    assert out["x"].shape == (10, width) and out["x"].dtype == np.float32
    assert out["y"].shape == (10, 19) and out["y"].dtype == np.uint8
    assert list(out["ids"]) == data.patch_ids
    settings = json.loads(str(out["settings"]))
    assert settings["pooling"] == pooling and settings["num_tokens"] == 105


def test_cls_is_block_576_720_of_all_and_metadata_matters(encoder):
    data = RandomChips(6)
    all_tokens = embed_dataset(encoder, data, None, pooling="all", batch_size=4, progress=False)
    cls = embed_dataset(encoder, data, None, pooling="cls", batch_size=4, progress=False)
    assert np.array_equal(cls["x"], all_tokens["x"][:, 576:720])
    no_meta = embed_dataset(encoder, data, None, pooling="cls", use_metadata=False,
                            batch_size=4, progress=False)
    assert not np.allclose(no_meta["x"], cls["x"], atol=1e-4)
    # metadata off = zeros, exactly what the encoder does without metadata
    with torch.no_grad():
        expected = encoder.embed(data.imgs, pooling="cls", normed=False)
    np.testing.assert_allclose(no_meta["x"], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_float16_and_published_helper(encoder, tmp_path):
    data = RandomChips(5)
    half = embed_dataset(encoder, data, tmp_path / "half.npz", pooling="mean", dtype="float16",
                         progress=False)
    full = embed_dataset(encoder, data, None, pooling="mean", progress=False)
    assert half["x"].dtype == np.float16
    np.testing.assert_allclose(half["x"].astype(np.float32), full["x"], rtol=2e-3, atol=2e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    x, y = compute_geomoemae_embeddings(encoder, loader, "cpu", use_autocast=False)
    all_raw = embed_dataset(encoder, data, None, pooling="all", progress=False)["x"]
    assert x.shape == (5, 105, 144) and y.shape == (5, 19)
    np.testing.assert_allclose(x.reshape(5, -1), all_raw, rtol=1e-4, atol=1e-4)


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_embeddings import RandomChips
    from embed.compute_embed import compute_embeddings
    from models.moe_mae import build_mae
    torch.manual_seed(0)
    encoder = build_mae("XXS").encoder.eval()
    compute_embeddings(encoder, RandomChips(int(sys.argv[1])), sys.argv[2], pooling="all",
                       batch_size=64, progress=False)  # returns the file, lazily: not read here
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            print(int(line.split()[1]) * 1024)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_RSS_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))

    def peak_rss(n):
        # A fixed mmap threshold: glibc's adaptive one lets freed activations of many sizes
        # fragment the heap, which moves the peaks of identical runs by up to 100 MB without
        # any row being held (measured: 1,000 chips 397 MB, 4,000 470 MB, 8,000 384 MB).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        result = subprocess.run([sys.executable, str(script), str(n), str(tmp_path / f"{n}.npz")],
                                capture_output=True, text=True, check=True, env=env)
        return int(result.stdout.split()[-1])

    # 4,000 chips: holding their embeddings would add ~180 MB, well above the tens of MB by
    # which a process's peak moves from run to run (allocator and thread-arena state)
    small, large = peak_rss(200), peak_rss(4000)
    output_size = (tmp_path / "4000.npz").stat().st_size
    assert np.load(tmp_path / "4000.npz")["x"].shape == (4000, 105 * 108)
    # Holding the rows would add at least the output's size (181 MB; np.concatenate twice that).
    assert large - small < output_size / 2, (small, large, output_size)


def write_config(tmp_path, checkpoint, dataset="bigearthnet", **embed):
    if dataset == "bigearthnet":
        data = {"dataset": "bigearthnet", "dataset_path": str(SAMPLE),
                "splits": {"train": str(SAMPLE / "bigearthnet-train.csv"),
                           "test": str(SAMPLE / "bigearthnet-test.csv")}}
    else:
        root = SAMPLE / "eurosat_l"
        data = {"dataset": "eurosat", "dataset_path": str(root),
                "splits": {"test": str(root / "eurosat-test.txt")}}
    config = {"model": {"size": "S", "checkpoint_path": str(checkpoint), "device": "cpu"},
              "data": {**data, "num_workers": 0, "batch_size": 64},
              "embed": {"output_dir": str(tmp_path / "emb"), "name": "demo", **embed}}
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path



def test_script_embeds_bigearthnet_splits_from_a_published_checkpoint(tmp_path, checkpoint,
                                                                      exit_status):
    config = write_config(tmp_path, checkpoint, pooling="cls")
    assert exit_status(compute_embeddings.main, ["--config_yaml", config]) == 0
    train = np.load(tmp_path / "emb" / "demo_train.npz")
    test = np.load(tmp_path / "emb" / "demo_test.npz")
    assert train["x"].shape == (168, 144) and test["x"].shape == (56, 144)
    assert train["y"].shape == (168, 19)
    assert str(train["ids"][0]).startswith("SYN_MSIL2A_")
    settings = json.loads(str(train["settings"]))
    assert settings["split"] == "train" and len(settings["class_names"]) == 19
    assert not list((tmp_path / "emb").glob(".*"))  # no temporary files left


def test_script_embeds_eurosat_without_metadata(tmp_path, checkpoint, exit_status):
    config = write_config(tmp_path, checkpoint, dataset="eurosat", pooling="mean")
    assert exit_status(compute_embeddings.main, ["--config_yaml", config]) == 0
    test = np.load(tmp_path / "emb" / "demo_test.npz")
    assert test["x"].shape == (40, 144) and test["y"].dtype == np.int64
    assert str(test["ids"][0]).startswith("AnnualCrop_")  # chip file names
    assert json.loads(str(test["settings"]))["class_names"][0] == "AnnualCrop"


def test_script_errors_name_the_key(tmp_path, checkpoint, capsys, exit_status):
    config = write_config(tmp_path, checkpoint, pooling="max")
    assert exit_status(compute_embeddings.main, ["--config_yaml", config]) == 2
    assert "'embed.pooling' must be one of" in capsys.readouterr().err
    config = write_config(tmp_path, tmp_path / "missing.pth")
    assert exit_status(compute_embeddings.main, ["--config_yaml", config]) == 2
    assert "'model.checkpoint_path': file not found" in capsys.readouterr().err
    wrong_size = write_config(tmp_path, checkpoint)
    assert exit_status(compute_embeddings.main,
                       ["--config_yaml", wrong_size, "--set", "model.size=XXS"]) == 2
    assert "weights do not fit this model" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_shards_and_merges_in_order(tmp_path, checkpoint, exit_status):
    config = write_config(tmp_path, checkpoint, pooling="cls")
    single = tmp_path / "single"
    assert exit_status(compute_embeddings.main,
                       ["--config_yaml", config, "--set", f"embed.output_dir={single}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29533", str(REPO / "compute_embeddings.py"), "--config_yaml",
         str(config), "--set", f"embed.output_dir={tmp_path / 'sharded'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for split in ("train", "test"):
        one = np.load(single / f"demo_{split}.npz")
        two = np.load(tmp_path / "sharded" / f"demo_{split}.npz")
        assert list(two["ids"]) == list(one["ids"])
        np.testing.assert_array_equal(two["y"], one["y"])
        np.testing.assert_allclose(two["x"], one["x"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,dataset", [("protocol_embed_bigearthnet", "bigearthnet"),
                                          ("protocol_embed_eurosat", "eurosat"),
                                          ("embed_bigearthnet", "bigearthnet"),
                                          ("embed_eurosat", "eurosat")])
def test_shipped_configs_are_valid(name, dataset, checkpoint):
    """The shipped configs use only known keys and valid values (paths pointed at the sample)."""
    root = SAMPLE if dataset == "bigearthnet" else SAMPLE / "eurosat_l"
    split = SAMPLE / "bigearthnet-test.csv" if dataset == "bigearthnet" else \
        SAMPLE / "eurosat_l" / "eurosat-test.txt"
    config = compute_embeddings.load_config(
        REPO / "configs" / f"{name}.yaml", compute_embeddings.SCHEMA,
        [f"model.checkpoint_path={checkpoint}", f"data.dataset_path={root}",
         f"data.splits={{test: {split}}}"])
    assert config["data"]["dataset"] == dataset
    assert config["embed"]["normed"] is False  # the published notebooks' tokens


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_is_explicit_and_close_to_fp32(tmp_path, precision):
    with torch.random.fork_rng():  # the test process's global generator is left as it was
        torch.manual_seed(0)
        encoder = build_mae("XXS").encoder.eval()
    data = RandomChips(6)
    full = embed_dataset(encoder, data, None, pooling="cls", batch_size=4, progress=False)
    half = embed_dataset(encoder, data, tmp_path / "half.npz", pooling="cls", batch_size=4,
                         precision=precision, progress=False)
    assert json.loads(str(full["settings"]))["precision"] == "fp32"
    assert json.loads(str(half["settings"]))["precision"] == precision
    assert half["x"].dtype == np.float32 and not np.array_equal(half["x"], full["x"])
    cosine = (half["x"] * full["x"]).sum(1) / (np.linalg.norm(half["x"], axis=1) *
                                               np.linalg.norm(full["x"], axis=1))
    assert cosine.min() > 0.99
