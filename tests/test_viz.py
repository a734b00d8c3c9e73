import numpy as np
import pytest
from PIL import Image

from dist_seg.viz import (
    class_palette,
    colorize,
    confusion_figure,
    figure_to_rgb,
    overlay,
    save_palette_png,
    triplet_grid,
)


def test_palette_is_distinct_and_fixed():
    pal = class_palette(11)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[255]) == (255, 255, 255)
    assert len({tuple(c) for c in pal}) == 256
    # a class keeps its colour whatever the number of classes
    assert np.array_equal(class_palette(3)[:3], pal[:3])
    with pytest.raises(ValueError, match="num_classes=256"):
        class_palette(256)


def test_palette_png_round_trips_values(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 11, size=(37, 53)).astype(np.uint8)
    label[:3] = 255
    path = tmp_path / "sub" / "x.png"
    save_palette_png(label, path)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), label)
        assert np.array_equal(np.asarray(im.convert("RGB")), colorize(label))


def test_colorize_and_overlay():
    label = np.array([[0, 1], [2, 255]])
    rgb = colorize(label)
    pal = class_palette(3)
    assert rgb.shape == (2, 2, 3) and np.array_equal(rgb[0, 1], pal[1])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    out = overlay(image, label, alpha=0.5)
    assert np.array_equal(out[0, 0], image[0, 0]) and np.array_equal(out[1, 1], image[1, 1])  # bg, ignore
    expected = np.rint(0.5 * 100 + 0.5 * pal[2].astype(np.float32)).astype(np.uint8)
    assert np.array_equal(out[1, 0], expected)
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[300]]))


def test_confusion_figure_builds_and_saves(tmp_path):
    matrix = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    fig = confusion_figure(matrix, ["bg", "a", "b"])
    rgb = figure_to_rgb(fig)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 0
    fig.savefig(tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] > 100
    with pytest.raises(ValueError, match="2 class names"):
        confusion_figure(matrix, ["bg", "a"])


def test_triplet_grid_layout():
    images = np.full((2, 4, 5, 3), 7, dtype=np.uint8)
    targets = np.zeros((2, 4, 5), dtype=np.int64)
    preds = np.ones((2, 4, 5), dtype=np.int64)
    grid = triplet_grid(images, targets, preds, gap=2)
    assert grid.shape == (2 * 4 + 2, 3 * 5 + 4, 3)
    assert (grid[:4, :5] == 7).all()
    assert np.array_equal(grid[0, 7], class_palette(2)[0])
    assert np.array_equal(grid[6, 14], class_palette(2)[1])
