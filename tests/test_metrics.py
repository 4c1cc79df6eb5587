"""Metrics of Table 1 against values worked out by hand."""
import math

import pytest
import torch

import cli
from metrics import Metrics, compute_metrics

LN2 = math.log(2)


def test_metrics_by_hand():
    # pred / gt ratios 1, 2, 2; the 4th pixel has no ground truth
    pred = torch.tensor([[1.0, 2.0, 4.0, 7.0]])
    gt = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    m = compute_metrics(pred=pred, gt=gt)
    expected = {
        'd1': 1 / 3, 'd2': 1 / 3, 'd3': 1 / 3,        # 2 > 1.25^3 = 1.953
        'abs_rel': (0 + 1 / 1 + 2 / 2) / 3,
        'sq_rel': (0 + 1 / 1 + 4 / 2) / 3,
        'rmse': math.sqrt((0 + 1 + 4) / 3),
        'rmse_log': math.sqrt(2 * LN2 ** 2 / 3),
        'log10': 2 * math.log10(2) / 3,
        # d = (0, ln2, ln2): mean d^2 - (mean d)^2 = 2/3 ln2^2 - 4/9 ln2^2 = 2/9 ln2^2
        'si_log': LN2 * math.sqrt(2) / 3,
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-9), k


def test_nothing_to_score_is_a_data_error_not_a_crash():
    """Ground truth without a valid pixel (a set whose depth is all missing): one line."""
    gt = torch.zeros(2, 1, 4, 4)
    with pytest.raises(cli.DataError, match='no.* valid ground-truth depth pixel'):
        Metrics().add(pred=torch.ones_like(gt), gt=gt, mask=gt > 0).result()


def test_threshold_edges():
    gt = torch.ones(1, 3)
    pred = torch.tensor([[1.2, 1.5, 1.9]])    # 1.2 < 1.25; 1.5 < 1.5625; 1.9 < 1.953
    m = compute_metrics(pred=pred, gt=gt)
    assert (m['d1'], m['d2'], m['d3']) == pytest.approx((1 / 3, 2 / 3, 1.0))
    m = compute_metrics(pred=1 / pred, gt=gt)  # too near counts like too far
    assert (m['d1'], m['d2'], m['d3']) == pytest.approx((1 / 3, 2 / 3, 1.0))


def test_perfect_prediction():
    gt = torch.rand(2, 1, 10, 12) * 9 + 0.5
    m = compute_metrics(pred=gt.clone(), gt=gt)
    assert m['d1'] == m['d2'] == m['d3'] == 1.0
    for k in ('abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10', 'si_log'):
        assert m[k] == pytest.approx(0.0, abs=1e-6), k


def test_constant_scale_changes_all_but_the_scale_invariant_error():
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 10, 12) * 9 + 0.5
    pred = gt * torch.exp(torch.randn_like(gt) * 0.2)
    base = compute_metrics(pred=pred, gt=gt)
    scaled = compute_metrics(pred=pred * 1.7, gt=gt)
    assert scaled['si_log'] == pytest.approx(base['si_log'], rel=1e-6)
    for k in ('d1', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10'):
        assert scaled[k] != pytest.approx(base[k], rel=1e-3), k


def test_arguments_cannot_be_swapped_silently():
    gt = torch.tensor([[1.0, 2.0]])
    pred = torch.tensor([[2.0, 4.0]])
    with pytest.raises(TypeError):
        compute_metrics(pred, gt)
    with pytest.raises(TypeError):
        Metrics().add(pred, gt, gt > 0)
    # the asymmetric metrics tell prediction from ground truth: abs rel 1.0 vs 0.5
    assert compute_metrics(pred=pred, gt=gt)['abs_rel'] == pytest.approx(1.0)
    assert compute_metrics(pred=gt, gt=pred)['abs_rel'] == pytest.approx(0.5)


def test_threshold_edges_are_strict():
    """Ratios of exactly 1.25, 1.25^2 and 1.25^3 (exact in binary) do not count: `<`."""
    gt = torch.tensor([[4.0, 16.0, 64.0]])
    m = compute_metrics(pred=torch.tensor([[5.0, 25.0, 125.0]]), gt=gt)
    assert (m['d1'], m['d2'], m['d3']) == (0.0, 1 / 3, 2 / 3)
    m = compute_metrics(pred=torch.tensor([[4.999, 24.99, 124.9]]), gt=gt)
    assert (m['d1'], m['d2'], m['d3']) == (1 / 3, 2 / 3, 1.0)


def test_scale_invariant_error_pooled_and_per_image_by_hand():
    """Log differences d: image A (0.1, 0.3), image B (0.2, 0.2, 0.5). Eq. 1 per image, mean(d^2)
    - mean(d)^2: A 0.05 - 0.04 = 0.01, B 0.11 - 0.09 = 0.02. Pooled (the paper protocol): the root
    of their mean; per image: the mean of their roots."""
    gt = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.5, 2.5]])
    d = torch.tensor([[0.1, 0.3, 0.0], [0.2, 0.2, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    pred = gt * d.exp()
    pred[0, 2] = 1.0
    pooled = compute_metrics(pred=pred, gt=gt, mask=mask)
    per_image = compute_metrics(pred=pred, gt=gt, mask=mask, per_image=True)
    assert pooled['si_log'] == pytest.approx(math.sqrt((0.01 + 0.02) / 2), rel=1e-5)
    assert per_image['si_log'] == pytest.approx((math.sqrt(0.01) + math.sqrt(0.02)) / 2, rel=1e-5)


def test_pooled_versus_per_image():
    # image A: one pixel off by 3 m; image B: three exact pixels
    pred = torch.tensor([[4.0, 0, 0, 0], [1.0, 1.0, 1.0, 0]])
    gt = torch.tensor([[1.0, 0, 0, 0], [1.0, 1.0, 1.0, 0]])
    pooled = compute_metrics(pred=pred, gt=gt)
    per_image = compute_metrics(pred=pred, gt=gt, per_image=True)
    assert pooled['rmse'] == pytest.approx(math.sqrt(9 / 4))        # 4 pixels pooled
    assert per_image['rmse'] == pytest.approx((3.0 + 0.0) / 2)      # mean of per-image RMSEs
    assert pooled['abs_rel'] == pytest.approx(3 / 4)
    assert per_image['abs_rel'] == pytest.approx(3 / 2)


def test_accumulating_batches_equals_one_batch():
    torch.manual_seed(1)
    gt = torch.rand(6, 1, 8, 8) * 5 + 0.5
    pred = gt * torch.exp(torch.randn_like(gt) * 0.3)
    mask = torch.rand_like(gt) > 0.3
    for per_image in (False, True):
        whole = Metrics(per_image).add(pred=pred, gt=gt, mask=mask).result()
        parts = Metrics(per_image)
        parts.add(pred=pred[:2], gt=gt[:2], mask=mask[:2]).add(pred=pred[2:], gt=gt[2:], mask=mask[2:])
        for k, v in whole.items():
            assert parts.result()[k] == pytest.approx(v, rel=1e-9)
