"""Training and inference speed on this machine: the plain pipeline against the fast one, in one run.

    python bench.py             # on the GPU when there is one (figures for BENCHMARKS.md)
    python bench.py --quick     # a few steps, small data, CPU: what the tests run

Prints one table: training samples/s of each stage with --path plain (DataLoader workers augmenting
one sample at a time, fp32) and --path fast (frames on the device, one batched augmentation,
bf16 autocast and channels_last on CUDA), their ratio, the data pipeline alone, inference latency
(batch 1) and throughput (batch 32), the FLOPs of a training sample (torch's flop counter) and the
share of the device's bf16 peak that the fast path reaches, the .mat cache speed-up, and the
paper's full schedule (2M + 1.5M samples) estimated from the fast figures.
"""
import argparse
import copy
import os
import tempfile
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
import util
from net import INPUT_HW, PAPER, GlobalCoarseNet, LocalFineNet, predict_log_depth

# Dense bf16 tensor-core peaks from the vendor's data sheets (FLOP/s), by device name.
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L40S': 362e12, 'RTX 4090': 165e12}


def peak_flops(device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_frames(folder, scenes, views):
    mat, _ = util.make_synthetic_nyu(folder, scenes, views, test_fraction=0.0, progress=False)
    if os.path.exists(util.cache_path_for(mat)):
        os.remove(util.cache_path_for(mat))
    t0 = time.perf_counter()
    arrays = util.read_nyu_labeled(mat, progress=False)      # reads the .mat, writes the cache
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    util.read_nyu_labeled(mat, progress=False)               # reads the cache
    second = time.perf_counter() - t0
    return util.Frames(arrays['images'], arrays['raw_depths']), first, second


def nets_for(path, device):
    fmt = torch.channels_last if path == 'fast' and device.type == 'cuda' else torch.contiguous_format
    return (GlobalCoarseNet(PAPER).to(device, memory_format=fmt),
            LocalFineNet(PAPER).to(device, memory_format=fmt))


def train_speed(frames, stage, path, device, batch, steps, warmup, workers, data_only=False):
    """Samples/s of `steps` training steps (after `warmup`), or of the data pipeline alone."""
    args = SimpleNamespace(path=path, workers=workers)
    amp = path == 'fast' and device.type == 'cuda'
    if path == 'fast':
        frames = copy.copy(frames).to(device)   # the shared CPU frames stay for the next rows
    coarse, fine = nets_for(path, device)
    net = coarse if stage == 'coarse' else fine
    coarse.train(stage == 'coarse')
    optimizer = train.make_optimizer(net, PAPER)
    order = util.SampleOrder(len(frames), 0)
    batches = train.training_batches(frames, order, 0, warmup + steps, batch, args, device)
    for i, (x, y, m) in enumerate(batches):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        if data_only:
            continue
        loss = train.forward_loss(stage, net, coarse, x, y, m, 0.5, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def training_flops_per_sample(stage, device):
    """FLOPs of one training sample's forward and backward (the fine stage's fixed coarse
    forward included), counted by torch on a batch of 2."""
    coarse, fine = nets_for('plain', device)
    x = torch.rand(2, 3, *INPUT_HW, device=device) * 255
    with FlopCounterMode(display=False) as counter:
        if stage == 'coarse':
            coarse(x).sum().backward()
        else:
            with torch.no_grad():
                c = coarse.eval()(x)
            fine(x, c).sum().backward()
    return counter.get_total_flops() / 2


@torch.no_grad()
def inference(device, path, batch, repeats):
    """Seconds per call of coarse + fine on a batch (median of `repeats`)."""
    coarse, fine = nets_for(path, device)
    coarse.eval()
    fine.eval()
    x = torch.rand(batch, 3, *INPUT_HW, device=device) * 255
    if path == 'fast' and device.type == 'cuda':
        x = x.contiguous(memory_format=torch.channels_last)
    amp = path == 'fast' and device.type == 'cuda'
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            predict_log_depth(coarse, fine, x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='CPU, tiny data, a few steps')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=train.BATCH_SIZE, help='(default: %(default)s, the paper)')
    p.add_argument('--steps', type=int, default=None, help='timed steps per measurement')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help="the plain path's DataLoader workers (default: %(default)s)")
    args = p.parse_args(argv)
    device = torch.device('cpu' if args.quick else args.device)
    torch.backends.cudnn.benchmark = True
    batch = 4 if args.quick else args.batch_size
    steps = args.steps or (2 if args.quick else 50)
    warmup = 1 if args.quick else 10
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f'device: {name}; batch {batch}, {steps} timed steps after {warmup} warm-up; torch {torch.__version__}')
    with tempfile.TemporaryDirectory() as tmp:
        frames, first, second = make_frames(tmp, *((2, 2) if args.quick else (16, 8)))
    rows = []

    def row(what, plain, fast, unit, fmt='{:.1f}'):
        ratio = f'{fast / plain:.2f}x' if plain and fast else ''
        rows.append((what, fmt.format(plain) if plain else '-', fmt.format(fast) if fast else '-', ratio, unit))

    fast_speed = {}
    for stage in ('coarse', 'fine'):
        speeds = [train_speed(frames, stage, path, device, batch, steps, warmup, args.workers)
                  for path in ('plain', 'fast')]
        fast_speed[stage] = speeds[1]
        row(f'train {stage} net', *speeds, 'samples/s')
    row('data pipeline alone', *[train_speed(frames, 'coarse', path, device, batch, steps, warmup,
                                             args.workers, data_only=True)
                                 for path in ('plain', 'fast')], 'samples/s')
    lat = [inference(device, path, 1, 5 if args.quick else 50) * 1000 for path in ('plain', 'fast')]
    rows.append(('inference batch 1 (coarse+fine)', f'{lat[0]:.2f}', f'{lat[1]:.2f}',
                 f'{lat[0] / lat[1]:.2f}x', 'ms latency'))
    thr = [32 / inference(device, path, 32, 3 if args.quick else 20) for path in ('plain', 'fast')]
    row('inference batch 32 (coarse+fine)', *thr, 'images/s')
    peak = peak_flops(device)
    for stage in ('coarse', 'fine'):
        flops = training_flops_per_sample(stage, device)
        achieved = flops * fast_speed[stage]
        share = f', {100 * achieved / peak:.1f}% of the bf16 peak' if peak else ''
        rows.append((f'{stage} FLOPs per training sample', '', f'{flops / 1e9:.2f} GFLOP', '',
                     f'fast: {achieved / 1e12:.2f} TFLOP/s{share}'))
    rows.append(('read synthetic .mat: first / cached', f'{first:.2f} s', f'{second:.3f} s',
                 f'{first / second:.0f}x', 'cache speed-up'))
    schedule = train.COARSE_SAMPLES / fast_speed['coarse'] + train.FINE_SAMPLES / fast_speed['fine']
    rows.append(("paper's schedule (2M + 1.5M samples)", '', f'{schedule / 60:.1f} min', '',
                 'estimated from the fast figures'))
    widths = [max(len(str(r[i])) for r in rows + [('what', 'plain', 'fast', 'fast/plain', '')])
              for i in range(5)]
    head = ('what', 'plain', 'fast', 'fast/plain', '')
    for r in [head, tuple('-' * w for w in widths)] + rows:
        print(' | '.join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == '__main__':
    util.run_cli(main)
