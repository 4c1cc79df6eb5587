"""How the paper's learning rates act on each variant (docs/learning_rates.md).

The paper's per-layer rates (Sec. 3.3: 0.001 for coarse1-5, 0.1 for coarse6 and coarse7) were
tuned by the authors for their own parametrisation. This script trains the coarse net of each
variant on the demo's synthetic rooms with train.py's own step (train.train_step: its loss units,
the paper's rates, momentum 0.9) at the paper's batch of 32, and records at every step the training loss (Eq. 4), the batch's mean log error
(prediction - target, over valid pixels) and the size of the coarse6 and coarse7 weight updates
relative to the weights; every --val-every samples the sc-inv error on held-out rooms. It prints a
table and draws one plot (docs/learning_rates.md's figures), then the rate tables of --rates.

    python lr_study.py                            # docs/learning_rates.md's figures (~55 min on 2 CPU cores)
    python lr_study.py --samples 320 --runs paper # a quick look
    python lr_study.py --rates                    # the two rate tables alone (about a minute)
    python lr_study.py --fine --coarse model/coarse.pth   # the demo's fine stage (~30 min)

--rates: the effective per-layer rates of the step in plain units (outputs in log metres,
features unscaled), measured by gradient (effective_rates); and for every tensor, biases
included, how far one step at the paper's rate moves the output against the same step in the same
net written in the authors' units (authors_ratios; 1: the authors' step).

--fine: the demo's fine stage (train.py --demo's data, batches, start and coarse net; its own
model/coarse.pth with --coarse, else trained here as the demo trains it) at the paper's rates for
--longer x its samples, then with each fine layer's rate / 10 in turn; every 2 steps the
validation frames and as many training frames scored (the loss, sc-inv, the prediction's log
scale and how far it moved). A table by ranges of the demo's fine samples and
model/fine_stage.png (+ .json; docs/fine_stage.png is its figure): docs/fine_stage.md (32
minutes on 2 shared CPU cores).

The runs: each variant as train.py builds it (coarse1-5 in the authors' units: 0..255 inputs,
features x 0.01); '*-std-units', the paper and alexnet variants as they were before (coarse input
divided by its std, features x 0.01 x that std: the same net, but each coarse1-5 bias stepping
std^2 times as far); 'paper-unscaled', the paper variant without the release's factors (std units, features and
targets unscaled); '*-release-factors', the release's factors taken as they are (features x 0.01,
targets / 0.457) on inputs divided by their std; 'alexnet-features-x0.44', std units with the
feature scale at which the alexnet variant's first coarse7 step was the paper variant's (a step's
share scales with the square of the features: 0.576 x sqrt(5.5% / 9.4%)).
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch

import cli
import data
import net
import runtime
import train
import util
from loss import TRAIN_LAMBDA, safe_log, scale_invariant_error, scale_invariant_loss
from net import ALEXNET, PAPER, RELEASE, GlobalCoarseNet, LocalFineNet


def scaled(variant, name, **scaling):
    return dataclasses.replace(variant, name=name, **scaling)


def mean_std(std):
    """One number for a coarse_std: a per-channel std's mean."""
    return sum(std) / len(std) if isinstance(std, tuple) else std


def std_units(variant, name, std, **scaling):
    """The variant with its coarse input divided by its std (coarse1-5 in units of the std, not
    the authors'), the features x 0.01 x std unless said otherwise: the same net at the start
    (zero biases), other steps on coarse1-5's biases."""
    return scaled(variant, name, coarse_std=std,
                  **{'feature_scale': 0.01 * mean_std(std), **scaling})


RUNS = {
    'paper': PAPER,
    'paper-std-units': std_units(PAPER, 'paper-std-units', net.IMAGES_STD),
    'paper-unscaled': std_units(PAPER, 'paper-unscaled', net.IMAGES_STD, feature_scale=1.0,
                                log_depth_std=1.0),
    'paper-release-factors': std_units(PAPER, 'paper-release-factors', net.IMAGES_STD, feature_scale=0.01),
    'release': RELEASE,
    'alexnet': ALEXNET,
    'alexnet-std-units': std_units(ALEXNET, 'alexnet-std-units', net.IMAGENET_STD),
    'alexnet-release-factors': std_units(ALEXNET, 'alexnet-release-factors', net.IMAGENET_STD,
                                         feature_scale=0.01),
    'alexnet-features-x0.44': std_units(ALEXNET, 'alexnet-features-x0.44', net.IMAGENET_STD,
                                        feature_scale=0.44),
}
SMOOTH = 10   # steps averaged in the plotted training loss (one batch is noisy)


def relative_update(after, before):
    return float((after - before).norm() / before.norm())


