"""The competition submission CSV: writer, row codec and checker.

    image_id,PredictionString
    batch_01_vt/0021.jpg,0 0 0 ... 0            # size x size class indices, row-major, space-separated

`image_id` is the COCO `file_name`; the label map is the prediction at the image's full size, resized to
size x size with nearest-neighbour sampling in the convention of the competition baseline (albumentations
`A.Resize` on a mask = OpenCV INTER_NEAREST = torch's `nearest`): output pixel i takes source pixel
floor(i * H / size). Rows follow the test json's image order.

The writer streams: one row string exists at a time, and the file appears under its final name only when it is
complete (temp file + rename), so a crashed run never leaves a plausible-looking half CSV behind.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from dist_seg.data.prep.coco import build_class_map, load_coco

HEADER = ("image_id", "PredictionString")
DEFAULT_SIZE = 256
_TOKENS = [str(i) for i in range(256)]


def resize_nearest(label: np.ndarray, size: int) -> np.ndarray:
    """[H, W] label map -> [size, size]; output pixel (i, j) = label[floor(i*H/size), floor(j*W/size)]."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"resize_nearest: expected an [H, W] label map, got shape {label.shape}")
    h, w = label.shape
    rows = np.arange(size, dtype=np.int64) * h // size
    cols = np.arange(size, dtype=np.int64) * w // size
    return label[np.ix_(rows, cols)]


def encode_row(label: np.ndarray) -> str:
    """Flatten a small label map (values 0..255) row-major into space-separated integers."""
    flat = np.asarray(label).reshape(-1)
    return " ".join([_TOKENS[v] for v in flat.astype(np.uint8).tolist()])


def decode_row(text: str, size: int) -> np.ndarray:
    """PredictionString -> int64 [size, size]; ValueError saying what is wrong (count or a non-integer)."""
    tokens = text.split()
    if len(tokens) != size * size:
        raise ValueError(f"{len(tokens)} values, expected {size * size} ({size}x{size})")
    return _parse(tokens).reshape(size, size)


def _parse(tokens: list[str]) -> np.ndarray:
    try:
        return np.array(tokens, dtype=np.int64)
    except ValueError:
        for k, tok in enumerate(tokens):  # slow path, only on a bad row: name the first bad token
            if not tok.lstrip("-").isdigit():
                raise ValueError(f"value {tok[:20]!r} at position {k} is not an integer") from None
        raise


class SubmissionWriter:
    """Writes rows one at a time after checking them; `close()` renames the finished file into place."""

    def __init__(self, path: str | Path, size: int = DEFAULT_SIZE, num_classes: int = 256):
        if size < 1:
            raise ValueError(f"submission size {size} must be >= 1")
        self.path, self.size, self.num_classes = Path(path), size, num_classes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._f, lineterminator="\n")
        self._csv.writerow(HEADER)
        self.rows = 0

    def write(self, image_id: str, label: np.ndarray) -> None:
        """Append one row; `label` is the [size, size] map (already resized, see `resize_nearest`)."""
        label = np.asarray(label)
        where = f"{self.path}: row {self.rows + 1} (image {image_id!r})"
        if label.shape != (self.size, self.size):
            raise ValueError(f"{where}: label map {label.shape}, expected ({self.size}, {self.size})")
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"{where}: label map dtype {label.dtype} is not an integer type")
        if label.size and (int(label.min()) < 0 or int(label.max()) >= self.num_classes):
            raise ValueError(
                f"{where}: values {int(label.min())}..{int(label.max())} outside 0..{self.num_classes - 1}"
            )
        self._csv.writerow((image_id, encode_row(label)))
        self.rows += 1

    def close(self) -> Path:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Problem:
    kind: str  # header | fields | missing | extra | duplicate | order | length | value
    message: str
    row: int | None = None  # 1-based data row (the header is row 0)
    image_id: str | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def iter_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(row number, fields) of every data row; row 0 is the header and is yielded too."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"submission file not found: {path}")
    # a PredictionString is ~130-200 KB, above the csv module's default field limit of 128 KiB
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))
    with open(path, newline="", encoding="utf-8") as f:
        yield from enumerate(csv.reader(f))


