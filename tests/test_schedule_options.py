"""The seed's own knobs: a global factor on the paper's learning rates, and the
schedule in passes over the training set instead of samples."""
import math

import pytest
import torch

import cli
import runlog
import train
import util
from helpers import train_args

# Sec. 3.3, written out here: coarse1-5 0.001, coarse6-7 0.1, fine1 and fine3 0.001, fine2 0.01.
PAPER_RATES = {**{f'coarse{i}': 0.001 for i in range(1, 6)}, 'coarse6': 0.1, 'coarse7': 0.1,
               'fine1': 0.001, 'fine2': 0.01, 'fine3': 0.001}


@pytest.mark.slow
def test_lr_scale_and_epochs(synthetic, tmp_path, capsys):
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    train_idx, _ = util.read_splits(synthetic[1], len(arrays['images']))
    n = len(util.split_train_val(train_idx, arrays['scenes'], 0.15, 0)[0])   # frames left to train on
    expected = math.ceil(2 * n / 5) * 5                                     # whole batches of 5
    run = train_args(synthetic, tmp_path, '--stage', 'coarse', '--coarse-epochs', 2, '--batch-size', 5,
                     '--val-fraction', 0.15, '--val-every', 1000)
    assert train.main(run + ['--lr-scale', '0.1', '--max-steps', '1']) == 0
    assert f'--coarse-epochs 2: 2 x {n} samples a pass = {expected} samples' in capsys.readouterr().out
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    rates = {g['layer']: g['lr'] for g in ckpt['optimizer']['param_groups']}
    assert rates == {k: 0.1 * v for k, v in PAPER_RATES.items() if k.startswith('coarse')}
    assert ckpt['config']['samples'] == expected and ckpt['config']['lr_scale'] == 0.1
    with pytest.raises(cli.DataError, match=r'was started with --lr-scale 0\.1, this run asks for 0\.5'):
        train.main(run + ['--lr-scale', '0.5', '--resume'])
    assert train.main(run + ['--lr-scale', '0.1', '--resume']) == 0
    assert runlog.read_history(tmp_path / 'history_coarse.csv')[-1]['samples'] == expected


@pytest.mark.parametrize('both', [['--coarse-samples', '64', '--coarse-epochs', '2'],
                                  ['--fine-samples', '64', '--fine-epochs', '1']])
def test_both_units_at_once_are_refused(both):
    with pytest.raises(cli.UserError, match=r'--(coarse|fine)-samples and --\1-epochs: give one of the two'):
        train.parse_args(both)