def study(variant, train_frames, val_frames, samples, batch, val_every, seed, show):
    """Coarse training of `variant` for `samples` samples with train.py's own step (train_step:
    its loss units, per-layer rates, momentum): one row a step, val rows apart. Returns the rows,
    the validation points, the one-step probe and the trained net."""
    torch.manual_seed(seed)
    coarse = GlobalCoarseNet(variant)
    conv_weights = 'random'
    if variant.coarse_convs == 'alexnet' and os.path.isfile(net.imagenet_weights()[1]):
        # only from the cache: this script never downloads; the biases in the variant's units
        net.load_imagenet_convs(coarse)
        conv_weights = 'ImageNet'
    optimizer = train.make_optimizer(coarse, variant)
    steps = samples // batch
    order = util.SampleOrder(len(train_frames), seed)
    batches = data.training_batches(train_frames, order, 0, steps, batch,
                                     SimpleNamespace(path='fast', log_every=steps, workers=0),
                                     torch.device('cpu'))
    weights = {'coarse6': coarse.coarse6[1].weight, 'coarse7': coarse.coarse7.weight}
    seen = {}   # the prediction of the step's forward pass, for the mean error
    hook = coarse.register_forward_hook(lambda module, inputs, out: seen.update(pred=out.detach()))
    rows, val = [], []
    bar = cli.progress(total=steps, desc=variant.name, enabled=show)
    for step, (x, y, m) in enumerate(batches):
        if step == 0:   # before any update (the probe leaves the net as it was)
            probe = one_step_on_coarse7(coarse, x, y, m)
        before = {name: w.detach().clone() for name, w in weights.items()}
        loss = train.train_step(coarse, None, optimizer, (x, y, m), TRAIN_LAMBDA, variant)
        rows.append({'samples': (step + 1) * batch, 'loss': float(loss),
                     'mean_error': float((seen['pred'] - safe_log(y, m))[m].mean()),
                     **{name: relative_update(w.detach(), before[name]) for name, w in weights.items()}})
        if (step + 1) * batch % val_every == 0 or step + 1 == steps:
            v = train.validate(coarse, val_frames, torch.device('cpu'), batch, TRAIN_LAMBDA)
            val.append((rows[-1]['samples'], v['si_log']))
        bar.update(1)
    bar.close()
    hook.remove()
    return {'rows': rows, 'val': val, 'conv_weights': conv_weights, 'one_step': probe, 'net': coarse}


def one_step_on_coarse7(coarse, x, y, m):
    """The batch's mean log error before and after one step of train.py's train_step on coarse7
    alone at its paper rate (every other layer's rate 0; a first step of SGD with momentum is a
    plain one: the momentum buffer starts as the gradient), the net in eval mode (no dropout): the
    fraction of the error that one step removes. The net is left as it was."""
    saved = copy.deepcopy(coarse.state_dict())
    mode = coarse.training
    coarse.eval()
    optimizer = train.make_optimizer(coarse, coarse.variant)
    for group in optimizer.param_groups:
        if group['layer'] != 'coarse7':
            group['lr'] = 0.0
    target = safe_log(y, m)
    with torch.no_grad():
        before = float((coarse(x) - target)[m].mean())
    train.train_step(coarse, None, optimizer, (x, y, m), TRAIN_LAMBDA, coarse.variant)
    with torch.no_grad():
        after = float((coarse(x) - target)[m].mean())
    coarse.load_state_dict(saved)
    coarse.train(mode)
    return (before - after) / before


def plain_state(net):
    """The weights of `net` for the same net in plain units (plain_variant): each tensor times the
    factor c with which it enters in our units. coarse6's weight sees features x feature_scale;
    coarse7 and fine3 produce log depth / log_depth_std; fine2's input channel 0 is the coarse
    map / log_depth_std."""
    v, state = net.variant, {k: t.clone() for k, t in net.state_dict().items()}
    for key in list(state):
        if key == 'coarse6.1.weight':
            state[key] *= v.feature_scale
        elif key.split('.')[0] in ('coarse7', 'fine3'):
            state[key] *= v.log_depth_std
        elif key == 'fine2.0.weight':
            state[key][:, 0] /= v.log_depth_std
    return state


def plain_variant(variant):
    return dataclasses.replace(variant, name=variant.name + '-plain', feature_scale=1.0,
                               log_depth_std=1.0)


