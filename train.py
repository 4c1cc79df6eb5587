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
import util

# Sec. 3.3: SGD, batch 32, momentum 0.9; 2M samples for the coarse net, 1.5M for the fine net.
BATCH_SIZE = 32
MOMENTUM = 0.9
COARSE_SAMPLES = 2_000_000
FINE_SAMPLES = 1_500_000
# The demo: synthetic rooms, a schedule a 2-core CPU runs in a few minutes.
DEMO_FOLDER = os.path.join('nyu', 'synthetic')
DEMO_SCENES, DEMO_VIEWS = 30, 6
DEMO_COARSE_SAMPLES, DEMO_FINE_SAMPLES, DEMO_BATCH = 3200, 1600, 16
CHECKPOINT_FORMAT = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group('data')
    d.add_argument('--data', default=os.path.join('nyu', 'nyu_depth_v2_labeled.mat'),
                   help='NYU Depth v2 labeled .mat (MATLAB v7.3) (default: %(default)s)')
    d.add_argument('--splits', default=os.path.join('nyu', 'splits.mat'),
                   help="NYU's official train/test split (default: %(default)s)")
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
    o.add_argument('--save-every', type=int, default=500,
                   help='write the checkpoint every N steps (default: %(default)s)')
    o.add_argument('--max-steps', type=int, default=None,
                   help='stop this invocation after N steps with a checkpoint (for time-limited '
                        'cluster jobs; continue with --resume)')
    o.add_argument('--threads', type=int, default=None, help='CPU threads for torch')
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


class BatchStream:
    """Shuffled epochs of training indices and the per-sample augmentation draws, all from one
    seeded generator whose state is checkpointed, so a resumed run sees the same batches."""

    def __init__(self, num, seed):
        self.num = num
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num, generator=self.gen)
        self.pos = 0

    def next(self, batch):
        out = []
        while len(out) < batch:
            if self.pos == self.num:
                self.perm, self.pos = torch.randperm(self.num, generator=self.gen), 0
            take = min(batch - len(out), self.num - self.pos)
            out.extend(self.perm[self.pos:self.pos + take].tolist())
            self.pos += take
        return out, util.AugParams.sample(batch, self.gen)

    def state(self):
        return {'gen': self.gen.get_state(), 'perm': self.perm, 'pos': self.pos}

    def load(self, state):
        self.gen.set_state(state['gen'])
        self.perm, self.pos = state['perm'], state['pos']


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


def save_weights(net, path):
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    util.atomic_write(path, lambda tmp: torch.save(state, tmp))


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
    if args.demo:
        args.data, args.splits = demo_paths()
    arrays = util.read_nyu_labeled(args.data)
    train_idx, test_idx = util.read_splits(args.splits, len(arrays['images']))
    train_idx, val_idx = util.split_train_val(train_idx, arrays['scenes'], args.val_fraction, args.seed)
    depth_key = 'raw_depths' if args.train_depth == 'raw' else 'depths'
    train = util.Frames(arrays['images'][train_idx], arrays[depth_key][train_idx])
    val = util.Frames(arrays['images'][val_idx], arrays['depths'][val_idx])
    print(f'{args.data}: {len(train)} training, {len(val)} validation frames '
          f'({len(test_idx)} test frames left for evaluate.py)')
    return train, val


