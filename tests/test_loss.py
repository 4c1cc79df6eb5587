"""The scale-invariant loss (Eq. 4) against values worked out by hand."""
import math

import pytest
import torch

from loss import safe_log, scale_invariant_error, scale_invariant_loss, valid_depth_mask


def _one_image():
    # target depths (m) and a prediction off by d = (0.1, -0.2, 0.3) in log space; the 4th pixel
    # has no depth (0) and must not count.
    target = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    d = torch.tensor([[0.1, -0.2, 0.3, 5.0]])
    mask = target > 0
    pred = safe_log(target, mask) + d
    return pred, safe_log(target, mask), mask


# n = 3, sum d^2 = 0.01 + 0.04 + 0.09 = 0.14, sum d = 0.2
@pytest.mark.parametrize('lam, expected', [
    (0.0, 0.14 / 3),                       # mean squared log error
    (0.5, 0.14 / 3 - 0.5 * 0.04 / 9),      # training loss, Eq. 4
    (1.0, 0.14 / 3 - 0.04 / 9),            # scale-invariant error, Eq. 1
])
def test_loss_by_hand(lam, expected):
    pred, target, mask = _one_image()
    assert float(scale_invariant_loss(pred, target, mask, lam)) == pytest.approx(expected, rel=1e-6)


def test_eq1_pairwise_form():
    """Eq. 1 equals (1/(2 n^2)) sum_ij (d_i - d_j)^2: the printed Eq. 2 lacks the 1/2 (erratum)."""
    pred, target, mask = _one_image()
    d = torch.tensor([0.1, -0.2, 0.3])
    pairwise = ((d[:, None] - d[None, :]) ** 2).sum() / (2 * 9)
    assert float(scale_invariant_error(pred, target, mask)) == pytest.approx(float(pairwise), rel=1e-6)


def test_batch_is_mean_over_images():
    pred, target, mask = _one_image()
    # second image: two valid pixels, d = (0.5, 0.5): lambda 0.5 -> 0.25 - 0.5 * 1 / 4 = 0.125
    t2 = torch.tensor([[2.0, 3.0, 0.0, 0.0]])
    m2 = t2 > 0
    p2 = safe_log(t2, m2) + torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    loss = scale_invariant_loss(torch.cat([pred, p2]), torch.cat([target, safe_log(t2, m2)]),
                                torch.cat([mask, m2]), 0.5)
    assert float(loss) == pytest.approx(((0.14 / 3 - 0.5 * 0.04 / 9) + 0.125) / 2, rel=1e-6)


def test_scale_invariance_at_lambda_1():
    torch.manual_seed(0)
    target = torch.rand(3, 1, 55, 74) * 9 + 0.5
    mask = torch.rand(3, 1, 55, 74) > 0.2
    pred = torch.randn(3, 1, 55, 74) * 0.3
    t = safe_log(target, mask)
    base1 = scale_invariant_loss(pred, t, mask, 1.0)
    base05 = scale_invariant_loss(pred, t, mask, 0.5)
    scaled = pred + math.log(2.7)   # every depth multiplied by 2.7
    assert float(scale_invariant_loss(scaled, t, mask, 1.0)) == pytest.approx(float(base1), rel=1e-5)
    assert float(scale_invariant_loss(scaled, t, mask, 0.5)) != pytest.approx(float(base05), rel=1e-3)


def test_missing_zero_nan_inf_negative_depth_never_gives_nan():
    depth = torch.tensor([[[0.0, float('nan'), float('inf'), -1.0],
                           [1.0, 2.0, 3.0, 4.0]]])
    mask = valid_depth_mask(depth, mask_min_max=False)
    assert mask.tolist() == [[[False] * 4, [True] * 4]]
    target = safe_log(depth, mask)
    assert torch.isfinite(target).all()
    pred = torch.zeros_like(depth, requires_grad=True)
    for lam in (0.0, 0.5, 1.0):
        loss = scale_invariant_loss(pred, target, mask, lam)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
        assert (pred.grad[~mask] == 0).all()   # masked pixels get no gradient
        pred.grad = None


def test_image_without_valid_pixels():
    depth = torch.zeros(2, 1, 5, 5)
    depth[1] = 2.0
    mask = depth > 0
    pred = torch.zeros_like(depth, requires_grad=True)
    loss = scale_invariant_loss(pred, safe_log(depth, mask), mask, 0.0)
    loss.backward()
    # the empty image is left out of the mean: the loss is the other image's, log(2)^2
    assert loss.item() == pytest.approx(math.log(2) ** 2, rel=1e-6)
    assert torch.isfinite(pred.grad).all()
    all_empty = scale_invariant_loss(pred, safe_log(depth * 0, mask & False), mask & False)
    assert all_empty.item() == 0.0


def test_min_max_depth_of_each_image_masked():
    """Sec. 4.1: for NYU, depths equal to the per-image minimum or maximum are masked."""
    depth = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 9.0, 9.0]],
                          [[5.0, 5.0, 6.0], [7.0, 0.0, 8.0]]])
    mask = valid_depth_mask(depth)
    assert mask.tolist() == [[[False, False, True], [True, False, False]],
                             [[False, False, True], [True, False, False]]]
