"""Every tensor's SGD step at the paper's rate is the step the authors made
(docs/learning_rates.md). The paper's rates (Sec. 3.3) were tuned in the authors' parametrisation, which their
release shows: coarse1 sees pixel values in 0..255 units less a mean (`x - 128`), coarse5's features
are x 0.01 before coarse6, fine1 sees (x - 109.31) / 76.18, the outputs and the targets are log
depth / 0.457, SGD with momentum 0.9. That net is written out here, apart from net.py. For each
tensor of our nets, train.py's own step (make_optimizer's groups, train_step) at the layer's rate
on that tensor alone, and the plain SGD step of the same rate on the same tensor of the authors'
net (with the variant's weight decay on a weight: none in the paper's, depth.conf's in the
release's), must change the output alike (to 1e-6). Float64, on the smallest input the nets take (68x68:
coarse5 1x1, output 15x15): a ratio of steps is one of units, not of sizes."""

import pytest
import torch
import torch.nn.functional as F

import train
from net import PAPER, RELEASE, Geometry, GlobalCoarseNet, LocalFineNet

TINY = Geometry('tiny', frame_hw=(68, 68), input_hw=(68, 68), output_hw=(15, 15))
# Sec. 3.3
RATES = {**{f'coarse{i}': 0.001 for i in range(1, 6)}, 'coarse6': 0.1, 'coarse7': 0.1,
         'fine1': 0.001, 'fine2': 0.01, 'fine3': 0.001}
# weight decay: [P] states none; [R] depth.conf's weight_decay_w, on the weights alone
DECAY = {'paper': dict.fromkeys(RATES, 0.0),
         'release': {**{f'coarse{i}': 5e-4 for i in range(1, 6)},
                     **dict.fromkeys(('coarse6', 'coarse7', 'fine1', 'fine2', 'fine3'), 1e-4)}}
# [R]: define_meta's statistics
IMAGES_MEAN, IMAGES_STD, LOGDEPTHS_STD = 109.31410628, 76.18328376, 0.45723134
# the coarse input's mean: the release's 128; the paper variant's, the images' mean
COARSE_MEAN = {'paper': IMAGES_MEAN, 'release': 128.0}


def authors_outputs(p, x, variant):
    """The authors' nets on images x (0..255) with parameters p (our state_dict's names, in their
    units): (coarse output, fine output), both in units of log depth / 0.457. variant only says
    which architecture: Fig. 1's 2x2 pools, or the release's 3x3/2 pools with LRN and 64 fine1
    filters whose channel 0 the coarse map replaces."""
    release = variant.pool == 'release'
    pool = (lambda h: F.max_pool2d(h, 3, 2, ceil_mode=True)) if release else (lambda h: F.max_pool2d(h, 2))
    norm = (lambda h: F.local_response_norm(h, 5, alpha=1e-4, beta=0.75, k=2.0)) if release else (lambda h: h)
    h = x - COARSE_MEAN[variant.name]   # 0..255 units
    h = norm(pool(F.relu(F.conv2d(h, p['coarse1.0.weight'], p['coarse1.0.bias'], stride=4))))
    h = norm(pool(F.relu(F.conv2d(h, p['coarse2.0.weight'], p['coarse2.0.bias'], padding=2))))
    h = F.relu(F.conv2d(h, p['coarse3.0.weight'], p['coarse3.0.bias'], padding=1))
    h = F.relu(F.conv2d(h, p['coarse4.0.weight'], p['coarse4.0.bias'], padding=1))
    h = F.relu(F.conv2d(h, p['coarse5.0.weight'], p['coarse5.0.bias'], padding=1))
    h = F.max_pool2d(h, 3, 2, ceil_mode=release)
    h = F.relu(F.linear(0.01 * h.flatten(1), p['coarse6.1.weight'], p['coarse6.1.bias']))
    coarse = F.linear(h, p['coarse7.weight'], p['coarse7.bias']).view(-1, 1, *TINY.output_hw)
    f = pool(F.relu(F.conv2d((x - IMAGES_MEAN) / IMAGES_STD, p['fine1.0.weight'], p['fine1.0.bias'],
                             stride=2)))
    f = torch.cat([coarse, f[:, 1:] if release else f], dim=1)
    f = F.relu(F.conv2d(f, p['fine2.0.weight'], p['fine2.0.bias'], padding=2))
    return coarse, F.conv2d(f, p['fine3.weight'], p['fine3.bias'], padding=2)


def jvp(function, at, direction):
    return torch.autograd.functional.jvp(function, at, direction)[1].detach()


