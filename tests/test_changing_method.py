"""Changing the method in one place: a loss and a fine net of one's own, defined here and
registered in a line each, trained by train.py itself; Eigen & Fergus 2015's loss (loss.py) against
a hand computation of its formula; an unknown --loss refused in one line."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoint
import cli
import net
import runlog
import train
import util
from helpers import one_line, train_args
from loss import LOSSES, gradient_matching_loss


def mean_abs_log_error(pred_log_depth, target_log_depth, mask, lam):
    """A loss of one's own: the mean |log error| over the valid pixels of the batch (lam unused)."""
    error = torch.where(mask, pred_log_depth - torch.where(mask, target_log_depth, 0.0), 0.0)
    return error.abs().sum() / mask.sum().clamp(min=1)


class EditNet(nn.Module):
    """A fine net of one's own: one 5x5 convolution that edits the coarse map it is given. Built
    as LocalFineNet is (net.STAGE_NETS); it starts as the identity (the edit is zero)."""

    def __init__(self, variant=net.PAPER, pass_through=True, geometry=net.NYU):
        super().__init__()
        self.variant, self.geometry = variant, geometry
        self.edit = nn.Conv2d(1, 1, 5, padding=2)
        nn.init.zeros_(self.edit.weight)
        nn.init.zeros_(self.edit.bias)

    def forward(self, images, coarse_log_depth):
        return coarse_log_depth + self.edit(coarse_log_depth)


@pytest.fixture
def registered(monkeypatch):
    """The new loss and fine net, registered as a user would: a line in each table."""
    monkeypatch.setitem(LOSSES, 'abs-log', mean_abs_log_error)   # the new loss: its table line
    monkeypatch.setitem(net.STAGE_NETS, 'fine', EditNet)         # the new fine net, and its rate
    monkeypatch.setitem(net.PAPER_LR, 'edit', 0.01)
    monkeypatch.setitem(net.PAPER.weight_decay, 'edit', 0.0)


def test_a_loss_and_a_fine_net_of_ones_own_train_through_train_py(registered):
    args = train.parse_args(['--demo', '--loss', 'abs-log'])    # --loss knows it now
    assert 'val_loss_abs-log' in runlog.history_columns(args.loss)

    torch.manual_seed(0)
    nets = {stage: net.new_net(stage) for stage in ('coarse', 'fine')}   # as train.main builds them
    assert isinstance(nets['fine'], EditNet)
    fixed = net.Chain(nets, last='coarse').eval()   # the fine stage's fixed input
    optimizer = train.make_optimizer(nets['fine'], net.PAPER)
    frames = util.Frames.from_tensors(torch.randint(0, 256, (2, 3, *net.NYU.frame_hw), dtype=torch.uint8),
                                      (torch.rand(2, *net.NYU.frame_hw) * 5 + 1).half())
    x, y, m = util.center_crop(*frames.get([0, 1]))   # a batch as validation crops it
    edit = nets['fine'].edit
    with torch.no_grad():
        coarse = nets['coarse'](x)
    for _ in range(2):   # two of train.py's steps; each returns the loss before it
        with torch.no_grad():
            before = mean_abs_log_error(coarse + edit(coarse), y.log(), m, None)
        loss = train.train_step(nets['fine'], fixed, optimizer, (x, y, m), args.lam, net.PAPER,
                                loss=args.loss)
        assert float(loss) == pytest.approx(float(before), rel=1e-6)
    assert edit.weight.abs().sum() > 0   # it learned an edit

    chain = net.Chain(nets)   # every stage's prediction: the coarse map, then the edited one
    with torch.no_grad():
        found = chain.predictions(x)
        torch.testing.assert_close(found['coarse'], coarse)
        torch.testing.assert_close(found['fine'], coarse + edit(coarse))
        scores = train.validate(chain, frames, torch.device('cpu'), 2, args.lam, args.loss)
    assert scores['loss_abs-log'] == pytest.approx(float(mean_abs_log_error(found['fine'], y.log(), m, None)))


