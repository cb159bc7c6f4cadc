"""Real data in its standard formats: CIFAR-10, Fashion-MNIST, ImageNet-style folders.

The datasets are a table (:data:`DATASETS`, like the group schedules): name, classes, image
size, per-channel mean and std, files and their published checksums. Small datasets
(CIFAR-10, Fashion-MNIST) are held as one uint8 tensor on the training device and augmented a
whole batch at a time there (:class:`TensorLoader`), as airbench does: no per-image Python in
the hot loop. Image folders are decoded with Pillow in DataLoader worker processes
(:class:`FolderLoader`). Both loaders share one small interface (``len()``, ``num_samples``,
``set_epoch``, ``batches(start)``) and yield ``(float images [N, C, H, W], int64 labels)``:
mean-subtracted and std-scaled by :meth:`DataSpec.normalize`.

Nothing from outside runs code: CIFAR-10's pickled batches are read by an unpickler that
admits only what a CIFAR batch holds, archives are checked against their published MD5
before they are read, and downloads go over https and are checked before they are moved
into place.
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import DataError, DeeprootsError
from ..runtime import atomic_write

__all__ = [
    "DataSpec",
    "Dataset",
    "DATASETS",
    "DataError",
    "load_cifar10",
    "load_fashion_mnist",
    "ImageFolderDataset",
    "folder_like",
    "folder_size",
    "check_normalisation",
    "TensorLoader",
    "FolderLoader",
    "random_crop_flip",
    "crop_flip_draws",
    "apply_crop_flip",
    "build_loaders",
    "fashion_mnist_dirs",
    "dataset_names",
    "calibration_images",
    "sample_images",
]


@dataclass(frozen=True)
class DataSpec:
    """What a model and the augmentation need to know of a dataset.

    ``mean`` and ``std`` are per channel, on the 0..255 scale; ``pad`` is the zero padding of
    the random crop (the paper's 4 pixels for CIFAR-10), ``flip`` random mirroring;
    ``crop_fraction`` the share of an evaluation image's short side kept (an image folder's
    centre crop, 0.875; a dataset's images are whole)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    pad: int = 4
    flip: bool = True
    crop_fraction: float = 1.0

    def normalize(self, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 [N, C, H, W] -> mean-subtracted, std-scaled float on the same device."""
        mean, std = _mean_std(self, images.device, dtype)
        return (images.to(dtype) - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std(spec: DataSpec, device: torch.device, dtype: torch.dtype):
    """``spec``'s mean and std as [1, C, 1, 1] tensors on ``device``, made once: a new small
    tensor on a GPU for every batch would be a copy that waits for the queue."""
    return (torch.tensor(spec.mean, device=device, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(spec.std, device=device, dtype=dtype).view(1, -1, 1, 1))


@dataclass(frozen=True)
class Dataset:
    """One row of the dataset table: its :class:`DataSpec`, where it is downloaded from, and
    its files per split with their published MD5s (``None``: checked through the archive)."""

    spec: DataSpec
    url: str
    files: Dict[str, Tuple[Tuple[str, Optional[str]], ...]]
    aliases: Tuple[str, ...] = field(default=())


CIFAR10_TRAIN = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
CIFAR10_TEST = ["test_batch"]
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

DATASETS: Dict[str, Dataset] = {
    "fashion-mnist": Dataset(
        DataSpec("fashion-mnist", 10, 1, 28, (72.94,), (90.02,), pad=2, flip=True),
        # the dataset's own files, served over https from its authors' repository
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        {"train": (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                   ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")),
         "test": (("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                  ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"))},
        aliases=("fashion_mnist", "fmnist")),
    "cifar10": Dataset(
        DataSpec("cifar10", 10, 3, 32, (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
        "https://www.cs.toronto.edu/~kriz/",
        {"archive": (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
         "train": tuple((n, None) for n in CIFAR10_TRAIN),
         "test": tuple((n, None) for n in CIFAR10_TEST)},
        aliases=("cifar-10",)),
}
CIFAR10_URL = DATASETS["cifar10"].url + DATASETS["cifar10"].files["archive"][0][0]
CIFAR10_MD5 = DATASETS["cifar10"].files["archive"][0][1]
FASHION_MNIST_URL = DATASETS["fashion-mnist"].url
FASHION_MNIST_FILES = DATASETS["fashion-mnist"].files


def dataset_names() -> List[str]:
    """The names ``--data`` accepts."""
    return [*DATASETS, "imagefolder:PATH"]


def dataset_name(data: str) -> Optional[str]:
    """The :data:`DATASETS` name ``data`` gives (its own, or an alias such as ``fmnist``), or
    None (an image folder, or no dataset of the table)."""
    return next((k for k, d in DATASETS.items() if data == k or data in d.aliases), None)


def check_data_fits(data: str, model, what: str, doing: str) -> None:
    """For a dataset of :data:`DATASETS` (whose channels and classes are known before a file
    is read or downloaded): a one-line DataError where ``model`` (``what``: how the message
    names it) was built for other channels or classes, so that ``doing`` (e.g. "evaluate")
    stops before the data is loaded. Models that do not say (a user's own) pass."""
    name = dataset_name(data)
    if name is None:
        return
    spec = DATASETS[name].spec
    channels, classes = getattr(model, "in_channels", None), getattr(model, "num_classes", None)
    if isinstance(channels, int) and channels != spec.in_channels:
        raise DataError(f"{what} takes {channels}-channel images and {name} has "
                        f"{spec.in_channels}-channel ones: {doing} it on images like those it "
                        f"was trained on")
    if isinstance(classes, int) and classes and classes != spec.num_classes:
        raise DataError(f"{what} has {classes} classes but {name} has {spec.num_classes}: "
                        f"{doing} it on the data it was trained on")


# ---------------------------------------------------------------------------------------------
# Files: download with checksum, read the standard formats with clear errors.


def md5_of(path: Path) -> str:
    """The MD5 of a file, read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` (https only) to ``dest`` and check its MD5 as it streams; ``dest``
    appears only when the whole file arrived with the right checksum. Raises DataError
    offline or on a wrong checksum."""
    if not url.startswith("https://"):
        raise DataError(f"refusing to download {url}: only https URLs are fetched")
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


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers and
    numpy arrays. Any other global (a function to call, a class to build) is refused, so a
    crafted batch cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch "
                                     f"never holds (refused: it could run code)")


def _unpickle(stream, name: str) -> dict:
    try:
        batch = _CifarUnpickler(stream, encoding="latin1").load()
        data, labels = batch["data"], batch["labels"]
    except Exception as err:  # truncated or crafted pickles raise several kinds of errors
        raise DataError(f"{name} is not a readable CIFAR-10 batch ({type(err).__name__}: "
                        f"{err}); delete it and fetch the dataset again") from err
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{name} holds {type(data).__name__} data; a CIFAR-10 batch holds a "
                        f"uint8 numpy array")
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{name} has data of shape {data.shape} and {len(labels)} labels; a "
                        f"CIFAR-10 batch has (N, 3072) and N labels")
    return {"data": data, "labels": labels}


