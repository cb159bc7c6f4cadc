"""Loaders on small files in each real format, written here; the batch augmentation."""
import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from deeproots.training import data as D
from helpers import (write_cifar_folder, write_cifar_tarball, write_fashion_mnist, write_idx,
                     write_image_folder)


def test_cifar_folder_layout_is_channel_planes_row_major(tmp_path):
    batches = write_cifar_folder(tmp_path)
    images, labels = D.load_cifar10(tmp_path, "train", download_ok=False)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    raw = batches["data_batch_1"]["data"][0]
    # the first 1024 bytes are red, row by row; then green; then blue
    assert images[0, 0, 0, 5] == raw[5] and images[0, 0, 1, 0] == raw[32]
    assert images[0, 1, 0, 0] == raw[1024] and images[0, 2, 31, 31] == raw[3071]
    assert labels[:6].tolist() == batches["data_batch_1"]["labels"]
    test_images, _ = D.load_cifar10(tmp_path, "test", download_ok=False)
    assert len(test_images) == 6


def _trust(monkeypatch, archive):
    """The test's small archive stands in for the real one: its MD5 is the expected one."""
    monkeypatch.setattr(D, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())


def test_cifar_tarball_read_in_place(tmp_path, monkeypatch):
    batches = write_cifar_tarball(tmp_path)
    _trust(monkeypatch, tmp_path / "cifar-10-python.tar.gz")
    images, labels = D.load_cifar10(tmp_path, "test", download_ok=False)
    expected = batches["test_batch"]["data"].reshape(-1, 3, 32, 32)
    assert np.array_equal(images.numpy(), expected)
    assert labels.tolist() == batches["test_batch"]["labels"]


def test_cifar_truncated_files_name_the_file(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(D.DataError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        D.load_cifar10(tmp_path, "train", download_ok=False)
    tar_root = tmp_path / "t"
    write_cifar_tarball(tar_root)
    archive = tar_root / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:2000])
    # checked against the published MD5 before a byte of it is read
    with pytest.raises(D.DataError, match=r"cifar-10-python.tar.gz has MD5 [0-9a-f]{32}, not "
                                          r"the published c58f30108f718f92721af3b95e74349a"):
        D.load_cifar10(tar_root, "train", download_ok=False)
    _trust(monkeypatch, archive)
    with pytest.raises(D.DataError, match="cifar-10-python.tar.gz is corrupt or truncated"):
        D.load_cifar10(tar_root, "train", download_ok=False)