def eq4(pred, target, lam=0.5):
    """Eq. 4 per image (every pixel valid), averaged over the batch."""
    d = (pred - target).flatten(1)
    return ((d ** 2).mean(1) - lam * d.mean(1) ** 2).mean()


def steps(variant):
    """{tensor: (change of our output, change of the authors')} for one step on each tensor
    alone, each with the variant's weight decay (DECAY: the weights', not the biases')."""
    torch.manual_seed(0)
    nets = {'coarse': GlobalCoarseNet(variant, TINY).double().eval(),   # eval: no dropout
            'fine': LocalFineNet(variant, pass_through=False, geometry=TINY).double().eval()}
    with torch.no_grad():   # biases away from 0, so that their units matter
        for n in nets.values():
            for name, p in n.named_parameters():
                if name.endswith('bias'):
                    p.copy_(0.1 * torch.randn_like(p))
    x = torch.rand(1, 3, *TINY.input_hw, dtype=torch.float64) * 255
    y = torch.exp(0.8 + 0.4 * torch.randn(1, 1, *TINY.output_hw, dtype=torch.float64))
    m = torch.ones_like(y, dtype=torch.bool)
    # the authors' parameters: ours, each coarse1-5 bias x the std our coarse input is divided
    # by (our coarse1-5 maps are theirs / that std; 1 in the authors' units)
    std = variant.coarse_std
    theirs = {k: v.detach().clone() * (std if k.split('.')[0] in [f'coarse{i}' for i in range(1, 6)]
                                       and k.endswith('bias') else 1.0)
              for n in nets.values() for k, v in n.named_parameters()}

    coarse_map = nets['coarse'](x).detach()   # the fine stage's fixed input

    def ours_change(stage, name, delta):
        """The change of our output that delta on one tensor makes, to first order (J delta: no
        rounding of a difference of two outputs near 1)."""
        args = (x,) if stage == 'coarse' else (x, coarse_map)
        out = lambda q: torch.func.functional_call(nets[stage], {name: q}, args)
        return jvp(out, dict(nets[stage].named_parameters())[name].detach(), delta)

    def theirs_change(stage, name, delta):
        out = lambda q: authors_outputs({**theirs, name: q}, x, variant)[stage == 'fine']
        return jvp(out, theirs[name], delta) * LOGDEPTHS_STD

    with torch.no_grad():   # the same function (to our input statistics, float32 buffers)
        coarse, fine = authors_outputs(theirs, x, variant)
        torch.testing.assert_close(coarse_map, coarse * LOGDEPTHS_STD, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(nets['fine'](x, coarse_map), fine * LOGDEPTHS_STD, rtol=1e-6, atol=1e-7)
    changes = {}
    for stage in ('coarse', 'fine'):
        for name, param in list(nets[stage].named_parameters()):
            layer = name.split('.')[0]
            # ours: train.py's optimizer and step, on this tensor alone
            saved = param.detach().clone()
            for other in nets[stage].parameters():
                other.requires_grad_(other is param)
            optimizer = train.make_optimizer(nets[stage], variant)
            train.train_step(nets[stage], None if stage == 'coarse' else nets['coarse'], optimizer,
                             (x, y, m), 0.5, variant)
            with torch.no_grad():
                step = param - saved
                param.copy_(saved)
            for other in nets[stage].parameters():
                other.requires_grad_(True)
            # theirs: the loss on log depth / 0.457, one step of SGD (momentum's first is plain)
            # with weight decay on a weight
            q = theirs[name].clone().requires_grad_(True)
            loss = eq4(authors_outputs({**theirs, name: q}, x, variant)[stage == 'fine'],
                       torch.log(y) / LOGDEPTHS_STD)
            grad, = torch.autograd.grad(loss, q)
            decay = 0.0 if name.endswith('bias') else DECAY[variant.name][layer]
            their_step = -RATES[layer] * (grad + decay * q.detach())
            changes[name] = ours_change(stage, name, step), theirs_change(stage, name, their_step)
    return changes


def check(changes):
    off = {name: f'{float(o.norm() / t.norm()):.6g}' for name, (o, t) in changes.items()
           if (o - t).norm() > 1e-6 * t.norm()}
    assert len(changes) == 20 and not off, f'|our output change| / |the authors\'|: {off}'


@pytest.mark.parametrize('variant', [PAPER, RELEASE], ids=lambda v: v.name)
def test_every_tensor_steps_as_in_the_authors_units(variant):
    """Coarse and fine, weights and biases, each variant with its weight decay: none in the paper
    variant ([P] states none), [R]'s on the release's weights."""
    torch.set_num_threads(1)   # tiny float64 tensors: two threads only wait on each other
    check(steps(variant))
