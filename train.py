"""Train the coarse, then the fine network, as in Sec. 3.3 of Eigen, Puhrsch & Fergus (NIPS 2014).

Stage 1 trains GlobalCoarseNet for 2M samples (KITTI 1.5M); stage 2 trains LocalFineNet for 1.5M
(KITTI 1M) samples on the outputs of the coarse net, which is held fixed (no gradient). SGD, batch 32, momentum 0.9, the
paper's per-layer learning rates (net.Variant), the scale-invariant loss of Eq. 4 (loss.py; --loss
chooses another from loss.LOSSES).
Outputs in --out (default model/): coarse.pth and fine.pth (plain state_dicts; refine.pth with
--refine 2), checkpoint.pth (with the weights files beside it, everything --resume needs),
history_<stage>.csv, loss_<stage>.png and predictions.png.

    python train.py                  # NYU labeled set in nyu/, the paper's schedule
    python train.py --demo           # synthetic rooms in NYU's format, a few minutes on a CPU
    python train.py --dataset kitti  # raw KITTI in kitti/, the Eigen split (Sec. 4.2)

This file is the method, top-down: the options, the per-layer optimizer, the loss on a batch, one
training step, the validation, the stage loop, and main. The nets run as a chain (net.Chain: the
coarse net, then each net that refines its prediction). The run machinery lives beside it:
data.py (the training set and its batches), runtime.py (devices, several GPUs or processes,
signals, the non-finite guard, random streams), checkpoint.py (resume, and end_of_step: the
logging points, checkpoints and stops after each step), runlog.py (progress, history, plots).
"""
import argparse
import contextlib
import math
import os
from collections import namedtuple

import numpy as np
import torch

import checkpoint
import cli
import data
import files
import runlog
import runtime
import util
from loss import DEFAULT_LOSS, LOSSES, TRAIN_LAMBDA, safe_log, scale_invariant_loss
from metrics import Metrics
from net import (GEOMETRIES, STAGES, VARIANTS, Chain, get_variant, layer_names, load_imagenet_convs,
                 load_pretrained_conv, load_weights, new_net, run_net)
from runtime import DIST, MOMENTUM, NonFiniteGuard, StopControl

# Sec. 3.3: SGD, batch 32, momentum 0.9 (runtime.MOMENTUM); 2M samples for the coarse net, 1.5M
# for the fine net. Sec. 4.2, KITTI: 1.5M and 1M, "learning rates are the same as for NYU Depth".
BATCH_SIZE = 32
SAMPLES = {'nyu': {'coarse': 2_000_000, 'fine': 1_500_000},
           'kitti': {'coarse': 1_500_000, 'fine': 1_000_000}}
