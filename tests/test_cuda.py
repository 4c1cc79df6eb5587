"""train.py, evaluate.py and predict.py on a CUDA GPU. Skipped, with the reason, where
no GPU is visible; on the GPU machine `.gpu/gpu_smoke.sh` runs them first.

TEST_DEVICE=cpu python -m pytest tests/test_cuda.py runs the same tests on the CPU (the CUDA-only
checks skip): a dry run of the tests themselves, for machines without a GPU."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
import predict
import runlog
import runtime
import train
import util
from helpers import per_step_losses, train_args
from net import PAPER, GlobalCoarseNet, LocalFineNet

DEVICE = os.environ.get('TEST_DEVICE', 'cuda:0')
ON_CUDA = DEVICE.startswith('cuda')
pytestmark = [pytest.mark.slow,   # every test here trains or runs a script end to end
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                 reason='needs a CUDA GPU (no GPU visible here)')]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason='checks CUDA itself')

SHORT = ['--coarse-samples', 48, '--fine-samples', 24, '--batch-size', 8, '--val-fraction', 0.15,
         '--val-every', 24, '--seed', 3]


def _args(synthetic, out, *extra):
    return train_args(synthetic, out, *extra, '--device', DEVICE)   # the last --device counts


def _checkpoint(out):
    return torch.load(out / 'checkpoint.pth', weights_only=True)


@pytest.mark.parametrize('path', ['fast', 'plain'])
def test_both_stages_train(synthetic, tmp_path, path):
    assert train.main(_args(synthetic, tmp_path, *SHORT, '--path', path, '--workers', 2)) == 0
    ckpt = _checkpoint(tmp_path)
    assert ckpt['done'] and ckpt['stage'] == 'fine'
    weights = [torch.load(tmp_path / 'coarse.pth', weights_only=True), ckpt['fine']]   # the fine
    assert all(torch.isfinite(v).all() for w in weights for v in w.values())   # stage refers to coarse.pth
    assert torch.isfinite(per_step_losses(tmp_path)).all()
    assert len(ckpt['rng']) == 1 and len(ckpt['rng'][0]['cuda']) == (1 if ON_CUDA else 0)
    for name in ('coarse.pth', 'fine.pth', 'loss_coarse.png', 'loss_fine.png', 'predictions.png'):
        assert (tmp_path / name).stat().st_size > 0


COARSE = ['--coarse-samples', 48, '--batch-size', 4, '--val-fraction', 0, '--val-every', 4,
          '--stage', 'coarse', '--seed', 7, '--log-every', 3]


def test_fast_equals_plain_in_fp32(synthetic, tmp_path):
    """--no-amp: fp32 without TF32 on both paths, the same batches and dropout masks. The fast path
    augments on the GPU, the plain one on the CPU (float rounding apart), and cuDNN may pick other
    algorithms for each: the 12 per-step losses agree within rtol 2e-3."""
    for path in ('fast', 'plain'):
        assert train.main(_args(synthetic, tmp_path / path, *COARSE, '--no-amp', '--path', path,
                                '--workers', 2)) == 0
    fast, plain = per_step_losses(tmp_path / 'fast'), per_step_losses(tmp_path / 'plain')
    assert len(fast) == 12
    torch.testing.assert_close(fast, plain, rtol=2e-3, atol=1e-5)


def test_bf16_losses_close_to_fp32(synthetic, tmp_path):
    for name, amp in (('bf16', '--amp'), ('fp32', '--no-amp')):
        assert train.main(_args(synthetic, tmp_path / name, *COARSE, amp)) == 0
    bf16, fp32 = per_step_losses(tmp_path / 'bf16'), per_step_losses(tmp_path / 'fp32')
    torch.testing.assert_close(bf16[:6], fp32[:6], rtol=0.05, atol=0.0)
    assert not torch.equal(bf16, fp32)      # it really ran in bf16


def test_resume_ends_bit_identical(synthetic, tmp_path):
    """--deterministic (fixed cuDNN algorithms): stopped twice and resumed, the run ends with the
    weights of an uninterrupted one, bit for bit (random streams of every GPU in the checkpoint)."""
    schedule = [*SHORT, '--save-every', 2, '--deterministic']
    assert train.main(_args(synthetic, tmp_path / 'straight', *schedule)) == 0
    chunked = tmp_path / 'chunked'
    assert train.main(_args(synthetic, chunked, *schedule, '--max-steps', 4)) == 0
    assert train.main(_args(synthetic, chunked, *schedule, '--resume', '--max-steps', 4)) == 0
    assert train.main(_args(synthetic, chunked, *schedule, '--resume')) == 0
    for name in ('coarse.pth', 'fine.pth'):
        a, b = (torch.load(d / name, weights_only=True) for d in (tmp_path / 'straight', chunked))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@needs_cuda
def test_steps_between_logging_points_never_synchronise(synthetic, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode('error') around every step after the first logging point
    (cuDNN's autotuning is done by then) and around the batch's augmentation."""
    state = {'on': False, 'guarded': 0}

    def guarded(real):
        def call(*args, **kwargs):
            if not state['on']:
                return real(*args, **kwargs)
            torch.cuda.set_sync_debug_mode('error')
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call

    real_step, real_read, real_stage = train.train_step, runlog.StageLog.read_losses, train.train_stage

    def step(*args, **kwargs):
        state['guarded'] += state['on']
        return guarded(real_step)(*args, **kwargs)

    def read_losses(self, *args):   # a logging point: the steps after it are watched
        state['on'] = False
        mean = real_read(self, *args)
        state['on'] = self.step < self.total_steps
        return mean

    def stage(*args):   # a new stage autotunes cuDNN again: watched from its first logging point
        state['on'] = False
        return real_stage(*args)

    monkeypatch.setattr(train, 'train_step', step)
    monkeypatch.setattr(runlog.StageLog, 'read_losses', read_losses)
    monkeypatch.setattr(train, 'train_stage', stage)
    monkeypatch.setattr(util, 'augment', guarded(util.augment))
    args = _args(synthetic, tmp_path, '--coarse-samples', 160, '--fine-samples', 80, '--batch-size', 8,
                 '--val-every', 80, '--log-every', 5)
    assert train.main(args) == 0
    assert state['guarded'] >= 20


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='DataParallel needs two or more GPUs')
def test_dataparallel_replicas_compute_in_bf16(synthetic, tmp_path):
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.seen = nn.Linear(16, 16), []

        def forward(self, x):
            self.seen.append((torch.get_autocast_dtype('cuda'), torch.is_autocast_enabled('cuda')))
            return self.lin(x)

    probe = Probe().cuda()
    dp = nn.DataParallel(runtime.Autocast(probe, 'cuda', torch.bfloat16), device_ids=[0, 1])
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = dp(torch.randn(8, 16, device='cuda'))
    assert out.dtype == torch.bfloat16
    # replicas share the original's attribute dict (a shallow copy), so `seen` has both threads
    assert probe.seen == [(torch.bfloat16, True)] * 2
    # and train.py itself on every GPU: one random stream per GPU in the checkpoint
    assert train.main(_args(synthetic, tmp_path, *SHORT, '--device', 'cuda')) == 0
    assert len(_checkpoint(tmp_path)['rng'][0]['cuda']) == torch.cuda.device_count()


