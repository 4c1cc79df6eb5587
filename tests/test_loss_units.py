"""One loss, one unit: every loss train.py shows is Eq. 4 in (log metres)^2, for
training and validation alike, and the learning-rate study steps exactly as train.py does."""
import re

import numpy as np
import pytest
import torch

import lr_study
import runlog
import train
import util
from helpers import train_args
from net import PAPER, RELEASE, GlobalCoarseNet, LocalFineNet

pytestmark = pytest.mark.slow   # every test here trains


def _no_dropout(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, 'dropout',
                        lambda input, p=0.5, training=True, inplace=False: input)


def _training_frames(synthetic):
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    train_idx, _ = util.read_splits(synthetic[1], len(arrays['images']))
    return util.Frames(arrays['images'][train_idx], arrays['depths'][train_idx])


def _eq4_by_hand(pred_log, depth, mask, lam=0.5):
    """Eq. 4 per image over its valid pixels, d = log y - log y*, averaged over the images that
    have a valid pixel: mean d^2 - lam mean(d)^2."""
    values = []
    for p, y, m in zip(pred_log.double().numpy(), depth.double().numpy(), mask.numpy()):
        d = p[m] - np.log(y[m])
        if d.size:
            values.append(np.mean(d ** 2) - lam * np.mean(d) ** 2)
    return float(np.mean(values))


def test_logged_training_and_validation_losses_are_eq4(synthetic, tmp_path, monkeypatch, capsys):
    """A fixed net (every rate 0, no dropout) trained for one step on all training frames without
    augmentation (centre crops), validated on the same frames: the training loss in the CSV and in
    the progress line and the validation loss all equal Eq. 4 computed here, in both stages."""
    real_optimizer = train.make_optimizer

    def frozen(net, variant, *args, **kwargs):
        optimizer = real_optimizer(net, variant, *args, **kwargs)
        for group in optimizer.param_groups:
            group['lr'] = 0.0
        return optimizer
    monkeypatch.setattr(train, 'make_optimizer', frozen)
    _no_dropout(monkeypatch)
    monkeypatch.setattr(util, 'augment', lambda img, depth, mask, params, geometry: util.center_crop(img, depth, mask, geometry))
    monkeypatch.setattr(util, 'split_train_val',   # validation = the training frames
                        lambda idx, scenes=None, val_fraction=0.1, seed=0: (np.asarray(idx), np.asarray(idx)))
    frames = _training_frames(synthetic)
    n = len(frames)
    assert train.main(train_args(synthetic, tmp_path, '--coarse-samples', n, '--fine-samples', n,
                                 '--batch-size', n, '--val-every', n, '--print-every', 0)) == 0
    printed = capsys.readouterr().out

    img, depth, _ = frames.get(range(n))
    d = depth.numpy()   # the mask by hand: depth > 0 and finite, not its image's min or max (Sec. 4.1)
    valid = np.isfinite(d) & (d > 0)
    lo = np.where(valid, d, np.inf).min(axis=(1, 2), keepdims=True)
    hi = np.where(valid, d, -np.inf).max(axis=(1, 2), keepdims=True)
    mask = torch.from_numpy(valid & (d != lo) & (d != hi))
    x, y, m = util.center_crop(img, depth, mask)
    coarse = GlobalCoarseNet(PAPER).eval()
    coarse.load_state_dict(torch.load(tmp_path / 'coarse.pth', weights_only=True))
    fine = LocalFineNet(PAPER).eval()
    fine.load_state_dict(torch.load(tmp_path / 'fine.pth', weights_only=True))
    with torch.no_grad():
        c = coarse(x)
        expected = {'coarse': _eq4_by_hand(c, y, m), 'fine': _eq4_by_hand(fine(x, c), y, m)}
    for stage, eq4 in expected.items():
        row = runlog.read_history(tmp_path / f'history_{stage}.csv')[-1]
        shown = float(re.search(rf'{stage} step 1/1 \({n} samples\): loss (\S+),', printed).group(1))
        print(f'{stage}: Eq. 4 by hand {eq4:.6f}, train_loss {row["train_loss"]:.6f}, progress '
              f'{shown}, val_loss {row["val_loss"]:.6f}')
        assert row['train_loss'] == pytest.approx(eq4, rel=1e-4)
        assert row['val_loss'] == pytest.approx(eq4, rel=1e-4)
        assert shown == pytest.approx(eq4, abs=6e-5)


def test_the_learning_rate_study_steps_as_train_py(synthetic, tmp_path, monkeypatch):
    """lr_study.py's training and train.py's coarse stage, one step from the same start on the same
    batch (dropout off: each draws it from its own stream), end with the same weights."""
    _no_dropout(monkeypatch)
    batch = 8
    assert train.main(train_args(synthetic, tmp_path, '--stage', 'coarse', '--coarse-samples', batch,
                                 '--batch-size', batch, '--val-fraction', 0, '--seed', 3)) == 0
    frames = _training_frames(synthetic)
    result = lr_study.study(PAPER, frames, frames, batch, batch, batch, seed=3, show=False)
    trained = torch.load(tmp_path / 'coarse.pth', weights_only=True)
    studied = result['net'].state_dict()
    torch.manual_seed(3)
    start = GlobalCoarseNet(PAPER).state_dict()   # both start here (train.py seeds, then builds)
    assert not torch.equal(trained['coarse7.weight'], start['coarse7.weight'])   # it did step
    assert all(torch.equal(studied[k], trained[k]) for k in trained)


def test_a_format_4_checkpoint_resumes_with_its_validation_losses_in_eq4_units(synthetic, tmp_path):
    """Format 4 wrote val_loss divided by 0.457^2; resuming it converts them (and the CSV). The
    release variant: an unfinished coarse stage of the paper or alexnet variant written before
    format 7 is refused (its coarse1-5 biases took other steps: test_authors_step.py)."""
    args = train_args(synthetic, tmp_path, '--stage', 'coarse', '--coarse-samples', 16,
                      '--batch-size', 8, '--val-every', 8, '--val-fraction', 0.15, '--variant', 'release')
    assert train.main(args + ['--max-steps', '1']) == 0
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    first = ckpt['history'][0]['val_loss']
    ckpt['format'] = 4
    ckpt['history'][0]['val_loss'] = first / RELEASE.log_depth_std ** 2
    torch.save(ckpt, tmp_path / 'checkpoint.pth')
    assert train.main(args + ['--resume']) == 0
    rows = runlog.read_history(tmp_path / 'history_coarse.csv')
    assert rows[0]['val_loss'] == pytest.approx(first, rel=1e-6) and len(rows) == 2