# What a run trains on: the training set, the held-out validation Frames, each training frame's
# scene (data.load_data).
TrainingSets = namedtuple('TrainingSets', 'train val scenes')
# The demo: synthetic rooms (data.py), a schedule a 2-core CPU runs in a few minutes.
DEMO_COARSE_SAMPLES, DEMO_FINE_SAMPLES, DEMO_BATCH = 3200, 1600, 16


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group('schedule (Sec. 3.3)')
    t.add_argument('--variant', choices=sorted(VARIANTS), default='paper',
                   help="'paper': Fig. 1 and the text; 'release': the authors' released code; "
                        "'alexnet': coarse1-5 as torchvision's AlexNet, initialised with its "
                        "ImageNet weights (docs/paper.md lists the differences) (default: %(default)s)")
    t.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help="--variant alexnet: coarse1-5 from torchvision's IMAGENET1K_V1 weights "
                        '(downloaded once into the torch hub cache, TORCH_HOME), as the paper '
                        'pretrains them (Sec. 3.1.1); --no-pretrained: a random start')
    t.add_argument('--stage', choices=['both', *STAGES], default='both',
                   help="one stage alone: 'fine' needs OUT/coarse.pth, 'refine' OUT/coarse.pth "
                        "and OUT/fine.pth (default: %(default)s: coarse, fine, and refine with "
                        "--refine 2)")
    t.add_argument('--refine', type=int, choices=[1, 2], default=1,
                   help="fine nets: 1, the paper's; 2, a third stage trains a second fine net on "
                        'the first one\'s output, coarse and fine fixed, with the fine schedule '
                        "(not in the paper: docs/training.md) (default: %(default)s)")
    t.add_argument('--coarse-samples', type=cli.whole(1), help=f"default {SAMPLES['nyu']['coarse']}, "
                                                       f"KITTI {SAMPLES['kitti']['coarse']} (paper)")
    t.add_argument('--fine-samples', type=cli.whole(1), help=f"default {SAMPLES['nyu']['fine']}, KITTI "
                                                     f"{SAMPLES['kitti']['fine']} (paper)")
    t.add_argument('--coarse-epochs', type=cli.real(above=0), metavar='E',
                   help='instead of --coarse-samples: E passes over the training set (with '
                        '--per-scene, over its evened pass), rounded up to whole batches')
    t.add_argument('--fine-epochs', type=cli.real(above=0), metavar='E', help='likewise for the fine stage')
    t.add_argument('--lr-scale', type=cli.real(above=0), default=1.0, metavar='F',
                   help="every layer's learning rate times F, keeping the paper's ratios (Sec. "
                        '3.3: "the global scale of all the rates was tuned") (default: %(default)s, '
                        "the paper's rates)")
    t.add_argument('--batch-size', type=cli.whole(1), help=f'default {BATCH_SIZE} (paper)')
    t.add_argument('--lam', type=cli.real(low=0, high=1), default=TRAIN_LAMBDA,
                   help='lambda of the scale-invariant loss, Eq. 4, in [0, 1]: 0 the plain '
                        'log-space error, 1 the scale-invariant error of Eq. 1 (default: '
                        '%(default)s)')
    t.add_argument('--pretrained-conv', metavar='PATH',
                   help='paper / release variants: a state_dict with weights for their coarse1-5 '
                        '(96-256-384-384-256 channels, which no public checkpoint has; else they '
                        'start random)')
    t.add_argument('--fine-init', choices=['pass', 'random'], default='pass',
                   help="the fine net's start, which the paper does not state: 'pass' returns the "
                        "coarse map it is given (the fine net then learns to edit it, Sec. 3.1.2; "
                        "docs/paper.md: why); 'random' as every other layer (default: %(default)s)")
    t.add_argument('--loss', choices=sorted(LOSSES), default=DEFAULT_LOSS,
                   help="the training loss (loss.LOSSES), with --lam: 'eq4', the paper's scale-"
                        "invariant loss; 'eigen-fergus-2015', Eq. 4 plus the squared horizontal "
                        "and vertical differences of the log error (Eigen & Fergus, ICCV 2015, Sec. "
                        "3.2). Validation reports Eq. 4, and the chosen loss too (default: "
                        "%(default)s)")
    t.add_argument('--seed', type=cli.whole(0), default=0, help='(default: %(default)s)')
    data.add_data_options(p, f'with a short schedule: {DEMO_COARSE_SAMPLES} + {DEMO_FINE_SAMPLES} '
                             f'samples, batch {DEMO_BATCH}, unless set')
    runtime.add_running_options(p)
    a = p.parse_args(argv)
    for stage in ('coarse', 'fine'):
        epochs = getattr(a, f'{stage}_epochs')
        if epochs is not None and getattr(a, f'{stage}_samples') is not None:
            p.error(f'--{stage}-samples and --{stage}-epochs: give one of the two')
    if a.dataset == 'kitti' and a.variant == 'release':
        p.error("--variant release is the authors' NYU code; KITTI trains 'paper' or 'alexnet'")
    if a.coarse_samples is None:
        a.coarse_samples = DEMO_COARSE_SAMPLES if a.demo else SAMPLES[a.dataset]['coarse']
    if a.fine_samples is None:
        a.fine_samples = DEMO_FINE_SAMPLES if a.demo else SAMPLES[a.dataset]['fine']
    if a.batch_size is None:
        a.batch_size = DEMO_BATCH if a.demo else BATCH_SIZE
    data.check_data_options(p, a)
    return a


# ----------------------------------------------------------------------------------------------
# The method