def check_submission(
    path: str | Path, expected_ids: Sequence[str] | None, size: int = DEFAULT_SIZE, num_classes: int = 256
) -> list[Problem]:
    """Everything wrong with a submission file; an empty list means it is valid.

    Each row needs exactly size*size integers in 0..num_classes-1. With `expected_ids` (the json's file names
    in order) every expected image must appear exactly once, nothing else may appear, and rows must follow
    that order. Reads the file one row at a time.
    """
    problems: list[Problem] = []
    seen: Counter[str] = Counter()
    order: list[tuple[int, str]] = []  # (row, id) of first occurrences of expected ids, in file order
    position = {im: i for i, im in enumerate(expected_ids)} if expected_ids is not None else None
    n_rows = -1
    for row, fields in iter_rows(path):
        n_rows = row
        if row == 0:
            if tuple(fields) != HEADER:
                problems.append(
                    Problem("header", f"row 0: header {fields[:4]!r}, expected {list(HEADER)!r}", 0)
                )
            continue
        if len(fields) != 2:
            problems.append(Problem("fields", f"row {row}: {len(fields)} fields, expected 2", row))
            continue
        image_id, text = fields
        where = f"row {row} (image {image_id!r})"
        seen[image_id] += 1
        if seen[image_id] == 2:
            problems.append(Problem("duplicate", f"{where}: image appears more than once", row, image_id))
        elif position is not None and image_id not in position:
            problems.append(Problem("extra", f"{where}: image is not in the json", row, image_id))
        elif position is not None and seen[image_id] == 1:
            order.append((row, image_id))
        problems += _check_values(text, size, num_classes, where, row, image_id)
    if position is not None:
        assert expected_ids is not None
        for i, im in enumerate(expected_ids):
            if im not in seen:
                problems.append(Problem("missing", f"image {im!r} (json image #{i}) has no row", None, im))
        problems += _order_problems(order, position)
    if n_rows < 0:
        problems.insert(0, Problem("header", "the file is empty (no header row)"))
    elif n_rows == 0 and not problems:
        problems.append(Problem("missing", "the file has no data rows"))
    return problems


def _check_values(
    text: str, size: int, num_classes: int, where: str, row: int, image_id: str
) -> list[Problem]:
    tokens = text.split()
    if len(tokens) != size * size:
        msg = f"{where}: {len(tokens)} values, expected {size * size} ({size}x{size})"
        return [Problem("length", msg, row, image_id)]
    try:
        values = _parse(tokens)
    except ValueError as e:
        return [Problem("value", f"{where}: {e}", row, image_id)]
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        msg = f"{where}: value {int(values[k])} at position {k} is outside 0..{num_classes - 1} ({int(bad.sum())} such values)"
        return [Problem("value", msg, row, image_id)]
    return []


def _order_problems(order: list[tuple[int, str]], position: dict[str, int]) -> list[Problem]:
    """Rows whose json position is lower than a row before them: the first such row is reported."""
    best = -1
    prev: str | None = None
    for row, im in order:
        if position[im] < best:
            return [
                Problem(
                    "order",
                    f"row {row} (image {im!r}, json image #{position[im]}) comes after image {prev!r} "
                    f"(json image #{best}): rows must follow the json's image order",
                    row,
                    im,
                )
            ]
        best, prev = position[im], im
    return []


def expected_from_coco(coco_path: str | Path) -> tuple[list[str], int]:
    """(file names in json order, number of classes including background) of a test json."""
    coco = load_coco(coco_path)
    names = []
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{coco_path}: images[{i}] has no string 'file_name'")
        names.append(im["file_name"])
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"{coco_path}: file_name {dup[0]!r} is listed more than once")
    num_classes = build_class_map(coco["categories"]).num_classes if coco["categories"] else 0
    return names, num_classes


# ---------------------------------------------------------------------------------------------- ordering
class OrderedSink:
    """A row sink that writes rows in the expected order (json order) as soon as they are next and holds the
    rest; duplicates and images not in the json become problems, not rows."""

    def __init__(self, writer: SubmissionWriter, expected: Sequence[str] | None):
        self.writer, self.problems = writer, []
        self.position = {im: i for i, im in enumerate(expected)} if expected is not None else None
        self.pending: dict[int, tuple[str, np.ndarray]] = {}
        self.next, self.seen = 0, set()

    def add(self, image_id: str, label: np.ndarray) -> None:
        if image_id in self.seen:
            self.problems.append(
                Problem("duplicate", f"image {image_id!r} was predicted twice", None, image_id)
            )
            return
        self.seen.add(image_id)
        if self.position is None:
            self.writer.write(image_id, label)
            return
        i = self.position.get(image_id)
        if i is None:
            msg = f"image {image_id!r} is not in the json: left out of the CSV"
            self.problems.append(Problem("extra", msg, None, image_id))
            return
        self.pending[i] = (image_id, label)
        while self.next in self.pending:
            self.writer.write(*self.pending.pop(self.next))
            self.next += 1

    def finish(self) -> None:
        for i in sorted(self.pending):  # rows after an image that never came (reported by the checker)
            self.writer.write(*self.pending.pop(i))
        self.writer.close()


# ---------------------------------------------------------------------------------------------- reporting
def report(problems: list[Problem], path: str | Path, limit: int = 20) -> str:
    """Human-readable summary: counts by kind, then the first `limit` problems."""
    if not problems:
        return f"{path}: OK"
    counts = Counter(p.kind for p in problems)
    lines = [f"{path}: INVALID ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def check_main(path: str, coco: str | None, size: int, num_classes: int | None) -> int:
    """`dist-seg predict --check-submission`: print the verdict; 0 when valid, 1 when not."""
    expected, n = expected_from_coco(coco) if coco else (None, 0)
    n = num_classes or n
    if not n:
        raise ValueError("the number of classes is unknown: pass --num-classes (the json has no categories)")
    problems = check_submission(path, expected, size, n)
    stream = sys.stdout if not problems else sys.stderr
    if not problems:
        rows = len(expected) if expected is not None else "all"
        print(f"{path}: OK ({rows} rows of {size}x{size} values in 0..{n - 1})", file=stream)
    else:
        print(report(problems, path), file=stream)
    return 1 if problems else 0
