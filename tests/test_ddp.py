"""DistributedDataParallel under torchrun, on the CPU with gloo: two processes, each on half of
every global batch, train exactly as one process on the whole batch; a group that torchrun
restarts after one of its processes was killed continues from the checkpoint."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import train
from helpers import ROOT, train_args
from net import PAPER, GlobalCoarseNet

COMMON = ['--coarse-samples', 16, '--fine-samples', 24, '--batch-size', 4, '--val-fraction', 0.15,
          '--val-every', 8, '--seed', 11, '--threads', 1, '--no-amp']


def torchrun(args, *options):
    """The command line of train.py `args` under torchrun with its `options` (default: this
    machine alone, two processes)."""
    return [sys.executable, '-m', 'torch.distributed.run',
            *(options or ('--standalone', '--nproc-per-node', '2')), 'train.py', *map(str, args)]


@pytest.fixture(scope='module')
def coarse_two_processes(synthetic, tmp_path_factory):
    """The coarse stage of COMMON under torchrun (two processes), uninterrupted: the output folder.
    Two tests compare their runs with it."""
    out = tmp_path_factory.mktemp('coarse_two_processes')
    r = subprocess.run(torchrun(train_args(synthetic, out, *COMMON, '--stage', 'coarse')),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / 'stdout.txt').write_text(r.stdout)
    return out


@pytest.mark.slow
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
        args = train_args(synthetic, runs['two'], *COMMON, '--stage', 'fine', '--path', path,
                          '--workers', 0)
        r = subprocess.run(torchrun(args), cwd=ROOT, capture_output=True, text=True, timeout=600)
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


@pytest.mark.slow
def test_coarse_stage_runs_under_torchrun(synthetic, coarse_two_processes, tmp_path):
    """With dropout (coarse6) the two processes draw their own masks, so the run is checked for one
    checkpoint (with both processes' random streams) and one weights file, written by rank 0, and
    against the same run on two nodes."""
    run = coarse_two_processes
    printed = (run / 'stdout.txt').read_text()   # what the user reads: one line a run, not a process
    for line in ('training, ', 'learning rates (Sec. 3.3)', 'coarse net written to'):
        assert printed.count(line) == 1, printed
    ckpt = torch.load(run / 'checkpoint.pth', weights_only=True)
    assert ckpt['done'] and len(ckpt['rng']) == 2   # both processes' random streams, their own
    assert not torch.equal(ckpt['rng'][0]['cpu'], ckpt['rng'][1]['cpu'])
    assert (run / 'coarse.pth').exists() and not list(run.glob('*.tmp*'))

    # the same run on two "nodes" of this machine (two torchrun launchers, one process each, c10d
    # rendezvous on 127.0.0.1, as docs/gpus.md's multi-node command) ends with the same weights
    nodes = tmp_path / 'nodes'
    args = train_args(synthetic, nodes, *COMMON, '--stage', 'coarse')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launchers = [subprocess.Popen(torchrun(args, '--nnodes', '2', '--nproc-per-node', '1',
                                           '--node-rank', str(node), '--rdzv-backend', 'c10d',
                                           '--rdzv-endpoint', f'127.0.0.1:{port}',
                                           '--rdzv-id', 'two-nodes'),
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in (0, 1)]
    outs = [p.communicate(timeout=600) for p in launchers]
    assert all(p.returncode == 0 for p in launchers), [o[1][-2000:] for o in outs]
    assert_same_weights(run, nodes)


def assert_same_weights(one, two):
    """The coarse nets in the output folders `one` and `two` are equal, bit for bit."""
    a, b = (torch.load(d / 'coarse.pth', weights_only=True) for d in (one, two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(folder):
    """(training loss, validation loss) of every row of the history in folder's checkpoint."""
    history = torch.load(folder / 'checkpoint.pth', weights_only=True)['history']
    return [(row['train_loss'], row['val_loss']) for row in history]


def worker_pids(launcher):
    """{global rank: process id} of the processes a torchrun launcher has started."""
    children = subprocess.run(['pgrep', '-P', str(launcher.pid)], capture_output=True, text=True)
    pids = {}
    for pid in map(int, children.stdout.split()):
        with open(f'/proc/{pid}/environ', 'rb') as f:
            env = dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)
        pids[int(env[b'RANK'])] = pid
    return pids