def param_groups(net, variant, lr_scale=1.0):
    """One SGD group per tensor ('tensor': its name), with its paper layer's learning rate (x
    lr_scale, Sec. 3.3) and weight decay on the weights alone ([R] depth.conf's weight_decay_w;
    the biases are not decayed). Fails loudly if a trainable parameter is in no group, the
    classic bug that leaves layers untrained."""
    groups, covered = [], set()
    for name in layer_names(net):
        for tensor, p in getattr(net, name).named_parameters():
            if p.requires_grad:
                groups.append({'params': [p], 'lr': variant.lr[name] * lr_scale, 'layer': name,
                               'tensor': f'{name}.{tensor}',
                               'weight_decay': 0.0 if tensor.endswith('bias') else variant.weight_decay[name]})
                covered.add(id(p))
    trainable = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in covered]
    if missing or len(covered) != len(trainable):
        raise RuntimeError(f'parameters without a learning rate: {missing}')
    return groups


def make_optimizer(net, variant, lr_scale=1.0):
    """SGD with momentum 0.9 and param_groups (the paper's rates x lr_scale). Fused (one kernel for
    a group's whole update) where the device has it: the same update as the default
    implementation (equal to rounding on the CPU, tested), fewer passes over the weights, and it
    can skip a step on the GPU's own verdict (NonFiniteGuard). Momentum buffers start at zero,
    which is exactly SGD's first step (buffer = gradient) and keeps a skipped first step from
    leaving them uninitialised."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(param_groups(net, variant, lr_scale), lr=0.0, momentum=MOMENTUM,
                                fused=True if runtime.fused_sgd_works(device) else None)
    for group in optimizer.param_groups:
        for p in group['params']:
            optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def forward_loss(net, fixed, x, y, m, lam, amp=False, loss=DEFAULT_LOSS):
    """The training loss (loss.LOSSES[loss], Eq. 4 by default) of the trained net's prediction on
    one augmented batch. fixed: what the trained net refines, held fixed (Sec. 3.3: the coarse net
    while the fine net trains; a Chain of the nets before it), None for the coarse net. With amp
    the nets run in bf16 autocast; the loss is always computed in fp32."""
    if x.device.type == 'cuda':
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            before = None if fixed is None else fixed(x)
        pred = run_net(net, x, before)
    return LOSSES[loss](pred.float(), safe_log(y, m), m, lam)


def in_authors_units(loss, variant):
    """The loss in the units the paper's learning rates were tuned for. [R] trains on targets log
    depth / 0.457 (variant.log_depth_std), so its loss, and with it every gradient, is ours /
    0.457^2 (docs/learning_rates.md). Only the gradient carries the factor: every loss a
    user sees is in (log metres)^2."""
    return loss / variant.log_depth_std ** 2


def train_step(net, fixed, optimizer, batch, lam, variant, amp=False, guard=None, loss=DEFAULT_LOSS):
    """One SGD step of Sec. 3.3 on one augmented batch (x, y, m), on the device; no value is read
    on the host. `net` is the trained net as the step runs it (Autocast, DataParallel, DDP),
    `fixed` what it refines (forward_loss). Returns the training loss of the (global) batch as a
    device scalar. guard: a NonFiniteGuard, None for a plain step. The one training step of the
    project: lr_study.py and the tests call it too."""
    x, y, m = batch
    value = forward_loss(net, fixed, x, y, m, lam, amp, loss)
    optimizer.zero_grad(set_to_none=True)
    in_authors_units(value, variant).backward()
    value = DIST.mean_(value.detach().clone())   # the global batch's loss, alike everywhere
    if guard is None or guard.allows_step(value):
        optimizer.step()
    return value


@torch.no_grad()
def validate(nets, frames, device, batch, lam, loss=DEFAULT_LOSS):
    """Validation frames, centre crop, nets in eval mode, the prediction of the last of `nets` (a
    Chain, or a coarse net alone): Eq. 4 ('loss', in (log metres)^2 as the logged training loss),
    the chosen training loss when it is another ('loss_<name>'), and the metrics of metrics.py on
    the 55x74 target grid (sc-inv = sqrt(Eq. 1), RMSE in metres, ...)."""
    losses = {'loss': lambda *a: scale_invariant_loss(*a, lam)}
    if loss != DEFAULT_LOSS:
        losses[f'loss_{loss}'] = lambda *a: LOSSES[loss](*a, lam)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in losses}
    count, found = 0, Metrics()
    with util.eval_mode(nets):   # then each module as it was (a fixed net may be in another mode)
        for start in range(0, len(frames), batch):
            idx = list(range(start, min(start + batch, len(frames))))
            img, depth, mask = (t.to(device) for t in frames.get(idx))
            x, y, m = util.center_crop(img, depth, mask, nets.geometry)
            pred, target = nets(x), safe_log(y, m)
            for k, f in losses.items():
                sums[k] += f(pred, target, m).double() * len(idx)
            found.add(pred=pred.exp(), gt=y, mask=m)   # one host read a batch
            count += len(idx)
    return {**{k: float(v) / count for k, v in sums.items()}, **found.result()}


def validate_or_say(nets, val, device, args):
    """validate on the held-out frames ({} without any); a set without a single valid depth pixel
    is refused naming the data (metrics.py's message cannot)."""
    if not len(val):
        return {}
    try:
        return validate(nets, val, device, args.batch_size, args.lam, args.loss)
    except cli.DataError as e:
        raise cli.DataError(f'{args.data}: its {len(val)} validation frames: {e}') from None


def stages_of(args):
    """The stages this run trains, in order."""
    return list(STAGES[:args.refine + 1]) if args.stage == 'both' else [args.stage]


def train_stage(stage, nets, sets, args, device, gpus, ckpt, stop):
    """One stage of Sec. 3.3, from its checkpoint `ckpt` or from the start, to its end (True) or
    until a stop (False, with a checkpoint). nets: {'coarse', 'fine'(, 'refine')}; sets: the
    TrainingSets. The trained net learns on the prediction of the nets before it, held fixed (the
    coarse net while the fine net trains); validation scores every net up to the trained one."""
    net, variant = nets[stage], nets['coarse'].variant
    fixed = None if stage == 'coarse' else Chain(nets, last=STAGES[STAGES.index(stage) - 1])
    scored = Chain(nets, last=stage)
    if fixed is not None:
        fixed.train(variant.fine_sees_coarse_dropout)   # [R]: with the coarse net's dropout on
        fixed.requires_grad_(False)
    net.train()
    optimizer = make_optimizer(net, variant, args.lr_scale)
    samples = args.coarse_samples if stage == 'coarse' else args.fine_samples
    log = runlog.StageLog(stage, samples, args, gpus, ckpt,   # step, history; resumed from ckpt
                          resumable=stage != stages_of(args)[0])
    if ckpt is not None:
        checkpoint.resume(os.path.join(args.out, 'checkpoint.pth'), ckpt, optimizer, args.seed, gpus)
    order = util.SampleOrder(len(sets.train), args.seed + STAGES.index(stage), sets.scenes,
                             args.per_scene, scored.geometry)   # each step's frames and draws
    batches = data.training_batches(sets.train, order, log.step, log.total_steps, args.batch_size,
                                    args, device, (DIST.rank, DIST.world))
    if log.step == log.total_steps:   # finished before: if it is now the run's last, record that
        if stage == stages_of(args)[-1]:
            checkpoint.save(os.path.join(args.out, 'checkpoint.pth'), log, nets, optimizer, args, done=True)
        return True
    net_run, fixed_run = runtime.wrap_nets(net, fixed, device, gpus, args.amp, args.compile)
    guard = NonFiniteGuard(optimizer, device, args.skip_nonfinite)
    with contextlib.closing(batches), log:   # closing: DataLoader workers end at once, also on a stop
        for batch in batches:
            log.step_done(train_step(net_run, fixed_run, optimizer, batch, args.lam, variant,
                                     args.amp, guard, args.loss))
            done = checkpoint.end_of_step(stage, stages_of(args), nets, optimizer, log, stop, args,
                                          lambda: validate_or_say(scored, sets.val, device, args))
            if done is not None:
                return done
    return True


def samples_from_epochs(args, train_set, scenes):
    """--coarse-epochs / --fine-epochs as samples: passes over the training set (its evened pass
    with --per-scene, Sec. 4.1), rounded up to whole batches; one line says so."""
    epoch = args.per_scene * len(set(scenes)) if args.per_scene else len(train_set)
    for stage in ('coarse', 'fine'):
        epochs = getattr(args, f'{stage}_epochs')
        if epochs is not None:
            steps = math.ceil(epochs * epoch / args.batch_size)
            setattr(args, f'{stage}_samples', steps * args.batch_size)
            print(f'--{stage}-epochs {epochs:g}: {epochs:g} x {epoch} samples a pass = '
                  f'{steps * args.batch_size} samples ({steps} steps of {args.batch_size})')


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    files.check_out_folder(args.out)
    device, gpus = runtime.start(args)   # --device, torchrun, precision (bf16 autocast on CUDA)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    variant = get_variant(args.variant)
    stages = stages_of(args)
    ckpt = checkpoint.open_run(args, variant, stages)   # --resume: the checkpoint to go on, or None
    if ckpt is not None and ckpt['done']:
        print(f"{os.path.join(args.out, 'checkpoint.pth')}: that run has finished; nothing to resume")
        return 0
    sets = TrainingSets(*DIST.together(lambda: data.load_data(args, device)))   # a refusal in
    samples_from_epochs(args, sets.train, sets.scenes)                          # one stops all
    if ckpt is not None:   # the samples of --*-epochs are known now
        checkpoint.check_schedule(os.path.join(args.out, 'checkpoint.pth'), ckpt, args, converted=True)
    print(f"learning rates (Sec. 3.3) x {args.lr_scale:g}: " + ', '.join(
        f'{layer} {rate * args.lr_scale:g}' for layer, rate in variant.lr.items()))
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    geometry = GEOMETRIES[args.dataset]   # Fig. 1's NYU or KITTI column
    # coarse and fine always, in this order: the same starts whichever stages run
    nets = {stage: new_net(stage, variant, geometry, args.fine_init)
            for stage in STAGES if stage != 'refine' or 'refine' in stages}
    for net in nets.values():
        net.to(device, memory_format=memory_format)
    coarse = nets['coarse']
    fresh_coarse = ckpt is None and stages[0] == 'coarse'
    if args.pretrained_conv and fresh_coarse:
        loaded, _ = load_pretrained_conv(coarse, args.pretrained_conv)
        print(f'loaded {", ".join(loaded)} from {args.pretrained_conv}')
    if variant.coarse_convs == 'alexnet' and args.pretrained and fresh_coarse:
        # rank 0 only: DistributedDataParallel gives its weights to the other processes
        DIST.together(lambda: print(f"coarse1-5: torchvision's ImageNet AlexNet weights, "
                                    f"{load_imagenet_convs(coarse)}"), main_only=True)
    runtime.seed_streams(args.seed, DIST.rank, gpus)   # the same initial weights, each its own dropout
    if ckpt is not None:   # its stage's net and the nets before it
        checkpoint.load_nets(ckpt, nets, args.out)
        stages = stages[stages.index(ckpt['stage']):]
    elif stages[0] != 'coarse':   # one later stage alone: the nets before it from OUT
        for stage in STAGES[:STAGES.index(stages[0])]:
            path = os.path.join(args.out, f'{stage}.pth')
            if not os.path.isfile(path):
                raise cli.DataError(f'{path}: the {stages[0]} stage needs the {stage} net trained before it')
            load_weights(nets[stage], path, f'the {stage} net written by the {stage} stage')
    if ckpt is None and args.overwrite:   # only now: refused data or weights leave all in place
        DIST.together(lambda: checkpoint.move_aside(args.out, stages), main_only=True)
    os.makedirs(args.out, exist_ok=True)   # only now: refused data or weights leave nothing behind
    with StopControl(args.max_steps) as stop:
        for stage in stages:
            resumed = ckpt if ckpt is not None and ckpt['stage'] == stage else None
            if not train_stage(stage, nets, sets, args, device, gpus, resumed, stop):
                # one process: 130, 143, 138 as if killed by the signal; under torchrun 0, a clean
                # stop (a non-zero status would make torchrun report a failure)
                return 128 + stop.signum if stop.signum and not DIST.active else 0
            ckpt = None
    DIST.stop()
    if DIST.main:
        if len(sets.val):
            util.plot_predictions(Chain(nets, last=stages_of(args)[-1]), sets.val, device,
                                  os.path.join(args.out, 'predictions.png'))
        print(runlog.summary(args, stages_of(args)))
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
