"""Train the coarse, then the fine network, as in Sec. 3.3 of Eigen, Puhrsch & Fergus (NIPS 2014).

Stage 1 trains GlobalCoarseNet for 2M samples (KITTI 1.5M); stage 2 trains LocalFineNet for 1.5M
(KITTI 1M) samples on the outputs of the coarse net, which is held fixed (no gradient). SGD, batch 32, momentum 0.9, the
paper's per-layer learning rates (net.Variant), the scale-invariant loss of Eq. 4 (loss.py).
Outputs in --out (default model/): coarse.pth and fine.pth (plain state_dicts; refine.pth with
--refine 2), checkpoint.pth (with the weights files beside it, everything --resume needs),
history_<stage>.csv, loss_<stage>.png and predictions.png.

    python train.py                  # NYU labeled set in nyu/, the paper's schedule
    python train.py --demo           # synthetic rooms in NYU's format, a few minutes on a CPU
    python train.py --dataset kitti  # raw KITTI in kitti/, the Eigen split (Sec. 4.2)

This file is the method, top-down: the options, the per-layer optimizer, the loss on a batch, one
training step, the validation, the stage loop, and main. The run machinery lives beside it:
data.py (the training set and its batches), runtime.py (devices, several GPUs or processes,
signals, the non-finite guard, random streams), checkpoint.py (resume), runlog.py (progress,
history, plots).
"""
import argparse
import contextlib
import math
import os

import numpy as np
import torch

import checkpoint
import cli
import data
import files
import runlog
import runtime
import util
from loss import TRAIN_LAMBDA, safe_log, scale_invariant_loss
from metrics import Metrics
from net import (GEOMETRIES, VARIANTS, CoarseThenFine, GlobalCoarseNet, LocalFineNet, RefinedFine,
                 get_variant, layer_names, load_imagenet_convs, load_pretrained_conv, load_weights,
                 predict_log_depth)
from runtime import DIST, MOMENTUM, NonFiniteGuard, StopControl
# The GPU smoke test's probe (../shared/gpu/gpu_probe.py, maintained outside this repository) still
# reaches these as train.*; they live in data.py and runtime.py since issue #19.
from data import draw_block, load_data, training_batches  # noqa: F401
from runtime import Autocast, set_precision  # noqa: F401

# Sec. 3.3: SGD, batch 32, momentum 0.9 (runtime.MOMENTUM); 2M samples for the coarse net, 1.5M
# for the fine net. Sec. 4.2, KITTI: 1.5M and 1M, "learning rates are the same as for NYU Depth".
BATCH_SIZE = 32
SAMPLES = {'nyu': {'coarse': 2_000_000, 'fine': 1_500_000},
           'kitti': {'coarse': 1_500_000, 'fine': 1_000_000}}
# The stages in order; 'refine' (--refine 2) is not the paper's.
STAGES = ('coarse', 'fine', 'refine')
# The demo: synthetic rooms (data.py), a schedule a 2-core CPU runs in a few minutes.
DEMO_COARSE_SAMPLES, DEMO_FINE_SAMPLES, DEMO_BATCH = 3200, 1600, 16


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group('schedule (Sec. 3.3)')
    t.add_argument('--variant', choices=sorted(VARIANTS), default='paper',
                   help="'paper': Fig. 1 and the text; 'release': the authors' released code; "
                        "'alexnet': coarse1-5 as torchvision's AlexNet, initialised with its "
                        "ImageNet weights (README lists the differences) (default: %(default)s)")
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
                        "(not in the paper: README) (default: %(default)s)")
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
                        "README: why); 'random' as every other layer (default: %(default)s)")
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
    """One SGD group per paper layer with its learning rate (x lr_scale) and weight decay (Sec.
    3.3). Fails loudly if a trainable parameter is in no group, the classic bug that leaves layers
    untrained."""
    groups, covered = [], set()
    for name in layer_names(net):
        params = [p for p in getattr(net, name).parameters() if p.requires_grad]
        groups.append({'params': params, 'lr': variant.lr[name] * lr_scale,
                       'weight_decay': variant.weight_decay[name], 'layer': name})
        covered.update(id(p) for p in params)
    trainable = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in covered]
    if missing or len(covered) != len(trainable):
        raise RuntimeError(f'parameters without a learning rate: {missing}')
    return groups


