"""Training and inference speed on this machine: the plain pipeline against the fast one, in one run.

    python bench.py             # on the GPU when there is one (figures for BENCHMARKS.md)
    python bench.py --quick     # a few steps, small data, CPU: what the tests run

Prints one table: training samples/s of each stage measured on train.py's own loop (train.main, with
its logging, validation and non-finite checks) with --path plain (DataLoader workers augmenting one
sample at a time, fp32) and --path fast (frames on the device, one batched augmentation, bf16
autocast and channels_last on CUDA), their ratio, the data pipeline alone, inference latency
(batch 1) and throughput (batch 32), the FLOPs of a training sample (torch's flop counter) and the
share of the device's bf16 peak that the fast path reaches, the .mat cache speed-up, and the
paper's full schedule (2M + 1.5M samples) estimated from the fast figures. With several GPUs, a
row for --device cuda (nn.DataParallel over all of them).
"""
import argparse
import contextlib
import copy
import io
import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import nyu_raw
import synthetic
import train
import util
from net import INPUT_HW, VARIANTS, Chain, get_variant, new_net, run_net

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


def make_data(folder, scenes, views):
    """Synthetic rooms in NYU's layout (all training scenes), the frames in memory, and the time of
    the first read of the .mat and of the cached second one."""
    mat, splits = synthetic.make_synthetic_nyu(folder, scenes, views, test_fraction=0.0, progress=False)
    if os.path.exists(util.cache_path_for(mat)):
        os.remove(util.cache_path_for(mat))
    t0 = time.perf_counter()
    arrays = util.read_nyu_labeled(mat, progress=False)      # reads the .mat, writes the cache
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    util.read_nyu_labeled(mat, progress=False)               # reads the cache
    second = time.perf_counter() - t0
    return (mat, splits), arrays, first, second


def nets_for(variant, path, device):
    """The Chain of a coarse and a fine net of `variant`, new, on the device."""
    fmt = torch.channels_last if path == 'fast' and device.type == 'cuda' else torch.contiguous_format
    return Chain({stage: new_net(stage, variant) for stage in ('coarse', 'fine')}).to(
        device, memory_format=fmt)


def make_raw_cache(folder, arrays, count):
    """A converted raw-frame cache (nyu_raw.py's format) of `count` frames, the synthetic frames
    repeated, 12 frames a scene: what `train.py --data` reads as raw frames."""
    os.makedirs(folder)
    take = np.arange(count) % len(arrays['images'])
    np.save(os.path.join(folder, 'images.npy'), arrays['images'][take])
    depth_mm = np.round(arrays['raw_depths'][take].astype(np.float32) * 1000).astype(np.uint16)
    np.save(os.path.join(folder, 'depths_mm.npy'), depth_mm)
    with open(os.path.join(folder, nyu_raw.CACHE_META), 'w') as f:
        json.dump({'source': 'bench.py', 'scenes': [f'bench_{i // 12:04d}' for i in range(count)]}, f)
    return folder


