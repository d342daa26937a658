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


def test_an_all_on_mask_shows_as_white_tiles_between_coloured_gaps():
    class Method:  # every region on, as AdaViPro's mask can be
        has_pictures = True

        def visualize(self, trained, frozen, images, *, rng):
            return {"prompted": images, "prompt_mask": np.ones((2, 4, 4, 1), np.float32)}

    images = np.ones((2, 4, 4, 3), np.float32)  # white in [-1, 1]
    pictures = visualize.method_pictures(
        Method(), None, None, images, rng=None, normalization="minus_one_to_one"
    )
    mask = pictures["prompt_mask"]
    assert mask.shape == (4 + 2 * 2, 2 * 4 + 3 * 2, 3)  # 2 images -> 2 columns, 1 row, pad 2
    np.testing.assert_array_equal(mask[2:6, 2:6], 255)
    np.testing.assert_array_equal(mask[2:6, 8:12], 255)
    np.testing.assert_array_equal(mask[0, 0], [0, 102, 204])  # visibly not white, nor grey
    np.testing.assert_array_equal(mask[2:6, 6:8], np.broadcast_to([0, 102, 204], (4, 2, 3)))
    np.testing.assert_array_equal(pictures["prompted"], 255)  # images keep white gaps