class _Payload:
    """Unpickling this calls os.system: what a crafted CIFAR batch would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_runs_nothing(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, f)
    with pytest.raises(D.DataError, match=r"data_batch_2 is not a readable CIFAR-10 batch "
                                          r"\(UnpicklingError: it refers to posix.system"):
        D.load_cifar10(tmp_path, "train", download_ok=False)
    assert not marker.exists()
    # a plain pickle of a python object is refused too, not only functions
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                     "x": __import__("collections").OrderedDict()}, f)
    with pytest.raises(D.DataError, match="collections.OrderedDict"):
        D.load_cifar10(tmp_path, "train", download_ok=False)


def test_cifar_labels_out_of_range(tmp_path):
    write_cifar_folder(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}, f)
    with pytest.raises(D.DataError, match="labels from 0 to 12; 10 classes take labels 0 to 9"):
        D.build_loaders("cifar10", data_dir=tmp_path, batch_size=2, download_ok=False)


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(D.DataError, match=r"--data-dir .*nowhere does not exist"):
        D.build_loaders("fashion-mnist", data_dir=tmp_path / "nowhere", download_ok=False)


def test_cifar_wrong_shape(tmp_path):
    write_cifar_folder(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(D.DataError, match=r"shape \(2, 100\).*\(N, 3072\)"):
        D.load_cifar10(tmp_path, "test", download_ok=False)


def test_cifar_missing_offline_says_where(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="CIFAR-10 not found: put cifar-10-batches-py/"):
        D.load_cifar10(tmp_path, "train", download_ok=False)

    def offline(*a, **k):
        raise D.urllib.error.URLError("no network")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError, match="cifar-10-python.tar.gz.*toronto"):
        D.load_cifar10(tmp_path, "train", download_ok=True)


def test_download_checks_md5_and_takes_https_only(tmp_path, monkeypatch):
    import io

    payload = b"deep roots" * 100
    asked = []

    def fake_urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(D.urllib.request, "urlopen", fake_urlopen)
    md5 = hashlib.md5(payload).hexdigest()
    got = D.download("https://example.org/a.bin", tmp_path / "out" / "a.bin", md5)
    assert got.read_bytes() == payload
    with pytest.raises(D.DataError, match="expected 0000"):
        D.download("https://example.org/b.bin", tmp_path / "out" / "b.bin", "0" * 32)
    assert not (tmp_path / "out" / "b.bin").exists()  # never moved into place
    with pytest.raises(D.DataError, match="refusing to download http://x/c.bin: only https"):
        D.download("http://x/c.bin", tmp_path / "out" / "c.bin", md5)
    assert asked == ["https://example.org/a.bin", "https://example.org/b.bin"]
    assert all(d.url.startswith("https://") for d in D.DATASETS.values())


def test_fashion_mnist_idx(tmp_path, monkeypatch):
    written = write_fashion_mnist(tmp_path / "fashion-mnist", n_train=20, n_test=10, size=28)
    images, labels = D.load_fashion_mnist(tmp_path / "fashion-mnist", "train", download_ok=False)
    assert images.shape == (20, 1, 28, 28)
    assert np.array_equal(images[:, 0].numpy(), written["train"][0])
    assert labels.tolist() == written["train"][1].tolist()
    # found through $DEEPROOTS_DATA/fashion-mnist too
    monkeypatch.setenv("DEEPROOTS_DATA", str(tmp_path))
    images, _ = D.load_fashion_mnist(None, "test", download_ok=False)
    assert len(images) == 10


def test_fashion_mnist_corrupt(tmp_path):
    write_fashion_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((20, 8, 8), np.uint8))
    raw = D.gzip.decompress(path.read_bytes())[:-7]
    path.write_bytes(D.gzip.compress(raw))
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.gz is truncated"):
        D.load_fashion_mnist(tmp_path, "train", download_ok=False)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match="not a readable gzip file"):
        D.load_fashion_mnist(tmp_path, "train", download_ok=False)
    write_idx(path, np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(D.DataError, match="5 images but .* 20 labels"):
        D.load_fashion_mnist(tmp_path, "train", download_ok=False)


def test_fashion_mnist_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.delenv("DEEPROOTS_DATA", raising=False)
    with pytest.raises(D.DataError, match="Fashion-MNIST not found: put train-images"):
        D.load_fashion_mnist(tmp_path / "empty", "train", download_ok=False)


def _jpeg(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        _jpeg(tmp_path / split / "cat" / "a.JPEG", (50, 40), (200, 10, 10))
        _jpeg(tmp_path / split / "dog" / "b.JPEG", (30, 64), (10, 10, 200))
        _jpeg(tmp_path / split / "dog" / "c.jpeg", (64, 64), (10, 200, 10))
    train_set = D.ImageFolderDataset(tmp_path / "train", size=24, train=True)
    assert train_set.classes == ["cat", "dog"] and len(train_set) == 3
    x, y = train_set[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 0
    val = D.ImageFolderDataset(tmp_path / "val", size=24, train=False)
    x, y = val[1]
    assert y == 1 and abs(x[2].float().mean().item() - 200) < 6 and x[0].float().mean() < 20
    loaders = D.build_loaders(f"imagefolder:{tmp_path}", batch_size=2, workers=0,
                              image_size=24)
    xb, yb = next(iter(loaders[0].batches()))
    assert xb.shape == (2, 3, 24, 24) and xb.dtype == torch.float32
    assert loaders[2].num_classes == 2


def test_a_loader_starts_no_more_decoding_processes_than_there_are_cpus(tmp_path):
    """--workers 64 on this machine: as many processes as the CPUs this process may use
    (os.sched_getaffinity), and no warning from PyTorch about too many."""
    import os
    import warnings

    for split in ("train", "val"):
        _jpeg(tmp_path / split / "cat" / "a.JPEG", (20, 20), (200, 10, 10))
        _jpeg(tmp_path / split / "cat" / "b.JPEG", (20, 20), (10, 10, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, test, _ = D.build_loaders(f"imagefolder:{tmp_path}", batch_size=2, workers=64,
                                         image_size=16)
        next(iter(train.batches()))
    cpus = len(os.sched_getaffinity(0))
    assert train.loader.num_workers == test.loader.num_workers == min(64, cpus)


def test_a_val_class_the_training_split_lacks_is_refused(tmp_path):
    """val/bird beside train's cat and dog: its images would take no label (they were left
    out without a word, and a val split of other classes alone read as 'no images')."""
    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "bird"))):
        for name in names:
            _jpeg(tmp_path / split / name / "a.JPEG", (20, 20), (200, 10, 10))
    with pytest.raises(D.DataError, match=r"val has class folders the training split does "
                                          r"not: bird; the classes are the training split's "
                                          r"\(2: cat, dog\)"):
        D.build_loaders(f"imagefolder:{tmp_path}", batch_size=2, workers=0, image_size=16)


def test_hidden_folders_are_not_classes_and_an_empty_class_is_refused(tmp_path):
    """Jupyter's train/.ipynb_checkpoints (here holding a copy of an image) was class 0, an
    output never asked for, and every label shifted by one from what the folder names say;
    an empty class folder was an output never taught. torchvision's ImageFolder refuses
    the empty one; the hidden one is skipped."""
    for split in ("train", "val"):
        _jpeg(tmp_path / split / "cat" / "a.JPEG", (20, 20), (200, 10, 10))
        _jpeg(tmp_path / split / "dog" / "b.JPEG", (20, 20), (10, 10, 200))
    _jpeg(tmp_path / "train" / ".ipynb_checkpoints" / "a-checkpoint.JPEG", (20, 20), (0, 0, 0))
    _jpeg(tmp_path / "val" / ".ipynb_checkpoints" / "b-checkpoint.JPEG", (20, 20), (0, 0, 0))
    train_set = D.ImageFolderDataset(tmp_path / "train", size=8)
    assert train_set.classes == ["cat", "dog"]
    assert [(p.name, label) for p, label in train_set.samples] == [("a.JPEG", 0), ("b.JPEG", 1)]
    _, _, spec = D.build_loaders(f"imagefolder:{tmp_path}", batch_size=1, workers=0,
                                 image_size=8)
    assert spec.num_classes == 2  # the val split's hidden folder is no stray class either
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "train" / "emu" / "notes.txt").write_text("to do")
    with pytest.raises(D.DataError, match=r"train has class folders with no image \(.jpg, "
                                          r".*\): emu; remove them or add their images$"):
        D.ImageFolderDataset(tmp_path / "train", size=8)


def test_calibration_images_of_a_small_folder_are_its_files_unaugmented(tmp_path):
    """20 images and the training loader's batch of 256 (which drops its last partial
    batch): the sample is every image asked for, read as for evaluation (the file's pixels
    normalised, no random crop or flip), the same for the same seed."""
    written = write_image_folder(tmp_path, classes=4, per_class=5, size=8)
    train, _, spec = D.build_loaders(f"imagefolder:{tmp_path}", batch_size=256, workers=0,
                                     image_size=8)
    assert len(train) == 0  # no whole batch of 256: what broke the first version
    x = D.sample_images(train, spec)  # default: all 20, as the split holds fewer than 1000
    assert x.shape == (20, 3, 8, 8) and torch.equal(x, D.sample_images(train, spec))
    plain = D.ImageFolderDataset(tmp_path / "train", 8, train=False)  # how eval reads them
    files = {tuple(spec.normalize(plain[i][0][None])[0].flatten().tolist())
             for i in range(len(plain))}
    assert {tuple(img.flatten().tolist()) for img in x} == files
    assert len(written) == 40  # 20 of them are the validation split's
    assert D.sample_images(train, spec, 7).shape[0] == 7
    with pytest.raises(D.DataError, match="21 calibration images asked for; the "
                                          "imagefolder:.* training split has 20"):
        D.sample_images(train, spec, 21)


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.ImageFolderDataset(tmp_path / "none")
    bad = tmp_path / "train" / "cat" / "broken.JPEG"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8 truncated")
    dataset = D.ImageFolderDataset(tmp_path / "train", size=8)
    with pytest.raises(D.DataError, match="broken.JPEG is not a readable image"):
        dataset[0]
    # decoded in worker processes: the same one line, not the worker's traceback
    _jpeg(tmp_path / "val" / "cat" / "a.JPEG", (16, 16), (1, 2, 3))
    train, _, _ = D.build_loaders(f"imagefolder:{tmp_path}", batch_size=1, workers=2,
                                  image_size=8)
    with pytest.raises(D.DataError) as err:
        next(iter(train.batches()))
    message = str(err.value)
    assert "broken.JPEG is not a readable image" in message and "\n" not in message
    assert "Traceback" not in message


def test_random_crop_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 6, 6)
    y = D.random_crop_flip(x, pad=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        assert any(torch.equal(y[i], padded[i, :, a:a + 6, b:b + 6])
                   for a in range(5) for b in range(5))
    assert not torch.equal(y, x)
    z = D.random_crop_flip(x, pad=0, flip=True, generator=g)
    flipped = [torch.equal(z[i], x[i].flip(2)) for i in range(16)]
    assert all(f or torch.equal(z[i], x[i]) for i, f in enumerate(flipped))
    assert 0 < sum(flipped) < 16


def test_tensor_loader_is_reproducible_resumable_and_shards_exactly():
    spec = D.DataSpec("t", 40, 1, 8, (0.0,), (1.0,), pad=2)  # labels 0..39 mark the images
    images = torch.randint(0, 255, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)
    full = D.TensorLoader(images, labels, spec, 8, train=True, seed=3)
    full.set_epoch(2)
    a = list(full.batches())
    b = list(full.batches(start=2))
    assert len(a) == 5 and all(torch.equal(p[0], q[0]) for p, q in zip(a[2:], b))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == list(range(40))
    full.set_epoch(3)
    assert not torch.equal(next(iter(full))[1], a[0][1])
    ranks = [D.TensorLoader(images, labels, spec, 8, train=True, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    for (x, y), (x0, y0), (x1, y1) in zip(a, *[r.batches() for r in ranks]):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)



def test_a_folder_of_a_users_images_is_read_as_the_model_was_trained(tmp_path, capsys):
    """A nin trained on one-channel Fashion-MNIST files, evaluated on an image folder of the
    same test images saved as PNG (half greyscale, half RGB with equal channels): the
    folder is read as the model takes its images (timm's input_img_mode "L" for a
    one-channel model, the model's size, the mean and std it was trained with, the whole
    image), so its top-1 is that of the test images given to the model by hand. It used to
    be read as 224 px RGB with ImageNet's mean: "nin was built for 1-channel input ...
    Build it with in_channels=3". A conversion reads such a folder the same way."""
    from deeproots.conversion.checkpoint import convert_checkpoint
    from deeproots.training.evaluate import evaluate, load_for_eval
    from deeproots.training.loop import train
    from helpers import train_cfg

    written = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=24, size=8)
    train(train_cfg(tmp_path / "fm", tmp_path / "run", model="nin", epochs=1))
    folder = tmp_path / "mine"
    for split, (xs, ys) in (("train", written["train"]), ("val", written["t10k"])):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (folder / split / str(y)).mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(x, "L")
            (img if i % 2 else img.convert("RGB")).save(folder / split / str(y) / f"{i}.png")
    for c in range(4, 10):  # nin has 10 outputs, the rule uses 0-3: the rest one image each
        (folder / "train" / str(c)).mkdir()
        Image.fromarray(written["train"][0][0], "L").save(folder / "train" / str(c) / "x.png")
    ckpt = tmp_path / "run" / "best.pt"
    model, loader, spec, _, _ = load_for_eval(ckpt, data=f"imagefolder:{folder}", workers=0)
    assert (spec.in_channels, spec.image_size, spec.mean, spec.std) == (1, 8, (72.94,), (90.02,))
    got = evaluate(model, loader)
    images, labels = written["t10k"]
    with torch.no_grad():
        logits = model((torch.from_numpy(images).float()[:, None] - 72.94) / 90.02)
    by_hand = (logits.argmax(1) == torch.from_numpy(labels).long()).float().mean().item()
    assert got.n == len(labels) and got.top1 == pytest.approx(by_hand)
    from deeproots.cli import main

    assert main(["eval", str(ckpt), "--data", f"imagefolder:{folder}", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {by_hand:.4f}" in out
    assert ("its images read as fashion-mnist's were: 1 channel at 8x8, normalised with "
            "mean 72.94 and std 90.02") in out
    assert main(["eval", str(ckpt), "--data", f"imagefolder:{folder}", "--workers", "0",
                 "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["read_as"] == {
        "in_channels": 1, "image_size": 8, "mean": [72.94], "std": [90.02],
        "crop_fraction": 1.0}
    # --mean and --std (timm's 0..1 scale) over the model's own: the images as normalised
    x = torch.from_numpy(images).float()[:, None]
    with torch.no_grad():
        other = (model((x - 127.5) / 63.75).argmax(1) == torch.from_numpy(labels).long())
    _, loader2, spec2, _, _ = load_for_eval(ckpt, data=f"imagefolder:{folder}", workers=0,
                                            mean=[0.5], std=[0.25])
    assert (spec2.mean, spec2.std) == ((127.5,), (63.75,))
    assert evaluate(model, loader2).top1 == pytest.approx(other.float().mean().item())
    _, _, summary = convert_checkpoint(ckpt, "root-4", data=f"imagefolder:{folder}",
                                       calibration_images_n=16, stages=False)
    assert summary.top1_before == pytest.approx(by_hand)
    # a fine-tune on the folder reads it the same way, and its model says so (timm's cfg)
    from deeproots.training.checkpoint import load_checkpoint, model_from_checkpoint

    train(train_cfg(tmp_path / "fm", tmp_path / "ft", model=None, init=str(ckpt),
                    data=f"imagefolder:{folder}", epochs=1, batch_size=8, workers=0))
    state = load_checkpoint(tmp_path / "ft" / "best.pt")
    assert {k: state["data"][k] for k in ("in_channels", "image_size", "mean", "crop_fraction")
            } == {"in_channels": 1, "image_size": 8, "mean": (72.94,), "crop_fraction": 1.0}
    cfg = model_from_checkpoint(state, "ft").pretrained_cfg
    assert cfg["input_size"] == (1, 8, 8) and cfg["crop_pct"] == 1.0


def test_a_folders_size_is_the_one_asked_else_the_models_own_else_its_runs_else_224():
    """One rule for the size an image folder is read at, for the conversion, eval and a
    fine-tune alike (each had its own copy of it)."""
    assert D.folder_size({"image_size": 8}, given=12, default=32) == 12
    assert D.folder_size({"image_size": 8}, default=32) == 8
    assert D.folder_size({"image_size": None, "in_channels": 1}, default=32) == 32
    assert D.folder_size(None) == 224


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (pixels 0 to 63,000): Pillow's convert, as torchvision's ImageFolder
    reads it, clips every pixel over 255 to white; the folder reads v / 257, rounded, in
    greyscale and in RGB. Floating-point pixels (a mode F TIFF) have no range: one line."""
    pixels = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "x.png")
    assert Image.open(tmp_path / "a" / "x.png").mode == "I;16"
    want = torch.from_numpy(np.rint(pixels / 257).astype(np.uint8))
    for channels in (1, 3):
        got, _ = D.ImageFolderDataset(tmp_path, size=8, train=False, channels=channels,
                                      crop_fraction=1.0)[0]
        assert got.shape == (channels, 8, 8) and torch.equal(got, want.expand(channels, 8, 8))
    Image.fromarray(pixels.astype(np.float32)).save(tmp_path / "a" / "y.tiff")
    with pytest.raises(D.DataError, match="y.tiff holds floating-point pixels"):
        D.ImageFolderDataset(tmp_path, size=8, train=False)[1]


def test_an_image_over_pillows_size_limit_is_one_line(tmp_path, monkeypatch):
    """Pillow refuses an image over twice MAX_IMAGE_PIXELS (a decompression bomb) with an
    error that is not an OSError: it was a traceback from a loader worker."""
    (tmp_path / "a").mkdir()
    Image.new("L", (20, 20)).save(tmp_path / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: over twice the limit
    with pytest.raises(D.DataError, match=r"big.png is too large to read \(Image size \(400 "
                                          r"pixels\) exceeds limit of 200 pixels"):
        D.ImageFolderDataset(tmp_path, size=8, train=False)[0]



def test_a_greyscale_folder_trains_a_one_channel_model(tmp_path):
    """train --in-channels 1 --mean --std on an image folder (timm's --in-chans 1, its
    --input-img-mode L): a nin of one input channel, its images read in greyscale and
    normalised with the mean and std given (0..1), recorded in the run so that eval reads
    them so; without --mean and --std, one line and nothing written. At 7 px the 8 px files
    are cropped, not resized (7 / 0.875 = 8): pixels by hand from Pillow's "L"."""
    from deeproots.config import TrainConfig
    from deeproots.training.checkpoint import load_checkpoint
    from deeproots.training.loop import train

    written = write_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=8)
    common = dict(model="nin", data=f"imagefolder:{tmp_path / 'imgs'}", epochs=1,
                  batch_size=4, image_size=7, device="cpu", workers=0, progress=False,
                  in_channels=1)
    with pytest.raises(D.DataError, match="reads 1-channel images and nothing says how its "
                                          "images were normalised; give --mean and --std"):
        train(TrainConfig(out=str(tmp_path / "none"), **common))
    assert not (tmp_path / "none").exists()
    train(TrainConfig(out=str(tmp_path / "run"), mean=[0.5], std=[0.25], **common))
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["model"]["conv1a.conv.weight"].shape[1] == 1
    assert state["data"]["mean"] == (127.5,) and state["data"]["std"] == (63.75,)
    _, test, spec = D.build_loaders(f"imagefolder:{tmp_path / 'imgs'}", batch_size=8,
                                    workers=0, image_size=7, like=D.folder_like(state["data"]))
    x, _ = next(test.batches())
    files = [p for p, _ in test.dataset.samples]  # the evaluation order
    for i in range(len(files)):
        grey = np.asarray(Image.open(files[i]).convert("L"), dtype=np.float32)[:7, :7]
        assert torch.allclose(x[i, 0], torch.from_numpy((grey - 127.5) / 63.75), atol=1e-6)
    assert len(written) == 16