def load_cifar10(root: Path | str, split: str = "train", download_ok: bool = True):
    """CIFAR-10 from the standard python batches, as (uint8 [N, 3, 32, 32], int64 [N]).

    Looks in ``root`` for ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (checked
    against its published MD5, then read in place, not extracted). When neither is there and
    ``download_ok``, downloads the archive from the standard URL."""
    root = Path(root)
    names = [n for n, _ in DATASETS["cifar10"].files[split]]
    folder = root / "cifar-10-batches-py"
    archive = root / "cifar-10-python.tar.gz"
    missing = _missing("CIFAR-10", root, "cifar-10-batches-py/ or cifar-10-python.tar.gz",
                       CIFAR10_URL)
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
                raise DataError(missing)
            try:
                download(CIFAR10_URL, archive, CIFAR10_MD5)
            except DataError as err:
                raise DataError(f"{missing} ({err})") from err
        elif md5_of(archive) != CIFAR10_MD5:
            raise DataError(f"{archive} has MD5 {md5_of(archive)}, not the published "
                            f"{CIFAR10_MD5}; delete it and fetch it again from {CIFAR10_URL}")
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
    """Where Fashion-MNIST is looked for: ``data_dir`` (and its ``fashion-mnist`` sub-folder)
    alone when it is given; else ``$DEEPROOTS_DATA`` (likewise), then Debian's
    ``/usr/share/datasets/fashion-mnist``."""
    if data_dir:
        return [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    dirs = []
    if os.environ.get("DEEPROOTS_DATA"):
        base = Path(os.environ["DEEPROOTS_DATA"])
        dirs += [base, base / "fashion-mnist"]
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


def crop_flip_draws(n: int, pad: int, flip: bool, generator: torch.Generator
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of :func:`random_crop_flip` for ``n`` images: row and column offsets
    (0 to 2 x pad) and mirror flags, drawn on the CPU from ``generator``."""
    zeros = torch.zeros(n, dtype=torch.int64)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else zeros
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator) if pad else zeros
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=bool)
    return dy, dx, mirror


def apply_crop_flip(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor,
                    mirror: torch.Tensor) -> torch.Tensor:
    """Crops of zero-padded ``images`` at offsets ``dy``, ``dx``, mirrored where ``mirror``;
    the draws on the images' device. A few tensor operations for the whole batch."""
    n, _, h, w = images.shape
    dev = images.device
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        index = torch.arange(n, device=dev)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        images = padded[index, chans, rows, cols]
    return torch.where(mirror[:, None, None, None], images.flip(3), images)


def random_crop_flip(images: torch.Tensor, pad: int, flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """Random crops of zero-padded images, and random mirroring, for a whole batch at once.

    ``images`` is float [N, C, H, W] (already mean-subtracted, so the zero padding is the
    mean, as in the paper). Offsets and flips are drawn from ``generator`` on the CPU so
    that a run is reproducible on any device."""
    dy, dx, mirror = crop_flip_draws(len(images), pad, flip, generator)
    if not pad and not flip:
        return images
    dev = images.device
    return apply_crop_flip(images, pad, dy.to(dev), dx.to(dev), mirror.to(dev))


def check_batch_split(batch_size: int, world_size: int) -> int:
    """The per-process batch: ``batch_size`` must split evenly over the processes."""
    if batch_size % world_size:
        raise DeeprootsError(f"batch size {batch_size} must be a multiple of the number of "
                             f"processes ({world_size})")
    return batch_size // world_size


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """A DataError unless every label is a class index from 0 to ``num_classes - 1``."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{where} has labels from {int(labels.min())} to {int(labels.max())}; "
                        f"{num_classes} classes take labels 0 to {num_classes - 1}")


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
        self.per_rank = check_batch_split(batch_size, world_size)
        check_labels(labels, spec.num_classes,
                     f"the {spec.name} {'train' if train else 'test'} split")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.spec, self.batch_size, self.train = spec, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.limit_batches = limit_batches
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Images in the split."""
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation to produce."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.num_samples
        batches = n // self.batch_size if self.train else math.ceil(n / self.batch_size)
        return min(batches, self.limit_batches) if self.limit_batches else batches

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised, augmented (images, labels) batches from batch ``start`` on.

        The epoch's order and every batch's crops and flips are drawn first and moved to the
        device in one copy each: the host never waits for the GPU between batches."""
        n, dev, spec = self.num_samples, self.images.device, self.spec
        batches = range(start, len(self))
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(dev)
            draws = [crop_flip_draws(min(self.batch_size, n - b * self.batch_size), spec.pad,
                                     spec.flip, torch.Generator().manual_seed(
                                         (self.seed * 100_003 + self.epoch) * 1_000_003 + b))
                     for b in batches]
            if draws:  # one copy each of the epoch's offsets and flips
                dys, dxs, flips = (torch.cat(part).to(dev) for part in zip(*draws))
        else:
            order = torch.arange(n, device=dev)
        at = 0
        for b in batches:
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = spec.normalize(self.images[index])
            if self.train:
                k = len(index)
                x = apply_crop_flip(x, spec.pad, dys[at:at + k], dxs[at:at + k],
                                    flips[at:at + k])
                at += k
            y = self.labels[index]
            if self.world_size > 1:
                if self.train:
                    lo = self.rank * self.per_rank
                    x, y = x[lo:lo + self.per_rank], y[lo:lo + self.per_rank]
                else:
                    x, y = x[self.rank::self.world_size], y[self.rank::self.world_size]
            yield x, y

    def __iter__(self):
        return self.batches()


# ---------------------------------------------------------------------------------------------
# ImageNet-style folders, decoded with Pillow in worker processes.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as PyTorch's DataLoader counts them):
    the most decoding processes a loader starts."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        return os.cpu_count() or 1


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files, classes in sorted order, as torchvision's ImageFolder.

    Training: random-resized crop (scale 0.08-1, aspect 3/4-4/3) to ``size`` and a random
    flip. Evaluation: resize the short side to ``size / crop_fraction`` and take the centre
    crop. Items are (uint8 [channels, size, size], label): each image read as RGB, or as
    greyscale (Pillow's "L") for ``channels=1``, as timm reads images for a one-channel
    model."""

    def __init__(self, root: Path | str, size: int = 224, train: bool = True,
                 classes: Optional[Sequence[str]] = None, channels: int = 3,
                 crop_fraction: float = 0.875):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; expected "
                            f"{self.root}/<class>/<image>.JPEG")
        # hidden folders (Jupyter's .ipynb_checkpoints, a sync tool's) are not classes
        folders = sorted(d.name for d in self.root.iterdir()
                         if d.is_dir() and not d.name.startswith("."))
        self.classes = list(classes) if classes is not None else folders
        if not self.classes:
            raise DataError(f"{self.root} has no class sub-folders; expected "
                            f"{self.root}/<class>/<image>.JPEG")
        if classes is not None:  # another split's classes: its images would go unlabelled
            extra = [name for name in folders if name not in self.classes]
            if extra:
                raise DataError(f"{self.root} has class folders the training split does not: "
                                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; "
                                f"the classes are the training split's "
                                f"({len(self.classes)}: {', '.join(self.classes[:5])}"
                                f"{' ...' if len(self.classes) > 5 else ''})")
        self.samples = [
            (p, i) for i, c in enumerate(self.classes) if (self.root / c).is_dir()
            for p in sorted((self.root / c).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise DataError(f"{self.root} has class folders but no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        if classes is None:  # the training split: a class with no image is an output never
            found = {label for _, label in self.samples}  # taught (torchvision refuses it too)
            empty = [c for i, c in enumerate(self.classes) if i not in found]
            if empty:
                raise DataError(f"{self.root} has class folders with no image "
                                f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:5])}"
                                f"{' ...' if len(empty) > 5 else ''}; remove them or add "
                                f"their images")
        self.size, self.train = size, train
        self.channels, self.crop_fraction = channels, crop_fraction
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError  # Pillow: only for image folders

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = eight_bit(img, path).convert(self.mode)
                x = torch.from_numpy(np.asarray(img).copy()).reshape(
                    img.size[1], img.size[0], -1).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path} is not a readable image ({err})") from err
        except Image.DecompressionBombError as err:  # over twice Pillow's MAX_IMAGE_PIXELS
            raise DataError(f"{path} is too large to read ({err}); resize it, or raise "
                            f"PIL.Image.MAX_IMAGE_PIXELS if you trust it") from err
        x = random_resized_crop(x, self.size) if self.train else center_crop(
            x, self.size, self.crop_fraction)
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(2)
        return x, label


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit greyscale modes
# (and its 32-bit one, which older Pillows open 16-bit PNGs as)


def eight_bit(img, path):
    """A Pillow image whose pixels are more than 8 bits (a 16-bit PNG or TIFF) scaled to
    8-bit greyscale (65535 -> 255: v / 257, rounded), where Pillow's own ``convert`` clips
    every value over 255 to white (torchvision's ImageFolder reads them so); an image of
    floats, which have no fixed range, is a one-line DataError. Others as they are."""
    from PIL import Image

    if img.mode == "F":
        raise DataError(f"{path} holds floating-point pixels (Pillow mode F), which have no "
                        f"fixed range to read as 8 bits; save it as an 8- or 16-bit image")
    if img.mode not in SIXTEEN_BIT:
        return img
    a = np.asarray(img).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{path} holds 32-bit pixels from {a.min()} to {a.max()}, outside "
                        f"16 bits; save it as an 8- or 16-bit image")
    return Image.fromarray(np.rint(a / 257).astype(np.uint8), "L")


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


