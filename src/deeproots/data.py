"""Real data in its standard formats: CIFAR-10, Fashion-MNIST, ImageNet-style folders.

Small datasets (CIFAR-10, Fashion-MNIST) are held as one uint8 tensor on the training device
and augmented a whole batch at a time there (:class:`TensorLoader`), as airbench does: no
per-image Python in the hot loop. Image folders are decoded with Pillow in DataLoader worker
processes. Both yield ``(uint8 images [N, C, H, W], int64 labels)``; :meth:`DataSpec.normalize`
turns a batch into mean-subtracted float input on the device.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .runtime import atomic_write

__all__ = [
    "DataSpec",
    "DataError",
    "load_cifar10",
    "load_fashion_mnist",
    "ImageFolderDataset",
    "TensorLoader",
    "random_crop_flip",
    "build_loaders",
    "fashion_mnist_dirs",
]


class DataError(ValueError):
    """Data that is missing, corrupt or not in the expected format."""


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
CIFAR10_TEST = ["test_batch"]

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    # split: (images, labels), with the MD5s published by the dataset's authors
    "train": (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
              ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")),
    "test": (("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
             ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DataSpec:
    """What a model and the augmentation need to know of a dataset.

    ``mean`` and ``std`` are per channel, on the 0..255 scale; ``pad`` is the zero padding of
    the random crop (the paper's 4 pixels for CIFAR-10), ``flip`` random mirroring."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    pad: int = 4
    flip: bool = True

    def normalize(self, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 [N, C, H, W] -> mean-subtracted, std-scaled float on the same device."""
        mean = torch.tensor(self.mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=dtype).view(1, -1, 1, 1)
        return (images.to(dtype) - mean) / std


# ---------------------------------------------------------------------------------------------
# Files: download with checksum, read the standard formats with clear errors.


def download(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest`` and check its MD5 as it streams; ``dest`` appears only
    when the whole file arrived with the right checksum. Raises DataError offline."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=30) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise DataError(f"{url} downloaded with MD5 {digest.hexdigest()}, expected {md5}; "
                            f"try again")

    try:
        return atomic_write(dest, fetch)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"could not download {url}: {err}") from err


def _unpickle(stream, name: str) -> dict:
    try:
        batch = pickle.load(stream, encoding="latin1")
        data, labels = batch["data"], batch["labels"]
    except Exception as err:  # truncated pickles raise several kinds of errors
        raise DataError(f"{name} is not a readable CIFAR-10 batch ({type(err).__name__}: "
                        f"{err}); delete it and fetch the dataset again") from err
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{name} has data of shape {data.shape} and {len(labels)} labels; a "
                        f"CIFAR-10 batch has (N, 3072) and N labels")
    return {"data": data, "labels": labels}


def load_cifar10(root: Path | str, split: str = "train", download_ok: bool = True):
    """CIFAR-10 from the standard python batches, as (uint8 [N, 3, 32, 32], int64 [N]).

    Looks in ``root`` for ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (read in
    place, not extracted). When neither is there and ``download_ok``, downloads the archive
    from the standard URL and checks its published MD5."""
    root = Path(root)
    names = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
    folder = root / "cifar-10-batches-py"
    archive = root / "cifar-10-python.tar.gz"
    batches = []
    if folder.is_dir():
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DataError(f"{path} is missing; {folder} should hold "
                                f"{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}")
            with open(path, "rb") as f:
                batches.append(_unpickle(f, str(path)))
    else:
        if not archive.is_file():
            if not download_ok:
                raise DataError(_missing("CIFAR-10", root, "cifar-10-batches-py/ or "
                                         "cifar-10-python.tar.gz", CIFAR10_URL))
            try:
                download(CIFAR10_URL, archive, CIFAR10_MD5)
            except DataError as err:
                raise DataError(_missing("CIFAR-10", root, "cifar-10-batches-py/ or "
                                         "cifar-10-python.tar.gz", CIFAR10_URL) +
                                f" ({err})") from err
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for name in names:
                    if name not in members:
                        raise DataError(f"{archive} has no {name}; is it cifar-10-python.tar.gz?")
                    batches.append(_unpickle(tar.extractfile(members[name]), f"{archive}:{name}"))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{archive} is corrupt or truncated ({err}); delete it and fetch "
                            f"it again from {CIFAR10_URL}") from err
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable gzip file ({err}); delete it and fetch "
                        f"it again") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    dims = raw[3]
    if dims != expected_dims:
        raise DataError(f"{path} has {dims} dimensions; expected {expected_dims}")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise DataError(f"{path} is truncated: its header says {shape} "
                        f"({math.prod(shape)} bytes), it holds {body.size}")
    return body.reshape(shape)


def fashion_mnist_dirs(data_dir: Optional[Path | str] = None) -> List[Path]:
    """Where Fashion-MNIST is looked for: ``data_dir``, ``$DEEPROOTS_DATA`` (and its
    ``fashion-mnist`` sub-folder), then Debian's ``/usr/share/datasets/fashion-mnist``."""
    dirs = []
    for base in (data_dir, os.environ.get("DEEPROOTS_DATA")):
        if base:
            dirs += [Path(base), Path(base) / "fashion-mnist"]
    dirs.append(Path(DEBIAN_FASHION_MNIST))
    return dirs



def load_fashion_mnist(data_dir: Optional[Path | str] = None, split: str = "train",
                       download_ok: bool = True):
    """Fashion-MNIST from the standard idx ``.gz`` files, as (uint8 [N, 1, 28, 28], int64 [N]).

    Searched in :func:`fashion_mnist_dirs` order; when no folder has the files and
    ``download_ok``, they are downloaded into ``data_dir`` (or ``$DEEPROOTS_DATA``, or
    ``./data``) and checked against their published MD5s."""
    (images_name, images_md5), (labels_name, labels_md5) = FASHION_MNIST_FILES[split]
    candidates = fashion_mnist_dirs(data_dir)
    found = next((d for d in candidates if (d / images_name).is_file()
                  and (d / labels_name).is_file()), None)
    if found is None:
        target = Path(data_dir or os.environ.get("DEEPROOTS_DATA") or "data") / "fashion-mnist"
        if not download_ok:
            raise DataError(_missing("Fashion-MNIST", candidates, f"{images_name} and "
                                     f"{labels_name}", FASHION_MNIST_URL))
        try:
            for name, md5 in FASHION_MNIST_FILES[split]:
                download(FASHION_MNIST_URL + name, target / name, md5)
        except DataError as err:
            raise DataError(
                _missing("Fashion-MNIST", candidates, f"{images_name} and {labels_name}",
                         FASHION_MNIST_URL) + f" ({err}). On Debian: apt-get install "
                "dataset-fashion-mnist") from err
        found = target
    images = _read_idx(found / images_name, 3)
    labels = _read_idx(found / labels_name, 1)
    if len(images) != len(labels):
        raise DataError(f"{found / images_name} has {len(images)} images but "
                        f"{found / labels_name} has {len(labels)} labels")
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def _missing(dataset: str, where, files: str, url: str) -> str:
    places = ", ".join(map(str, where)) if isinstance(where, (list, tuple)) else str(where)
    return (f"{dataset} not found: put {files} in {places} (or pass --data-dir), or run "
            f"where {url} can be reached to download it")


# ---------------------------------------------------------------------------------------------
# In-memory data on the device, augmented in batches.


def random_crop_flip(images: torch.Tensor, pad: int, flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """Random crops of zero-padded images, and random mirroring, for a whole batch at once.

    ``images`` is float [N, C, H, W] (already mean-subtracted, so the zero padding is the
    mean, as in the paper). Offsets and flips are drawn from ``generator`` on the CPU so
    that a run is reproducible on any device."""
    n, _, h, w = images.shape
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        index = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[index, chans, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


class TensorLoader:
    """Batches of an in-memory dataset, shuffled and augmented on its device.

    The order and the augmentation of epoch ``e``, batch ``b`` depend only on
    ``(seed, e, b)``, so a run resumed part-way sees exactly the batches it would have seen.
    With ``world_size > 1`` each rank takes its slice of every global batch, so the ranks
    together see what one process would see.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DataSpec,
                 batch_size: int, train: bool, device: torch.device | str = "cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 limit_batches: Optional[int] = None):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the number of "
                             f"processes ({world_size})")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.spec, self.batch_size, self.train = spec, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.limit_batches = limit_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation to produce."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.images)
        batches = n // self.batch_size if self.train else math.ceil(n / self.batch_size)
        return min(batches, self.limit_batches) if self.limit_batches else batches

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised, augmented (images, labels) batches from batch ``start`` on."""
        n = len(self.images)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        per_rank = self.batch_size // self.world_size
        for b in range(start, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.spec.normalize(self.images[index])
            if self.train:
                g = torch.Generator().manual_seed(
                    (self.seed * 100_003 + self.epoch) * 1_000_003 + b)
                x = random_crop_flip(x, self.spec.pad, self.spec.flip, g)
            y = self.labels[index]
            if self.world_size > 1:
                if self.train:
                    lo = self.rank * per_rank
                    x, y = x[lo:lo + per_rank], y[lo:lo + per_rank]
                else:
                    x, y = x[self.rank::self.world_size], y[self.rank::self.world_size]
            yield x, y

    def __iter__(self):
        return self.batches()


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders, decoded with Pillow in worker processes.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files, classes in sorted order, as torchvision's ImageFolder.

    Training: random-resized crop (scale 0.08-1, aspect 3/4-4/3) to ``size`` and a random
    flip. Evaluation: resize the short side to ``size / 0.875`` and take the centre crop.
    Items are (uint8 [3, size, size], label)."""

    def __init__(self, root: Path | str, size: int = 224, train: bool = True,
                 classes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; expected "
                            f"{self.root}/<class>/<image>.JPEG")
        self.classes = list(classes) if classes is not None else sorted(
            d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"{self.root} has no class sub-folders; expected "
                            f"{self.root}/<class>/<image>.JPEG")
        self.samples = [
            (p, i) for i, c in enumerate(self.classes) if (self.root / c).is_dir()
            for p in sorted((self.root / c).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"{self.root} has class folders but no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        self.size, self.train = size, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path} is not a readable image ({err})") from err
        x = random_resized_crop(x, self.size) if self.train else center_crop(x, self.size)
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(2)
        return x, label


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    y = F.interpolate(x[None].float(), size=(h, w), mode="bilinear", antialias=True,
                      align_corners=False)
    return y[0].round().clamp(0, 255).to(torch.uint8)


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop of a uint8 [C, H, W] image, resized to ``size`` x ``size``."""
    _, h, w = x.shape
    area = h * w
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(*scale))
        aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]))))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()))
            left = int(torch.randint(0, w - cw + 1, ()))
            return _resize(x[:, top:top + ch, left:left + cw], size, size)
    return center_crop(x, size)


