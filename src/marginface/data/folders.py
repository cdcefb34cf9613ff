"""Image-folder (one sub-folder per identity) and list-file (`path label` per line) datasets, and
`open_source`, which picks the right raw source for a path without importing torch.

Every source offers the same small interface: `len()`, `num_classes`, `labels`, `read_bytes(i)` and
`read(i) -> (uint8 HxWx3 RGB, label)`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from marginface.data.decode import decode_rgb
from marginface.data.recordio import RecordIOSource
from marginface.errors import DataFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class _FileSource:
    format = "files"
    layout = "files"

    def __init__(self, path: Path, files: list[Path], labels: np.ndarray, num_classes: int) -> None:
        self.path = path
        self.files = files
        self.labels = labels
        self.num_classes = int(num_classes)
        self.image_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def describe_item(self, i: int) -> str:
        return str(self.files[i])

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        path = self.files[i]
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise DataFormatError(f"{path}: cannot read image file: {exc.strerror}") from None
        return data, int(self.labels[i])

    def read(self, i: int) -> tuple[np.ndarray, int]:
        data, label = self.read_bytes(i)
        return decode_rgb(data, where=str(self.files[i])), label

    def close(self) -> None:
        pass


class ImageFolderSource(_FileSource):
    """`root/<identity>/<image>`: labels are the ranks of the sorted identity folder names."""

    format = "image-folder"
    layout = "folders"

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataFormatError(f"{root}: not a directory; expected an image folder with one folder per identity")
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise DataFormatError(
                f"{root}: empty image folder; expected one sub-folder per identity containing images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        files: list[Path] = []
        labels: list[int] = []
        empty = []
        for label, name in enumerate(classes):
            folder = root / name
            found = sorted(
                entry.name
                for entry in os.scandir(folder)
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                empty.append(name)
            files.extend(folder / f for f in found)
            labels.extend([label] * len(found))
        if not files:
            raise DataFormatError(
                f"{root}: image folder has {len(classes)} identity folders but no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        if empty:
            # Kept as classes so labels stay tied to sorted folder names; they only cost unused class centres.
            warnings.warn(f"{root}: {len(empty)} identity folder(s) without images, e.g. {empty[0]!r}", stacklevel=2)
        super().__init__(root, files, np.asarray(labels, dtype=np.int64), len(classes))
        self.classes = classes


class ListFileSource(_FileSource):
    """A text file of `path label` lines: paths relative to the list's directory, the label the last field.

    The im2rec `.lst` form `index<TAB>label<TAB>path` is accepted; blank lines and `#` comments are skipped.
    """

    format = "list-file"
    layout = "list"

    def __init__(self, list_path: str | os.PathLike, num_classes: int | None = None) -> None:
        list_path = Path(list_path)
        base = list_path.parent
        files: list[Path] = []
        labels: list[int] = []
        try:
            text = list_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataFormatError(f"{list_path}: list file is not UTF-8 text") from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) == 3 and _is_int(fields[0]) and _is_number(fields[1]):
                path_text, label_text = fields[2], fields[1]  # im2rec .lst
            else:
                parts = line.rsplit(None, 1)
                if len(parts) != 2 or not _is_number(parts[1]):
                    raise DataFormatError(
                        f"{list_path}: line {number}: {line[:80]!r} has no label; expected 'path label' "
                        "with an integer label"
                    )
                path_text, label_text = parts
            label = float(label_text)
            if label != int(label) or label < 0:
                raise DataFormatError(f"{list_path}: line {number}: label {label_text!r} is not a non-negative integer")
            path = Path(path_text.strip())
            files.append(path if path.is_absolute() else base / path)
            labels.append(int(label))
        if not files:
            raise DataFormatError(f"{list_path}: list file has no 'path label' lines")
        label_array = np.asarray(labels, dtype=np.int64)
        found_classes = int(label_array.max()) + 1
        if num_classes is not None and found_classes > num_classes:
            bad = int(np.argmax(label_array >= num_classes))
            raise DataFormatError(f"{list_path}: {files[bad]} has label {labels[bad]}, outside 0..{num_classes - 1}")
        super().__init__(list_path, files, label_array, num_classes or found_classes)


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def open_source(path: str | os.PathLike, num_classes: int | None = None, use_mmap: bool = True) -> Any:
    """The raw source behind a dataset path: RecordIOSource, ImageFolderSource or ListFileSource."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(
            f"{path}: dataset not found; expected a RecordIO directory or .rec file, an image folder, or a list file"
        )
    if path.is_dir():
        if (path / "train.rec").is_file() or any(path.glob("*.rec")):
            return RecordIOSource(path, num_classes=num_classes, use_mmap=use_mmap)
        source = ImageFolderSource(path)
        if num_classes is not None:
            if num_classes < source.num_classes:
                raise DataFormatError(f"{path}: {source.num_classes} identity folders but num_classes={num_classes}")
            source.num_classes = int(num_classes)
        return source
    if path.suffix == ".rec":
        return RecordIOSource(path, num_classes=num_classes, use_mmap=use_mmap)
    if path.suffix == ".idx" and path.with_suffix(".rec").is_file():
        return RecordIOSource(path.with_suffix(".rec"), num_classes=num_classes, use_mmap=use_mmap)
    if path.name == "property":
        return RecordIOSource(path.parent, num_classes=num_classes, use_mmap=use_mmap)
    return ListFileSource(path, num_classes=num_classes)