def build_loaders(data: str, *, data_dir=None, batch_size: int = 128, device="cpu",
                  seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 4,
                  image_size: int = 224, limit_train_batches: Optional[int] = None,
                  limit_eval_batches: Optional[int] = None, download_ok: bool = True,
                  like: Optional[dict] = None):
    """Train and test loaders and the :class:`DataSpec` for ``data``: a name of
    :data:`DATASETS` (``fashion-mnist``, ``cifar10``) or ``imagefolder:PATH`` (with
    ``PATH/train`` and ``PATH/val``). ``like``: the data a trained model's images were
    prepared as (a checkpoint's ``data``: :func:`folder_like`); an image folder is then read
    the same way: its channels, mean and std and its centre crop."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} does not exist or is not a folder")
    name = dataset_name(data)
    if name == "fashion-mnist":
        train = load_fashion_mnist(data_dir, "train", download_ok)
        test = load_fashion_mnist(data_dir, "test", download_ok)
    elif name == "cifar10":
        root = data_dir or os.environ.get("DEEPROOTS_DATA") or "data"
        train = load_cifar10(root, "train", download_ok)
        test = load_cifar10(root, "test", download_ok)
    elif isinstance(data, str) and data.startswith("imagefolder:"):
        return _folder_loaders(Path(data.split(":", 1)[1]), batch_size, seed, rank,
                               world_size, workers, image_size, limit_train_batches,
                               limit_eval_batches, like)
    else:
        raise DeeprootsError(f"unknown data {data!r}; accepted: {', '.join(dataset_names())}")
    # the table's spec, sized as the files really are (small test files, resized copies)
    spec = replace(DATASETS[name].spec, image_size=int(train[0].shape[-1]))
    common = dict(spec=spec, batch_size=batch_size, device=device, seed=seed, rank=rank,
                  world_size=world_size)
    return (TensorLoader(*train, train=True, limit_batches=limit_train_batches, **common),
            TensorLoader(*test, train=False, limit_batches=limit_eval_batches, **common),
            spec)


CALIBRATION_IMAGES = 1000  # a calibrated conversion's default sample of the training split:
# NiN on Fashion-MNIST converts in under a minute on 2 cores (benchmarks/calibrated_rootify.py
# --calibration-images N); 1500, tried by hand, gave the same top-1


def calibration_images(data: str, images: Optional[int] = None, *, data_dir=None, download_ok: bool = True,
                       image_size: int = 224, seed: int = 0):
    """``images`` images of the training split of ``data``, as a model takes them
    (normalised, not augmented; for image folders, the first batches of the training
    loader), a random sample fixed by ``seed``; and the :class:`DataSpec`. What a calibrated
    conversion (``rootify(..., calibration=...)``) fits on."""
    train, _, spec = build_loaders(data, data_dir=data_dir, batch_size=256,
                                   image_size=image_size, download_ok=download_ok, workers=0)
    return sample_images(train, spec, images, seed), spec


def head(loader, images: int):
    """The first ``images`` of a test loader (its order fixed), as a loader of the same kind:
    where a quick evaluation is enough."""
    if isinstance(loader, TensorLoader):
        if images >= loader.num_samples:
            return loader
        return TensorLoader(loader.images[:images], loader.labels[:images], spec=loader.spec,
                            batch_size=loader.batch_size, train=False,
                            device=loader.images.device)
    limit = -(-images // loader.loader.batch_size)
    out = copy.copy(loader)
    out.limit_batches = min(limit, loader.limit_batches or limit)
    return out


def sample_images(train, spec: "DataSpec", images: Optional[int] = None, seed: int = 0
                  ) -> torch.Tensor:
    """``images`` images of the training loader ``train`` as a model takes them (normalised,
    not augmented: an image folder's centre crops), on the CPU, a random sample fixed by
    ``seed``; ``None``: :data:`CALIBRATION_IMAGES`, or the whole split where it holds fewer.
    More than the split holds, when asked for, is a one-line :class:`DataError`."""
    return sample_split(train, spec, [images], seed)[0][0]


def sample_split(train, spec: "DataSpec", counts: Sequence[Optional[int]], seed: int = 0
                 ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random samples of the training loader ``train`` (a permutation fixed by
    ``seed``, cut in turn), each as (images as a model takes them, labels): ``counts`` of
    them, e.g. calibration images to fit on and others to choose by. A count of ``None`` is
    :data:`CALIBRATION_IMAGES`, or what the split has left where that is fewer. More than the
    split holds, when asked for, is a one-line :class:`DataError`."""
    available, start, out = train.num_samples, 0, []
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    for n in counts:
        n = min(CALIBRATION_IMAGES, available - start) if n is None else n
        if start + n > available:
            raise DataError(f"{n} calibration images asked for; the {spec.name} training "
                            f"split has {available - start}"
                            + (f" left of its {available}" if start else ""))
        out.append(_read(train, spec, pick[start:start + n]))
        start += n
    return out


def _read(train, spec: "DataSpec", pick: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(train, TensorLoader):
        where = pick.to(train.images.device)
        return (spec.normalize(train.images[where].to("cpu")),
                train.labels[where].to("cpu"))
    # an image folder: the same files read as for evaluation (no random crop or flip)
    plain = ImageFolderDataset(train.dataset.root, train.dataset.size, train=False,
                               classes=train.dataset.classes, channels=train.dataset.channels,
                               crop_fraction=train.dataset.crop_fraction)
    items = [plain[int(i)] for i in pick]
    return (spec.normalize(torch.stack([x for x, _ in items])),
            torch.tensor([y for _, y in items], dtype=torch.int64))


class FolderLoader:
    """A DataLoader over an image folder with the interface of :class:`TensorLoader`."""

    def __init__(self, dataset, spec, batch_size, train, seed, rank, world_size, workers,
                 limit_batches):
        per_rank = check_batch_split(batch_size, world_size)
        self.dataset = dataset
        self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed,
                                          drop_last=train)
        workers = min(workers, usable_cpus())  # more only contend (and PyTorch warns)
        self.loader = DataLoader(dataset, per_rank, sampler=self.sampler,
                                 num_workers=workers, drop_last=train,
                                 persistent_workers=workers > 0)
        self.spec, self.train, self.limit_batches = spec, train, limit_batches

    @property
    def num_samples(self) -> int:
        """Images in the split."""
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.limit_batches) if self.limit_batches else n

    def batches(self, start: int = 0):
        """Yield normalised (images, labels) batches from batch ``start`` on (the batches
        before it are drawn and dropped, so the order is that of an uninterrupted epoch)."""
        iterator = iter(self.loader)
        for b in range(len(self)):
            try:
                x, y = next(iterator)
            except StopIteration:
                return
            except DataError as err:  # raised in a worker: keep its one line, not the trace
                raise DataError(str(err).strip().splitlines()[-1].split("DataError: ")[-1]) \
                    from None
            if b >= start:
                yield self.spec.normalize(x), y


