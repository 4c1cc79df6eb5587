"""Train the coarse, then the fine network, as in Sec. 3.3 of Eigen, Puhrsch & Fergus (NIPS 2014).

Stage 1 trains GlobalCoarseNet for 2M samples; stage 2 trains LocalFineNet for 1.5M samples on the
outputs of the coarse net, which is held fixed (eval mode, no gradient). SGD, batch 32, momentum
0.9, the paper's per-layer learning rates (net.Variant). Outputs in --out (default model/):
coarse.pth and fine.pth (plain state_dicts), checkpoint.pth (everything --resume needs),
loss_coarse.png / loss_fine.png and predictions.png.

    python train.py                  # NYU labeled set in nyu/, the paper's schedule
    python train.py --demo           # synthetic rooms in NYU's format, a few minutes on a CPU
"""
import argparse
import glob
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from loss import TRAIN_LAMBDA, safe_log, scale_invariant_loss
from metrics import Metrics
from net import (GlobalCoarseNet, LocalFineNet, VARIANTS, get_variant, layer_names,
                 load_pretrained_conv, predict_log_depth)
import nyu_raw
import util

# Sec. 3.3: SGD, batch 32, momentum 0.9; 2M samples for the coarse net, 1.5M for the fine net.
BATCH_SIZE = 32
MOMENTUM = 0.9
COARSE_SAMPLES = 2_000_000
FINE_SAMPLES = 1_500_000
# The demo: synthetic rooms, a schedule a 2-core CPU runs in a few minutes.
LABELED = os.path.join('nyu', 'nyu_depth_v2_labeled.mat')
DEMO_FOLDER = os.path.join('nyu', 'synthetic')
DEMO_SCENES, DEMO_VIEWS = 30, 6
DEMO_COARSE_SAMPLES, DEMO_FINE_SAMPLES, DEMO_BATCH = 3200, 1600, 16
CHECKPOINT_FORMAT = 2
RAW_VAL_FRAMES = 300   # validation frames decoded into memory from held-out raw scenes


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data')
    d.add_argument('--data', default=LABELED,
                   help='training set: the NYU Depth v2 labeled .mat (MATLAB v7.3), or raw frames '
                        "(README): a BTS list .txt, DenseDepth's nyu_data.zip, a folder of "
                        'rgb_*/depth_* pairs or a folder converted by nyu_raw.py '
                        '(default: %(default)s)')
    d.add_argument('--data-format', choices=('auto', 'labeled') + nyu_raw.FORMATS, default='auto',
                   help='(default: %(default)s: by the name of --data)')
    d.add_argument('--data-root', help="BTS: the folder the list's paths are relative to "
                                       "(default: the list file's folder)")
    d.add_argument('--depth-scale', type=float,
                   help='a plain folder: metres per depth PNG unit (0.001 for millimetres)')
    d.add_argument('--labeled', default=LABELED,
                   help='with raw frames: the labeled .mat whose test scenes (with --splits) are '
                        'refused in training (default: %(default)s)')
    d.add_argument('--splits', default=os.path.join('nyu', 'splits.mat'),
                   help="NYU's official train/test split (default: %(default)s)")
    d.add_argument('--per-scene', type=int, default=None,
                   help=f'draw N frames of every scene per pass (Sec. 4.1: the distribution '
                        f'evened to {nyu_raw.PER_SCENE} per scene); 0 = every frame once per pass '
                        f'(default: {nyu_raw.PER_SCENE} for raw frames, 0 for the labeled set)')
    d.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader processes: decoding raw frames, and augmenting with '
                        '--path plain (default: %(default)s)')
    d.add_argument('--demo', action='store_true',
                   help=f'train on synthetic rooms written in NYU format to {DEMO_FOLDER}/ (made on '
                        f'first use) with a short schedule: {DEMO_COARSE_SAMPLES} + '
                        f'{DEMO_FINE_SAMPLES} samples, batch {DEMO_BATCH}, unless set below')
    d.add_argument('--train-depth', choices=['raw', 'filled'], default='raw',
                   help="training targets: 'raw' Kinect depth with holes masked, as the paper "
                        "(Sec. 4.1: missing values not filled), or the labeled set's inpainted "
                        "'filled' depths (default: %(default)s). Validation always uses filled.")
    d.add_argument('--val-fraction', type=float, default=0.1,
                   help='share of the training images (whole scenes) held out for validation; '
                        'the test split is never used here (default: %(default)s)')
    t = p.add_argument_group('schedule (Sec. 3.3)')
    t.add_argument('--variant', choices=sorted(VARIANTS), default='paper',
                   help="'paper': Fig. 1 and the text; 'release': the authors' released code "
                        "(README lists the differences) (default: %(default)s)")
    t.add_argument('--stage', choices=['both', 'coarse', 'fine'], default='both',
                   help="'fine' needs OUT/coarse.pth (default: %(default)s)")
    t.add_argument('--coarse-samples', type=int, help=f'default {COARSE_SAMPLES} (paper)')
    t.add_argument('--fine-samples', type=int, help=f'default {FINE_SAMPLES} (paper)')
    t.add_argument('--batch-size', type=int, help=f'default {BATCH_SIZE} (paper)')
    t.add_argument('--lam', type=float, default=TRAIN_LAMBDA,
                   help='lambda of the scale-invariant loss, Eq. 4 (default: %(default)s)')
    t.add_argument('--pretrained-conv', metavar='PATH',
                   help='state_dict with ImageNet weights for coarse1-5 (the paper pretrains '
                        'them; none can be downloaded here, so random init is the default)')
    t.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    o = p.add_argument_group('running')
    o.add_argument('--out', default='model', help='output folder (default: %(default)s)')
    o.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.pth')
    o.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu, cuda or cuda:N; all visible GPUs are used with DataParallel when '
                        'the device is cuda (default: %(default)s)')
    o.add_argument('--val-every', type=int, default=None,
                   help='validate every N samples (default: 50 times per stage)')
    o.add_argument('--path', choices=['fast', 'plain'], default='fast',
                   help="'fast': frames held on the device, the paper's augmentations drawn per "
                        "sample but applied as one batched grid; 'plain': the usual DataLoader with "
                        "per-sample augmentation in worker processes. Both compute the same "
                        "(tested) (default: %(default)s)")
    o.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for the nets (the loss stays fp32). A deviation for speed: '
                        'default on with --path fast on CUDA, off otherwise (the paper: fp32)')
    o.add_argument('--compile', action='store_true', help='torch.compile the trained net')
    o.add_argument('--save-every', type=int, default=500,
                   help='write the checkpoint every N steps (default: %(default)s)')
    o.add_argument('--max-steps', type=int, default=None,
                   help='stop this invocation after N steps with a checkpoint (for time-limited '
                        'cluster jobs; continue with --resume)')
    o.add_argument('--skip-nonfinite', action='store_true',
                   help='skip a batch whose loss is NaN or inf and count it, instead of stopping '
                        'the run with the step number (the default)')
    o.add_argument('--threads', type=int, default=None, help='CPU threads for torch')
    o.add_argument('--debug', action='store_true', help='show the traceback of an error')
    a = p.parse_args(argv)
    demo = a.demo
    if a.coarse_samples is None:
        a.coarse_samples = DEMO_COARSE_SAMPLES if demo else COARSE_SAMPLES
    if a.fine_samples is None:
        a.fine_samples = DEMO_FINE_SAMPLES if demo else FINE_SAMPLES
    if a.batch_size is None:
        a.batch_size = DEMO_BATCH if demo else BATCH_SIZE
    for name in ('coarse_samples', 'fine_samples', 'batch_size', 'save_every'):
        if getattr(a, name) <= 0:
            p.error(f'--{name.replace("_", "-")} must be positive')
    if a.data_format == 'auto':
        a.data_format = 'labeled' if demo else nyu_raw.detect_format(a.data)
    if a.per_scene is None:
        a.per_scene = 0 if a.data_format == 'labeled' else nyu_raw.PER_SCENE
    if a.per_scene < 0:
        p.error('--per-scene must be 0 or positive')
    if not 0 <= a.val_fraction < 1:
        p.error('--val-fraction must be in [0, 1)')
    return a


