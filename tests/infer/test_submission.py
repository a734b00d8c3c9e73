"""The submission CSV: nearest resize convention, row round trip, streaming writer checks, and the checker."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_seg.infer import predict
from dist_seg.infer.submission import (
    HEADER,
    SubmissionWriter,
    check_submission,
    decode_row,
    encode_row,
    expected_from_coco,
    iter_rows,
    resize_nearest,
)

NUM_CLASSES = 11


@pytest.mark.parametrize("shape", [(512, 512), (270, 480), (360, 480), (37, 100), (256, 256), (7, 9)])
def test_resize_nearest_is_the_baseline_convention(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, NUM_CLASSES, size=shape, dtype=np.uint8)
    # torch's "nearest" (like OpenCV INTER_NEAREST used by albumentations' Resize) is the reference
    ref = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(256, 256), mode="nearest")
    assert np.array_equal(resize_nearest(label, 256), ref[0, 0].byte().numpy())
    if shape == (512, 512):
        assert np.array_equal(resize_nearest(label, 256), label[::2, ::2])


def test_rows_round_trip_through_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = ["batch_01_vt/0021.jpg", "batch_02/0003.jpg", "with,comma.jpg"]
    full = [rng.integers(0, NUM_CLASSES, size=(512, 512), dtype=np.uint8) for _ in ids]
    path = tmp_path / "sub.csv"
    with SubmissionWriter(path, 256, NUM_CLASSES) as w:
        for image_id, label in zip(ids, full, strict=True):
            w.write(image_id, resize_nearest(label, 256))
    rows = list(iter_rows(path))
    assert rows[0] == (0, list(HEADER))
    assert [r[1][0] for r in rows[1:]] == ids
    for (_, (_, text)), label in zip(rows[1:], full, strict=True):
        assert len(text.split(" ")) == 256 * 256
        assert np.array_equal(decode_row(text, 256), resize_nearest(label, 256))
    assert check_submission(path, ids, 256, NUM_CLASSES) == []
    assert encode_row(np.array([[0, 254], [10, 3]])) == "0 254 10 3"


def test_writer_rejects_bad_rows_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "sub.csv"
    good = np.zeros((4, 4), dtype=np.uint8)
    cases = [
        (np.zeros((4, 5), dtype=np.uint8), "(4, 5)"),
        (np.full((4, 4), NUM_CLASSES, dtype=np.uint8), f"outside 0..{NUM_CLASSES - 1}"),
        (np.zeros((4, 4), dtype=np.float32), "not an integer"),
    ]
    for bad, text in cases:
        with pytest.raises(ValueError, match="row 2 \\(image 'b.jpg'\\)") as e:
            with SubmissionWriter(path, 4, NUM_CLASSES) as w:
                w.write("a.jpg", good)
                w.write("b.jpg", bad)
        assert text in str(e.value)
        assert list(tmp_path.iterdir()) == [], "a failed write must leave neither the CSV nor its temp file"


# ---------------------------------------------------------------------------------------------- checker
SIZE = 4
IDS = ["batch_01_vt/0001.jpg", "batch_01_vt/0002.jpg", "batch_02_vt/0001.jpg", "batch_03/0007.jpg"]


def _coco(tmp_path: Path) -> Path:
    cats = [{"id": i, "name": f"class {i}", "supercategory": "x"} for i in range(1, NUM_CLASSES)]
    images = [{"id": i, "file_name": f, "width": 512, "height": 512} for i, f in enumerate(IDS)]
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"images": images, "categories": cats}))
    return path


def _valid_rows() -> list[list[str]]:
    rng = np.random.default_rng(2)
    return [[im, encode_row(rng.integers(0, NUM_CLASSES, size=(SIZE, SIZE)))] for im in IDS]


def _write(path: Path, rows: list[list[str]], header: tuple[str, ...] = HEADER) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def _values(k: int, *replace: tuple[int, str]) -> str:
    tokens = _valid_rows()[k][1].split()
    for pos, tok in replace:
        tokens[pos] = tok
    return " ".join(tokens)


# kind -> (rows, expected row number, expected image, words the message must contain)
BAD_FILES = {
    "missing": (lambda r: r[:2] + r[3:], None, IDS[2], ["has no row", "#2"]),
    "extra": (lambda r: r + [["batch_09/0001.jpg", r[0][1]]], 5, "batch_09/0001.jpg", ["not in the json"]),
    "duplicate": (lambda r: r[:2] + [r[1]] + r[2:], 3, IDS[1], ["more than once"]),
    "order": (lambda r: [r[1], r[0], r[2], r[3]], 2, IDS[0], ["after image", "order"]),
    "length": (
        lambda r: r[:1] + [[IDS[1], _values(1)[:-2]]] + r[2:],
        2,
        IDS[1],
        ["15 values", "expected 16"],
    ),
    "value": (lambda r: r[:3] + [[IDS[3], _values(3, (5, "11"))]], 4, IDS[3], ["value 11", "position 5"]),
    "negative": (lambda r: r[:3] + [[IDS[3], _values(3, (0, "-1"))]], 4, IDS[3], ["value -1", "position 0"]),
    "not_int": (lambda r: [[IDS[0], _values(0, (7, "1.5"))]] + r[1:], 1, IDS[0], ["'1.5'", "not an integer"]),
    "fields": (lambda r: r[:1] + [r[1] + ["x"]] + r[2:], 2, None, ["3 fields"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_checker_names_row_and_image_of_each_kind_of_problem(tmp_path: Path, case: str) -> None:
    make, row, image, words = BAD_FILES[case]
    path = _write(tmp_path / "sub.csv", make(_valid_rows()))
    expected, n = expected_from_coco(_coco(tmp_path))
    assert (expected, n) == (IDS, NUM_CLASSES)
    problems = check_submission(path, expected, SIZE, n)
    kind = {"negative": "value", "not_int": "value", "fields": "fields"}.get(case, case)
    hits = [p for p in problems if p.kind == kind]
    assert hits, problems
    assert hits[0].row == row and hits[0].image_id == image, hits[0]
    for word in words:
        assert word in hits[0].message, hits[0].message
    if row is not None:
        assert f"row {row}" in hits[0].message
    if image is not None:
        assert repr(image) in hits[0].message


def test_check_submission_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = str(_coco(tmp_path))
    good = _write(tmp_path / "good.csv", _valid_rows())
    args = ["--coco", coco, "--submission-size", str(SIZE)]
    assert predict.main(["--check-submission", str(good), *args]) == 0
    assert "OK (4 rows of 4x4 values in 0..10)" in capsys.readouterr().out

    rows = _valid_rows()
    bad = _write(tmp_path / "bad.csv", [rows[1], rows[0]], header=("id", "PredictionString"))
    assert predict.main(["--check-submission", str(bad), *args]) == 1
    err = capsys.readouterr().err
    assert "INVALID" in err and "[header]" in err and "[missing]" in err and "[order]" in err
    assert repr(IDS[2]) in err and repr(IDS[3]) in err

    (tmp_path / "empty.csv").write_text("")
    assert predict.main(["--check-submission", str(tmp_path / "empty.csv"), *args]) == 1
    assert "empty" in capsys.readouterr().err
    # the class range comes from the json's categories unless --num-classes narrows it
    assert predict.main(["--check-submission", str(good), *args, "--num-classes", "2"]) == 1
    assert "outside 0..1" in capsys.readouterr().err
    assert predict.main(["--check-submission", str(tmp_path / "nope.csv"), *args]) == 2
    assert "not found" in capsys.readouterr().err