def check_normalisation(data: Optional[str], mean, std) -> None:
    """``--mean``/``--std`` set how an image folder's images are normalised: a one-line
    error where ``data`` is a named dataset (normalised as its table says)."""
    if (mean is not None or std is not None) and not str(data or "").startswith(
            "imagefolder:"):
        raise DataError(f"--mean and --std set how an image folder's images are normalised; "
                        f"{data}'s are normalised as its models were trained: leave them out")


def folder_like(trained_on: Optional[dict], *, channels: Optional[int] = None,
                mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> Optional[dict]:
    """How an image folder is read for a trained model, as timm reads images from a model's
    ``pretrained_cfg``: the channels, mean and std, image size and centre crop its images
    were prepared with (``trained_on``: a checkpoint's ``data``; a named dataset's images
    are whole, 1.0; an image folder's 0.875). ``channels``: the model's own, where its
    checkpoint names no data (a state_dict); ``mean``/``std``: given on timm's 0..1 scale
    (``--mean``/``--std``; one value for every channel), over what it was trained with. None
    where nothing is known (a folder is then read as RGB with ImageNet's mean and std); a
    one-channel model of unknown data without ``mean`` and ``std``: mean None, refused when
    a folder is read."""
    data = trained_on if isinstance(trained_on, dict) else {}
    c = data.get("in_channels") or channels
    if c not in (1, 3):
        if mean is None and std is None:
            return None
        c = 3
    given = {}
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = tuple(float(v) for v in values)
        if len(values) not in (1, c) or not all(math.isfinite(v) for v in values) or (
                name == "std" and min(values) <= 0):
            counts = "1 number" if c == 1 else f"1 or {c} numbers"
            raise DataError(f"--{name} takes {counts} on the 0..1 scale (the model reads "
                            f"{c}-channel images){', above 0' if name == 'std' else ''}; got "
                            f"{' '.join(f'{v:g}' for v in values)}")
        given[name] = tuple(255 * v for v in (values * c if len(values) == 1 else values))
    own_mean, own_std = data.get("mean"), data.get("std")
    if not (own_mean and own_std and len(own_mean) == len(own_std) == c):
        own_mean, own_std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else (None, None)
    folder = str(data.get("name", "")).startswith("imagefolder:")
    mean_, std_ = given.get("mean", own_mean), given.get("std", own_std)
    return {"name": data.get("name"), "in_channels": c,
            "mean": None if mean_ is None else tuple(mean_),
            "std": None if std_ is None else tuple(std_),
            "image_size": data.get("image_size"),
            "crop_fraction": data.get("crop_fraction", 0.875 if folder or not data else 1.0)}


def folder_size(like: Optional[dict], *, given: Optional[int] = None,
                default: Optional[int] = None) -> int:
    """The size an image folder is read at: ``given`` (asked for), else the size the model's
    own images were read at (``like``, from :func:`folder_like`), else ``default`` (its run's
    configured size), else 224 (ImageNet's crop)."""
    return given or (like or {}).get("image_size") or default or 224


def _folder_loaders(root, batch_size, seed, rank, world_size, workers, image_size,
                    limit_train, limit_eval, like=None):
    like = like or {}
    channels, crop = like.get("in_channels", 3), like.get("crop_fraction", 0.875)
    if like and (like.get("mean") is None or like.get("std") is None):
        raise DataError(f"imagefolder:{root}: the model reads {channels}-channel images and "
                        f"nothing says how its images were normalised; give --mean and --std "
                        f"(on the 0..1 scale, as timm takes them)")
    train_set = ImageFolderDataset(root / "train", image_size, train=True, channels=channels,
                                   crop_fraction=crop)  # (its evaluation-style reads)
    test_set = ImageFolderDataset(root / "val", image_size, train=False,
                                  classes=train_set.classes, channels=channels,
                                  crop_fraction=crop)
    spec = DataSpec(f"imagefolder:{root}", len(train_set.classes), channels, image_size,
                    like.get("mean", IMAGENET_MEAN), like.get("std", IMAGENET_STD), pad=0,
                    flip=False, crop_fraction=crop)
    common = dict(spec=spec, batch_size=batch_size, seed=seed, rank=rank,
                  world_size=world_size, workers=workers)
    return (FolderLoader(train_set, train=True, limit_batches=limit_train, **common),
            FolderLoader(test_set, train=False, limit_batches=limit_eval, **common), spec)
