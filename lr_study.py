"""How the paper's learning rates act on each variant (issue #11, README "The learning rates").

The paper's per-layer rates (Sec. 3.3: 0.001 for coarse1-5, 0.1 for coarse6 and coarse7) were
tuned by the authors for their own parametrisation. This script trains the coarse net of each
variant on the demo's synthetic rooms with exactly those rates, momentum 0.9 and the paper's batch
of 32, and records at every step the training loss (Eq. 4), the batch's mean log error
(prediction - target, over valid pixels) and the size of the coarse6 and coarse7 weight updates
relative to the weights; every --val-every samples the sc-inv error on held-out rooms. It prints a
table and draws one plot (the README's figure).

    python lr_study.py                            # the README's figures (~30 min on 2 CPU cores)
    python lr_study.py --samples 320 --runs paper # a quick look

The runs: each variant as train.py builds it; 'paper-unscaled', the paper variant before this
study (features and targets unscaled); '*-release-factors', the release's factors taken as they
are (features x 0.01, targets / 0.457) on inputs normalised by their std.
"""
import argparse
import copy
import dataclasses
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

import cli
import net
import train
import util
from loss import TRAIN_LAMBDA, safe_log, scale_invariant_loss
from net import ALEXNET, PAPER, RELEASE, GlobalCoarseNet


def scaled(variant, name, **scaling):
    return dataclasses.replace(variant, name=name, **scaling)


RUNS = {
    'paper': PAPER,
    'paper-unscaled': scaled(PAPER, 'paper-unscaled', feature_scale=1.0, log_depth_std=1.0),
    'paper-release-factors': scaled(PAPER, 'paper-release-factors', feature_scale=0.01),
    'release': RELEASE,
    'alexnet': ALEXNET,
    'alexnet-release-factors': scaled(ALEXNET, 'alexnet-release-factors', feature_scale=0.01),
}
SMOOTH = 10   # steps averaged in the plotted training loss (one batch is noisy)


def relative_update(after, before):
    return float((after - before).norm() / before.norm())