# ----------------------------------------------------------------------------------------------

def param_groups(net, variant):
    """One SGD group per paper layer with its learning rate and weight decay (Sec. 3.3). Fails
    loudly if a trainable parameter is in no group, the classic bug that leaves layers untrained."""
    groups, covered = [], set()
    for name in layer_names(net):
        params = [p for p in getattr(net, name).parameters() if p.requires_grad]
        groups.append({'params': params, 'lr': variant.lr[name],
                       'weight_decay': variant.weight_decay[name], 'layer': name})
        covered.update(id(p) for p in params)
    trainable = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in covered]
    if missing or len(covered) != len(trainable):
        raise RuntimeError(f'parameters without a learning rate: {missing}')
    return groups


def make_optimizer(net, variant):
    return torch.optim.SGD(param_groups(net, variant), lr=0.0, momentum=MOMENTUM)


@torch.no_grad()
def validate(coarse, fine, frames, device, batch, lam, scale):
    """Validation frames, centre crop, nets in eval mode: the mean training loss (Eq. 4) and the
    metrics of metrics.py on the 55x74 target grid (sc-inv = sqrt(Eq. 1), RMSE in metres, ...)."""
    nets = [n for n in (coarse, fine) if n is not None]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    loss_sum, count, found = 0.0, 0, Metrics()
    for start in range(0, len(frames), batch):
        idx = list(range(start, min(start + batch, len(frames))))
        img, depth, mask = (t.to(device) for t in frames.get(idx))
        x, y, m = util.center_crop(img, depth, mask)
        pred = predict_log_depth(coarse, fine, x)
        loss_sum += float(scale_invariant_loss(pred, safe_log(y, m), m, lam)) * len(idx) / scale
        found.add(pred=pred.exp(), gt=y, mask=m)
        count += len(idx)
    for n, mode in zip(nets, modes):
        n.train(mode)
    return {'loss': loss_sum / count, **found.result()}


