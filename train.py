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
import contextlib
import datetime
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
                 load_imagenet_convs, load_pretrained_conv, load_weights, predict_log_depth)
import cli
import files
import nyu_raw
import synthetic
import util

# Sec. 3.3: SGD, batch 32, momentum 0.9; 2M samples for the coarse net, 1.5M for the fine net.
BATCH_SIZE = 32
MOMENTUM = 0.9
COARSE_SAMPLES = 2_000_000
FINE_SAMPLES = 1_500_000
# The demo: synthetic rooms, a schedule a 2-core CPU runs in a few minutes.
LABELED = os.path.join('nyu', 'nyu_depth_v2_labeled.mat')
SPLITS = os.path.join('nyu', 'splits.mat')
DEMO_FOLDER = os.path.join('nyu', 'synthetic')
DEMO_SCENES, DEMO_VIEWS = 30, 6
DEMO_COARSE_SAMPLES, DEMO_FINE_SAMPLES, DEMO_BATCH = 3200, 1600, 16
# 3: every process's CPU and GPU random streams ('rng'); 4: the paper and alexnet variants'
# feature and target scaling of issue #11 (a format-3 run of theirs would go on with other nets);
# 5: the history's val_loss in Eq. 4's units, as train_loss (format 4's was divided by 0.457^2:
# converted on resume, issue #18)
CHECKPOINT_FORMAT = 5
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
    d.add_argument('--splits', default=SPLITS,
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
                   help="'paper': Fig. 1 and the text; 'release': the authors' released code; "
                        "'alexnet': coarse1-5 as torchvision's AlexNet, initialised with its "
                        "ImageNet weights (README lists the differences) (default: %(default)s)")
    t.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help="--variant alexnet: coarse1-5 from torchvision's IMAGENET1K_V1 weights "
                        '(downloaded once into the torch hub cache, TORCH_HOME), as the paper '
                        'pretrains them (Sec. 3.1.1); --no-pretrained: a random start')
    t.add_argument('--stage', choices=['both', 'coarse', 'fine'], default='both',
                   help="'fine' needs OUT/coarse.pth (default: %(default)s)")
    t.add_argument('--coarse-samples', type=int, help=f'default {COARSE_SAMPLES} (paper)')
    t.add_argument('--fine-samples', type=int, help=f'default {FINE_SAMPLES} (paper)')
    t.add_argument('--batch-size', type=int, help=f'default {BATCH_SIZE} (paper)')
    t.add_argument('--lam', type=float, default=TRAIN_LAMBDA,
                   help='lambda of the scale-invariant loss, Eq. 4 (default: %(default)s)')
    t.add_argument('--pretrained-conv', metavar='PATH',
                   help='paper / release variants: a state_dict with weights for their coarse1-5 '
                        '(96-256-384-384-256 channels, which no public checkpoint has; else they '
                        'start random)')
    t.add_argument('--fine-init', choices=['pass', 'random'], default='pass',
                   help="the fine net's start, which the paper does not state: 'pass' returns the "
                        "coarse map it is given (the fine net then learns to edit it, Sec. 3.1.2; "
                        "README: why); 'random' as every other layer (default: %(default)s)")
    t.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    o = p.add_argument_group('running')
    o.add_argument('--out', default='model', help='output folder (default: %(default)s)')
    o.add_argument('--resume', nargs='?', const='yes', choices=['yes', 'auto'],
                   help='continue from OUT/checkpoint.pth; `--resume auto`: continue it if it is '
                        'there, else start afresh (one command line a scheduler can rerun)')
    o.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help="'cuda': every visible GPU (nn.DataParallel when there are several; "
                        "torchrun is the faster way, README); 'cuda:N': GPU N alone; 'cpu' "
                        '(default: %(default)s)')
    o.add_argument('--val-every', type=int, default=None,
                   help='validate every N samples (default: 50 times per stage)')
    o.add_argument('--path', choices=['fast', 'plain'], default='fast',
                   help="'fast': frames held on the device, the paper's augmentations drawn per "
                        "sample but applied as one batched grid; 'plain': the usual DataLoader with "
                        "per-sample augmentation in worker processes. Both compute the same "
                        "(tested) (default: %(default)s)")
    o.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for the nets (the loss stays fp32). A deviation for speed: '
                        'default on with --path fast on CUDA, off otherwise. --no-amp: the '
                        "paper's fp32, without TF32")
    o.add_argument('--compile', action='store_true', help='torch.compile the trained net')
    o.add_argument('--save-minutes', type=float, default=10.0,
                   help='write the checkpoint every N minutes of training, and always at the end '
                        'of a stage and on a stop (default: %(default)s)')
    o.add_argument('--save-every', type=int, default=0,
                   help='also write it every N steps (default: %(default)s = only by time)')
    o.add_argument('--log-every', type=int, default=None,
                   help='read the loss on the host every N steps (progress, NaN check); in between '
                        'a GPU step never waits for the CPU (default: 50 on CUDA, 1 on the CPU)')
    o.add_argument('--deterministic', action='store_true',
                   help='the same bits on every GPU run (cuDNN autotuning off, deterministic '
                        'kernels; slower). The CPU is deterministic anyway')
    o.add_argument('--max-steps', type=int, default=None,
                   help='stop this invocation after N steps with a checkpoint (for time-limited '
                        'cluster jobs; continue with --resume)')
    o.add_argument('--skip-nonfinite', action='store_true',
                   help='skip a batch whose loss is NaN or inf and count it, instead of stopping '
                        'the run with the step number (the default)')
    o.add_argument('--print-every', type=float, default=60.0, metavar='SECONDS',
                   help='where the output is a file or a pipe, not a terminal: a plain progress '
                        'line every N seconds instead of the bar (default: %(default)s)')
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
    for name in ('coarse_samples', 'fine_samples', 'batch_size', 'save_minutes') + \
            (('log_every',) if a.log_every is not None else ()):
        if getattr(a, name) <= 0:
            p.error(f'--{name.replace("_", "-")} must be positive')
    if a.save_every < 0 or a.print_every < 0:
        p.error('--save-every and --print-every must be 0 or positive')
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
    """SGD with momentum 0.9 and the paper's per-layer groups. Fused (one kernel for the whole
    update) where the device has it: the same update as the default implementation (equal to
    rounding on the CPU, tested), fewer passes over the weights, and it can skip a step on the GPU's
    own verdict (NonFiniteGuard). Momentum buffers start at zero, which is exactly SGD's first
    step (buffer = gradient) and keeps a skipped first step from leaving them uninitialised."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(param_groups(net, variant), lr=0.0, momentum=MOMENTUM,
                                fused=True if fused_sgd_works(device) else None)
    for group in optimizer.param_groups:
        for p in group['params']:
            optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


_FUSED_SGD = {}


def fused_sgd_works(device):
    """Whether this torch has a fused SGD kernel for the device (CUDA and, in recent releases,
    the CPU): tried once on a one-element parameter."""
    if device.type not in _FUSED_SGD:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros(1, device=device)
        try:
            torch.optim.SGD([p], lr=0.1, momentum=MOMENTUM, fused=True).step()
            _FUSED_SGD[device.type] = True
        except (RuntimeError, TypeError, ValueError):
            _FUSED_SGD[device.type] = False
    return _FUSED_SGD[device.type]


class NonFiniteGuard:
    """A NaN or inf loss must never reach the weights, and the GPU must not wait for the host to
    find out. The step's (global) loss is checked on the device and handed to fused SGD as its
    `found_inf` flag, which makes the kernel leave weights and momentum untouched: no host read.
    Stopping mode (the default): the flag stays set for the rest of the block, so the weights are
    exactly those before the bad step when the next logging point reads the losses and stops the
    run naming that step. --skip-nonfinite: only the bad step is skipped (and counted there).
    Without fused SGD (an old torch or an exotic device), the loss is read on the host per step."""

    def __init__(self, optimizer, device, skip):
        self.skip = skip
        self.on_device = optimizer.defaults.get('fused') is True
        self.found = torch.zeros((), device=device)
        self.halted = False   # host fallback, stopping mode: a bad step was seen
        if self.on_device:
            optimizer.found_inf = self.found   # read by SGD.step, as GradScaler does

    def allows_step(self, loss_value):
        """Called before optimizer.step() with the step's loss (a device scalar); False: do not
        call it (host fallback only)."""
        if not self.on_device:
            ok = math.isfinite(float(loss_value)) and (self.skip or not self.halted)
            self.halted = self.halted or not ok
            return ok
        bad = (~torch.isfinite(loss_value)).to(self.found.dtype)
        if self.skip:
            self.found.copy_(bad)
        else:
            torch.maximum(self.found, bad, out=self.found)
        return True


class Autocast(nn.Module):
    """Runs `module` in autocast with an explicit dtype, inside the module's own forward.

    nn.DataParallel runs each replica in a thread of its own and re-enters autocast there as
    torch.autocast(device_type, enabled=...), without the dtype (torch/nn/parallel/
    parallel_apply.py); the autocast dtype is thread-local, so the replicas would compute in
    CUDA's default float16, without a GradScaler, where gradients of about 3e-7 (coarse6) are
    subnormal. Entering autocast here, in the replicated forward, gives every replica bf16."""

    def __init__(self, module, device_type, dtype=torch.bfloat16, enabled=True):
        super().__init__()
        self.module, self.device_type, self.dtype, self.enabled = module, device_type, dtype, enabled

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.module(*args)


@torch.no_grad()
def validate(coarse, fine, frames, device, batch, lam):
    """Validation frames, centre crop, nets in eval mode: the mean training loss (Eq. 4, in
    (log metres)^2 as the logged training loss) and the metrics of metrics.py on the 55x74 target
    grid (sc-inv = sqrt(Eq. 1), RMSE in metres, ...)."""
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
        loss_sum += float(scale_invariant_loss(pred, safe_log(y, m), m, lam)) * len(idx)
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


def train_step(net, coarse, optimizer, batch, lam, variant, amp=False, guard=None):
    """One SGD step of Sec. 3.3 on one augmented batch (x, y, m), on the device; no value is read
    on the host. `net` is the trained net as the step runs it (Autocast, DataParallel, DDP),
    `coarse` None in the coarse stage, the fixed coarse net in the fine stage. Returns Eq. 4 of
    the (global) batch as a device scalar. guard: a NonFiniteGuard, None for a plain step. The
    one training step of the project: lr_study.py and the tests call it too."""
    x, y, m = batch
    loss = forward_loss('coarse' if coarse is None else 'fine', net, coarse, x, y, m, lam, amp)
    optimizer.zero_grad(set_to_none=True)
    # [R] trains on targets log depth / 0.457, so its loss, and with it every gradient, is ours /
    # 0.457^2; the paper's learning rates were tuned for that (README, "The learning rates"). Only
    # the gradient carries the factor: every loss a user sees is Eq. 4 in (log metres)^2.
    (loss / variant.log_depth_std ** 2).backward()
    value = DIST.mean_(loss.detach().clone())   # the global batch's loss, alike everywhere
    if guard is None or guard.allows_step(value):
        optimizer.step()
    return value


def all_finite(net):
    return bool(torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all())


# What a checkpoint's config must share with the command line that resumes it.
RESUME_MUST_MATCH = ('batch_size', 'samples', 'lam', 'seed', 'train_depth', 'per_scene')


def read_checkpoint(path, args, variant):
    """The checkpoint to resume, refused (one line, saying why) if it is truncated, not ours, or
    from another variant, stage or schedule than the command line asks for."""
    ckpt = files.load_torch_file(path, 'a checkpoint written by train.py')
    needed = {'format', 'variant', 'stage', 'step', 'done', 'skipped', 'coarse', 'optimizer',
              'rng', 'history', 'running_loss', 'config'}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise cli.DataError(f'{path}: not a train.py checkpoint (no {sorted(needed)} entries)')
    if ckpt['format'] == 4:   # its val_loss was Eq. 4 / log_depth_std^2: into Eq. 4's units
        for row in ckpt['history']:
            if row.get('val_loss') is not None:
                row['val_loss'] *= variant.log_depth_std ** 2
        ckpt['format'] = CHECKPOINT_FORMAT
        print(f'{path}: format 4, its validation losses converted to Eq. 4 in (log m)^2')
    if ckpt['format'] != CHECKPOINT_FORMAT:
        raise cli.DataError(f"{path}: checkpoint format {ckpt['format']}, this train.py reads "
                             f"format {CHECKPOINT_FORMAT} (an older train.py wrote it: start "
                             f"afresh, or finish it with that version)")
    if ckpt['variant'] != variant.name:
        raise cli.DataError(f"{path}: is a checkpoint of the '{ckpt['variant']}' variant, this "
                             f"run is '{variant.name}'; resume it with --variant {ckpt['variant']}")
    if ckpt['done']:
        return ckpt
    if args.stage == 'coarse' and ckpt['stage'] == 'fine':
        raise cli.DataError(f"{path}: holds the fine stage (step {ckpt['step']}), but --stage "
                             f"coarse was asked for; resume with --stage fine or --stage both")
    if args.stage == 'fine' and ckpt['stage'] == 'coarse':
        raise cli.DataError(f"{path}: holds an unfinished coarse stage (step {ckpt['step']}), "
                             f"but --stage fine was asked for; resume with --stage coarse or both")
    samples = args.coarse_samples if ckpt['stage'] == 'coarse' else args.fine_samples
    asked = {'batch_size': args.batch_size, 'samples': samples, 'lam': args.lam,
             'seed': args.seed, 'train_depth': args.train_depth, 'per_scene': args.per_scene}
    for key in RESUME_MUST_MATCH:
        if key in ckpt['config'] and ckpt['config'][key] != asked[key]:
            option = {'samples': f"--{ckpt['stage']}-samples"}.get(key, '--' + key.replace('_', '-'))
            raise cli.DataError(f"{path}: was started with {option} {ckpt['config'][key]}, "
                                 f"this run asks for {asked[key]}; resume with the same setting")
    return ckpt


def remove_stale_temporaries(folder):
    """Half-written files of a run that was killed while saving (atomic_write's temporaries): the
    complete files beside them are what counts, so these are only clutter."""
    for tmp in glob.glob(os.path.join(glob.escape(folder), '*.pth.tmp*')):
        os.remove(tmp)
        print(f'removed {tmp}, left by a run killed while saving')


class StopControl:
    """When this invocation should stop early: on SIGINT / SIGTERM / SIGUSR1 (finish the step,
    write the checkpoint, exit with 128 + the signal's number) or after --max-steps steps. A context manager, so the previous
    signal handlers come back afterwards (main() is also called from tests)."""

    # SIGUSR1: what SLURM sends ahead of a job's time limit with --signal (README)
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, max_steps=None):
        self.max_steps, self.steps = max_steps, 0

    def step_done(self):
        """Count a step; True once --max-steps steps are done (the same count in every process)."""
        self.steps += 1
        return self.max_steps is not None and self.steps >= self.max_steps

    @property
    def signalled(self):
        return self.signum is not None

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
        synthetic.make_synthetic_nyu(DEMO_FOLDER, DEMO_SCENES, DEMO_VIEWS, seed=0)
    return data, splits


def load_data(args, device):
    """(training set, validation Frames, scene of each training frame). The labeled set is held in
    memory; a converted raw-frame cache is loaded onto `device` for --path fast (when it fits);
    other raw frames stay on disk and are decoded as drawn (DataLoader workers)."""
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
    if args.path == 'fast' and isinstance(frames, nyu_raw.CachedFrames):
        train = frames.to_frames(train_idx, device)   # held on the GPU: no decoding, no workers
    else:
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
        raise cli.DataError(f'{args.data}: has no scene names, so --per-scene cannot balance')
    return train, val, scenes


def training_batches(train, order, first_step, total_steps, batch, args, device, shard=(0, 1)):
    """The augmented (input, target depth, target mask) of steps first_step.. on `device`.

    fast: frames drawn as uint8 (in-memory frames indexed where they live, on the GPU when they
    were moved there; raw frames decoded ahead by DataLoader workers), then every sample's own
    augmentation applied in one batched grid_sample on the device. Frame indices and draws come
    in blocks of args.log_every steps, one upload per block (draw_block), so the steps between
    logging points never wait for the host.
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
    block = getattr(args, 'log_every', None) or 1
    draws = step_draws(order, first_step, total_steps, batch, block, device, shard)
    if isinstance(train, util.Frames):
        frames = ((train.images[idx], train.depths[idx], params) for idx, params in draws)
    else:
        loader = torch.utils.data.DataLoader(
            train, batch_sampler=StepIndices(order, first_step, total_steps, batch, shard),
            num_workers=args.workers, pin_memory=device.type == 'cuda',
            prefetch_factor=4 if args.workers else None, worker_init_fn=ignore_stop_signals,
            generator=torch.Generator())
        frames = ((images_u8.to(device, non_blocking=True), depths.to(device, non_blocking=True),
                   params) for (images_u8, depths), (_, params) in zip(loader, draws))
    for images_u8, depths, params in frames:
        img, depth, mask = util.as_float_batch(images_u8, depths)
        yield util.augment(img, depth, mask, params)


def frame_batches(train, order, first_step, total_steps, batch, workers, device, shard=(0, 1),
                  block=1):
    """(uint8 images, float16 depths) of steps first_step.. of in-memory Frames, not augmented."""
    for idx, _ in step_draws(order, first_step, total_steps, batch, block, device, shard):
        yield train.images[idx], train.depths[idx]


def draw_block(order, steps, batch, shard=(0, 1)):
    """The frame indices and augmentation draws of `steps` (a range), this process's share of each
    global batch, as one (steps, share, 1 + AugParams.PACKED) float32 tensor: column 0 the frame,
    then AugParams.pack(). Exactly order.indices() and order.aug_params() of each step (frame
    numbers are exact in float32 up to 16.7M)."""
    rank, world = shard
    rows = []
    for step in steps:
        frames = torch.tensor(order.indices(step, batch)[rank::world], dtype=torch.float32)
        params = order.aug_params(step, batch).take(slice(rank, None, world)).pack()
        rows.append(torch.cat([frames[:, None], params], dim=1))
    return torch.stack(rows)


def step_draws(order, first_step, total_steps, batch, block, device, shard=(0, 1)):
    """(frame indices, AugParams) of each step on `device`, drawn a block of steps at a time (the
    blocks end at multiples of `block`, where the training loop reads its losses) and uploaded in
    one asynchronous copy from pinned memory."""
    start = first_step
    while start < total_steps:
        end = min(total_steps, (start // block + 1) * block)
        packed = draw_block(order, range(start, end), batch, shard)
        if device.type == 'cuda':
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
        for rows in packed:
            yield rows[:, 0].long(), util.AugParams.unpack(rows[:, 1:])
        start = end


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

    def start(self, device, gpus):
        """(device, GPUs) of this process: under torchrun, the GPU of its local rank alone."""
        if not self.active:
            return device, gpus
        if device.type == 'cuda':
            device, gpus = torch.device('cuda', self.local_rank), [self.local_rank]
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        self.device = device
        return device, gpus

    def wrap(self, net):
        if not self.active:
            return net
        ids = [self.device.index] if self.device.type == 'cuda' else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def mean_(self, value):
        """A device tensor averaged over the processes, in place. With NCCL the host does not wait
        for it (the reduction is queued on the GPU's stream)."""
        if self.active:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def agree(self, *flags):
        """Each flag True if it is True in any process (one small collective; a host read)."""
        if not self.active:
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(v > 0 for v in t.tolist())

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] in every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def stop(self):
        if self.active:
            torch.distributed.destroy_process_group()


DIST = Distributed()


def resolve_device(name):
    """--device as (the device the nets live on, the GPUs a step runs on). 'cuda': every visible
    GPU, through nn.DataParallel when there are several (the user's request); 'cuda:N': GPU N
    alone; 'cpu'. Refused with one line if it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise cli.UserError(f'--device {name}: not a device; use cpu, cuda or cuda:N') from None
    if device.type != 'cuda':
        return device, []
    if not torch.cuda.is_available():
        raise cli.UserError(f'--device {name}: CUDA is not available here (torch.cuda.is_available() '
                             f'is False); use --device cpu')
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device('cuda', 0), list(range(count))
    if device.index >= count:
        raise cli.UserError(f'--device {name}: {count} GPU(s) visible here (cuda:0..cuda:{count - 1})')
    return device, [device.index]


def seed_streams(seed, rank, gpus, salt=0):
    """Seed the random streams of dropout: one of its own for every torchrun process and every
    GPU. torch.manual_seed alone gives every process, and every GPU of one process, the same
    stream, so the DataParallel replicas and the torchrun processes would all drop the same
    units for their shares of the batch."""
    def derive(*key):
        return int(np.random.SeedSequence([seed, rank, salt, *key]).generate_state(1)[0])
    torch.manual_seed(derive(0))
    for i in gpus:
        with torch.cuda.device(i):
            torch.cuda.manual_seed(derive(i + 1))


def rng_state(gpus):
    return {'cpu': torch.get_rng_state(), 'cuda': [torch.cuda.get_rng_state(i) for i in gpus]}


def set_rng_state(state, gpus):
    torch.set_rng_state(state['cpu'])
    for i, s in zip(gpus, state['cuda']):
        torch.cuda.set_rng_state(s, i)


def load_optimizer_state(optimizer, state):
    """Momentum buffers and rates from a checkpoint; the implementation (fused or not) stays the
    one this machine chose (a checkpoint may come from another machine or torch)."""
    chosen = {k: optimizer.defaults.get(k) for k in ('fused', 'foreach')}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(chosen)


# Loss plots cost about 0.5 s each: at most one a minute, and one at the end of every stage.
PLOT_EVERY_S = 60


class StageRun:
    """One stage (coarse or fine) from a checkpoint of it (`ckpt`) or from the start.

    A step (train_step) runs on the device alone: nothing is read on the host, so the CPU queues
    the next steps while the GPU computes. Everything that reads values (the losses, the
    non-finite verdict, progress, validation, plots, checkpoints, stopping) happens at the
    logging points (log_point): every --log-every steps, at validation and --save-every steps,
    at the end and when a stop is asked for."""

    def __init__(self, stage, coarse, fine, train, val, scenes, args, device, gpus, ckpt, stop):
        self.stage, self.coarse, self.fine, self.train, self.val = stage, coarse, fine, train, val
        self.args, self.device, self.gpus, self.stop = args, device, gpus, stop
        self.variant = coarse.variant
        self.net = coarse if stage == 'coarse' else fine
        if stage == 'fine':   # Sec. 3.3: the coarse net is held fixed while the fine net trains
            coarse.train(self.variant.fine_sees_coarse_dropout)   # [R]: with its dropout on
            coarse.requires_grad_(False)
        self.net.train()
        self.optimizer = make_optimizer(self.net, self.variant)
        self.samples = args.coarse_samples if stage == 'coarse' else args.fine_samples
        self.total_steps = math.ceil(self.samples / args.batch_size)
        self.val_every = max(1, round((args.val_every or self.samples / 50) / args.batch_size))
        self.order = util.SampleOrder(len(train), args.seed + (0 if stage == 'coarse' else 1),
                                      scenes, args.per_scene)
        self.history = []   # one row (util.HISTORY_COLUMNS) per validation point
        self.step, self.skipped, self.saved_step = 0, 0, None
        if ckpt is not None:
            if ckpt['optimizer'] is not None:   # None: the stage had finished (see checkpoint)
                load_optimizer_state(self.optimizer, ckpt['optimizer'])
            self.resume_random_streams(ckpt)
            self.history, self.step = ckpt['history'], ckpt['step']
            self.skipped, self.saved_step = ckpt['skipped'], ckpt['step']
        if DIST.active and args.batch_size % DIST.world:
            raise cli.UserError(f'--batch-size {args.batch_size} does not split evenly over '
                                 f'{DIST.world} processes')
        self.parallel, self.coarse_run = self.wrap_nets()
        self.guard = NonFiniteGuard(self.optimizer, device, args.skip_nonfinite)
        self.ckpt_path = os.path.join(args.out, 'checkpoint.pth')
        self.csv_path = os.path.join(args.out, f'history_{stage}.csv')
        self.block_losses = []          # device scalars of the steps since the last logging point
        # the training loss since the last history row (in the checkpoint: a resumed row is whole)
        self.run_loss, self.run_count = ckpt['running_loss'] if ckpt is not None else (0.0, 0)

    def resume_random_streams(self, ckpt):
        states = ckpt['rng']
        if len(states) == DIST.world and len(states[DIST.rank]['cuda']) in (0, len(self.gpus)):
            set_rng_state(states[DIST.rank], self.gpus)
        else:
            seed_streams(self.args.seed, DIST.rank, self.gpus, salt=ckpt['step'])
            if DIST.main:
                print(f'note: {self.ckpt_path} was written by {len(states)} process(es) on '
                      f'{len(states[0]["cuda"])} GPU(s); dropout continues with new random streams')

    def wrap_nets(self):
        """The nets as a step runs them: in autocast with its dtype (Autocast), over several GPUs
        (nn.DataParallel) or processes (DDP), compiled with --compile. The fine stage's coarse net
        likewise, without DDP (it has no gradients)."""
        kind, amp = self.device.type, self.args.amp
        net, coarse = Autocast(self.net, kind, enabled=amp), Autocast(self.coarse, kind, enabled=amp)
        if DIST.active:
            net = DIST.wrap(net)
        elif len(self.gpus) > 1:
            net = nn.DataParallel(net, device_ids=self.gpus)
            coarse = nn.DataParallel(coarse, device_ids=self.gpus)
        if self.args.compile:
            net = torch.compile(net)
        return net, coarse

    def is_log_point(self, step):
        a = self.args
        return (step % a.log_every == 0 or step % self.val_every == 0 or step == self.total_steps
                or bool(a.save_every and step % a.save_every == 0))

    # ------------------------------------------------------------------------------------------

    def run(self):
        """Train to the end of the stage (True) or until a stop (False)."""
        a = self.args
        # a terminal gets the progress bar; a log file (or a pipe) plain lines every --print-every s
        self.bar = cli.progress(total=self.total_steps, initial=self.step, enabled=DIST.main,
                                desc=f'{self.stage} net', unit='step', dynamic_ncols=True)
        self.print_lines = DIST.main and not (sys.stdout.isatty() and sys.stderr.isatty())
        if DIST.main:   # the rows of the checkpoint, and none after it: no duplicates on resume
            util.write_history(self.csv_path, self.history)
        self.t_start = self.t_interval = time.perf_counter()
        self.elapsed_before = self.history[-1]['elapsed_s'] if self.history else 0.0
        self.samples_before = self.step * a.batch_size
        self.steps_here, self.last_save, self.last_plot = 0, time.monotonic(), time.monotonic()
        self.last_line = -math.inf
        batches = training_batches(self.train, self.order, self.step, self.total_steps,
                                   a.batch_size, a, self.device, (DIST.rank, DIST.world))
        with contextlib.closing(batches):   # ends DataLoader workers at once, also on a stop
            for x, y, m in batches:
                self.train_step(x, y, m)
                self.step += 1
                self.steps_here += 1
                self.bar.update(1)
                limit = self.stop.step_done()
                # one process reacts to a signal at once; several agree at the logging points
                now = limit or (self.stop.signalled and not DIST.active) or self.is_log_point(self.step)
                if now:
                    verdict = self.log_point(limit)
                    if verdict is not None:
                        return verdict
        return True

    def train_step(self, x, y, m):
        """One SGD step on one augmented batch, on the device; no value is read on the host."""
        self.block_losses.append(train_step(self.parallel, self.coarse_run if self.stage == 'fine'
                                            else None, self.optimizer, (x, y, m), self.args.lam,
                                            self.variant, self.args.amp, self.guard))

    def log_point(self, limit):
        """The host's turn: read the losses of the steps since the last logging point (one read),
        stop on a non-finite one (or count it), update the progress bar, validate, plot and write
        the checkpoint when due. Returns True at the end of the stage, False when stopped here,
        None to go on."""
        a, stage = self.args, self.stage
        first = self.step - len(self.block_losses) + 1
        losses = torch.stack(self.block_losses).tolist() if self.block_losses else []
        self.block_losses = []
        bad = [(first + i, v) for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad and not (a.skip_nonfinite and all_finite(self.net)):
            raise cli.UserError(f'{stage} step {bad[0][0]}: the loss is {bad[0][1]}; training '
                                 f'stopped before it touched the weights, {self.kept()}. Continue '
                                 f'with --resume, or pass --skip-nonfinite to skip such batches')
        for s, v in bad:
            self.skipped += 1
            self.bar.write(f'{stage} step {s}: loss {v}, batch skipped ({self.skipped} so far)')
        for v in losses:   # one at a time: the same sums however the steps fall into blocks
            if math.isfinite(v):
                self.run_loss += v
                self.run_count += 1
        mean_loss = self.run_loss / self.run_count if self.run_count else float('nan')
        self.report(mean_loss)
        if self.step % self.val_every == 0 or self.step == self.total_steps:
            self.validation_point(mean_loss)
        signalled, time_due = DIST.agree(self.stop.signalled,
                                         time.monotonic() - self.last_save >= 60 * a.save_minutes)
        interrupted = (limit or signalled) and self.step < self.total_steps
        if self.step == self.total_steps:
            self.finish()
            return True
        if interrupted or time_due or (a.save_every and self.step % a.save_every == 0):
            self.checkpoint()
        if interrupted:
            self.bar.close()
            print(f'stopped ({self.stop.reason()}) at {stage} step {self.step}/{self.total_steps}; '
                  f'checkpoint written to {self.ckpt_path}; continue with --resume')
            return False
        return None

    def report(self, mean_loss):
        """Progress: the bar's figures, or a plain line (stage, step/total, samples, loss, samples/s,
        ETA) at most every --print-every seconds and at the end of the stage."""
        a = self.args
        elapsed = time.perf_counter() - self.t_start
        rate = self.steps_here * a.batch_size / elapsed
        self.bar.set_postfix(loss=f'{mean_loss:.4f}', samples_s=f'{rate:.1f}')
        last = self.step == self.total_steps
        if self.print_lines and (last or time.monotonic() - self.last_line >= a.print_every):
            eta = round((self.total_steps - self.step) * elapsed / self.steps_here)
            print(f'{self.stage} step {self.step}/{self.total_steps} '
                  f'({self.step * a.batch_size} samples): loss {mean_loss:.4f}, '
                  f'samples_s={rate:.1f}, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}',
                  flush=True)
            self.last_line = time.monotonic()

    def validation_point(self, mean_loss):
        """A row of the history (the training loss since the last row, validation, speed),
        appended to OUT/history_<stage>.csv; the loss plot, at most once a minute."""
        a, samples, now = self.args, self.step * self.args.batch_size, time.perf_counter()
        row = {'step': self.step, 'samples': samples, 'train_loss': mean_loss,
               'samples_per_s': (samples - self.samples_before) / (now - self.t_interval),
               'elapsed_s': self.elapsed_before + now - self.t_start,
               'wall_time': datetime.datetime.now().isoformat(timespec='seconds')}
        self.t_interval, self.samples_before = now, samples
        self.run_loss, self.run_count = 0.0, 0
        if DIST.main:
            if len(self.val):
                v = validate(self.coarse, self.fine if self.stage == 'fine' else None, self.val,
                             self.device, a.batch_size, a.lam)
                row.update({f'val_{k}': value for k, value in v.items()})
                self.bar.write(f"{self.stage} {samples} samples: val loss {v['loss']:.4f}, sc-inv "
                               f"{v['si_log']:.3f}, RMSE {v['rmse']:.3f} m, d<1.25 {v['d1']:.3f}")
            util.append_history(self.csv_path, row)
        self.history.append(row)
        if time.monotonic() - self.last_plot >= PLOT_EVERY_S or self.step == self.total_steps:
            self.plot()

    def plot(self):
        """The loss plot, drawn from the history CSV (what a user can also plot themselves)."""
        if DIST.main:
            util.plot_losses(util.read_history(self.csv_path), self.stage,
                             os.path.join(self.args.out, f'loss_{self.stage}.png'))
        self.last_plot = time.monotonic()

    def finish(self):
        self.bar.close()
        weights = os.path.join(self.args.out, f'{self.stage}.pth')
        if DIST.main:
            state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            self.save(weights, lambda tmp: torch.save(state, tmp), f'{self.stage} net')
        self.checkpoint(done=self.stage == 'fine' or self.args.stage == 'coarse')
        print(f'{self.stage} net written to {weights}' +
              (f' ({self.skipped} batches with a non-finite loss skipped)' if self.skipped else ''))

    # ------------------------------------------------------------------------------------------

    def kept(self):
        if self.saved_step is None:
            return 'no checkpoint of this stage had been written yet'
        return f'the last checkpoint ({self.ckpt_path}, {self.stage} step {self.saved_step}) is intact'

    def save(self, path, write, what):
        """Write a file atomically; a full disk or other OSError stops the run with a message."""
        try:
            files.atomic_write(path, write)
        except OSError as e:
            raise cli.UserError(f'{path}: could not write the {what} at {self.stage} step '
                                 f'{self.step} ({e.strerror or e}); {self.kept()}. Free some '
                                 f'space, then continue with --resume') from None

    def checkpoint(self, done=False):
        """Everything --resume needs, with every process's random streams; written by rank 0.
        At the end of the stage without the optimizer's momentum, which is then never needed
        again (283 MB less to write for the coarse net)."""
        a = self.args
        finished = self.step == self.total_steps
        streams = DIST.gather(rng_state(self.gpus))
        if not all_finite(self.net):   # never replace a good checkpoint with a diverged net
            raise cli.UserError(f'{self.stage} step {self.step}: the weights hold NaN or inf; not '
                                 f'saved, {self.kept()}. Resume from it with --resume (a lower '
                                 f'learning rate or --skip-nonfinite may help)')
        if DIST.main:
            state = {'format': CHECKPOINT_FORMAT, 'variant': self.variant.name, 'stage': self.stage,
                     'step': self.step, 'done': done, 'skipped': self.skipped,
                     'coarse': self.coarse.state_dict(),
                     'fine': self.fine.state_dict() if self.stage == 'fine' else None,
                     'optimizer': None if finished else self.optimizer.state_dict(), 'rng': streams,
                     'history': self.history, 'running_loss': (self.run_loss, self.run_count),
                     'config': {'batch_size': a.batch_size, 'samples': self.samples, 'lam': a.lam,
                                'seed': a.seed, 'train_depth': a.train_depth,
                                'per_scene': a.per_scene, 'data': os.path.abspath(a.data),
                                'processes': DIST.world}}
            self.save(self.ckpt_path, lambda tmp: torch.save(state, tmp), 'checkpoint')
        self.saved_step, self.last_save = self.step, time.monotonic()


def set_precision(args, device):
    """bf16 autocast (--amp, default on for the fast path on CUDA); otherwise the paper's fp32,
    TF32 included: cuDNN would run fp32 convolutions in TF32 by default. --deterministic: the
    same bits on every run (cuDNN autotuning off, deterministic kernels), slower."""
    if args.amp is None:
        args.amp = args.path == 'fast' and device.type == 'cuda'
    torch.backends.cudnn.allow_tf32 = bool(args.amp)
    torch.backends.cudnn.benchmark = not args.deterministic   # fixed input sizes: autotune once
    torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')   # before cuBLAS starts
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, gpus = DIST.start(*resolve_device(args.device))
    if args.compile and len(gpus) > 1 and not DIST.active:
        raise cli.UserError(f'--compile does not work with nn.DataParallel ({len(gpus)} GPUs in one '
                             f'process): use torchrun for several GPUs (README), or --device cuda:0')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if args.log_every is None:
        args.log_every = 50 if device.type == 'cuda' else 1   # on the CPU a read costs nothing
    set_precision(args, device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    variant = get_variant(args.variant)
    ckpt_path = os.path.join(args.out, 'checkpoint.pth')
    ckpt = None
    if DIST.main:
        remove_stale_temporaries(args.out)
    if args.resume == 'auto':
        found = os.path.isfile(ckpt_path)
        print(f'--resume auto: continuing {ckpt_path}' if found else
              f'--resume auto: no checkpoint in {args.out}, starting afresh')
        args.resume = 'yes' if found else None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise cli.DataError(f'{ckpt_path}: no checkpoint to resume from')
        ckpt = read_checkpoint(ckpt_path, args, variant)
        if ckpt['done']:
            print(f'{ckpt_path}: that run has finished; nothing to resume')
            return 0
    elif os.path.isfile(ckpt_path):
        old = files.load_torch_file(ckpt_path, 'a checkpoint written by train.py')
        if not (isinstance(old, dict) and old.get('done')):
            raise cli.DataError(f'{ckpt_path}: an unfinished run is there; continue it with '
                                 f'--resume, or choose another --out (nothing was overwritten)')
    train, val, scenes = load_data(args, device)
    if args.path == 'fast' and isinstance(train, util.Frames):
        train.to(device)   # uint8 frames on the GPU: 0.4 MB a frame, 0.3 GB for the labeled set
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    coarse = GlobalCoarseNet(variant).to(device, memory_format=memory_format)
    fine = LocalFineNet(variant, pass_through=args.fine_init == 'pass').to(device, memory_format=memory_format)
    stages = ['coarse', 'fine'] if args.stage == 'both' else [args.stage]
    fresh_coarse = ckpt is None and stages[0] == 'coarse'
    if args.pretrained_conv and fresh_coarse:
        loaded, _ = load_pretrained_conv(coarse, args.pretrained_conv)
        print(f'loaded {", ".join(loaded)} from {args.pretrained_conv}')
    if variant.coarse_convs == 'alexnet' and args.pretrained and fresh_coarse and DIST.main:
        # rank 0 only: DistributedDataParallel gives its weights to the other processes
        print(f"coarse1-5: torchvision's ImageNet AlexNet weights, {load_imagenet_convs(coarse)}")
    seed_streams(args.seed, DIST.rank, gpus)   # the same initial weights, each its own dropout
    if ckpt is not None:
        coarse.load_state_dict(ckpt['coarse'])
        if ckpt['stage'] == 'fine':
            fine.load_state_dict(ckpt['fine'])
            stages = ['fine']
    if stages == ['fine'] and ckpt is None:
        coarse_path = os.path.join(args.out, 'coarse.pth')
        if not os.path.isfile(coarse_path):
            raise cli.DataError(f'{coarse_path}: the fine stage needs the trained coarse net')
        load_weights(coarse, coarse_path, 'the coarse net written by the coarse stage')
    os.makedirs(args.out, exist_ok=True)   # only now: refused data or weights leave nothing behind
    with StopControl(args.max_steps) as stop:
        for stage in stages:
            resumed = ckpt if ckpt is not None and ckpt['stage'] == stage else None
            run = StageRun(stage, coarse, fine, train, val, scenes, args, device, gpus, resumed, stop)
            if not run.run():
                # one process: 130, 143, 138 as if killed by the signal; under torchrun 0, a clean
                # stop (a non-zero status would make torchrun report a failure)
                return 128 + stop.signum if stop.signum and not DIST.active else 0
            ckpt = None
    DIST.stop()
    if len(val) and DIST.main:
        util.plot_predictions(coarse, fine if 'fine' in stages else None, val, device,
                              os.path.join(args.out, 'predictions.png'))
    if DIST.main:
        print(summary(args, stages))
    return 0


def summary(args, stages):
    """The run's last lines: each stage's final validation figures side by side, where the files
    are, and the command that evaluates them on the test split."""
    lines, names = [], {'coarse': 'Coarse', 'fine': 'Coarse + Fine'}
    for stage, name in names.items():
        if stage == 'fine' and 'fine' not in stages:
            continue
        path = os.path.join(args.out, f'history_{stage}.csv')
        rows = [r for r in util.read_history(path) if r['val_loss'] is not None] \
            if os.path.isfile(path) else []
        if rows:
            r = rows[-1]
            lines.append(f"| {name:13s} | {r['samples']:9d} | {r['val_loss']:.4f} | {r['val_si_log']:.3f}"
                         f" | {r['val_rmse']:.3f} | {r['val_abs_rel']:.3f} | {r['val_d1']:.3f} |")
    out = args.out
    files = ', '.join(p for p in (os.path.join(out, f) for f in (
        'coarse.pth', 'fine.pth', 'loss_coarse.png', 'loss_fine.png', 'predictions.png')) if os.path.isfile(p))
    text = ['', 'Validation at the end of each stage (held-out scenes, centre crop; loss: Eq. 4 '
                'in (log m)^2):',
            '| net           |   samples | loss   | sc-inv | RMSE m | abs rel | d<1.25 |'] + lines
    if not lines:
        text = ['', 'no validation figures (--val-fraction 0)']
    where = ' --demo' if args.demo else ''
    if not args.demo:
        labeled = args.data if args.data_format == 'labeled' else args.labeled
        where += f' --data {labeled}' if labeled != LABELED else ''
        where += f' --splits {args.splits}' if args.splits != SPLITS else ''
    text += [f'written: {files}', f'evaluate on the test split: python evaluate.py --model {out}{where}']
    return '\n'.join(text)


if __name__ == '__main__':
    cli.run_cli(main)