def study(variant, train_frames, val_frames, samples, batch, val_every, seed, show):
    """Coarse training of `variant` for `samples` samples: one row a step, val rows apart."""
    torch.manual_seed(seed)
    coarse = GlobalCoarseNet(variant)
    conv_weights = 'random'
    if variant.coarse_convs == 'alexnet' and os.path.isfile(net.imagenet_weights()[1]):
        net.load_imagenet_convs(coarse)   # only from the cache: this script never downloads
        conv_weights = 'ImageNet'
    optimizer = train.make_optimizer(coarse, variant)
    steps = samples // batch
    order = util.SampleOrder(len(train_frames), seed)
    batches = train.training_batches(train_frames, order, 0, steps, batch,
                                     SimpleNamespace(path='fast', log_every=steps, workers=0),
                                     torch.device('cpu'))
    weights = {'coarse6': coarse.coarse6[1].weight, 'coarse7': coarse.coarse7.weight}
    rows, val = [], []
    bar = cli.progress(total=steps, desc=variant.name, enabled=show)
    for step, (x, y, m) in enumerate(batches):
        if step == 0:   # before any update (the probe leaves the net as it was)
            probe = one_step_on_coarse7(coarse, x, y, m)
        before = {name: w.detach().clone() for name, w in weights.items()}
        target = safe_log(y, m)
        pred = coarse(x)
        loss = scale_invariant_loss(pred, target, m, TRAIN_LAMBDA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows.append({'samples': (step + 1) * batch, 'loss': float(loss.detach()),
                     'mean_error': float((pred.detach() - target)[m].mean()),
                     **{name: relative_update(w.detach(), before[name]) for name, w in weights.items()}})
        if (step + 1) * batch % val_every == 0 or step + 1 == steps:
            v = train.validate(coarse, None, val_frames, torch.device('cpu'), batch, TRAIN_LAMBDA, 1.0)
            val.append((rows[-1]['samples'], v['si_log']))
        bar.update(1)
    bar.close()
    return {'rows': rows, 'val': val, 'conv_weights': conv_weights, 'one_step': probe}


def one_step_on_coarse7(coarse, x, y, m):
    """The batch's mean log error before and after one plain SGD step (no momentum) on coarse7
    alone at its paper rate, the net in eval mode (no dropout): the fraction of the error that
    one step removes. Near 1 (or above): the rate cancels the whole error at once and momentum
    makes it ring. The net is left as it was."""
    saved = copy.deepcopy(coarse.coarse7.state_dict())
    mode = coarse.training
    coarse.eval()
    target = safe_log(y, m)
    pred = coarse(x)
    before = float((pred.detach() - target)[m].mean())
    grads = torch.autograd.grad(scale_invariant_loss(pred, target, m, TRAIN_LAMBDA),
                                list(coarse.coarse7.parameters()))
    with torch.no_grad():
        for p, g in zip(coarse.coarse7.parameters(), grads):
            p -= coarse.variant.lr['coarse7'] * g
        after = float((coarse(x) - target)[m].mean())
    coarse.coarse7.load_state_dict(saved)
    coarse.train(mode)
    return (before - after) / before


def summary(name, variant, result):
    """One table line: parametrisation, the loss and |mean error| early and late, the median
    relative update of coarse6 / coarse7 over the last half, the final validation sc-inv."""
    rows = result['rows']
    half = rows[len(rows) // 2:]
    tenth = max(1, len(rows) // 10)
    med = lambda key, rs: float(np.median([r[key] for r in rs]))
    return (f"| {name} | {variant.feature_scale:.3g} | {variant.log_depth_std:.3f} | {result['conv_weights']} "
            f"| {med('loss', rows[:tenth]):.3f} -> {med('loss', rows[-tenth:]):.3f} "
            f"| {float(np.median([abs(r['mean_error']) for r in rows[-tenth:]])):.3f} "
            f"| {med('coarse6', half):.1e} | {med('coarse7', half):.1e} "
            f"| {result['val'][-1][1]:.3f} | {result['one_step']:.2g} |")


def plot(results, path):
    plt = util._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, result in results.items():
        s = [r['samples'] for r in result['rows']]
        loss = np.convolve([r['loss'] for r in result['rows']], np.ones(SMOOTH) / SMOOTH, 'valid')
        line, = axes[0].plot(s[SMOOTH - 1:], loss, lw=1, label=name)
        axes[0].plot(*zip(*[(v[0], v[1] ** 2) for v in result['val']]), 'o--', color=line.get_color(), ms=3)
        axes[1].semilogy(s, [r['coarse6'] for r in result['rows']], lw=0.8, color=line.get_color())
        axes[2].semilogy(s, [r['coarse7'] for r in result['rows']], lw=0.8, color=line.get_color())
    axes[0].set_title(f'training loss (Eq. 4, mean of {SMOOTH} steps); dots: val. sc-inv$^2$')
    axes[1].set_title('coarse6: |update| / |weights| per step')
    axes[2].set_title('coarse7: |update| / |weights| per step')
    for ax in axes:
        ax.set_xlabel('training samples')
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', nargs='+', choices=list(RUNS), default=list(RUNS),
                   help='(default: all)')
    p.add_argument('--samples', type=int, default=4000, help='per run (default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=train.BATCH_SIZE, help='(default: %(default)s, the paper)')
    p.add_argument('--val-every', type=int, default=800, help='samples (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    p.add_argument('--plot', default=os.path.join('model', 'lr_study.png'),
                   help='(default: %(default)s)')
    args = p.parse_args(argv)
    if args.samples < args.batch_size or args.batch_size <= 0 or args.val_every <= 0:
        p.error('--samples must be at least --batch-size, both and --val-every positive')
    mat, splits = train.demo_paths()
    arrays = util.read_nyu_labeled(mat, progress=False)
    train_idx, _ = util.read_splits(splits, len(arrays['images']))
    train_idx, val_idx = util.split_train_val(train_idx, arrays['scenes'], 0.15, args.seed)
    frames = [util.Frames(arrays['images'][i], arrays['depths'][i]) for i in (train_idx, val_idx)]
    print(f'{mat}: {len(train_idx)} training frames, {len(val_idx)} validation frames of held-out '
          f'rooms; {args.samples} samples a run, batch {args.batch_size}')
    results = {}
    for name in args.runs:
        t0 = time.perf_counter()
        results[name] = study(RUNS[name], *frames, args.samples, args.batch_size, args.val_every,
                              args.seed, show=True)
        print(f'{name}: {time.perf_counter() - t0:.0f} s')
    print('| run | feature scale | log depth std | coarse1-5 | loss, first -> last tenth '
          '| abs(mean log error), last tenth | coarse6 update | coarse7 update | val sc-inv '
          '| one coarse7 step removes |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for name, result in results.items():
        print(summary(name, RUNS[name], result))
    os.makedirs(os.path.dirname(args.plot) or '.', exist_ok=True)
    plot(results, args.plot)
    with open(os.path.splitext(args.plot)[0] + '.json', 'w') as f:
        json.dump(results, f)
    print(f'plot: {args.plot}; every step in {os.path.splitext(args.plot)[0]}.json')
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