def forward_loss(stage, net, coarse, x, y, m, lam, amp=False):
    """Eq. 4 on one augmented batch; the fine stage runs the fixed coarse net first (Sec. 3.3).
    With amp the nets run in bf16 autocast; the loss is always computed in fp32."""
    if x.device.type == 'cuda':
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if stage == 'coarse':
            pred = net(x)
        else:
            with torch.no_grad():
                c = coarse(x)
            pred = net(x, c)
    return scale_invariant_loss(pred.float(), safe_log(y, m), m, lam)


def all_finite(net):
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


# What a checkpoint's config must share with the command line that resumes it.
RESUME_MUST_MATCH = ('batch_size', 'samples', 'lam', 'seed', 'train_depth', 'per_scene')


def read_checkpoint(path, args, variant):
    """The checkpoint to resume, refused (one line, saying why) if it is truncated, not ours, or
    from another variant, stage or schedule than the command line asks for."""
    ckpt = util.load_torch_file(path, 'a checkpoint written by train.py')
    needed = {'format', 'variant', 'stage', 'step', 'done', 'coarse', 'optimizer', 'torch_rng',
              'history', 'config'}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise util.DataError(f'{path}: not a train.py checkpoint (no {sorted(needed)} entries)')
    if ckpt['format'] != CHECKPOINT_FORMAT:
        raise util.DataError(f"{path}: checkpoint format {ckpt['format']}, this train.py reads "
                             f"format {CHECKPOINT_FORMAT}")
    if ckpt['variant'] != variant.name:
        raise util.DataError(f"{path}: is a checkpoint of the '{ckpt['variant']}' variant, this "
                             f"run is '{variant.name}'; resume it with --variant {ckpt['variant']}")
    if ckpt['done']:
        return ckpt
    if args.stage == 'coarse' and ckpt['stage'] == 'fine':
        raise util.DataError(f"{path}: holds the fine stage (step {ckpt['step']}), but --stage "
                             f"coarse was asked for; resume with --stage fine or --stage both")
    if args.stage == 'fine' and ckpt['stage'] == 'coarse':
        raise util.DataError(f"{path}: holds an unfinished coarse stage (step {ckpt['step']}), "
                             f"but --stage fine was asked for; resume with --stage coarse or both")
    samples = args.coarse_samples if ckpt['stage'] == 'coarse' else args.fine_samples
    asked = {'batch_size': args.batch_size, 'samples': samples, 'lam': args.lam,
             'seed': args.seed, 'train_depth': args.train_depth, 'per_scene': args.per_scene}
    for key in RESUME_MUST_MATCH:
        if key in ckpt['config'] and ckpt['config'][key] != asked[key]:
            option = {'samples': f"--{ckpt['stage']}-samples"}.get(key, '--' + key.replace('_', '-'))
            raise util.DataError(f"{path}: was started with {option} {ckpt['config'][key]}, "
                                 f"this run asks for {asked[key]}; resume with the same setting")
    return ckpt


