"""DistributedDataParallel under torchrun, on the CPU with gloo: two processes, each on half of
every global batch, train exactly as one process on the whole batch."""
import shutil
import socket
import subprocess
import sys

import torch

import data
import train
from conftest import ROOT, train_args
from net import PAPER, GlobalCoarseNet

COMMON = ['--coarse-samples', 16, '--fine-samples', 24, '--batch-size', 4, '--val-fraction', 0.15,
          '--val-every', 8, '--seed', 11, '--threads', 1, '--no-amp']


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(synthetic, tmp_path):
    # the fine stage has no dropout, so both runs draw no random numbers but the shared batches;
    # its fixed coarse net: any weights do (the same file for both runs), here a fresh one's
    torch.manual_seed(11)
    base = tmp_path / 'coarse.pth'
    torch.save(GlobalCoarseNet(PAPER).state_dict(), base)
    runs = {}
    for name in ('one', 'two'):
        (tmp_path / name).mkdir()
        shutil.copy(base, tmp_path / name / 'coarse.pth')
        runs[name] = tmp_path / name
    for path in ('fast', 'plain'):
        args = [str(a) for a in train_args(synthetic, runs['one'], *COMMON, '--stage', 'fine',
                                           '--path', path, '--workers', 0)]
        assert train.main(args) == 0
        one = torch.load(runs['one'] / 'fine.pth', weights_only=True)
        args = [str(a) for a in train_args(synthetic, runs['two'], *COMMON, '--stage', 'fine',
                                           '--path', path, '--workers', 0)]
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                            '--nproc-per-node', '2', 'train.py', *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        two = torch.load(runs['two'] / 'fine.pth', weights_only=True)
        assert one.keys() == two.keys()
        # the weights moved: every bias starts at 0
        assert all(one[f'{layer}.bias'].abs().max() > 0 for layer in ('fine1.0', 'fine2.0', 'fine3'))
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
        history = [torch.load(runs[n] / 'checkpoint.pth', weights_only=True)['history']
                   for n in ('one', 'two')]
        losses = [torch.tensor([[r['samples'], r['train_loss']] for r in h]) for h in history]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert all(r['val_loss'] is not None for r in history[1]) and len(history[1]) == 3   # rank 0 validated
        config = [torch.load(runs[n] / 'checkpoint.pth', weights_only=True)['config'] for n in ('one', 'two')]
        assert (config[0]['processes'], config[1]['processes']) == (1, 2)
        for name in runs:                          # next path: fresh fine stage
            for f in ('fine.pth', 'checkpoint.pth'):
                (runs[name] / f).unlink()


def test_coarse_stage_runs_under_torchrun(synthetic, tmp_path):
    """With dropout (coarse6) the two processes draw their own masks, so the run is checked for one
    checkpoint (with both processes' random streams) and one weights file, written by rank 0, and
    against the same run on two nodes."""
    args = [str(a) for a in train_args(synthetic, tmp_path, *COMMON, '--stage', 'coarse')]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc-per-node', '2', 'train.py', *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert ckpt['done'] and len(ckpt['rng']) == 2   # both processes' random streams, their own
    assert not torch.equal(ckpt['rng'][0]['cpu'], ckpt['rng'][1]['cpu'])
    assert (tmp_path / 'coarse.pth').exists() and not list(tmp_path.glob('*.tmp*'))

    # Issue #21: the same run on two "nodes" of this machine (two torchrun launchers, one process
    # each, c10d rendezvous on 127.0.0.1, as README's multi-node command) ends with the same weights
    nodes = tmp_path / 'nodes'
    args = [str(a) for a in train_args(synthetic, nodes, *COMMON, '--stage', 'coarse')]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launchers = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2',
                                   '--nproc-per-node', '1', '--node-rank', str(node),
                                   '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}',
                                   '--rdzv-id', 'two-nodes', 'train.py', *args],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in launchers]
    assert all(p.returncode == 0 for p in launchers), [o[1][-2000:] for o in outs]
    one, two = (torch.load(d / 'coarse.pth', weights_only=True) for d in (tmp_path, nodes))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_each_process_takes_its_share_of_every_global_batch(synthetic):
    import util
    frames = util.Frames(*(a[:20] for a in (util.read_nyu_labeled(synthetic[0], progress=False)[k]
                                           for k in ('images', 'depths'))))
    order = util.SampleOrder(len(frames), 0)
    def images(shard=(0, 1)):   # each step's images of in-memory frames, this process's share
        return [frames.images[idx] for idx, _ in data.step_draws(order, 0, 3, 4, 1, torch.device('cpu'), shard)]
    whole, halves = images(), [images((r, 2)) for r in (0, 1)]
    for step in range(3):
        assert torch.equal(halves[0][step], whole[step][0::2])
        assert torch.equal(halves[1][step], whole[step][1::2])
    keys = [list(data.StepIndices(order, 0, 2, 4, (r, 2), with_keys=True)) for r in (0, 1)]
    for step in range(2):
        assert sorted(keys[0][step] + keys[1][step]) == [(step, j, i) for j, i in enumerate(order.indices(step, 4))]


def test_a_save_failing_on_rank_0_alone_stops_every_rank_with_its_line(synthetic, tmp_path):
    """Issue #20: rank 0 alone writes; when that fails (here: checkpoint.pth is a folder, as a full
    disk would fail it), every process stops with the same one-line error at once, instead of the
    others waiting in the next collective (NCCL: 30 minutes)."""
    import time
    (tmp_path / 'checkpoint.pth').mkdir()
    (tmp_path / 'checkpoint.pth' / 'keep').write_text('a folder, so the rename onto it fails')
    args = [str(a) for a in train_args(synthetic, tmp_path, *COMMON, '--stage', 'coarse',
                                       '--save-every', 2)]
    start = time.monotonic()
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc-per-node', '2', 'train.py', *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if 'could not write the checkpoint at coarse step 2' in line]
    assert len(lines) == 2, r.stderr[-3000:]              # rank 0's, and rank 1's copy of it
    assert time.monotonic() - start < 120