def run_stage(stage, coarse, fine, train, val, args, device, ckpt, stop):
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
    stream = BatchStream(len(train), args.seed + (0 if stage == 'coarse' else 1))
    history = {'train': [], 'val': []}
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        stream.load(ckpt['stream'])
        torch.set_rng_state(ckpt['torch_rng'])
        history, step = ckpt['history'], ckpt['step']
    parallel = nn.DataParallel(net) if device.type == 'cuda' and torch.cuda.device_count() > 1 else net
    coarse_run = nn.DataParallel(coarse) if parallel is not net and stage == 'fine' else coarse
    scale = variant.log_depth_std ** 2   # [R] trains on log depth / std: its loss is ours / std^2

    def checkpoint(done=False):
        state = {'format': CHECKPOINT_FORMAT, 'variant': variant.name, 'stage': stage,
                 'step': step, 'done': done, 'coarse': coarse.state_dict(),
                 'fine': fine.state_dict() if stage == 'fine' else None,
                 'optimizer': optimizer.state_dict(), 'stream': stream.state(),
                 'torch_rng': torch.get_rng_state(), 'history': history,
                 'config': {'batch_size': args.batch_size, 'samples': samples, 'lam': args.lam,
                            'seed': args.seed, 'train_depth': args.train_depth}}
        util.atomic_write(os.path.join(args.out, 'checkpoint.pth'), lambda tmp: torch.save(state, tmp))

    bar = tqdm(total=total_steps, initial=step, desc=f'{stage} net', unit='step', dynamic_ncols=True)
    run_loss, run_count, t0, steps_here = 0.0, 0, time.time(), 0
    while step < total_steps:
        idx, params = stream.next(args.batch_size)
        img, depth, mask = (t.to(device) for t in train.get(idx))
        x, y, m = util.augment(img, depth, mask, params)
        if stage == 'coarse':
            pred = parallel(x)
        else:
            with torch.no_grad():
                c = coarse_run(x)
            pred = parallel(x, c)
        loss = scale_invariant_loss(pred, safe_log(y, m), m, args.lam) / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        steps_here += 1
        run_loss += loss.item() * scale
        run_count += 1
        bar.update(1)
        bar.set_postfix(loss=f'{run_loss / run_count:.4f}',
                        samples_s=f'{steps_here * args.batch_size / (time.time() - t0):.1f}')
        if step % val_every == 0 or step == total_steps:
            history['train'].append((step * args.batch_size, run_loss / run_count))
            run_loss, run_count = 0.0, 0
            if len(val):
                v = validate(coarse, fine if stage == 'fine' else None, val, device,
                             args.batch_size, args.lam, scale)
                history['val'].append((step * args.batch_size, v['loss'], v['si_log']))
                bar.write(f"{stage} {step * args.batch_size} samples: val loss {v['loss']:.4f}, "
                          f"sc-inv {v['si_log']:.3f}, RMSE {v['rmse']:.3f} m, d<1.25 {v['d1']:.3f}")
            util.plot_losses(history, stage, os.path.join(args.out, f'loss_{stage}.png'))
        interrupted = stop.step_done()
        if step % args.save_every == 0 or step == total_steps or interrupted:
            checkpoint()
        if interrupted and step < total_steps:
            bar.close()
            print(f'stopped ({stop.reason()}) at {stage} step {step}/{total_steps}; checkpoint written to '
                  f"{os.path.join(args.out, 'checkpoint.pth')}; continue with --resume")
            return False
    bar.close()
    save_weights(net, os.path.join(args.out, f'{stage}.pth'))
    checkpoint(done=stage == 'fine' or args.stage == 'coarse')
    print(f"{stage} net written to {os.path.join(args.out, f'{stage}.pth')}")
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    variant = get_variant(args.variant)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'checkpoint.pth')
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise util.DataError(f'{ckpt_path}: no checkpoint to resume from')
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if ckpt.get('variant') != variant.name:
            raise util.DataError(f"{ckpt_path}: is a '{ckpt.get('variant')}' checkpoint; "
                                 f"resume it with --variant {ckpt.get('variant')}")
        if ckpt.get('done'):
            print(f'{ckpt_path}: that run has finished; nothing to resume')
            return 0
    elif os.path.isfile(ckpt_path):
        old = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if not old.get('done'):
            raise util.DataError(f'{ckpt_path}: an unfinished run is there; continue it with '
                                 f'--resume, or choose another --out (nothing was overwritten)')
    train, val = load_data(args)

    coarse = GlobalCoarseNet(variant).to(device)
    fine = LocalFineNet(variant).to(device)
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
        coarse.load_state_dict(torch.load(coarse_path, map_location=device, weights_only=True))
    with StopControl(args.max_steps) as stop:
        for stage in stages:
            resumed = ckpt if ckpt is not None and ckpt['stage'] == stage else None
            if not run_stage(stage, coarse, fine, train, val, args, device, resumed, stop):
                return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(stop.signum, 0)
            ckpt = None
    if len(val):
        util.plot_predictions(coarse, fine if 'fine' in stages else None, val, device,
                              os.path.join(args.out, 'predictions.png'))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except util.DataError as e:
        sys.exit(f'error: {e}')