def remove_stale_temporaries(folder):
    """Half-written files of a run that was killed while saving (atomic_write's temporaries): the
    complete files beside them are what counts, so these are only clutter."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), '*.pth.tmp*')):
        os.remove(tmp)
        print(f'removed {tmp}, left by a run killed while saving')


class StopControl:
    """When this invocation should stop early: on SIGINT / SIGTERM (finish the step, write the
    checkpoint, exit cleanly) or after --max-steps steps. A context manager, so the previous signal
    handlers come back afterwards (main() is also called from tests)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, max_steps=None):
        self.max_steps, self.steps = max_steps, 0

    def step_done(self):
        self.steps += 1
        return self.signum is not None or (self.max_steps is not None and self.steps >= self.max_steps)

    def reason(self):
        return signal.Signals(self.signum).name if self.signum else f'--max-steps {self.max_steps}'

    def __enter__(self):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:   # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum
        print(f'\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint',
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------

def demo_paths():
    """The synthetic demo's .mat and splits.mat, rendered on first use."""
    data, splits = (os.path.join(DEMO_FOLDER, 'synthetic_labeled.mat'),
                    os.path.join(DEMO_FOLDER, 'synthetic_splits.mat'))
    if not (os.path.isfile(data) and os.path.isfile(splits)):
        print(f'making the synthetic demo data in {DEMO_FOLDER}/ (once)')
        util.make_synthetic_nyu(DEMO_FOLDER, DEMO_SCENES, DEMO_VIEWS, seed=0)
    return data, splits


def load_data(args):
    """(training set, validation Frames, scene of each training frame). The labeled set is held in
    memory; raw frames stay on disk and are decoded as drawn (DataLoader workers)."""
    if args.demo:
        args.data, args.splits = demo_paths()
    if args.data_format == 'labeled':
        return load_labeled(args)
    frames = nyu_raw.open_raw(args.data, args.data_format, args.data_root, args.depth_scale)
    nyu_raw.refuse_test_scenes(frames, nyu_raw.test_scenes(args.labeled, args.splits))
    train_idx, val_idx = util.split_train_val(np.arange(len(frames)), frames.scenes,
                                              args.val_fraction, args.seed)
    # validation: whole held-out scenes, at most RAW_VAL_FRAMES of them spread evenly, in memory
    val_idx = val_idx[np.linspace(0, len(val_idx) - 1, min(len(val_idx), RAW_VAL_FRAMES)).astype(int)] \
        if len(val_idx) else val_idx
    val = util.Frames.from_dataset(frames, val_idx, min(args.workers, 4))
    train = torch.utils.data.Subset(frames, train_idx.tolist())
    scenes = [frames.scenes[i] for i in train_idx]
    print(f'{frames.description}: {len(train)} training frames of {len(set(scenes))} scenes, '
          f'{len(val)} validation frames of held-out scenes; none of the test split\'s scenes')
    return train, val, scenes


def load_labeled(args):
    arrays = util.read_nyu_labeled(args.data)
    train_idx, test_idx = util.read_splits(args.splits, len(arrays['images']))
    train_idx, val_idx = util.split_train_val(train_idx, arrays['scenes'], args.val_fraction, args.seed)
    depth_key = 'raw_depths' if args.train_depth == 'raw' else 'depths'
    train = util.Frames(arrays['images'][train_idx], arrays[depth_key][train_idx])
    val = util.Frames(arrays['images'][val_idx], arrays['depths'][val_idx])
    print(f'{args.data}: {len(train)} training, {len(val)} validation frames '
          f'({len(test_idx)} test frames left for evaluate.py); depth: '
          f"{util.describe_invalid(arrays['invalid'])}")
    scenes = [arrays['scenes'][i] for i in train_idx] if arrays['scenes'] else None
    if args.per_scene and scenes is None:
        raise util.DataError(f'{args.data}: has no scene names, so --per-scene cannot balance')
    return train, val, scenes


def training_batches(train, order, first_step, total_steps, batch, args, device, shard=(0, 1)):
    """The augmented (input, target depth, target mask) of steps first_step.. on `device`.

    fast: frames drawn as uint8 (in-memory frames indexed where they live, on the GPU when they
    were moved there; raw frames decoded ahead by DataLoader workers), then every sample's own
    augmentation applied in one batched grid_sample on the device.
    plain: a DataLoader whose workers augment one sample at a time on the CPU (what most
    reproductions do); the same draws, so the same batches.
    shard (rank, world): this process's share of every global batch under torchrun."""
    if args.path == 'plain':
        keys = StepIndices(order, first_step, total_steps, batch, shard, with_keys=True)
        loader = torch.utils.data.DataLoader(
            util.PerSampleAugmented(train, order, batch), batch_sampler=keys,
            num_workers=args.workers, pin_memory=device.type == 'cuda',
            prefetch_factor=4 if args.workers else None, worker_init_fn=ignore_stop_signals,
            generator=torch.Generator())   # workers' seeds not drawn from the RNG of dropout
        for x, y, m in loader:
            yield tuple(t.to(device, non_blocking=True) for t in (x, y, m))
        return
    drawn = frame_batches(train, order, first_step, total_steps, batch, args.workers, device, shard)
    mine = slice(shard[0], None, shard[1])
    for step, (images_u8, depths) in enumerate(drawn, first_step):
        img, depth, mask = util.as_float_batch(images_u8.to(device, non_blocking=True),
                                               depths.to(device, non_blocking=True))
        yield util.augment(img, depth, mask, order.aug_params(step, batch).take(mine))


def frame_batches(train, order, first_step, total_steps, batch, workers, device, shard=(0, 1)):
    """(uint8 images, float16 depths) of steps first_step.. in order, not yet augmented."""
    steps = StepIndices(order, first_step, total_steps, batch, shard)
    if isinstance(train, util.Frames):
        for idx in steps:
            idx = torch.as_tensor(idx, device=train.images.device)
            yield train.images[idx], train.depths[idx]
        return
    loader = torch.utils.data.DataLoader(train, batch_sampler=steps, num_workers=workers,
                                         pin_memory=device.type == 'cuda',
                                         prefetch_factor=4 if workers else None,
                                         worker_init_fn=ignore_stop_signals,
                                         generator=torch.Generator())
    yield from loader


def ignore_stop_signals(_worker_id):
    """In decoding workers: Ctrl-C reaches the whole process group, but only the main process
    decides to stop (after the step, with a checkpoint); it ends the workers itself."""
    for s in StopControl.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StepIndices:
    """The DataLoader's batch sampler: the frame indices of each remaining step."""

    def __init__(self, order, first_step, total_steps, batch, shard=(0, 1), with_keys=False):
        self.order, self.first, self.total, self.batch = order, first_step, total_steps, batch
        self.rank, self.world = shard
        self.with_keys = with_keys   # (step, position in the batch, frame) for per-sample work

    def __len__(self):
        return self.total - self.first

    def __iter__(self):
        for step in range(self.first, self.total):
            idx = self.order.indices(step, self.batch)
            mine = [(step, j, i) for j, i in enumerate(idx) if j % self.world == self.rank]
            yield mine if self.with_keys else [i for _, _, i in mine]


class Distributed:
    """Several processes launched by torchrun (WORLD_SIZE > 1): one per GPU (NCCL), or CPU
    processes (gloo). Each computes its share of every global batch and DistributedDataParallel
    averages the gradients, so the step is that of one process on the whole batch; rank 0 alone
    validates and writes files. One process (plain `python train.py`): all of this is a no-op."""

    def __init__(self):
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.device = None

    @property
    def active(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def start(self, device):
        if not self.active:
            return device
        if device.type == 'cuda':
            device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        self.device = device
        return device

    def wrap(self, net):
        if not self.active:
            return net
        ids = [self.device.index] if self.device.type == 'cuda' else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def mean(self, value):
        """The average of a float over the processes (every one gets it)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def any(self, flag):
        return self.mean(float(flag)) > 0

    def stop(self):
        if self.active:
            torch.distributed.destroy_process_group()


DIST = Distributed()


def run_stage(stage, coarse, fine, train, val, scenes, args, device, ckpt, stop):
    """Train one stage from `ckpt` (a resumed checkpoint for this stage, or None)."""
    from tqdm import tqdm
    variant = coarse.variant
    net = coarse if stage == 'coarse' else fine
    if stage == 'fine':   # Sec. 3.3: the coarse net is held fixed while the fine net trains
        coarse.eval()
        for p in coarse.parameters():
            p.requires_grad_(False)
    net.train()
    optimizer = make_optimizer(net, variant)
    samples = args.coarse_samples if stage == 'coarse' else args.fine_samples
    total_steps = math.ceil(samples / args.batch_size)
    val_every = max(1, round((args.val_every or samples / 50) / args.batch_size))
    order = util.SampleOrder(len(train), args.seed + (0 if stage == 'coarse' else 1), scenes,
                             args.per_scene)
    history = {'train': [], 'val': []}
    step, skipped, saved_step = 0, 0, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        torch.set_rng_state(ckpt['torch_rng'])
        history, step = ckpt['history'], ckpt['step']
        skipped, saved_step = ckpt.get('skipped', 0), ckpt['step']
    if DIST.active:
        if args.batch_size % DIST.world:
            raise util.UserError(f'--batch-size {args.batch_size} does not split evenly over '
                                 f'{DIST.world} processes')
        parallel, coarse_run = DIST.wrap(net), coarse
    else:   # one process: all visible GPUs through DataParallel (what the user asked for)
        parallel = nn.DataParallel(net) if device.type == 'cuda' and torch.cuda.device_count() > 1 else net
        coarse_run = nn.DataParallel(coarse) if parallel is not net and stage == 'fine' else coarse
    if args.compile:
        parallel = torch.compile(parallel)
    scale = variant.log_depth_std ** 2   # [R] trains on log depth / std: its loss is ours / std^2

    ckpt_path = os.path.join(args.out, 'checkpoint.pth')

    def kept():
        if saved_step is None:
            return 'no checkpoint of this stage had been written yet'
        return f'the last checkpoint ({ckpt_path}, {stage} step {saved_step}) is intact'

    def save(path, write, what):
        """Write a file atomically; a full disk or other OSError stops the run with a message."""
        try:
            util.atomic_write(path, write)
        except OSError as e:
            raise util.UserError(f'{path}: could not write the {what} at {stage} step {step} '
                                 f'({e.strerror or e}); {kept()}. Free some space, then '
                                 f'continue with --resume') from None

    def checkpoint(done=False):
        nonlocal saved_step
        if not DIST.main:
            return
        if not all_finite(net):   # never replace a good checkpoint with a diverged net
            raise util.UserError(f'{stage} step {step}: the weights hold NaN or inf; not saved, '
                                 f'{kept()}. Resume from it with --resume (a lower learning '
                                 f'rate or --skip-nonfinite may help)')
        state = {'format': CHECKPOINT_FORMAT, 'variant': variant.name, 'stage': stage,
                 'step': step, 'done': done, 'skipped': skipped, 'coarse': coarse.state_dict(),
                 'fine': fine.state_dict() if stage == 'fine' else None,
                 'optimizer': optimizer.state_dict(),
                 'torch_rng': torch.get_rng_state(), 'history': history,
                 'config': {'batch_size': args.batch_size, 'samples': samples, 'lam': args.lam,
                            'seed': args.seed, 'train_depth': args.train_depth,
                            'per_scene': args.per_scene, 'data': os.path.abspath(args.data),
                            'processes': DIST.world}}
        save(ckpt_path, lambda tmp: torch.save(state, tmp), 'checkpoint')
        saved_step = step

    bar = tqdm(total=total_steps, initial=step, desc=f'{stage} net', unit='step', dynamic_ncols=True,
               disable=not DIST.main)
    run_loss, run_count, t0, steps_here = 0.0, 0, time.time(), 0
    shard = (DIST.rank, DIST.world)
    for x, y, m in training_batches(train, order, step, total_steps, args.batch_size, args, device, shard):
        loss = forward_loss(stage, parallel, coarse_run, x, y, m, args.lam, args.amp) / scale
        loss_value = DIST.mean(loss.item() * scale)   # every process decides alike on NaN
        if math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run_loss += loss_value
            run_count += 1
        elif args.skip_nonfinite and all_finite(net):
            skipped += 1
            bar.write(f'{stage} step {step + 1}: loss {loss_value}, batch skipped '
                      f'({skipped} so far)')
        else:
            raise util.UserError(f'{stage} step {step + 1}: the loss is {loss_value}; training '
                                 f'stopped before it touched the weights, {kept()}. Continue '
                                 f'with --resume, or pass --skip-nonfinite to skip such batches')
        step += 1
        steps_here += 1
        bar.update(1)
        mean_loss = run_loss / run_count if run_count else float('nan')
        bar.set_postfix(loss=f'{mean_loss:.4f}',
                        samples_s=f'{steps_here * args.batch_size / (time.time() - t0):.1f}')
        if step % val_every == 0 or step == total_steps:
            history['train'].append((step * args.batch_size, mean_loss))
            run_loss, run_count = 0.0, 0
            if len(val) and DIST.main:
                v = validate(coarse, fine if stage == 'fine' else None, val, device,
                             args.batch_size, args.lam, scale)
                history['val'].append((step * args.batch_size, v['loss'], v['si_log']))
                bar.write(f"{stage} {step * args.batch_size} samples: val loss {v['loss']:.4f}, "
                          f"sc-inv {v['si_log']:.3f}, RMSE {v['rmse']:.3f} m, d<1.25 {v['d1']:.3f}")
            if DIST.main:
                util.plot_losses(history, stage, os.path.join(args.out, f'loss_{stage}.png'))
        interrupted = DIST.any(stop.step_done())
        if step % args.save_every == 0 or step == total_steps or interrupted:
            checkpoint()
        if interrupted and step < total_steps:
            bar.close()
            print(f'stopped ({stop.reason()}) at {stage} step {step}/{total_steps}; checkpoint written to '
                  f"{os.path.join(args.out, 'checkpoint.pth')}; continue with --resume")
            return False
    bar.close()
    weights = os.path.join(args.out, f'{stage}.pth')
    if DIST.main:
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        save(weights, lambda tmp: torch.save(state, tmp), f'{stage} net')
    checkpoint(done=stage == 'fine' or args.stage == 'coarse')
    print(f'{stage} net written to {weights}' +
          (f' ({skipped} batches with a non-finite loss skipped)' if skipped else ''))
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = DIST.start(torch.device(args.device))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    variant = get_variant(args.variant)
    if args.amp is None:
        args.amp = args.path == 'fast' and device.type == 'cuda'
    torch.backends.cudnn.benchmark = True   # fixed input sizes: let cuDNN pick its fastest kernels
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'checkpoint.pth')
    ckpt = None
    if DIST.main:
        remove_stale_temporaries(args.out)
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise util.DataError(f'{ckpt_path}: no checkpoint to resume from')
        ckpt = read_checkpoint(ckpt_path, args, variant)
        if ckpt['done']:
            print(f'{ckpt_path}: that run has finished; nothing to resume')
            return 0
    elif os.path.isfile(ckpt_path):
        old = util.load_torch_file(ckpt_path, 'a checkpoint written by train.py')
        if not (isinstance(old, dict) and old.get('done')):
            raise util.DataError(f'{ckpt_path}: an unfinished run is there; continue it with '
                                 f'--resume, or choose another --out (nothing was overwritten)')
    train, val, scenes = load_data(args)

    if args.path == 'fast' and isinstance(train, util.Frames):
        train.to(device)   # uint8 frames on the GPU: 0.4 MB a frame, 0.3 GB for the labeled set
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    coarse = GlobalCoarseNet(variant).to(device, memory_format=memory_format)
    fine = LocalFineNet(variant).to(device, memory_format=memory_format)
    if args.pretrained_conv and not ckpt:
        loaded, _ = load_pretrained_conv(coarse, args.pretrained_conv)
        print(f'loaded {", ".join(loaded)} from {args.pretrained_conv}')
    stages = ['coarse', 'fine'] if args.stage == 'both' else [args.stage]
    if ckpt is not None:
        coarse.load_state_dict(ckpt['coarse'])
        if ckpt['stage'] == 'fine':
            fine.load_state_dict(ckpt['fine'])
            stages = ['fine']
    if stages == ['fine'] and ckpt is None:
        coarse_path = os.path.join(args.out, 'coarse.pth')
        if not os.path.isfile(coarse_path):
            raise util.DataError(f'{coarse_path}: the fine stage needs the trained coarse net')
        util.load_weights(coarse, coarse_path, 'the coarse net written by the coarse stage')
    with StopControl(args.max_steps) as stop:
        for stage in stages:
            resumed = ckpt if ckpt is not None and ckpt['stage'] == stage else None
            if not run_stage(stage, coarse, fine, train, val, scenes, args, device, resumed, stop):
                return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(stop.signum, 0)
            ckpt = None
    DIST.stop()
    if len(val) and DIST.main:
        util.plot_predictions(coarse, fine if 'fine' in stages else None, val, device,
                              os.path.join(args.out, 'predictions.png'))
    return 0


if __name__ == '__main__':
    util.run_cli(main)