def center_crop(x: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Resize the short side of a uint8 [C, H, W] image to ``size / crop_fraction``, then
    take the central ``size`` x ``size``."""
    _, h, w = x.shape
    short = round(size / crop_fraction)
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (
        max(short, round(h * short / w)), short)
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def build_loaders(data: str, *, data_dir=None, batch_size: int = 128, device="cpu",
                  seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 4,
                  image_size: int = 224, limit_train_batches: Optional[int] = None,
                  limit_eval_batches: Optional[int] = None, download_ok: bool = True):
    """Train and test loaders and the :class:`DataSpec` for ``data``: ``fashion-mnist``,
    ``cifar10`` or ``imagefolder:PATH`` (with ``PATH/train`` and ``PATH/val``)."""
    if data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        train = load_fashion_mnist(data_dir, "train", download_ok)
        test = load_fashion_mnist(data_dir, "test", download_ok)
        spec = DataSpec("fashion-mnist", 10, 1, 28, (72.94,), (90.02,), pad=2, flip=True)
    elif data == "cifar10":
        root = data_dir or os.environ.get("DEEPROOTS_DATA") or "data"
        train = load_cifar10(root, "train", download_ok)
        test = load_cifar10(root, "test", download_ok)
        spec = DataSpec("cifar10", 10, 3, 32, (125.31, 122.95, 113.87), (62.99, 62.09, 66.70))
    elif data.startswith("imagefolder:"):
        return _folder_loaders(Path(data.split(":", 1)[1]), batch_size, seed, rank,
                               world_size, workers, image_size, limit_train_batches,
                               limit_eval_batches)
    else:
        raise ValueError(f"unknown data {data!r}; accepted: fashion-mnist, cifar10, "
                         f"imagefolder:PATH")
    common = dict(spec=spec, batch_size=batch_size, device=device, seed=seed, rank=rank,
                  world_size=world_size)
    return (TensorLoader(*train, train=True, limit_batches=limit_train_batches, **common),
            TensorLoader(*test, train=False, limit_batches=limit_eval_batches, **common),
            spec)


class FolderLoader:
    """A DataLoader over an image folder with the interface of :class:`TensorLoader`."""

    def __init__(self, dataset, spec, batch_size, train, seed, rank, world_size, workers,
                 limit_batches):
        from torch.utils.data import DataLoader, DistributedSampler

        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be a multiple of the number of "
                             f"processes ({world_size})")
        self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed,
                                          drop_last=train)
        self.loader = DataLoader(dataset, batch_size // world_size, sampler=self.sampler,
                                 num_workers=workers, drop_last=train,
                                 persistent_workers=workers > 0)
        self.spec, self.train, self.limit_batches = spec, train, limit_batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.limit_batches) if self.limit_batches else n

    def batches(self, start: int = 0):
        for b, (x, y) in enumerate(self.loader):
            if b >= len(self):
                break
            if b >= start:
                yield self.spec.normalize(x), y


def _folder_loaders(root, batch_size, seed, rank, world_size, workers, image_size,
                    limit_train, limit_eval):
    train_set = ImageFolderDataset(root / "train", image_size, train=True)
    test_set = ImageFolderDataset(root / "val", image_size, train=False,
                                  classes=train_set.classes)
    spec = DataSpec(f"imagefolder:{root}", len(train_set.classes), 3, image_size,
                    IMAGENET_MEAN, IMAGENET_STD, pad=0, flip=False)
    common = dict(spec=spec, batch_size=batch_size, seed=seed, rank=rank,
                  world_size=world_size, workers=workers)
    return (FolderLoader(train_set, train=True, limit_batches=limit_train, **common),
            FolderLoader(test_set, train=False, limit_batches=limit_eval, **common), spec)
