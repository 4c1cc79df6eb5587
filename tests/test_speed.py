"""The fast path is the same training as the plain one; bench.py runs. (That the .mat cache is
used: tests/test_nyu_loader.py.)"""
import subprocess
import sys

import pytest
import torch

import train
import util
from helpers import ROOT, check_aligned, per_step_losses, position_frame, train_args

pytestmark = pytest.mark.slow   # training runs, bench.py, batches of augmentation: each over ~1.5 s

STEPS = ['--coarse-samples', 24, '--fine-samples', 12, '--batch-size', 4, '--val-fraction', 0,
         '--val-every', 4, '--seed', 7]


def test_plain_per_sample_augmentation_is_the_batched_one_and_aligned():
    image, depth, _ = position_frame()
    frames = [(image[0], depth[0])] * 6
    order = util.SampleOrder(len(frames), 3)
    plain = util.PerSampleAugmented(frames, order, 6)
    for step in (0, 5):
        params = order.aug_params(step, 6)
        batched = util.augment(*util.as_float_batch(image.repeat(6, 1, 1, 1), depth.repeat(6, 1, 1)), params)
        for j in range(6):
            one = plain[(step, j, j)]
            assert torch.allclose(one[0], batched[0][j], atol=1e-3)
            assert torch.equal(one[1], batched[1][j]) and torch.equal(one[2], batched[2][j])
            # the alignment test of tests/test_augment.py, on this sample's own draw
            check_aligned(util.AugParams(*(t[j:j + 1] for t in (params.scale, params.angle, params.offset,
                                                                   params.color, params.flip))), min_cells=800)


def test_fast_and_plain_paths_train_the_same(synthetic, tmp_path):
    """fp32 both: the same batches in the same order, so the same loss at every step (of the fine
    stage, which the final checkpoint's history holds) and the same weights of both nets."""
    runs = {}
    for name, extra in (('fast', ['--path', 'fast']), ('plain', ['--path', 'plain', '--workers', 2])):
        assert train.main(train_args(synthetic, tmp_path / name, *STEPS, *extra, '--no-amp')) == 0
        runs[name] = tmp_path / name
    fast, plain = (per_step_losses(runs[n]) for n in ('fast', 'plain'))
    assert len(fast) == 3
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    for net in ('coarse.pth', 'fine.pth'):
        a, b = (torch.load(runs[n] / net, weights_only=True) for n in ('fast', 'plain'))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_bf16_fast_path_follows_the_fp32_loss_curve(synthetic, tmp_path):
    """bf16 autocast (the CUDA default of the fast path; here on the CPU): the loss of each of the
    first steps within bf16 tolerance of the fp32 plain path's."""
    short = ['--coarse-samples', 24, '--batch-size', 4, '--val-fraction', 0, '--val-every', 4,
             '--seed', 7, '--stage', 'coarse']
    assert train.main(train_args(synthetic, tmp_path / 'bf16', *short, '--path', 'fast', '--amp')) == 0
    assert train.main(train_args(synthetic, tmp_path / 'fp32', *short, '--path', 'plain', '--workers', 0)) == 0
    bf16, fp32 = per_step_losses(tmp_path / 'bf16'), per_step_losses(tmp_path / 'fp32')
    assert len(bf16) == 6
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.0)
    assert not torch.equal(bf16, fp32)      # it really ran in bf16


def test_bench_quick_prints_the_table():
    r = subprocess.run([sys.executable, 'bench.py', '--quick', '--workers', '2'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for row in ('train coarse net', 'train fine net', 'raw cache of 36 frames', 'data pipeline alone',
                'inference batch 1',
                'inference batch 32', 'coarse FLOPs per training sample', "paper's schedule"):
        assert row in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith('coarse FLOPs'))
    gflop = float(line.split('|')[2].split()[0])
    assert 8 < gflop < 10      # ~3 GFLOP forward, ~9 for a training sample (forward + backward)
