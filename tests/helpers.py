"""Small files in the datasets' real formats, written by the tests themselves; and the
command line run as a user runs it (:func:`run_cli`)."""
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (the MNIST/Fashion-MNIST format) of unsigned bytes, gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train=64, n_test=32, size=8, seed=0):
    """Fashion-MNIST-format files with a learnable rule: the label is the row band that
    holds the bright stripe. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, y in enumerate(labels):
            band = slice(y * size // 4, (y + 1) * size // 4)
            images[i, band, :] = 250
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(), "batch_label": b"x"}


def write_cifar_folder(root: Path, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                              "data_batch_5", "test_batch"]):
        batches[name] = cifar_batch(n, i)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    return batches


def write_cifar_tarball(root: Path, n=6):
    batches = {}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3",
                                  "data_batch_4", "data_batch_5", "test_batch"]):
            batches[name] = cifar_batch(n, 10 + i)
            blob = pickle.dumps(batches[name])
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def trained_like(name, **kwargs):
    """A registered model in eval mode whose batch norms hold non-trivial statistics, as
    after training (so folding them changes the weights)."""
    import torch
    from torch import nn

    import deeproots

    torch.manual_seed(0)
    model = deeproots.create_model(name, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model


def train_cfg(data_dir, out, **kw):
    """A short training run's config on the small Fashion-MNIST files in ``data_dir``."""
    from deeproots.config import TrainConfig

    base = dict(model="nin-root-4", data="fashion-mnist", data_dir=str(data_dir), out=str(out),
                epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5, device="cpu",
                progress=False, download=False)
    base.update(kw)
    return TrainConfig(**base)


def write_image_folder(root: Path, classes=2, per_class=4, size=8, splits=("train", "val"),
                       seed=0):
    """``root/<split>/class<c>/<i>.png``: small RGB images of random pixels (PNG, lossless, so
    a test can compare what a loader read with the file). Returns the images written, by
    path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        for c in range(classes):
            for i in range(per_class):
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(path)
                written[path] = pixels
    return written


def run_cli(argv, capsys):
    """``deeproots ARGV`` run in-process: its exit status (argparse's own errors included)
    and what it wrote to stderr."""
    from deeproots.cli import main

    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's own errors
        rc = stop.code
    return rc, capsys.readouterr().err