@pytest.mark.slow
def test_train_py_saves_a_fine_net_of_ones_own_and_load_pretrained_rebuilds_it(synthetic, tmp_path,
                                                                             registered):
    """The whole of train.py's fine stage with the new net and loss: the history has the loss's
    column, fine.pth holds the learned edit, and load_pretrained builds the new class from it and
    feeds it the coarse map."""
    torch.save(net.GlobalCoarseNet().state_dict(), tmp_path / 'coarse.pth')
    assert train.main(train_args(synthetic, tmp_path, '--stage', 'fine', '--loss', 'abs-log',
                                 '--fine-samples', 8, '--batch-size', 4, '--val-fraction', 0.1)) == 0
    rows = runlog.read_history(tmp_path / 'history_fine.csv')
    assert rows and rows[-1]['val_loss_abs-log'] > 0
    saved = torch.load(tmp_path / 'fine.pth', weights_only=True)
    assert set(saved) == {'edit.weight', 'edit.bias'} and saved['edit.weight'].abs().sum() > 0
    nets = net.load_pretrained(tmp_path)
    assert isinstance(nets['fine'], EditNet)
    torch.testing.assert_close(nets['fine'].edit.weight, saved['edit.weight'])
    x = torch.rand(1, 3, *net.NYU.input_hw) * 255
    with torch.no_grad():
        found = nets.predictions(x)
        torch.testing.assert_close(found['fine'], found['coarse'] + nets['fine'].edit(found['coarse']))


def eigen_fergus_2015_by_hand(pred, target, mask):
    """ICCV 2015, Sec. 3.2, one image at a time, d = log prediction - log target:
    1/n sum d^2 - 1/(2 n^2) (sum d)^2 + 1/n sum (grad_x d)^2 + (grad_y d)^2, the differences taken
    between neighbours that are both valid; the mean over images with a valid pixel."""
    values = []
    for p, t, m in zip(pred, target, mask):
        d, n = p - t, m.sum()
        if n == 0:
            continue
        gradients = 0.0
        for i in range(d.shape[0]):
            for j in range(d.shape[1]):
                if j + 1 < d.shape[1] and m[i, j] and m[i, j + 1]:
                    gradients += (d[i, j + 1] - d[i, j]) ** 2
                if i + 1 < d.shape[0] and m[i, j] and m[i + 1, j]:
                    gradients += (d[i + 1, j] - d[i, j]) ** 2
        values.append((d[m] ** 2).sum() / n - (d[m].sum()) ** 2 / (2 * n ** 2) + gradients / n)
    return np.mean(values)


def test_the_2015_loss_is_its_formula():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
    mask = rng.random((3, 4, 5)) > 0.3
    mask[2] = False                      # an image without a valid pixel counts for nothing
    target[~mask] = np.nan               # invalid targets may be anything
    expected = eigen_fergus_2015_by_hand(pred, target, mask)
    got = gradient_matching_loss(*(torch.from_numpy(a)[:, None] for a in (pred, target, mask)), lam=0.5)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_an_unknown_loss_is_one_line():
    with pytest.raises(cli.UserError) as e:
        train.parse_args(['--demo', '--loss', 'l2'])
    assert '--loss' in one_line(e) and 'eigen-fergus-2015' in one_line(e)


def test_a_run_resumes_with_the_loss_it_began_with():
    ckpt = {'stage': 'fine', 'config': {'loss': 'eigen-fergus-2015'}}
    with pytest.raises(cli.DataError, match='started with --loss eigen-fergus-2015, this run asks for eq4'):
        checkpoint.check_schedule('checkpoint.pth', ckpt, train.parse_args(['--demo']))


def test_a_variant_of_ones_own_is_one_line(monkeypatch):
    """A variant: one dataclasses.replace line in net.VARIANTS (here coarse7 at half the paper's
    rate), then --variant NAME, and train.py's optimizer and step use its numbers."""
    mine = dataclasses.replace(net.PAPER, name='mine', lr={**net.PAPER.lr, 'coarse7': 0.05})
    monkeypatch.setitem(net.VARIANTS, 'mine', mine)
    args = train.parse_args(['--demo', '--variant', 'mine'])
    assert net.get_variant(args.variant) is mine
    torch.manual_seed(0)
    coarse = net.new_net('coarse', mine)
    optimizer = train.make_optimizer(coarse, mine)
    rates = {g['layer']: g['lr'] for g in optimizer.param_groups}
    assert rates['coarse7'] == 0.05 and rates['coarse6'] == 0.1 and rates['coarse1'] == 0.001
    x = torch.rand(2, 3, *net.NYU.input_hw) * 255
    y = torch.rand(2, 1, *net.NYU.output_hw) + 0.5
    before = coarse.coarse7.weight.detach().clone()
    loss = train.train_step(coarse, None, optimizer, (x, y, torch.ones_like(y, dtype=torch.bool)),
                            args.lam, mine)
    assert torch.isfinite(torch.as_tensor(loss)) and not torch.equal(before, coarse.coarse7.weight)
