"""The paper's augmentation (Sec. 3.4) keeps image and depth aligned, for every transform."""
import pytest
import torch

import util
from helpers import CODE0, check_aligned, position_frame
from net import FRAME_HW, INPUT_HW, OUTPUT_HW

FH, FW = FRAME_HW


def _params(scale=1.0, angle=0.0, offset=(8, 6), color=(1.0, 1.0, 1.0), flip=False):
    return util.AugParams(torch.tensor([scale]), torch.tensor([angle]),
                          torch.tensor([offset], dtype=torch.float32), torch.tensor([color]),
                          torch.tensor([flip]))


def test_identity_is_the_centre_crop():
    image, depth, mask = position_frame()
    img, d, m = util.augment(image, depth, mask, util.AugParams.identity(1))
    ci, cd, cm = util.center_crop(image, depth, mask)
    assert (img - ci).abs().max() < 1e-3
    assert torch.equal(d, cd) and torch.equal(m, cm)
    # the crop is centred: 8 columns and 6 rows cut on each side of 320x240
    assert ci[0, 0, 0, 0] == 8 and ci[0, 1, 0, 0] == 6
    # target cell (i, j) is crop pixel (5 + 4i, 5 + 4j)
    assert cd[0, 0, 0, 0] == CODE0 + (6 + 5) * FW + (8 + 5)
    assert cd[0, 0, 54, 73] == CODE0 + (6 + 5 + 216) * FW + (8 + 5 + 292)


def test_rotation_by_five_degrees_moves_a_crop_corner_where_the_formula_says():
    """The image sample at the crop's first pixel, written out here: the frame rotated by 5
    degrees about its centre c = (159.5, 119.5), the crop corner at (30, 20) of the rotated frame,
    so the source is c + R(p - c) with R = [[cos, sin], [-sin, cos]] of 5 degrees (a slip to
    radians, 286 degrees, lands elsewhere)."""
    import math
    t = math.radians(5.0)
    px, py = 30 - 159.5, 20 - 119.5
    expected = (159.5 + math.cos(t) * px + math.sin(t) * py, 119.5 - math.sin(t) * px + math.cos(t) * py)
    img, _, _ = util.augment(*position_frame(), _params(angle=5.0, offset=(30, 20)))
    assert float(img[0, 0, 0, 0]) == pytest.approx(expected[0], abs=1e-3)   # channel 0 holds x
    assert float(img[0, 1, 0, 0]) == pytest.approx(expected[1], abs=1e-3)   # channel 1 holds y
    assert math.hypot(expected[0] - 159.5, expected[1] - 119.5) == pytest.approx(math.hypot(px, py))


def test_scaled_crop_starts_where_the_formula_says():
    """Zoom by s = 1.37 (pixel centres: scaled x = s (x + 0.5) - 0.5), crop at (40, 30): the
    first input pixel comes from source x = 40.5 / 1.37 - 0.5, y = 30.5 / 1.37 - 0.5."""
    img, _, _ = util.augment(*position_frame(), _params(scale=1.37, offset=(40, 30)))
    assert float(img[0, 0, 0, 0]) == pytest.approx(40.5 / 1.37 - 0.5, abs=1e-3)
    assert float(img[0, 1, 0, 0]) == pytest.approx(30.5 / 1.37 - 0.5, abs=1e-3)


def test_flip_mirrors_the_crop_where_the_formula_says():
    """Flipped, the crop's first pixel is its last unflipped one: x = 8 + 303."""
    img, _, _ = util.augment(*position_frame(), _params(offset=(8, 6), flip=True))
    assert float(img[0, 0, 0, 0]) == pytest.approx(8 + 303, abs=1e-3)
    assert float(img[0, 1, 0, 0]) == pytest.approx(6, abs=1e-3)


def test_translation_aligned():
    img, *_ = check_aligned(_params(offset=(3, 11)))
    assert float(img[0, 0, 0, 0]) == pytest.approx(3, abs=1e-3)
    assert float(img[0, 1, 0, 0]) == pytest.approx(11, abs=1e-3)