def effective_rates(variant, seed=0):
    """The per-layer rates of train.py's step in plain units (outputs in log metres, coarse5's
    features unscaled), measured by gradient: one train_step (its first step, so the update is
    -rate x gradient; weight decay set to 0 for the measurement) on a random batch, the update
    carried into plain units (x c, plain_state), divided by the plain net's gradient of Eq. 4.
    Returns {(layer, part): rate}; part 'weight', 'bias', or for fine2 'coarse-map input' /
    'other inputs'."""
    torch.manual_seed(seed)
    # float64: the two parametrisations round differently, and a rate is a ratio of small numbers;
    # the fine net starts random (pass-through's zero fine3 weights would give fine1 no gradient)
    ours = {'coarse': GlobalCoarseNet(variant).double().eval(),
            'fine': LocalFineNet(variant, pass_through=False).double().eval()}
    plain = {k: type(n)(plain_variant(variant)).double().eval() for k, n in ours.items()}
    for k in ours:
        plain[k].load_state_dict(plain_state(ours[k]))
    x = torch.rand(4, 3, *net.INPUT_HW, dtype=torch.float64) * 255
    y = torch.exp(0.8 + 0.4 * torch.randn(4, 1, *net.OUTPUT_HW, dtype=torch.float64))
    m = torch.ones_like(y, dtype=torch.bool)
    with torch.no_grad():   # the mapping is exact: both nets predict the same
        assert torch.allclose(plain['fine'](x, plain['coarse'](x)), ours['fine'](x, ours['coarse'](x)),
                              atol=1e-9)
    rates = {}
    for stage in ('fine', 'coarse'):   # the fine stage first: it leaves the coarse net as it is
        fixed = None if stage == 'coarse' else ours['coarse']
        before = plain_state(ours[stage])
        optimizer = train.make_optimizer(ours[stage], variant)
        for group in optimizer.param_groups:
            group['weight_decay'] = 0.0
        train.train_step(ours[stage], fixed, optimizer, (x, y, m), TRAIN_LAMBDA, variant)
        after = plain_state(ours[stage])
        plain_loss = train.forward_loss(plain[stage], None if stage == 'coarse' else plain['coarse'],
                                        x, y, m, TRAIN_LAMBDA)
        names = [n for n, _ in plain[stage].named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(plain_loss, list(plain[stage].parameters()))))
        for name, grad in grads.items():
            layer, kind = name.split('.')[0], name.split('.')[-1]
            step = before[name] - after[name]
            parts = {kind: (step, grad)}
            if name == 'fine2.0.weight':
                parts = {'coarse-map input': (step[:, :1], grad[:, :1]),
                         'other inputs': (step[:, 1:], grad[:, 1:])}
            for part, (s, g) in parts.items():
                rates[(layer, part)] = float(s.norm() / g.norm())
    return rates


