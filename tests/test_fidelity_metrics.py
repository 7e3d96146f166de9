"""The fidelity metrics on images whose answer is known."""

import numpy as np

from htd_toolkit.evaluate.fidelity import TileSegmenter, cell_labels, crop_fidelity, map_fidelity

RED, BLUE = (200, 60, 90), (90, 60, 200)


def painted(maps: np.ndarray, rng) -> np.ndarray:
    """Images whose class-1 pixels are noisy red and class-2 pixels noisy blue."""
    images = np.zeros((*maps.shape, 3), np.uint8)
    for cls, colour in ((1, RED), (2, BLUE)):
        where = maps == cls
        images[where] = np.clip(np.array(colour) + rng.normal(0, 12, (where.sum(), 3)), 0, 255).astype(np.uint8)
    return images


def half_maps(n: int) -> np.ndarray:
    """Left half class 1 and right half class 2 in even maps, the other way round in odd ones."""
    maps = np.ones((n, 32, 32), np.uint8)
    maps[0::2, :, 16:] = 2
    maps[1::2, :, :16] = 2
    return maps


def test_cell_labels_take_the_majority_and_leave_ignore_out():
    maps = np.zeros((1, 4, 4), np.uint8)
    maps[0, :2, :2], maps[0, :2, 2:] = 1, 255
    maps[0, 2:, 2:] = [[2, 2], [2, 1]]
    assert cell_labels(maps, 3, 2).tolist() == [[[1, 255], [0, 2]]]


def test_map_fidelity_is_perfect_on_painted_maps_and_low_on_shuffled_ones():
    rng = np.random.default_rng(0)
    maps = half_maps(8)
    segmenter = TileSegmenter.fit(painted(maps, rng), maps, 3, tile=16)
    images = painted(maps, rng)
    assert map_fidelity(segmenter, images, maps, ["bg", "red", "blue"])["miou"] == 1.0
    assert map_fidelity(segmenter, images, np.roll(maps, 1, axis=0), ["bg", "red", "blue"])["miou"] < 0.6


def test_crop_fidelity_prefers_the_crop_a_region_was_painted_from():
    rng = np.random.default_rng(1)
    maps = half_maps(4)
    segmenter = TileSegmenter.fit(painted(maps, rng), maps, 3, tile=16)
    crop_maps = np.stack([np.full((16, 16), 1, np.uint8), np.full((16, 16), 2, np.uint8)])
    red, blue = painted(crop_maps, rng)
    scores = crop_fidelity(segmenter, painted(maps, rng), maps, [{1: red, 2: blue}] * 4)
    assert scores["colour"]["closer_to_own"] == 1.0 and scores["features"]["closer_to_own"] == 1.0
    swapped = crop_fidelity(segmenter, painted(maps, rng), maps, [{1: blue, 2: red}] * 4)
    assert swapped["colour"]["closer_to_own"] == 0.0