def test_scale_aligned_and_zooms():
    s = 1.37
    img, _, _, cells = check_aligned(_params(scale=s, offset=(40, 30)))
    # the 304-pixel wide crop covers 304 / s source pixels
    span = float(img[0, 0, 100, -1] - img[0, 0, 100, 0])
    assert span == pytest.approx(303 / s, abs=0.01)


def test_scale_divides_depth():
    s = 1.25
    image, _, mask = position_frame()
    depth = torch.full((1, FH, FW), 3.0)
    _, d, m = util.augment(image, depth, mask, _params(scale=s, offset=(20, 10)))
    assert m.all()
    assert torch.allclose(d, torch.full_like(d, 3.0 / s))


@pytest.mark.parametrize('angle', [-5.0, 2.5, 5.0])
def test_rotation_aligned(angle):
    check_aligned(_params(angle=angle))


def test_flip_aligned_and_mirrors():
    img, d, m, _ = check_aligned(_params(flip=True))
    plain, *_ = util.augment(*position_frame(), _params(flip=False))
    assert torch.allclose(img, plain.flip(-1))


def test_color_multiplies_image_only():
    color = (0.8, 1.1, 1.2)
    img, d, m, _ = check_aligned(_params(color=color))
    plain, pd, pm = util.augment(*position_frame(), _params())
    assert torch.allclose(img, plain * torch.tensor(color).view(1, 3, 1, 1))
    assert torch.equal(d, pd) and torch.equal(m, pm)


def test_all_transforms_together_aligned():
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        check_aligned(util.AugParams.sample(1, g), min_cells=1000)


def test_batched_draws_apply_per_sample():
    g = torch.Generator().manual_seed(1)
    params = util.AugParams.sample(4, g)
    image, depth, mask = position_frame()
    batch = util.augment(image.repeat(4, 1, 1, 1), depth.repeat(4, 1, 1), mask.repeat(4, 1, 1), params)
    for i in range(4):
        one = util.augment(image, depth, mask, util.AugParams(
            *(t[i:i + 1] for t in (params.scale, params.angle, params.offset, params.color, params.flip))))
        for a, b in zip(batch, one):
            assert torch.allclose(a[i:i + 1].float(), b.float(), atol=1e-3)


def test_padding_is_masked():
    """Rotating a scale-1 frame and cropping at its corner brings in pixels from outside it."""
    image, depth, mask = position_frame()
    img, d, m = util.augment(image, depth, mask, _params(angle=5.0, offset=(0, 0)))
    cells = img[0, 2, 5::4, 5::4][:OUTPUT_HW[0], :OUTPUT_HW[1]]
    assert (~m).sum() > 10
    assert (cells[~m[0, 0]] < 100).all()      # the image there is padding (black) too
    assert (d[~m] == 0).all()
    assert (img[0, 2] == 0).any()


def test_invalid_source_pixels_stay_invalid():
    image, depth, mask = position_frame()
    mask[:, :, :160] = False                   # left half of the frame has no depth
    _, d, m = util.augment(image, depth, mask, _params())
    x = (torch.round(d[0, 0]) - CODE0) % FW
    assert m[0, 0].any() and (x[m[0, 0]] >= 160).all()
    assert not m[0, 0, :, :30].any()


def test_sampled_ranges_are_the_papers():
    p = util.AugParams.sample(4000, torch.Generator().manual_seed(0))
    assert 1.0 <= p.scale.min() < 1.01 and 1.49 < p.scale.max() <= 1.5         # covers [1, 1.5]
    assert -5.0 <= p.angle.min() < -4.9 and 4.9 < p.angle.max() <= 5.0        # degrees, +-5
    for c in range(3):
        assert 0.8 <= p.color[:, c].min() < 0.81 and 1.19 < p.color[:, c].max() <= 1.2
    assert 0.47 < p.flip.float().mean() < 0.53
    # every crop lies inside the scaled frame
    assert (p.offset[:, 0] <= FW * p.scale - INPUT_HW[1]).all()
    assert (p.offset[:, 1] <= FH * p.scale - INPUT_HW[0]).all()
    assert (p.offset >= 0).all() and (p.offset == p.offset.round()).all()