def make_optimizer(net, variant, lr_scale=1.0):
    """SGD with momentum 0.9 and the paper's per-layer groups (rates x lr_scale). Fused (one kernel for the whole
    update) where the device has it: the same update as the default implementation (equal to
    rounding on the CPU, tested), fewer passes over the weights, and it can skip a step on the GPU's
    own verdict (NonFiniteGuard). Momentum buffers start at zero, which is exactly SGD's first
    step (buffer = gradient) and keeps a skipped first step from leaving them uninitialised."""
    device = next(net.parameters()).device
    optimizer = torch.optim.SGD(param_groups(net, variant, lr_scale), lr=0.0, momentum=MOMENTUM,
                                fused=True if runtime.fused_sgd_works(device) else None)
    for group in optimizer.param_groups:
        for p in group['params']:
            optimizer.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


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


@torch.no_grad()
def validate(coarse, fine, frames, device, batch, lam):
    """Validation frames, centre crop, nets in eval mode: the mean training loss (Eq. 4, in
    (log metres)^2 as the logged training loss) and the metrics of metrics.py on the 55x74 target
    grid (sc-inv = sqrt(Eq. 1), RMSE in metres, ...)."""
    modes = [(m, m.training) for n in (coarse, fine) if n is not None for m in n.modules()]
    for m, _ in modes:
        m.eval()
    loss_sum, count, found = torch.zeros((), dtype=torch.float64, device=device), 0, Metrics()
    for start in range(0, len(frames), batch):
        idx = list(range(start, min(start + batch, len(frames))))
        img, depth, mask = (t.to(device) for t in frames.get(idx))
        x, y, m = util.center_crop(img, depth, mask, coarse.geometry)
        pred = predict_log_depth(coarse, fine, x)
        loss_sum += scale_invariant_loss(pred, safe_log(y, m), m, lam).double() * len(idx)
        found.add(pred=pred.exp(), gt=y, mask=m)   # one host read a batch
        count += len(idx)
    for m, mode in modes:   # each module as it was (a fixed net may be in another mode)
        m.training = mode
    return {'loss': float(loss_sum) / count, **found.result()}


def validate_or_say(coarse, fine, val, device, args):
    """validate on the held-out frames ({} without any); a set without a single valid depth pixel
    is refused naming the data (metrics.py's message cannot)."""
    if not len(val):
        return {}
    try:
        return validate(coarse, fine, val, device, args.batch_size, args.lam)
    except cli.DataError as e:
        raise cli.DataError(f'{args.data}: its {len(val)} validation frames: {e}') from None


def refining_nets(nets, stage):
    """What refines the coarse prediction up to `stage`: nothing (None), the fine net, or both fine
    nets (--refine 2), as predict_log_depth takes it."""
    if stage == 'coarse':
        return None
    return nets['fine'] if stage == 'fine' else RefinedFine(nets['fine'], nets['refine'])


def stages_of(args):
    """The stages this run trains, in order."""
    return list(STAGES[:args.refine + 1]) if args.stage == 'both' else [args.stage]