def effective_rate_table(variants=(PAPER, RELEASE, ALEXNET)):
    """docs/learning_rates.md's table: per layer, the paper's rate and the effective rate of each variant in
    plain units (x the paper's rate)."""
    measured = {v.name: effective_rates(v) for v in variants}
    lines = ['| layer | tensor | paper\'s rate | ' + ' | '.join(measured) + ' |',
             '|---|---|---|' + '---|' * len(measured)]
    for layer, part in sorted(measured[variants[0].name], key=lambda k: (k[0][0] == 'f', k[0])):
        rate = PAPER.lr[layer]
        cells = [f'{m[(layer, part)]:.3g} (x{m[(layer, part)] / rate:.3g})' for m in measured.values()]
        lines.append(f'| {layer} | {part} | {rate:g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def authors_variant(variant):
    """The same nets in the authors' units ([R]): coarse1 sees pixel values in 0..255 units less a
    mean, coarse5's features are x 0.01 before coarse6, the fine net sees (x - 109.31) / 76.18 and
    the outputs are in units of log depth's std (0.457). Returns (variant, k): our coarse1-5
    activations x k are the authors' (k = feature_scale / 0.01: ReLU convs and max pools scale
    with their input), so the authors' net is ours with its coarse input divided by coarse_std / k
    and its coarse1-5 biases x k (net.from_std_units); k = 1 for a variant in the authors' units."""
    if variant.log_depth_std != RELEASE.log_depth_std:
        raise ValueError(f'{variant.name}: outputs not in units of log depth / 0.457')
    k = variant.feature_scale / RELEASE.feature_scale
    std = variant.coarse_std
    std = tuple(s / k for s in std) if isinstance(std, tuple) else std / k
    return dataclasses.replace(variant, name=variant.name + '-authors', coarse_std=std,
                               feature_scale=RELEASE.feature_scale, fine_mean=net.IMAGES_MEAN,
                               fine_std=net.IMAGES_STD), k



# The smallest input that every variant's nets take (coarse5 1x1, output 15x15): a step's ratio
# between two units is one of units, not of sizes, and float64 steps on it take seconds.
SMALL = net.Geometry('small', frame_hw=(68, 68), input_hw=(68, 68), output_hw=(15, 15))


def authors_ratios(variant, seed=0, geometry=SMALL):
    """For every tensor: one step of train.py's step (train_step, the optimizer of make_optimizer:
    the layer's paper rate, momentum's first step; weight decay 0 for the measurement) on that
    tensor alone, in our net and in the same net in the authors' units (authors_variant); returns
    {(layer, tensor): (|change of our output| / |change of theirs|, |their difference| / |change
    of theirs|)}, the coarse net's output for coarse1-7, the fine net's for fine1-3. (1, ~0): the
    step the authors' rates made. tests/test_authors_step.py pins it against a net written out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny float64 tensors: more threads only wait on each other
    try:
        return _authors_ratios(variant, seed, geometry)
    finally:
        torch.set_num_threads(threads)


def _authors_ratios(variant, seed, geometry):
    torch.manual_seed(seed)
    theirs_variant, k = authors_variant(variant)
    nets = {}
    for name, v in (('ours', variant), ('theirs', theirs_variant)):
        torch.manual_seed(seed)
        nets[name] = {'coarse': GlobalCoarseNet(v, geometry).double().eval(),
                      'fine': LocalFineNet(v, pass_through=False, geometry=geometry).double().eval()}
    with torch.no_grad():   # nonzero biases everywhere, so that their units matter
        for stage_net in nets['ours'].values():
            for p in (p for n, p in stage_net.named_parameters() if n.endswith('bias')):
                p.copy_(0.1 * torch.randn_like(p))
    for stage in ('coarse', 'fine'):
        state = nets['ours'][stage].state_dict()
        nets['theirs'][stage].load_state_dict(net.from_std_units(state, k) if stage == 'coarse' else state)
    x = torch.rand(2, 3, *geometry.input_hw, dtype=torch.float64) * 255
    y = torch.exp(0.8 + 0.4 * torch.randn(2, 1, *geometry.output_hw, dtype=torch.float64))
    m = torch.ones_like(y, dtype=torch.bool)

    coarse_maps = {}   # the fixed coarse net's output, the fine net's input

    def output(name, stage):
        with torch.no_grad():
            if stage == 'coarse':
                return nets[name]['coarse'](x)
            if name not in coarse_maps:
                coarse_maps[name] = nets[name]['coarse'](x)
            return nets[name]['fine'](x, coarse_maps[name])

    ratios = {}
    for stage in ('coarse', 'fine'):   # the fine stage's coarse net is fixed: coarse last
        before = {name: output(name, stage) for name in nets}
        # the same function (to the float32 input statistics): the one a step changes
        torch.testing.assert_close(before['ours'], before['theirs'], rtol=1e-6, atol=1e-6)
        for tensor in [n for n, _ in nets['ours'][stage].named_parameters()]:
            change = {}
            for name, v in (('ours', variant), ('theirs', theirs_variant)):
                trained = nets[name][stage]
                saved = {n: p.detach().clone() for n, p in trained.named_parameters()}
                for n, p in trained.named_parameters():
                    p.requires_grad_(n == tensor)
                optimizer = train.make_optimizer(trained, v)
                for group in optimizer.param_groups:
                    group['weight_decay'] = 0.0
                fixed = None if stage == 'coarse' else (lambda images, c=coarse_maps[name]: c)
                train.train_step(trained, fixed, optimizer, (x, y, m), TRAIN_LAMBDA, v)
                change[name] = output(name, stage) - before[name]
                with torch.no_grad():
                    for n, p in trained.named_parameters():
                        p.copy_(saved[n])
                        p.requires_grad_(True)
            ratio = float(change['ours'].norm() / change['theirs'].norm())
            differs = float((change['ours'] - change['theirs']).norm() / change['theirs'].norm())
            ratios[(tensor.split('.')[0], tensor.split('.')[-1])] = (ratio, differs)
    return ratios


def authors_ratio_table(variants=(PAPER, RUNS['paper-std-units'], RELEASE, ALEXNET,
                                   RUNS['alexnet-std-units'])):
    """Per tensor, the change of the output that one step at the paper's rate makes in each
    variant, over the change it makes in the same net in the authors' units (authors_ratios)."""
    measured = {v.name: authors_ratios(v) for v in variants}
    lines = ['| layer | tensor | paper\'s rate | ' + ' | '.join(measured) + ' |',
             '|---|---|---|' + '---|' * len(measured)]
    for layer, kind in measured[variants[0].name]:
        cells = [f'{m[(layer, kind)][0]:.4g}' for m in measured.values()]
        lines.append(f'| {layer} | {kind} | {PAPER.lr[layer]:g} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def summary(name, variant, result):
    """One table line: parametrisation (the coarse input's unit: 1 = 0..255, the authors'), the loss and |mean error| early and late, the median
    relative update of coarse6 / coarse7 over the last half, the final validation sc-inv."""
    rows = result['rows']
    half = rows[len(rows) // 2:]
    tenth = max(1, len(rows) // 10)
    med = lambda key, rs: float(np.median([r[key] for r in rs]))
    return (f"| {name} | {mean_std(variant.coarse_std):.3g} | {variant.feature_scale:.3g} | {variant.log_depth_std:.3f} | {result['conv_weights']} "
            f"| {med('loss', rows[:tenth]):.3f} -> {med('loss', rows[-tenth:]):.3f} "
            f"| {float(np.median([abs(r['mean_error']) for r in rows[-tenth:]])):.3f} "
            f"| {med('coarse6', half):.1e} | {med('coarse7', half):.1e} "
            f"| {result['val'][-1][1]:.3f} | {result['one_step']:.2g} |")


def smoothed(losses):
    """(step, mean of the SMOOTH steps up to it); a run of fewer than 2 x SMOOTH steps averages
    half its steps (rounded up), so that its curve still has points to join. The first step
    returned is the window."""
    window = min(SMOOTH, (len(losses) + 1) // 2)
    mean = np.convolve(losses, np.ones(window) / window, 'valid')
    return np.arange(window, len(losses) + 1), mean


def plot(results, path):
    plt = util._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, result in results.items():
        s = [r['samples'] for r in result['rows']]
        step, loss = smoothed([r['loss'] for r in result['rows']])
        window = step[0]   # the same in every run: each has as many steps
        line, = axes[0].plot([s[i - 1] for i in step], loss, lw=1, label=name)
        axes[0].plot(*zip(*[(v[0], v[1] ** 2) for v in result['val']]), 'o--', color=line.get_color(), ms=3)
        axes[1].semilogy(s, [r['coarse6'] for r in result['rows']], lw=0.8, color=line.get_color())
        axes[2].semilogy(s, [r['coarse7'] for r in result['rows']], lw=0.8, color=line.get_color())
    axes[0].set_title(f'training loss (Eq. 4, mean of {window} steps); dots: val. sc-inv$^2$')
    axes[1].set_title('coarse6: |update| / |weights| per step')
    axes[2].set_title('coarse7: |update| / |weights| per step')
    for ax in axes:
        ax.set_xlabel('training samples')
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def without_nets(runs):
    """The runs without their trained nets: what the JSON beside the plot holds."""
    return {name: {k: v for k, v in run.items() if k != 'net'} for name, run in runs.items()}


def save(draw, result, saved, path):
    """draw(result, path) draws the plot; `saved` (every step) goes into the JSON beside it.
    Returns the line that names both."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    draw(result, path)
    json_path = os.path.splitext(path)[0] + '.json'
    with open(json_path, 'w') as f:
        json.dump(saved, f)
    return f'plot: {path}; every step in {json_path}'


def print_rate_tables():
    print("The rates of train.py's step in plain units (outputs in log metres, coarse5 features "
          "unscaled):")
    print(effective_rate_table())
    print("\nOne step of each tensor at the paper's rate: the change of the output, over the change "
          "the same step makes in the same net in the authors' units (1: the authors' step):")
    print(authors_ratio_table())


# ----------------------------------------------------------------------------------------------
# The demo's fine stage (--fine): what loss_fine.png shows, and which layer's step makes it

FINE_LAYERS = ('fine1', 'fine2', 'fine3')
# training frames scored beside the validation frames (centre crop, as validation): as many as
# the demo validates on, so that both sets' changes compare
PROBE_FRAMES = 12


def fine_stage_calls(seed, fine_samples=None):
    """Every call of train.py and net.py the fine-stage study makes, in one place: the demo's
    options and data, its nets as train.main builds them, the optimizer, one training step (coarse
    or fine) and one validation. The rest of the study uses only these."""
    args = train.parse_args(['--demo', '--seed', str(seed), '--threads', '1']
                            + (['--fine-samples', str(fine_samples)] if fine_samples else []))
    cpu = torch.device('cpu')

    def setup(coarse_path):
        # train.main's order of the random streams: the seed, the data, the coarse net, the fine
        # net (its start: the pass-through), dropout's stream
        torch.manual_seed(seed)
        np.random.seed(seed)
        sets = data.load_data(args, cpu)
        coarse, fine = GlobalCoarseNet(PAPER), LocalFineNet(PAPER, pass_through=True)
        runtime.seed_streams(seed, 0, [])
        if coarse_path:
            net.load_weights(coarse, coarse_path, 'the coarse net')
        return sets, coarse, fine

    return SimpleNamespace(
        args=args, setup=setup,
        optimizer=lambda trained, variant: train.make_optimizer(trained, variant),
        # the fine step takes the fixed coarse net as any callable images -> coarse map
        step=lambda trained, fixed, opt, batch, variant: train.train_step(
            trained, fixed, opt, batch, args.lam, variant),
        validate=lambda coarse, fine, frames: train.validate(
            net.Chain({'coarse': coarse, 'fine': fine}), frames, cpu, args.batch_size, args.lam),
        refine=lambda fine, images, coarse_map: fine(images, coarse_map))


def fine_batches(calls, train_set, scenes, stage_seed, steps, geometry):
    """The demo's augmented batches of a stage, as train.train_stage draws them (a pure function of
    the seed and the step)."""
    a = calls.args
    order = util.SampleOrder(len(train_set), stage_seed, scenes, a.per_scene, geometry)
    return data.training_batches(train_set, order, 0, steps, a.batch_size, a, torch.device('cpu'))


def train_demo_coarse(calls, coarse, train_set, scenes, show):
    """The demo's coarse stage: train.py --demo's schedule, step and batches."""
    a = calls.args
    coarse.train()
    optimizer = calls.optimizer(coarse, PAPER)
    steps = math.ceil(a.coarse_samples / a.batch_size)
    bar = cli.progress(total=steps, desc='coarse', enabled=show)
    for batch in fine_batches(calls, train_set, scenes, a.seed, steps, coarse.geometry):
        calls.step(coarse, None, optimizer, batch, PAPER)
        bar.update(1)
    bar.close()


class Scored:
    """Frames scored at every validation of the fine stage (centre crop, as train.validate):
    their coarse map computed once (the coarse net is fixed), per frame the log error d."""

    def __init__(self, calls, coarse, frames):
        self.calls = calls
        x, y, m = util.center_crop(*frames.get(list(range(len(frames)))), coarse.geometry)
        with torch.no_grad():
            self.x, self.log_y, self.m, self.coarse_map = x, safe_log(y, m), m, coarse(x)
        self.last = None

    def score(self, fine):
        """Eq. 4 (the validation loss), sc-inv, the mean log error (the prediction's log scale)
        and the spread of Eq. 4 across frames; the RMS change of the prediction since the last
        call and its mean (the change of the log scale)."""
        mode = fine.training
        fine.eval()
        with torch.no_grad():
            pred = self.calls.refine(fine, self.x, self.coarse_map)
        fine.train(mode)
        per_frame = scale_invariant_loss(pred, self.log_y, self.m, TRAIN_LAMBDA, per_image=True)
        d = torch.where(self.m, pred - self.log_y, 0.0).flatten(1)
        n = self.m.flatten(1).sum(1)
        offset = d.sum(1) / n
        eq1 = scale_invariant_error(pred, self.log_y, self.m, per_image=True)
        out = {'loss': float(per_frame.mean()), 'sc_inv': float(eq1.mean().sqrt()),
               'offset': float(offset.mean()),
               'loss_sem': float(per_frame.std() / len(per_frame) ** 0.5)}
        if self.last is not None:
            change = (pred - self.last)[self.m]
            out['move'] = float(change.square().mean().sqrt())
            out['move_offset'] = float(change.mean())
        self.last = pred
        return out


def fine_run(calls, coarse, fine_start, variant, sets, steps, val_every, cached_maps, cache_steps,
             show):
    """The demo's fine stage of `variant` from `fine_start`: one row a step (training loss), every
    val_every steps the validation frames and the probe of training frames scored. cached_maps:
    the coarse map of each of the first cache_steps steps' batch (filled by the first run, reused
    by the next: every run draws the same batches)."""
    train_set, scenes, val, probe = sets
    fine = copy.deepcopy(fine_start).train()
    optimizer = calls.optimizer(fine, variant)
    scored = {'val': Scored(calls, coarse, val), 'probe': Scored(calls, coarse, probe)}
    points = [{'samples': 0, **{k: s.score(fine) for k, s in scored.items()}}]
    rows = []
    batch_size = calls.args.batch_size
    bar = cli.progress(total=steps, desc=variant.name, enabled=show)
    for step, batch in enumerate(fine_batches(calls, train_set, scenes, calls.args.seed + 1, steps,
                                              coarse.geometry)):
        if step == len(cached_maps) < cache_steps:
            with torch.no_grad():
                cached_maps.append(coarse(batch[0]))
        fixed = (lambda images, c=cached_maps[step]: c) if step < len(cached_maps) else coarse
        loss = calls.step(fine, fixed, optimizer, batch, variant)
        rows.append(float(loss))
        if (step + 1) % val_every == 0 or step + 1 == steps:
            points.append({'samples': (step + 1) * batch_size,
                           **{k: s.score(fine) for k, s in scored.items()}})
        bar.update(1)
    bar.close()
    return {'rows': rows, 'points': points, 'net': fine}


def fine_variant(layer):
    """The paper variant with `layer`'s rate / 10 (None: as it is)."""
    if layer is None:
        return PAPER
    return scaled(PAPER, f'{layer} / 10', lr={**PAPER.lr, layer: PAPER.lr[layer] / 10})


def fine_study(coarse_path, longer, val_every, probe_frames, fine_samples=None, show=True):
    """The demo's fine stage (train.py --demo: the paper variant, its data, schedule and batches)
    on one coarse net, the demo's own (coarse_path) or trained here as the demo trains it: the
    paper's rates for `longer` x the demo's fine samples (or fine_samples), then each fine layer's
    rate / 10 for those samples. Returns the runs, the coarse net's validation scores, and
    validation's check (train.validate twice on the final nets against the study's own
    scoring)."""
    calls = fine_stage_calls(seed=0, fine_samples=fine_samples)
    (train_set, val, scenes), coarse, fine_start = calls.setup(coarse_path)
    if not coarse_path:
        train_demo_coarse(calls, coarse, train_set, scenes, show)
    coarse.eval()   # the paper variant's fine stage: the coarse net fixed, without dropout
    coarse.requires_grad_(False)
    probe = util.Frames.from_tensors(*(t[util.spread(np.arange(len(train_set)), probe_frames)]
                                       for t in (train_set.images, train_set.depths)))
    sets = (train_set, scenes, val, probe)
    steps = math.ceil(calls.args.fine_samples / calls.args.batch_size)
    maps, runs = [], {}
    for layer in (None, *FINE_LAYERS):
        variant = fine_variant(layer)
        t0 = time.perf_counter()
        runs[variant.name] = fine_run(calls, coarse, fine_start, variant, sets,
                                      steps * (longer if layer is None else 1), val_every, maps,
                                      steps, show)
        runs[variant.name]['seconds'] = time.perf_counter() - t0
    check = {}
    for name, run in runs.items():
        twice = [calls.validate(coarse, run['net'], val)['loss'] for _ in range(2)]
        check[name] = (twice[0], twice[1], run['points'][-1]['val']['loss'])
    return {'runs': runs, 'coarse': calls.validate(coarse, None, val), 'check': check,
            'steps': steps, 'frames': (len(train_set), len(val), probe_frames),
            'batch': calls.args.batch_size, 'val_every': val_every}


def fine_summary(name, samples, points, rows):
    """One table line: a run's validations (points) and training losses (rows) in one range of
    fine samples (first, last)."""
    val = np.array([p['val']['loss'] for p in points])
    jumps = np.abs(np.diff(val))   # between the range's validations
    moves = [p['val']['move'] for p in points]
    common = [abs(p['val']['move_offset']) for p in points]
    return (f"| {name} | {samples[0]:,}-{samples[1]:,} "
            f"| {val.mean():.4f} ({val.std():.4f}) | {val.min():.3f} - {val.max():.3f} "
            f"| {f'{np.median(jumps):.3f} ({jumps.max():.3f})' if len(jumps) else '-'} "
            f"| {np.mean([p['val']['sc_inv'] for p in points]):.3f} "
            f"| {np.std([p['val']['offset'] for p in points]):.3f} "
            f"| {np.median(moves):.3f} ({np.median(common):.3f}) "
            f"| {np.std([p['probe']['loss'] for p in points]):.4f} "
            f"| {np.mean(rows):.3f} "
            f"| {val[-1]:.4f} ({points[-1]['val']['sc_inv']:.3f}) |")


def fine_table(result):
    """docs/fine_stage.md's table: the coarse net alone, then each run by ranges of the demo's
    fine samples, over the validations in each range (an sd divides by their number)."""
    steps, batch = result['steps'], result['batch']
    runs = result['runs']
    # the runs' first scoring, before any step: the pass-through fine net gives the coarse map
    start = next(iter(runs.values()))['points'][0]['val']
    lines = ['| run | fine samples | val loss (Eq. 4), mean (sd) | val loss, min - max '
             '| val loss change between validations, median (largest) | val sc-inv, mean '
             '| val mean log error, sd '
             f"| RMS move of the val prediction per {result['val_every']} steps (its mean part) "
             f"| {result['frames'][2]} training frames' loss, sd | training loss, mean "
             '| val loss, last (sc-inv) |',
             '|---|---|---|---|---|---|---|---|---|---|---|',
             f"| coarse net alone | - | {result['coarse']['loss']:.4f} | - | - "
             f"| {result['coarse']['si_log']:.3f} | ({start['offset']:.3f}) | - | - | - | - |"]
    for first in range(0, max(len(run['rows']) for run in runs.values()), steps):
        for name, run in runs.items():
            last = min(first + steps, len(run['rows']))
            points = [p for p in run['points'] if first * batch < p['samples'] <= last * batch]
            if points:   # none past the run's end, or with --fine-val-every above the demo's steps
                lines.append(fine_summary(name, (first * batch + 1, last * batch), points,
                                          run['rows'][first:last]))
    return '\n'.join(lines)


def plot_fine(result, path):
    plt = util._pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (a_val, a_train), (a_long, a_offset) = axes
    steps, batch = result['steps'], result['batch']
    coarse_loss = result['coarse']['loss']
    for name, run in result['runs'].items():
        points = [p for p in run['points'] if p['samples'] <= steps * batch]
        s = [p['samples'] for p in points]
        line, = a_val.plot(s, [p['val']['loss'] for p in points], '.-', lw=0.8, ms=3, label=name)
        a_offset.plot(s, [p['val']['offset'] for p in points], '.-', lw=0.8, ms=3,
                      color=line.get_color())
        step, loss = smoothed(run['rows'][:steps])
        a_train.plot(step * batch, loss, lw=1, color=line.get_color())
        window = step[0]   # the same in every run: each is cut to `steps`
    long_name, long_run = next(iter(result['runs'].items()))
    s = [p['samples'] for p in long_run['points']]
    a_long.plot(s, [p['val']['loss'] for p in long_run['points']], '.-', lw=0.8, ms=3,
                label='validation frames')
    a_long.plot(s, [p['probe']['loss'] for p in long_run['points']], '.-', lw=0.8, ms=3,
                label=f"{result['frames'][2]} training frames, centre crop")
    step, loss = smoothed(long_run['rows'])
    a_long.plot(step * batch, loss, lw=1, label=f'training loss (mean of {step[0]} steps)')
    for ax in (a_val, a_long):
        ax.axhline(coarse_loss, color='k', ls='--', lw=0.8, label='coarse net alone (val)')
    a_val.set_title("validation loss (Eq. 4) at every validation; dashed: the coarse net alone")
    a_train.set_title(f'training loss (Eq. 4, mean of {window} steps)')
    a_long.set_title(f"{long_name}: {len(long_run['rows']) * batch:,} fine samples "
                     f"({len(long_run['rows']) * batch // (steps * batch)}x the demo's)")
    a_offset.set_title('validation: mean log error (prediction - target), the log scale')
    for ax in axes.flat:
        ax.set_xlabel('fine-stage training samples')
        ax.grid(alpha=0.3)
    a_val.legend(fontsize=8)
    a_long.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report_fine(args):
    t0 = time.perf_counter()
    result = fine_study(args.coarse, args.longer, args.fine_val_every, args.probe_frames,
                        args.fine_samples)
    n_train, n_val, n_probe = result['frames']
    print(f"the demo's fine stage: {n_train} training frames, {n_val} validation frames, "
          f"{result['steps']} steps of {result['batch']} "
          f"({result['steps'] * result['batch']} samples), "
          f"scored every {args.fine_val_every} steps on the validation frames and on {n_probe} "
          f"training frames (centre crop)")
    print(fine_table(result))
    for name, (first, second, own) in result['check'].items():
        print(f'{name}: train.validate on the final nets twice: {first:.6f}, {second:.6f}; '
              f'the study\'s scoring: {own:.6f}')
    for name, run in result['runs'].items():
        print(f"{name}: {run['seconds']:.0f} s")
    saved = {'runs': without_nets(result['runs']),
             **{k: v for k, v in result.items() if k != 'runs'}}
    print(f'{save(plot_fine, result, saved, args.plot)}; {time.perf_counter() - t0:.0f} s in all')


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', nargs='+', choices=list(RUNS), default=list(RUNS),
                   help='(default: all)')
    p.add_argument('--samples', type=int, default=4000, help='per run (default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=train.BATCH_SIZE, help='(default: %(default)s, the paper)')
    p.add_argument('--val-every', type=int, default=800, help='samples (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    p.add_argument('--plot', default=os.path.join('model', 'lr_study.png'),
                   help='(default: %(default)s)')
    p.add_argument('--rates', action='store_true',
                   help="print only the rate tables: plain units, and against the authors' "
                        "units for every tensor (about a minute)")
    f = p.add_argument_group('the fine stage (--fine)')
    f.add_argument('--fine', action='store_true',
                   help="the demo's fine stage (train.py --demo): the paper's rates for --longer x "
                        "its fine samples, then each fine layer's rate / 10; a table and the plot "
                        "(--plot, default model/fine_stage.png; docs/fine_stage.png is its figure)")
    f.add_argument('--coarse', metavar='PATH',
                   help="the demo's coarse net (model/coarse.pth of train.py --demo) instead of "
                        'training it here as the demo does')
    f.add_argument('--fine-samples', type=cli.whole(1),
                   help=f"(default: the demo's, {train.DEMO_FINE_SAMPLES})")
    f.add_argument('--longer', type=cli.whole(1), default=4,
                   help="the paper's rates run for this many times the demo's fine samples "
                        '(default: %(default)s)')
    f.add_argument('--fine-val-every', type=cli.whole(1), default=2, metavar='STEPS',
                   help="steps between scorings (default: %(default)s, the demo's validation)")
    f.add_argument('--probe-frames', type=cli.whole(1), default=PROBE_FRAMES,
                   help='training frames scored beside the validation frames '
                        '(default: %(default)s)')
    args = p.parse_args(argv)
    if args.rates:
        print_rate_tables()
        return 0
    if args.fine:
        torch.set_num_threads(1)
        if args.plot == p.get_default('plot'):
            args.plot = os.path.join('model', 'fine_stage.png')
        report_fine(args)
        return 0
    if args.samples < args.batch_size or args.batch_size <= 0 or args.val_every <= 0:
        p.error('--samples must be at least --batch-size, both and --val-every positive')
    mat, splits = data.demo_paths()
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
    print('| run | coarse input / | feature scale | log depth std | coarse1-5 | loss, first -> last tenth '
          '| abs(mean log error), last tenth | coarse6 update | coarse7 update | val sc-inv '
          '| one coarse7 step removes |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for name, result in results.items():
        print(summary(name, RUNS[name], result))
    print()
    print_rate_tables()
    print(save(plot, results, without_nets(results), args.plot))
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