def train_py_speed(data, variant, stage, path, device, batch, steps, workers, folder):
    """Samples/s of train.py's own training loop (train.main on one stage, `steps` steps): the same
    code as a real run, its logging, validation and checkpoint cadence included. Timed over the
    last three of four validation intervals (the first holds cuDNN autotuning and warm-up).
    data: (labeled .mat, splits.mat), or (raw-frame cache, splits.mat, labeled .mat)."""
    out = os.path.join(folder, f'{stage}-{path}-{device}-{os.path.basename(data[0])}'.replace(':', ''))
    os.makedirs(out)
    if stage == 'fine':   # the fine stage needs a coarse net; its weights do not change the speed
        torch.save(new_net('coarse', variant).state_dict(), os.path.join(out, 'coarse.pth'))
    interval = max(1, steps // 4) * batch
    raw = os.path.isdir(data[0])   # a converted raw-frame cache (with the labeled file's split)
    source = ['--labeled', data[2], '--per-scene', '12'] if raw else ['--data-format', 'labeled']
    argv = ['--data', data[0], '--splits', data[1], *source, '--out', out,
            '--device', str(device), '--stage', stage, f'--{stage}-samples', str(4 * interval),
            '--batch-size', str(batch), '--val-every', str(interval), '--path', path,
            '--workers', str(workers), '--variant', variant.name,
            '--no-pretrained']   # ImageNet weights (--variant alexnet) do not change the speed
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = train.main(argv)
    if rc != 0:
        raise cli.UserError(f'train.py {" ".join(argv)} returned {rc}')
    rows = torch.load(os.path.join(out, 'checkpoint.pth'), weights_only=True)['history']
    return (rows[-1]['samples'] - rows[0]['samples']) / (rows[-1]['elapsed_s'] - rows[0]['elapsed_s'])


def pipeline_speed(frames, path, device, batch, steps, warmup, workers):
    """Samples/s of the data pipeline alone: batches drawn, augmented and on the device."""
    args = SimpleNamespace(path=path, workers=workers, log_every=50)
    if path == 'fast':
        frames = copy.copy(frames).to(device)   # the shared CPU frames stay for the next rows
    order = util.SampleOrder(len(frames), 0)
    for i, _ in enumerate(data.training_batches(frames, order, 0, warmup + steps, batch, args, device)):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def training_flops_per_sample(variant, stage, device):
    """FLOPs of one training sample's forward and backward (the fine stage's fixed coarse
    forward included), counted by torch on a batch of 2."""
    nets = nets_for(variant, 'plain', device)
    x = torch.rand(2, 3, *INPUT_HW, device=device) * 255
    with FlopCounterMode(display=False) as counter:
        before = None
        if stage != 'coarse':
            with torch.no_grad():
                before = Chain(nets, last='coarse').eval()(x)
        run_net(nets[stage], x, before).sum().backward()
    return counter.get_total_flops() / 2


@torch.no_grad()
def inference(variant, device, path, batch, repeats, warmup):
    """Seconds per call of coarse + fine on a batch (median of `repeats`, after `warmup` calls)."""
    nets = nets_for(variant, path, device).eval()
    x = torch.rand(batch, 3, *INPUT_HW, device=device) * 255
    if path == 'fast' and device.type == 'cuda':
        x = x.contiguous(memory_format=torch.channels_last)
    amp = path == 'fast' and device.type == 'cuda'
    times = []
    for i in range(repeats + warmup):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            nets(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = sorted(times[warmup:])
    return timed[len(timed) // 2]


def main(argv=None):
    """The command line and the one table. Long because the table is: one measurement a row."""
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='CPU, tiny data, a few steps')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu or cuda[:N] (default: %(default)s; cuda means cuda:0 here)')
    p.add_argument('--batch-size', type=int, default=train.BATCH_SIZE, help='(default: %(default)s, the paper)')
    p.add_argument('--steps', type=int, default=None,
                   help='steps per measurement (default: 400, 4 with --quick)')
    p.add_argument('--raw-frames', type=int, default=3000,
                   help='frames of the generated raw-frame cache (default: %(default)s)')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help="the plain path's DataLoader workers (default: %(default)s)")
    p.add_argument('--variant', choices=sorted(VARIANTS), default='paper',
                   help="the nets measured, as train.py's --variant (default: %(default)s)")
    args = p.parse_args(argv)
    variant = get_variant(args.variant)
    device = torch.device('cpu' if args.quick else args.device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', 0)   # one GPU; several: the DataParallel row
    torch.backends.cudnn.benchmark = True
    batch = 4 if args.quick else args.batch_size
    steps = args.steps or (4 if args.quick else 400)
    warmup = 1 if args.quick else 10
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f'device: {name}; variant {variant.name}; batch {batch}; train.py: {steps} steps a row, '
          f'timed over the last 3/4; pipeline: {steps} steps after {warmup} warm-up; torch {torch.__version__}')
    rows = []

    def row(what, plain, fast, unit, fmt='{:.1f}'):
        ratio = f'{fast / plain:.2f}x' if plain and fast else ''
        rows.append((what, fmt.format(plain) if plain else '-', fmt.format(fast) if fast else '-', ratio, unit))

    fast_speed = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, arrays, first, second = make_data(tmp, *((2, 2) if args.quick else (16, 8)))
        frames = util.Frames(arrays['images'], arrays['raw_depths'])
        for stage in ('coarse', 'fine'):
            speeds = [train_py_speed(data, variant, stage, path, device, batch, steps, args.workers, tmp)
                      for path in ('plain', 'fast')]
            fast_speed[stage] = speeds[1]
            row(f'train {stage} net (train.py loop)', *speeds, 'samples/s')
        count = 36 if args.quick else args.raw_frames
        cache = make_raw_cache(os.path.join(tmp, 'raw_cache'), arrays, count)
        row(f'train coarse net, raw cache of {count} frames', *[train_py_speed((cache, data[1], data[0]), variant, 'coarse', path, device, batch, steps,
                                        args.workers, tmp) for path in ('plain', 'fast')],
            'samples/s (plain: streamed from disk; fast: held on the device)')
        gpus = torch.cuda.device_count() if device.type == 'cuda' else 0
        if gpus > 1:
            dp = train_py_speed(data, variant, 'coarse', 'fast', torch.device('cuda'), batch, steps,
                                args.workers, tmp)
            row(f'train coarse net, --device cuda (DataParallel, {gpus} GPUs)', fast_speed['coarse'],
                dp, 'samples/s (plain column: one GPU)')
    row('data pipeline alone', *[pipeline_speed(frames, path, device, batch, steps, warmup, args.workers)
                                 for path in ('plain', 'fast')], 'samples/s')
    # calls timed at batch 1 and 32, untimed warm-up calls; --quick: one call, no warm-up (the
    # figures only show that the rows work)
    repeats_1, repeats_32, warm = (1, 1, 0) if args.quick else (50, 20, 2)
    lat = [inference(variant, device, path, 1, repeats_1, warm) * 1000 for path in ('plain', 'fast')]
    rows.append(('inference batch 1 (coarse+fine)', f'{lat[0]:.2f}', f'{lat[1]:.2f}',
                 f'{lat[0] / lat[1]:.2f}x', 'ms latency'))
    thr = [32 / inference(variant, device, path, 32, repeats_32, warm) for path in ('plain', 'fast')]
    row('inference batch 32 (coarse+fine)', *thr, 'images/s')
    peak = peak_flops(device)
    for stage in ('coarse', 'fine'):
        flops = training_flops_per_sample(variant, stage, device)
        achieved = flops * fast_speed[stage]
        share = f', {100 * achieved / peak:.1f}% of the bf16 peak' if peak else ''
        rows.append((f'{stage} FLOPs per training sample', '', f'{flops / 1e9:.2f} GFLOP', '',
                     f'fast: {achieved / 1e12:.2f} TFLOP/s{share}'))
    rows.append(('read synthetic .mat: first / cached', f'{first:.2f} s', f'{second:.3f} s',
                 f'{first / second:.0f}x', 'cache speed-up'))
    schedule = sum(train.SAMPLES['nyu'][s] / fast_speed[s] for s in ('coarse', 'fine'))
    rows.append(("paper's schedule (2M + 1.5M samples)", '', f'{schedule / 60:.1f} min', '',
                 'estimated from the fast figures'))
    widths = [max(len(str(r[i])) for r in rows + [('what', 'plain', 'fast', 'fast/plain', '')])
              for i in range(5)]
    head = ('what', 'plain', 'fast', 'fast/plain', '')
    for r in [head, tuple('-' * w for w in widths)] + rows:
        print(' | '.join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
