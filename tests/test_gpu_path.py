"""The GPU training path's logic, checked on the CPU: batches drawn a block of steps at
a time, steps that read nothing on the host between logging points, the non-finite guard without a
host read, checkpoints by wall time, one dropout stream per process, bf16 inside DataParallel's
replica threads, and what --device means."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import cli
import data
import runlog
import runtime
import train
import util
from helpers import ROOT, nan_at_call, train_args


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(
        (a.scale, a.angle, a.offset, a.color, a.flip), (b.scale, b.angle, b.offset, b.color, b.flip)))


@pytest.mark.parametrize('shard', [(0, 1), (1, 2)])
def test_block_drawn_indices_and_draws_equal_the_per_step_ones(shard, monkeypatch):
    scenes = ['a'] * 7 + ['b'] * 3 + ['c'] * 10
    order = util.SampleOrder(20, 3, scenes, per_scene=6)
    blocks, real = [], data.draw_block
    monkeypatch.setattr(data, 'draw_block', lambda o, steps, *a: blocks.append(steps) or real(o, steps, *a))
    rank, world = shard
    drawn = list(data.step_draws(order, 2, 11, 6, 4, torch.device('cpu'), shard))
    assert blocks == [range(2, 4), range(4, 8), range(8, 11)]   # one draw per block, ending at 4k
    assert len(drawn) == 9
    for step, (idx, params) in zip(range(2, 11), drawn):
        assert idx.tolist() == order.indices(step, 6)[rank::world]
        assert _same_params(params, order.aug_params(step, 6).take(list(range(rank, 6, world))))


# Every way a tensor's value reaches the host.
HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__float__', '__int__', '__bool__', '__index__')


@pytest.mark.slow
def test_steps_between_logging_points_read_no_tensor_on_the_host(synthetic, tmp_path, monkeypatch):
    """On the fast path, the steps between logging points (every --log-every 4 steps here) run with
    every host read of a tensor made to raise; only the logging points (losses, validation,
    checkpoint) and the drawing of the next block of batches may read."""
    state = {'guarded': False, 'guarded_steps': 0, 'log_points': 0}

    def forbid(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state['guarded']:
                raise AssertionError(f'Tensor.{name} read on the host during a training step')
            return real(self, *args, **kwargs)
        return read

    def allowed(real, on_exit):
        def call(*args, **kwargs):
            before = state['guarded']
            state['guarded'] = False
            try:
                return real(*args, **kwargs)
            finally:
                state['guarded'] = before if on_exit is None else on_exit
        return call

    real_step, real_augment = train.train_step, util.augment

    def step(*args, **kwargs):
        state['guarded'] = True
        state['guarded_steps'] += 1
        return real_step(*args, **kwargs)

    def augment(*args):   # the next batch: guarded from here, also right after a logging point
        state['guarded'] = True
        return real_augment(*args)

    def log_point(*args):   # a logging point starts with the read of the losses
        state['log_points'] += 1
        return real_log_point(*args)

    real_log_point = runlog.StageLog.read_losses
    monkeypatch.setattr(train, 'train_step', step)
    monkeypatch.setattr(util, 'augment', augment)
    monkeypatch.setattr(runlog.StageLog, 'read_losses', allowed(log_point, on_exit=False))
    monkeypatch.setattr(train, 'train_stage', allowed(train.train_stage, on_exit=False))
    monkeypatch.setattr(data, 'draw_block', allowed(data.draw_block, on_exit=None))
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    args = train_args(synthetic, tmp_path, '--coarse-samples', 48, '--fine-samples', 32,
                      '--batch-size', 4, '--val-every', 24, '--val-fraction', 0.15,
                      '--log-every', 4, '--path', 'fast')
    assert train.main(args) == 0
    # 12 + 8 steps; logging points every 4th step, at the validations (every 6th) and the end
    assert state['guarded_steps'] == 20
    assert state['log_points'] == 4 + 3                 # coarse: 4, 6, 8, 12; fine: 4, 6, 8
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['done'] and [r['step'] for r in ckpt['history'] if r['val_loss'] is not None] == [6, 8]


@pytest.mark.slow
def test_a_nan_loss_between_logging_points_never_reaches_the_weights(synthetic, tmp_path, monkeypatch):
    """The NaN of step 2 is seen on the host only at the logging point of step 4. By then steps 2,
    3 and 4 must all have left the weights alone (fused SGD's found_inf, kept set): the weights
    there are exactly those after step 1 of the same run without a NaN."""
    schedule = ['--coarse-samples', 40, '--batch-size', 4, '--val-fraction', 0, '--stage', 'coarse',
                '--log-every', 4, '--val-every', 40]
    assert train.main(train_args(synthetic, tmp_path / 'ref', *schedule, '--max-steps', 1)) == 0
    after_step_1 = torch.load(tmp_path / 'ref' / 'checkpoint.pth', weights_only=True)['coarse']
    seen, real = {}, runlog.StageLog.read_losses

    def log_point(self, net):
        seen['step'] = self.step
        seen['weights'] = {k: v.clone() for k, v in net.state_dict().items()}
        return real(self, net)

    monkeypatch.setattr(runlog.StageLog, 'read_losses', log_point)
    nan_at_call(monkeypatch, {2})
    with pytest.raises(cli.UserError, match='coarse step 2: the loss is nan'):
        train.main(train_args(synthetic, tmp_path / 'nan', *schedule))
    assert seen['step'] == 4
    assert all(torch.equal(seen['weights'][k], after_step_1[k]) for k in after_step_1)
    assert not (tmp_path / 'nan' / 'checkpoint.pth').exists()


@pytest.mark.slow
def test_checkpoints_by_wall_time(synthetic, tmp_path, monkeypatch):
    saved = []

    def save(path, log, *args, **kwargs):   # which steps save is the question, not the file
        saved.append(log.step)

    monkeypatch.setattr(checkpoint, 'save', save)
    schedule = ['--coarse-samples', 24, '--batch-size', 4, '--val-fraction', 0, '--stage', 'coarse',
                '--log-every', 2, '--val-every', 24]
    assert train.main(train_args(synthetic, tmp_path / 'steps', *schedule, '--save-every', 3)) == 0
    assert saved == [3, 6]      # every 3 steps and at the end; 10 minutes never came
    saved.clear()
    assert train.main(train_args(synthetic, tmp_path / 'often', *schedule,
                                 '--save-minutes', 1e-6)) == 0
    assert saved == [2, 4, 6]   # due at every logging point


DROPOUT_SCRIPT = '''
import sys, torch, runtime
device, gpus = runtime.DIST.start(torch.device('cpu'), [])
runtime.seed_streams(5, runtime.DIST.rank, gpus)
mask = torch.nn.functional.dropout(torch.ones(4096), 0.5) > 0
masks = runtime.DIST.gather(mask)
if runtime.DIST.main:
    torch.save(masks, sys.argv[1])
runtime.DIST.stop()
'''


@pytest.mark.slow
def test_two_gloo_ranks_draw_different_dropout_masks(tmp_path):
    script, out = tmp_path / 'dropout.py', tmp_path / 'masks.pt'
    script.write_text(DROPOUT_SCRIPT)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc-per-node', '2', str(script), str(out)], cwd=ROOT, timeout=300,
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    masks = torch.load(out, weights_only=True)
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])
    for rank, mask in enumerate(masks):                  # each rank's own, reproducible stream
        assert 0.45 < mask.float().mean() < 0.55
        runtime.seed_streams(5, rank, [])
        assert torch.equal(torch.nn.functional.dropout(torch.ones(4096), 0.5) > 0, mask)


def test_replica_autocast_wrapper_sets_its_dtype_in_a_fresh_thread():
    """nn.DataParallel's replica threads enter `torch.autocast(device_type, enabled=True)` without
    the dtype, and the dtype is thread-local: a fresh thread gets the device's default (float16 on
    CUDA, bfloat16 on the CPU), whatever the main thread asked for. The same on the CPU, with the
    roles of the dtypes swapped: the main thread asks for float16, the thread computes in
    bfloat16; the wrapper, entered inside the replicated forward, computes in its own dtype."""
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(8, 8), torch.randn(4, 8)

    def replica_dtype(module):
        out = {}

        def worker(enabled):   # what torch/nn/parallel/parallel_apply.py does in each thread
            with torch.amp.autocast('cpu', enabled=enabled):
                out['dtype'] = module(x).dtype
        with torch.autocast('cpu', dtype=torch.float16):
            thread = threading.Thread(target=worker, args=(torch.is_autocast_enabled('cpu'),))
            thread.start()
            thread.join()
        return out['dtype']

    assert replica_dtype(lin) == torch.bfloat16          # the thread's default, not float16
    assert replica_dtype(runtime.Autocast(lin, 'cpu', torch.float16)) == torch.float16
    with torch.autocast('cpu', dtype=torch.float16):     # and its own dtype wins in any thread
        assert runtime.Autocast(lin, 'cpu', torch.bfloat16)(x).dtype == torch.bfloat16
    assert runtime.Autocast(lin, 'cpu', enabled=False)(x).dtype == torch.float32


def test_device_cuda_means_every_gpu_and_cuda_n_one(monkeypatch, nyu_like, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    assert runtime.resolve_device('cuda') == (torch.device('cuda', 0), [0, 1, 2, 3])
    assert runtime.resolve_device('cuda:2') == (torch.device('cuda', 2), [2])
    assert runtime.resolve_device('cpu') == (torch.device('cpu'), [])
    with pytest.raises(cli.UserError, match=r'cuda:7: 4 GPU\(s\) visible'):
        runtime.resolve_device('cuda:7')
    with pytest.raises(cli.UserError, match='not a device'):
        runtime.resolve_device('gpu0')
    with pytest.raises(cli.UserError, match='--compile does not work with nn.DataParallel'):
        train.main(train_args(nyu_like, tmp_path, '--device', 'cuda', '--compile'))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(cli.UserError, match='CUDA is not available'):
        runtime.resolve_device('cuda')


@pytest.mark.slow
def test_fused_sgd_is_the_default_update(synthetic):
    """Fused SGD on the CPU (torch >= 2.4) gives the foreach implementation's update, to rounding
    (one fused multiply-add may differ in the last bit)."""
    from net import PAPER, LocalFineNet
    if not runtime.fused_sgd_works(torch.device('cpu')):
        pytest.skip('this torch has no fused SGD on the CPU')
    torch.manual_seed(0)
    nets = [LocalFineNet(PAPER) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = train.make_optimizer(nets[0], PAPER)
    plain = torch.optim.SGD(train.param_groups(nets[1], PAPER), lr=0.0, momentum=0.9, foreach=True)
    assert fused.defaults['fused'] is True
    x, c = torch.rand(2, 3, 228, 304) * 255, torch.rand(2, 1, 55, 74)
    for _ in range(3):
        for net, opt in zip(nets, (fused, plain)):
            opt.zero_grad()
            net(x, c).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert not torch.equal(nets[0].fine3.weight, LocalFineNet(PAPER).fine3.weight)   # they moved


@pytest.mark.slow
def test_validation_reads_the_host_once_a_batch(synthetic, monkeypatch):
    """Validation's sums stay on the device, one host read a batch (and one for the
    loss at the end); the figures equal those of all frames measured in one go, to rounding."""
    from metrics import Metrics
    from net import PAPER, GlobalCoarseNet
    from loss import safe_log, scale_invariant_loss
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    frames = util.Frames(arrays['images'][:12], arrays['depths'][:12])
    torch.manual_seed(0)
    coarse = GlobalCoarseNet(PAPER).eval()
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k:
                            reads.append(_n) or _real(self, *a, **k))
    scores = train.validate(coarse, frames, torch.device('cpu'), 4, 0.5)
    monkeypatch.undo()
    assert len(reads) <= 3 + 1, reads                  # 3 batches of 4, and the loss
    x, y, m = util.center_crop(*frames.get(range(12)))
    with torch.no_grad():
        pred = coarse(x)
        whole = Metrics().add(pred=pred.exp(), gt=y, mask=m).result()
        loss = float(scale_invariant_loss(pred, safe_log(y, m), m, 0.5))
    assert scores['loss'] == pytest.approx(loss, rel=1e-5)
    assert all(scores[k] == pytest.approx(v, rel=1e-6) for k, v in whole.items())


@pytest.mark.slow
@pytest.mark.parametrize('saved, resumed', [(torch.contiguous_format, torch.channels_last),
                                            (torch.channels_last, torch.contiguous_format)])
def test_momentum_resumes_in_the_layout_of_its_parameters(saved, resumed):
    """Nets are channels_last on CUDA only, so a checkpoint moves between layouts. Its
    momentum buffers are restored in their parameters' layout (fused SGD on CUDA refuses a
    mismatch; on the CPU it computed a wrong update), and the next step is an uninterrupted one's."""
    import copy
    from net import PAPER, LocalFineNet
    if not runtime.fused_sgd_works(torch.device('cpu')):
        pytest.skip('this torch has no fused SGD on the CPU')
    torch.manual_seed(0)
    x, c = torch.rand(2, 3, 228, 304) * 255, torch.rand(2, 1, 55, 74)

    def step(net, optimizer):
        optimizer.zero_grad()
        net(x, c).square().mean().backward()
        optimizer.step()

    straight = LocalFineNet(PAPER, pass_through=False).to(memory_format=saved)
    optimizer = train.make_optimizer(straight, PAPER)
    step(straight, optimizer)                              # momentum buffers now hold a gradient
    state = copy.deepcopy(optimizer.state_dict())
    resumed_net = LocalFineNet(PAPER, pass_through=False)
    resumed_net.load_state_dict(straight.state_dict())
    resumed_net = resumed_net.to(memory_format=resumed)
    resumed_optimizer = train.make_optimizer(resumed_net, PAPER)
    checkpoint.load_optimizer_state(resumed_optimizer, state)
    step(straight, optimizer)
    step(resumed_net, resumed_optimizer)
    for (name, p), q in zip(straight.named_parameters(), resumed_net.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name


@pytest.mark.slow
def test_the_next_block_is_drawn_before_the_logging_point_reads(synthetic, tmp_path, monkeypatch):
    """At a logging point the host reads the block's losses, which drains the GPU's
    queue; the next block's frames and draws are made before that (while the last step of the
    block is still to be queued), never after the read."""
    events, real_draw, real_read = [], data.draw_block, runlog.StageLog.read_losses
    monkeypatch.setattr(data, 'draw_block', lambda o, steps, *a: events.append(('draw', steps.start))
                        or real_draw(o, steps, *a))

    def read(self, net):
        events.append(('read', self.step))
        return real_read(self, net)
    monkeypatch.setattr(runlog.StageLog, 'read_losses', read)
    assert train.main(train_args(synthetic, tmp_path, '--stage', 'coarse', '--coarse-samples', 40,
                                 '--batch-size', 4, '--val-fraction', 0, '--log-every', 4,
                                 '--val-every', 40)) == 0
    reads = [s for kind, s in events if kind == 'read']
    assert reads == [4, 8, 10]
    for step in reads[:-1]:   # the block starting at this step was drawn before this step's read
        assert events.index(('draw', step)) < events.index(('read', step))