def test_evaluate_and_predict(synthetic, tmp_path):
    """Random-weight nets (the speed of the test; the numbers only need to agree): the GPU's
    evaluation and prediction equal the CPU's within TF32 rounding."""
    model = tmp_path / 'model'
    model.mkdir()
    torch.manual_seed(0)
    torch.save(GlobalCoarseNet(PAPER).state_dict(), model / 'coarse.pth')
    torch.save(LocalFineNet(PAPER).state_dict(), model / 'fine.pth')
    results = {}
    for device in ('cpu', DEVICE):
        args = evaluate.parse_args(['--data', str(synthetic[0]), '--splits', str(synthetic[1]),
                                    '--model', str(model), '--out', str(tmp_path / device.replace(':', '')),
                                    '--device', device])
        results[device] = evaluate.evaluate(args)
    for protocol, rows in results['cpu'].items():
        for method, metrics in rows.items():
            for name, value in metrics.items():
                assert results[DEVICE][protocol][method][name] == pytest.approx(value, rel=1e-2, abs=1e-3)
    from PIL import Image
    image = tmp_path / 'room.png'
    Image.fromarray((np.random.default_rng(0).random((150, 200, 3)) * 255).astype(np.uint8)).save(image)
    depth = {}
    for device in ('cpu', DEVICE):
        out = tmp_path / f'pred-{device.replace(":", "")}'
        assert predict.main([str(image), '--model', str(model), '--out', str(out), '--device', device]) == 0
        depth[device] = np.load(out / 'room_depth.npy')
    assert depth[DEVICE].shape == (150, 200)
    np.testing.assert_allclose(depth[DEVICE], depth['cpu'], rtol=1e-2)
