"""`open_dataset`: one entry point for RecordIO, image folders and list files, as a torch Dataset.

Items are `(float32 3xHxW in [-1, 1], int label)` after the training transform; `read(i)` gives the raw
`(uint8 HxWx3 RGB, label)` for tools and tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from marginface.data.decode import decode_rgb
from marginface.data.decode import image_size as encoded_size
from marginface.data.folders import open_source
from marginface.data.transforms import FaceTransform
from marginface.errors import DataFormatError


class FaceDataset(Dataset):
    """A face-identity dataset with `len()`, `num_classes`, `labels`, `read(i)` and transformed items.

    `set_epoch(e)` changes the flip pattern; it is a pure function of (seed, epoch, index), so workers and
    resumed runs agree. File handles are opened lazily in each process.
    """

    def __init__(
        self,
        source: Any,
        image_size: int | tuple[int, int] | None = None,
        flip_p: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.transform = FaceTransform(image_size=image_size, flip_p=flip_p, seed=seed)
        self.epoch = 0
        # Without a resize every image must have one size, or a batch cannot be stacked: the stored size, or
        # the first image's, is the one the others are held to.
        self._kept_size: tuple[int, int] | None = None
        if self.transform.size_hw is None and len(source):
            try:
                self._kept_size = source.image_size or encoded_size(source.read_bytes(0)[0], source.describe_item(0))
            except DataFormatError:  # a damaged first image is reported when it is read, like any other
                self._kept_size = None

    # -- metadata ------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.source.path)

    @property
    def format(self) -> str:
        return self.source.format

    @property
    def layout(self) -> str:
        return self.source.layout

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)

    @property
    def labels(self) -> np.ndarray:
        """int64 label of every item (cheap: RecordIO reads identity records or headers only)."""
        return self.source.labels

    @property
    def stored_size(self) -> tuple[int, int] | None:
        """(height, width) recorded by the dataset (RecordIO `property`), if any."""
        return self.source.image_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- access --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """The decoded image (uint8 HxWx3 RGB, untransformed) and its label."""
        return self.source.read(self._check_index(index))

    def read_bytes(self, index: int) -> tuple[bytes, int]:
        """The encoded image bytes and label, without decoding."""
        return self.source.read_bytes(self._check_index(index))

    def describe_item(self, index: int) -> str:
        return self.source.describe_item(self._check_index(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        data, label = self.source.read_bytes(index)
        # Decoding straight to the training size lets JPEGs use DCT scaling when the ratio is 2, 4 or 8.
        image = decode_rgb(data, where=lambda: self.source.describe_item(index), size=self.transform.size_hw)
        if self._kept_size is not None and image.shape[:2] != self._kept_size:
            self._refuse_size(index, image.shape[:2])
        return self.transform(image, index=index, epoch=self.epoch), label

    def _refuse_size(self, index: int, got: tuple[int, int]) -> None:
        height, width = self._kept_size
        reference = "the set's property" if self.source.image_size else "the first image"
        raise DataFormatError(
            f"{self.source.describe_item(index)}: image is {got[0]}x{got[1]}, but {reference} says {height}x{width} "
            f"and data.image_size=null keeps stored sizes; set data.image_size={height} to resize every image, or "
            f"repack with `marginface data pack --size {height}x{width}`"
        )

    def _check_index(self, index: int) -> int:
        index = int(index)
        n = len(self.source)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return (
            f"FaceDataset({str(self.path)!r}, format={self.format}, layout={self.layout}, "
            f"images={len(self)}, "
            f"classes={self.num_classes}, {self.transform})"
        )


def open_dataset(
    path: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    train: bool = True,
    flip_p: float = 0.5,
    seed: int = 0,
    num_classes: int | None = None,
    use_mmap: bool = True,
) -> FaceDataset:
    """Open a RecordIO set (directory or `.rec`), an image folder or a list file as a `FaceDataset`.

    `image_size` resizes (e.g. 56 for the CPU demo); `train=False` disables the random flip; `num_classes`
    overrides the class count found in the data (labels are checked against it). RecordIO records are read
    through a per-process memory map; `use_mmap=False` reads them with `os.pread` instead (slower by about a
    system call per record, but immune to SIGBUS if the file is truncated while in use).
    """
    source = open_source(path, num_classes=num_classes, use_mmap=use_mmap)
    return FaceDataset(source, image_size=image_size, flip_p=flip_p if train else 0.0, seed=seed)
