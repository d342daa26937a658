"""Picture grids: layout, denormalization, and PNG files that decode back to the same pixels."""

import numpy as np
import pytest
import tensorflow as tf
from etils import epath

from jprompt.data.preprocess import CLIP_MEAN, CLIP_STD
from jprompt.train import visualize


def test_grid_places_images_row_major_with_white_gaps():
    images = np.stack([np.full((4, 5, 3), value, np.float32) for value in (0.0, 0.5, 1.0)])
    picture = visualize.grid(images, pad=1)
    # 3 images -> 2 columns, 2 rows.
    assert picture.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[1:5, 1:6], 0)
    np.testing.assert_array_equal(picture[1:5, 7:12], 128)
    np.testing.assert_array_equal(picture[6:10, 1:6], 255)
    np.testing.assert_array_equal(picture[0], 255)  # gap


def test_to_unit_range_inverts_both_normalizations_and_clips():
    pixels = np.random.default_rng(0).uniform(0, 1, (2, 3, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(
        visualize.to_unit_range(pixels * 2 - 1, "minus_one_to_one"), pixels, atol=1e-6
    )
    clip = (pixels - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(visualize.to_unit_range(clip, "clip"), pixels, atol=1e-6)
    assert visualize.to_unit_range(np.full((1, 1, 1, 3), 5.0), "minus_one_to_one").max() == 1.0
    with pytest.raises(ValueError, match="unknown normalization"):
        visualize.to_unit_range(pixels, "imagenet21k")


def test_png_round_trip(tmp_path):
    picture = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = epath.Path(tmp_path) / "images" / "x.png"
    visualize.write_png(path, picture)
    np.testing.assert_array_equal(tf.io.decode_png(path.read_bytes()).numpy(), picture)
