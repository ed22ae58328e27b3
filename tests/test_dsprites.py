"""The procedural dSprites grid follows the published specification and index order."""
from __future__ import annotations

import numpy as np
import pytest

from disco.export.data.dsprites import FACTOR_SIZES, DSprites, render


def test_grid_size_and_index_order_posy_fastest() -> None:
    d = DSprites()
    assert len(d) == 737_280 == 3 * 6 * 40 * 32 * 32
    c = d.classes(np.array([0, 1, 32, 1024, 40960, 245760, 737279]))
    np.testing.assert_array_equal(c, [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0],
                                      [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 2, 5, 39, 31, 31]])


def test_index_is_the_inverse_of_classes() -> None:
    d = DSprites()
    idx = np.random.default_rng(0).integers(0, len(d), 5000)
    np.testing.assert_array_equal(d.index(d.classes(idx)), idx)


def test_latents_values_follow_the_specification() -> None:
    d = DSprites()
    v = d.values(np.arange(len(d), step=997))
    assert set(v[:, 0]) == {1.0} and set(v[:, 1]) <= {1.0, 2.0, 3.0}
    np.testing.assert_allclose(sorted(set(np.round(v[:, 2], 6))), np.round(np.linspace(0.5, 1, 6), 6))
    last = d.values(np.array([len(d) - 1]))[0]
    np.testing.assert_allclose(last, [1, 3, 1.0, 2 * np.pi, 1, 1])


def test_images_are_binary_deterministic_and_64x64() -> None:
    d = DSprites()
    idx = np.arange(0, len(d), 7919)
    a, b = d.images(idx), d.images(idx)
    assert a.shape == (len(idx), 64, 64) and a.dtype == np.uint8
    assert set(np.unique(a)) <= {0, 1}
    np.testing.assert_array_equal(a, b)
    assert a.reshape(len(idx), -1).sum(1).min() > 0  # every sprite is visible


def test_orientation_0_and_2pi_draw_the_same_image() -> None:
    c0 = np.array([[0, 2, 3, 0, 10, 20]])
    c39 = c0.copy()
    c39[0, 3] = 39
    np.testing.assert_array_equal(render(c0), render(c39))


def test_each_factor_changes_the_image() -> None:
    base = np.array([0, 2, 3, 5, 10, 20])
    for k in range(1, len(FACTOR_SIZES)):
        other = base.copy()
        other[k] = (other[k] + 2) % FACTOR_SIZES[k]
        assert (render(base) != render(other)).any(), f"factor {k} does not change the image"


def test_position_moves_the_centre_of_mass_along_its_axis() -> None:
    def centre(cls: list[int]) -> np.ndarray:
        img = render(np.array([cls]))[0]
        ys, xs = np.nonzero(img)
        return np.array([xs.mean(), ys.mean()])

    left, right = centre([0, 0, 5, 0, 0, 16]), centre([0, 0, 5, 0, 31, 16])
    top, bottom = centre([0, 0, 5, 0, 16, 0]), centre([0, 0, 5, 0, 16, 31])
    assert right[0] - left[0] > 25 and abs(right[1] - left[1]) < 1
    assert bottom[1] - top[1] > 25 and abs(bottom[0] - top[0]) < 1


def test_bigger_scale_covers_more_pixels() -> None:
    areas = [render(np.array([[0, 0, s, 0, 16, 16]])).sum() for s in range(6)]
    assert areas == sorted(areas) and areas[-1] > 3 * areas[0]


def test_out_of_range_index_is_refused() -> None:
    with pytest.raises(IndexError, match="737280"):
        DSprites().classes(np.array([737280]))
