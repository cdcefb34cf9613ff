"""The two dataset layouts on RecordIO (insightface header/identity records, flat im2rec) and `property`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from marginface.data.recordio.reader import RecordIOReader
from marginface.data.recordio.record import IR_SIZE, IRHeader, frame_record, header_class, pack_header, unpack_header
from marginface.data.recordio.writer import RecordIOWriter
from marginface.errors import ConfigError, DataFormatError


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """Parse the first line of an insightface `property` file: `num_classes,height,width`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: property file not found") from None
    first = text.strip().splitlines()[0] if text.strip() else ""
    fields = [f.strip() for f in first.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        classes, height, width = (int(f) for f in fields)
        if classes <= 0 or height <= 0 or width <= 0:
            raise ValueError
    except ValueError:
        raise DataFormatError(
            f"{path}: first line {first[:60]!r} is not 'num_classes,height,width' with three positive integers"
        ) from None
    return classes, height, width


def write_property(path: str | os.PathLike, num_classes: int, image_size: tuple[int, int], images: int) -> None:
    """Write a `property` file atomically: `C,H,W`, then the image count (readers parse line 1 only)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n{images}\n", encoding="ascii")
    os.replace(tmp, path)


def write_identity_dataset(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] | Callable[[], tuple[int, int]] = (112, 112),
    flat: bool = False,
    label_array: bool = False,
) -> dict:
    """Write `train.rec`, `train.idx` and `property` from (label, encoded image) pairs grouped by label.

    Default is the insightface layout: key 0 a header `flag=2 [N+1, N+1+C]`, images at keys 1..N, identity
    records `[first, end)` at keys N+1..N+C. `flat=True` writes the im2rec layout (images at keys 0..N-1, no
    header or identity records). `label_array=True` stores face2rec2-style `[class, 1.0]` labels.
    Samples must come in ascending label order; files appear under their final names only when complete.
    `image_size` may be a callable, asked once every sample has been written.
    """
    out_dir = Path(out_dir)
    num_classes = int(num_classes)
    if num_classes <= 0:
        raise ConfigError(f"write_identity_dataset: num_classes must be positive, got {num_classes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = out_dir / "train.rec", out_dir / "train.idx"
    start = 0 if flat else 1
    counts = np.zeros(num_classes, dtype=np.int64)
    images = 0
    previous = -1
    with RecordIOWriter(rec_path, idx_path) as writer:
        header_offset = None
        if not flat:
            # The header record has a fixed size (40 bytes framed, no magic possible in its fields), so it can
            # be reserved now and filled once N is known, keeping it first in the file as face2rec2 does.
            header_offset = writer.reserve(0, 8 + IR_SIZE + 8)
        for label, data in samples:
            label = int(label)
            if not 0 <= label < num_classes:
                raise ConfigError(f"write_identity_dataset: label {label} outside 0..{num_classes - 1}")
            if label < previous:
                raise ConfigError(
                    f"write_identity_dataset: samples must be grouped by label in ascending order; got label "
                    f"{label} after {previous} (sample {images})"
                )
            previous = label
            key = start + images
            header = pack_header([label, 1.0] if label_array else label, record_id=key)
            writer.write(key, header + bytes(data))
            counts[label] += 1
            images += 1
        if not flat:
            ends = start + np.cumsum(counts)
            starts = ends - counts
            for cls in range(num_classes):
                key = images + 1 + cls
                writer.write(key, pack_header([float(starts[cls]), float(ends[cls])], record_id=key))
            header = pack_header([float(images + 1), float(images + 1 + num_classes)], record_id=0)
            writer.overwrite(header_offset, frame_record(header))
    if callable(image_size):  # known only once the samples are read (e.g. packing without --size)
        image_size = image_size()
    write_property(out_dir / "property", num_classes, image_size, images)
    return {
        "path": str(out_dir),
        "images": images,
        "classes": num_classes,
        "layout": "flat" if flat else "insightface",
        "label_array": bool(label_array),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "empty_classes": int((counts == 0).sum()),
    }


# ----------------------------------------------------------------------------------------------------------
# A dataset view over a .rec: layout detection, image keys, labels


def resolve_rec_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(rec, idx, property) for a dataset directory holding `train.rec` or for a `.rec` file path."""
    path = Path(path)
    if path.is_dir():
        recs = sorted(path.glob("*.rec"))
        rec = path / "train.rec" if (path / "train.rec").is_file() else (recs[0] if len(recs) == 1 else None)
        if rec is None:
            found = ", ".join(p.name for p in recs) or "none"
            raise DataFormatError(f"{path}: expected train.rec (or a single .rec) in the directory; found {found}")
    else:
        rec = path
    return rec, rec.with_suffix(".idx"), rec.parent / "property"


class RecordIOSource:
    """An insightface-layout or flat RecordIO dataset: image keys, class count and labels, read by position.

    `labels` comes from the identity records when they tile the images (no image is touched), otherwise
    from the image headers alone (one small read each). Labels are checked against `property`'s class count.
    """

    format = "recordio"

    def __init__(self, path: str | os.PathLike, num_classes: int | None = None, use_mmap: bool = True) -> None:
        self.rec_path, idx_path, self.property_path = resolve_rec_paths(path)
        self.path = self.rec_path
        self.reader = RecordIOReader(self.rec_path, idx_path, use_mmap=use_mmap)
        self.property: tuple[int, int, int] | None = None
        if self.property_path.is_file():
            self.property = read_property(self.property_path)
        self.label_array = False
        self._labels: np.ndarray | None = None
        self._identity_ranges: np.ndarray | None = None
        header = self._header_record()
        if header is not None:
            first, end = int(header.label[0]), int(header.label[1])
            self.layout = "insightface"
            self.image_keys = np.arange(1, first, dtype=np.int64)
            self.identity_keys = np.arange(first, end, dtype=np.int64)
            if end > first and (first not in self.reader or end - 1 not in self.reader):
                # Identity records are optional for training (arcface_torch never reads them); without them
                # labels come from the image headers.
                self.identity_keys = np.zeros(0, dtype=np.int64)
        else:
            self.layout = "flat"
            self.image_keys = np.sort(self.reader.keys)
            self.identity_keys = np.zeros(0, dtype=np.int64)
        if len(self.image_keys) == 0:
            raise DataFormatError(f"{self.rec_path}: RecordIO dataset holds no image records")
        if num_classes is not None:
            self.num_classes = int(num_classes)
        elif self.property is not None:
            self.num_classes = self.property[0]
        elif len(self.identity_keys):
            self.num_classes = len(self.identity_keys)
        else:
            self.num_classes = 1 << 24  # float32 labels are exact up to 2^24; the real count comes from labels
            self.num_classes = int(self.labels.max()) + 1
        self.image_size = (self.property[1], self.property[2]) if self.property is not None else None
        first_header = self.reader.read_header(int(self.image_keys[0]))
        self.label_array = first_header.flag > 0

    def _header_record(self) -> IRHeader | None:
        if 0 not in self.reader:
            return None
        header = self.reader.read_header(0)
        if header.flag < 2:
            return None
        first, end = float(header.label[0]), float(header.label[1])
        # A flat set with face2rec2 array labels also has flag 2 at key 0, but that record carries an image;
        # the header record has no payload and its ranges point at existing keys.
        if len(self.reader.read_prefix(0, IR_SIZE + 4 * header.flag + 1)) > IR_SIZE + 4 * header.flag:
            return None
        if not (first >= 1 and end >= first and first == int(first) and end == int(end)):
            return None
        if int(first) - 1 > len(self.reader) or (int(first) > 1 and (int(first) - 1) not in self.reader):
            raise DataFormatError(
                f"{self.reader.idx_path}: header record (key 0) says images are keys 1..{int(first) - 1} but "
                f"key {int(first) - 1} is not in the index"
            )
        return header

    def __len__(self) -> int:
        return len(self.image_keys)

    def describe_item(self, i: int) -> str:
        return f"{self.rec_path} key {int(self.image_keys[i])}"

    def _check_label(self, value: float, key: int) -> int:
        label = int(value)
        if label != value or not 0 <= label < self.num_classes:
            source = f"{self.property_path}" if self.property is not None else "the class count"
            raise DataFormatError(
                f"{self.rec_path}: key {key}: label {value:g} outside 0..{self.num_classes - 1} "
                f"(num_classes {self.num_classes} from {source}); expected an integer class id in range"
            )
        return label

    def _missing(self, key: int) -> DataFormatError:
        return DataFormatError(
            f"{self.reader.idx_path}: key {key} is missing; the header record (key 0) lists image keys "
            f"1..{len(self.image_keys)}"
        )

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        key = int(self.image_keys[i])
        try:
            record = self.reader.read(key)
        except KeyError:
            raise self._missing(key) from None
        try:
            header, payload = unpack_header(record)
        except DataFormatError as exc:
            raise DataFormatError(f"{self.rec_path}: key {key}: {exc}") from None
        return payload, self._check_label(header_class(header), key)

    def read(self, i: int) -> tuple[np.ndarray, int]:
        from marginface.data.decode import decode_rgb

        payload, label = self.read_bytes(i)
        return decode_rgb(payload, where=self.describe_item(i)), label

    @property
    def identity_ranges(self) -> np.ndarray | None:
        """(C, 2) int64 `[first_key, end_key)` per class from the identity records, or None (flat layout)."""
        if self._identity_ranges is None and len(self.identity_keys):
            ranges = np.empty((len(self.identity_keys), 2), dtype=np.int64)
            for row, key in enumerate(self.identity_keys.tolist()):
                header = self.reader.read_header(key)
                if header.flag < 2:
                    raise DataFormatError(
                        f"{self.rec_path}: key {key}: identity record has flag {header.flag}; "
                        "expected 2 labels [first_key, end_key)"
                    )
                ranges[row] = header.label[:2]
            self._identity_ranges = ranges
        return self._identity_ranges

    @property
    def labels(self) -> np.ndarray:
        """int64 class id of every image, in position order."""
        if self._labels is None:
            labels = self._labels_from_identities()
            if labels is None:
                labels = self._labels_from_headers()
            self._labels = labels
        return self._labels

    def _labels_from_identities(self) -> np.ndarray | None:
        ranges = self.identity_ranges
        if ranges is None:
            return None
        first = int(self.image_keys[0])
        # The ranges must tile the image keys in order; shuffled writers (rec2shufrec) break this, and then
        # the per-image headers are the truth.
        nonempty = ranges[ranges[:, 1] > ranges[:, 0]]
        if not len(nonempty) or nonempty[0, 0] != first or nonempty[-1, 1] != first + len(self.image_keys):
            return None
        if (nonempty[1:, 0] != nonempty[:-1, 1]).any():
            return None
        counts = ranges[:, 1] - ranges[:, 0]
        if (counts < 0).any():
            return None
        labels = np.repeat(np.arange(len(ranges), dtype=np.int64), counts)
        if len(ranges) > self.num_classes and (labels >= self.num_classes).any():
            bad = int(np.argmax(labels >= self.num_classes))
            self._check_label(float(labels[bad]), int(self.image_keys[bad]))
        return labels

    def _labels_from_headers(self) -> np.ndarray:
        labels = np.empty(len(self.image_keys), dtype=np.int64)
        for position, key in enumerate(self.image_keys.tolist()):
            try:
                header = self.reader.read_header(key)
            except KeyError:
                raise self._missing(key) from None
            labels[position] = self._check_label(header_class(header), key)
        return labels

    def close(self) -> None:
        self.reader.close()