@pytest.mark.slow
def test_torchrun_restarts_a_group_after_a_killed_process_and_it_resumes(synthetic, tmp_path,
                                                                         coarse_two_processes):
    """Fault tolerance as docs/gpus.md gives it: torchrun --max-restarts 1, train.py --resume
    auto, and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (without it the restarted group hangs or fails
    in its rendezvous: runtime.Distributed.check_restartable). Rank 0, the process that writes, is
    killed (SIGKILL) right after the first checkpoint (step 2 of 4); torchrun stops the other
    process and starts both again, they continue from step 2, and the run ends with the weights
    of the uninterrupted run, bit for bit (the CPU is deterministic, and the checkpoint holds
    both processes' dropout streams and the momentum)."""
    args = train_args(synthetic, tmp_path, *COMMON, '--stage', 'coarse', '--save-every', 2,
                      '--resume', 'auto', '--print-every', 0)   # a line a step: which steps ran
    env = {**os.environ, 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    # its own process group, so that a failed test ends torchrun and the processes it started
    launcher = subprocess.Popen(torchrun(args, '--standalone', '--nproc-per-node', '2',
                                         '--max-restarts', '1'),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / 'checkpoint.pth').exists():   # renamed into place when complete
            assert launcher.poll() is None and time.monotonic() < deadline, 'no checkpoint written'
            time.sleep(0.005)
        os.kill(worker_pids(launcher)[0], signal.SIGKILL)
        killed_at = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert (killed_at['step'], killed_at['done']) == (2, False)
    assert launcher.returncode == 0, err[-3000:]
    first, _, restarted = out.partition(f"--resume auto: continuing {tmp_path / 'checkpoint.pth'}")
    assert 'starting afresh' in first and restarted, out   # the restarted group says it resumes,
    # and does: steps 3 and 4 alone. (A restart from step 0 would end with the same weights, as
    # the schedule is deterministic: only these lines tell the two apart.)
    assert re.findall(r'coarse step (\d)/4', restarted) == ['3', '4'], out
    assert_same_weights(coarse_two_processes, tmp_path)
    assert losses(tmp_path) == losses(coarse_two_processes)   # the history, continued
    assert not list(tmp_path.glob('*.tmp*'))


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_save_failing_on_rank_0_alone_stops_every_rank_with_its_line(synthetic, tmp_path):
    """Rank 0 alone writes; when that fails (here: checkpoint.pth is a folder, as a full
    disk would fail it), every process stops with the same one-line error at once, instead of the
    others waiting in the next collective (NCCL: 30 minutes)."""
    (tmp_path / 'checkpoint.pth').mkdir()
    (tmp_path / 'checkpoint.pth' / 'keep').write_text('a folder, so the rename onto it fails')
    args = train_args(synthetic, tmp_path, *COMMON, '--stage', 'coarse', '--save-every', 2)
    start = time.monotonic()
    # torchrun ends the other workers as soon as it sees rank 0's failure (every 0.1 s); 5 s between
    # its looks leave rank 1 the time to print its own line on a loaded machine (the suite's)
    r = subprocess.run(torchrun(args, '--standalone', '--nproc-per-node', '2', '--monitor-interval', '5'),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if 'could not write the checkpoint at coarse step 2' in line]
    assert len(lines) == 2, r.stderr[-3000:]              # rank 0's, and rank 1's copy of it
    assert time.monotonic() - start < 120



def test_restarts_on_the_store_torchrun_shares_are_refused(monkeypatch):
    """The environment torchrun --max-restarts 1 gives its processes without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: refused with one line before any rendezvous, not a
    restart that hangs (the test above runs the accepted one)."""
    import cli
    import runtime
    for name, value in {'WORLD_SIZE': '2', 'RANK': '0', 'TORCHELASTIC_MAX_RESTARTS': '1',
                        'TORCHELASTIC_USE_AGENT_STORE': 'True'}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(cli.UserError, match='TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'):
        runtime.Distributed().start(torch.device('cpu'), [])
