"""Picture outputs: comparison grids and decoded demo digits, as the nodes return them."""

import numpy as np
import pytest
import torch

from comfy_dg.pictures import side_by_side, tile


def test_tile_lays_out_a_batch():
    imgs = torch.zeros(5, 4, 6, 3)
    imgs[2] = 1.0
    grid = tile(imgs, columns=3, pad=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)      # 2 rows × 3 columns of 4×6 images
    # image 2 sits in row 0, column 2, and is white; image 0 is black; the unused last cell stays white
    assert (grid[2:6, 18:24] == 255).all() and (grid[2:6, 2:8] == 0).all() and (grid[8:12, 18:24] == 255).all()


def test_side_by_side_labels_and_panels():
    a, b = torch.zeros(4, 8, 8, 3), torch.ones(4, 8, 8, 3)
    pic = side_by_side([(a, "left"), (b, "right")], columns=2)
    assert pic.dtype == np.uint8 and pic.shape[0] > 18 + 16 and pic.shape[2] == 3
    assert pic[:18].min() < 128          # the labels are drawn


def test_comparison_grid_node(pack):
    out = pack["DGComparisonGrid"].execute(torch.zeros(4, 8, 8, 3), torch.ones(4, 8, 8, 3), "a", "b", 2,
                                          images_c=torch.full((4, 8, 8, 3), 0.5), label_c="real").args[0]
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[-1] == 3 and 0 <= out.min() and out.max() <= 1


def test_decode_digits_node(pack):
    lat = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1)
    img = pack["DGDecodeDigits"].execute({"samples": lat}, 4).args[0]
    assert img.shape == (2, 32, 32, 3)
    assert float(img[0, 0, 0, 0]) == 0.0 and float(img[0, -1, -1, 0]) == 1.0
    with pytest.raises(ValueError, match="1-channel"):
        pack["DGDecodeDigits"].execute({"samples": torch.zeros(1, 4, 8, 8)}, 4)
