"""The paper's learning rates act on every variant as on the authors' release (issue #11, README
"The learning rates"): one plain SGD step on coarse7 at the paper's rate, on a fixed batch of
synthetic rooms, removes a small share of the batch's mean log error, neither all of it at once
(the rate then overshoots and momentum 0.9 makes it ring) nor next to none (coarse6 and coarse7
then barely learn: lr_study.py measured both)."""
import pytest
import torch

import util
from loss import TRAIN_LAMBDA, safe_log, scale_invariant_loss
from net import ALEXNET, PAPER, RELEASE, GlobalCoarseNet

# lr_study.py's runs (README): the release removes 0.08% of the error in its first coarse7 step,
# paper / alexnet 1-2%; features and targets unscaled (the paper variant before the study) 10%,
# the release's 0.01 on inputs in units of their std 0.001%, and then coarse6/7 did not learn.
SHARE = (2e-4, 0.05)


@pytest.mark.parametrize('variant', [PAPER, RELEASE, ALEXNET])
def test_one_coarse7_step_at_the_papers_rate_removes_a_bounded_share_of_the_error(variant, synthetic):
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    frames = util.Frames(arrays['images'][:16], arrays['depths'][:16])
    x, y, m = util.center_crop(*frames.get(range(16)))
    target = safe_log(y, m)
    torch.manual_seed(0)
    coarse = GlobalCoarseNet(variant).eval()        # no dropout: the same net before and after

    def mean_error():
        return float((coarse(x).detach() - target)[m].mean())

    before = mean_error()
    loss = scale_invariant_loss(coarse(x), target, m, TRAIN_LAMBDA)
    grads = torch.autograd.grad(loss, list(coarse.coarse7.parameters()))
    assert variant.lr['coarse7'] == 0.1                # Sec. 3.3, never retuned
    with torch.no_grad():
        for p, g in zip(coarse.coarse7.parameters(), grads):
            p -= 0.1 * g                             # plain SGD, no momentum
        after = mean_error()
    share = (before - after) / before
    print(f'{variant.name}: mean log error {before:+.4f} -> {after:+.4f}, share removed {share:.2g}')
    assert SHARE[0] < share < SHARE[1]
