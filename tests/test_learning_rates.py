"""The paper's learning rates act on every variant as the recipe needs
(docs/learning_rates.md): one step of train.py's own train_step on coarse7 alone, at the paper's
rate, on a fixed batch of synthetic rooms, removes a bounded share s of the batch's mean log error.

Why these bounds. For the mean error (the direction coarse7's bias moves all outputs along), SGD
with momentum 0.9 is the heavy-ball method with s = rate x curvature: the error decays whenever
0 < s < 2 (1 + 0.9) = 3.8, at the fastest rate sqrt(0.9) a step for every s from (1 - sqrt(0.9))^2
= 0.26% up to 3.8 (oscillating above 0.26%), and more slowly below: in about (1 - 0.9) / s steps.
- upper: s < 1, a step never over-corrects the batch's error (well inside the stability limit);
- lower: the mean error settles within 1% of the paper's coarse schedule (2M / 32 = 62,500 steps):
  (1 - 0.9) / s < 625, s > 1.6e-4.
The release's own parametrisation removes 0.44%, the paper and alexnet variants ~6% and ~9%;
the release's factors taken as they are on normalised inputs (feature x 0.01) 0.003%: that
one fails, as it should (lr_study.py: its coarse6/7 do not learn)."""
import pytest
import torch

import train
import util
from loss import TRAIN_LAMBDA, safe_log
from net import ALEXNET, PAPER, RELEASE, GlobalCoarseNet

pytestmark = pytest.mark.slow   # a training step of coarse7 on each variant's whole net

SHARE = (0.1 / 625, 1.0)


@pytest.mark.parametrize('variant', [PAPER, RELEASE, ALEXNET])
def test_one_coarse7_step_at_the_papers_rate_removes_a_bounded_share_of_the_error(variant, synthetic):
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    frames = util.Frames(arrays['images'][:16], arrays['depths'][:16])
    x, y, m = util.center_crop(*frames.get(range(16)))
    target = safe_log(y, m)
    torch.manual_seed(0)
    coarse = GlobalCoarseNet(variant).eval()        # no dropout: the same net before and after

    def mean_error():
        with torch.no_grad():
            return float((coarse(x) - target)[m].mean())

    optimizer = train.make_optimizer(coarse, variant)
    assert variant.lr['coarse7'] == 0.1                # Sec. 3.3, never retuned
    for group in optimizer.param_groups:               # coarse7 alone moves
        if group['layer'] != 'coarse7':
            group['lr'] = 0.0
    before = mean_error()
    train.train_step(coarse, None, optimizer, (x, y, m), TRAIN_LAMBDA, variant)
    after = mean_error()
    share = (before - after) / before
    print(f'{variant.name}: mean log error {before:+.4f} -> {after:+.4f}, share removed {share:.2g}')
    assert SHARE[0] < share < SHARE[1]