def train_stage(stage, nets, sets, args, device, gpus, ckpt, stop):
    """One stage of Sec. 3.3, from its checkpoint `ckpt` or from the start, to its end (True) or
    until a stop (False, with a checkpoint). nets: {'coarse', 'fine'(, 'refine')}; sets: (training
    set, validation Frames, scenes)."""
    train_set, val, scenes = sets
    coarse, net, variant = nets['coarse'], nets[stage], nets['coarse'].variant
    # What feeds the trained net, held fixed (Sec. 3.3: the coarse net while the fine net trains),
    # and the prediction that validation scores: every net up to the trained one.
    fixed = {'coarse': None, 'fine': coarse, 'refine': CoarseThenFine(coarse, nets['fine'])}[stage]
    scored = refining_nets(nets, stage)
    if fixed is not None:
        fixed.train(variant.fine_sees_coarse_dropout)   # [R]: with the coarse net's dropout on
        fixed.requires_grad_(False)
    net.train()
    optimizer = make_optimizer(net, variant, args.lr_scale)
    samples = args.coarse_samples if stage == 'coarse' else args.fine_samples
    log = runlog.StageLog(stage, samples, args, gpus, ckpt,   # step, history; resumed from ckpt
                          resumable=stage != stages_of(args)[0])
    if ckpt is not None:
        checkpoint.resume(ckpt, optimizer, args.seed, gpus)
    order = util.SampleOrder(len(train_set), args.seed + STAGES.index(stage), scenes,
                             args.per_scene, coarse.geometry)   # each step's frames and draws
    batches = data.training_batches(train_set, order, log.step, log.total_steps, args.batch_size,
                                    args, device, (DIST.rank, DIST.world))
    if log.step == log.total_steps:   # finished before: if it is now the run's last, record that
        if stage == stages_of(args)[-1]:
            checkpoint.save(os.path.join(args.out, 'checkpoint.pth'), log, nets, optimizer, args, done=True)
        return True
    net_run, fixed_run = runtime.wrap_nets(net, fixed, device, gpus, args.amp, args.compile)
    guard = NonFiniteGuard(optimizer, device, args.skip_nonfinite)
    ckpt_path = os.path.join(args.out, 'checkpoint.pth')
    with contextlib.closing(batches), log:   # closing: DataLoader workers end at once, also on a stop
        for x, y, m in batches:
            loss = train_step(net_run, fixed_run, optimizer, (x, y, m), args.lam, variant,
                              args.amp, guard)
            log.step_done(loss)
            limit = stop.step_done()
            # one process reacts to a signal at once; several agree at the logging points
            if not (limit or (stop.signalled and not DIST.active) or log.is_log_point()):
                continue
            # A logging point: the host reads the losses of the steps since the last one.
            mean_loss = log.read_losses(net)
            if log.validation_due():
                scores = DIST.together(lambda: validate_or_say(coarse, scored, val, device, args),
                                       main_only=True) or {}   # rank 0's refusal stops all
                log.add_row(mean_loss, scores)   # history CSV and loss plot
            signalled, time_due = DIST.agree(stop.signalled, log.save_due())
            if log.step == log.total_steps:      # the stage's weights and its last checkpoint
                weights = os.path.join(args.out, f'{stage}.pth')
                DIST.together(lambda: checkpoint.write(weights, lambda tmp: torch.save(
                    {k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp),
                    f'{stage} net', log), main_only=True)
                if DIST.main:   # weights trained on the nets this stage replaced are stale now
                    checkpoint.remove_later_weights(args.out, stage, stages_of(args))
                checkpoint.save(ckpt_path, log, nets, optimizer, args,
                                done=stage == stages_of(args)[-1])
                log.close(f'{stage} net written to {weights}')
                return True
            interrupted = limit or signalled
            if interrupted or time_due or log.save_every_due():
                checkpoint.save(ckpt_path, log, nets, optimizer, args)
            if interrupted:
                log.close(f'stopped ({stop.reason()}) at {stage} step {log.step}/{log.total_steps}; '
                          f'checkpoint written to {ckpt_path}; continue with --resume')
                return False
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
    sets = DIST.together(lambda: data.load_data(args, device))   # a refusal in one stops all
    samples_from_epochs(args, sets[0], sets[2])
    if ckpt is not None:   # the samples of --*-epochs are known now
        checkpoint.check_schedule(os.path.join(args.out, 'checkpoint.pth'), ckpt, args, converted=True)
    print(f"learning rates (Sec. 3.3) x {args.lr_scale:g}: " + ', '.join(
        f'{layer} {rate * args.lr_scale:g}' for layer, rate in variant.lr.items()))
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    geometry = GEOMETRIES[args.dataset]   # Fig. 1's NYU or KITTI column
    fine_net = lambda: LocalFineNet(variant, pass_through=args.fine_init == 'pass', geometry=geometry)
    nets = {'coarse': GlobalCoarseNet(variant, geometry), 'fine': fine_net()}   # in this order:
    if 'refine' in stages:                                                      # the same starts
        nets['refine'] = fine_net()
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
        if len(sets[1]):
            util.plot_predictions(coarse, refining_nets(nets, stages_of(args)[-1]), sets[1], device,
                                  os.path.join(args.out, 'predictions.png'))
        print(runlog.summary(args, stages_of(args)))
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
