"""Layer output sizes of Fig. 1 ([P]) and of the authors' release ([R])."""
from dataclasses import replace

import pytest
import torch

from helpers import coarse_trace
from net import (ALEXNET, PAPER, RELEASE, Geometry, GlobalCoarseNet, LocalFineNet, layer_names,
                 load_weights)

# Fig. 1 gives W x H x C; here (C, H, W).
PAPER_SIZES = {
    'coarse1': (96, 27, 37), 'coarse2': (256, 13, 18), 'coarse3': (384, 13, 18),
    'coarse4': (384, 13, 18), 'coarse5': (256, 6, 8), 'coarse6': (4096,), 'coarse7': (4070,),
}
# [R]: 3x3/2 ceil pools make coarse5 6x9; everything else as Fig. 1.
RELEASE_SIZES = dict(PAPER_SIZES, coarse5=(256, 6, 9))


@pytest.mark.parametrize('variant, sizes', [(PAPER, PAPER_SIZES), (RELEASE, RELEASE_SIZES)])
def test_coarse_layer_sizes(variant, sizes):
    net = GlobalCoarseNet(variant).eval()
    x = torch.rand(2, 3, 228, 304) * 255
    assert coarse_trace(net, x) == sizes
    assert net(x).shape == (2, 1, 55, 74)


@pytest.mark.parametrize('variant', [PAPER, RELEASE])
def test_fine_layer_sizes(variant):
    fine = LocalFineNet(variant).eval()
    x = torch.rand(2, 3, 228, 304) * 255
    f1 = fine.fine1((x - variant.fine_mean) / variant.fine_std)
    # [P]: 63 maps of 55x74 (74x55x63 in Fig. 1) + the coarse map = 64; [R]: 64, channel 0 replaced
    assert tuple(f1.shape[1:]) == (variant.fine1_filters, 55, 74)
    assert tuple(fine.fine2[0].weight.shape) == (64, 64, 5, 5)
    assert tuple(fine.fine3.weight.shape) == (1, 64, 5, 5)
    assert fine(x, torch.zeros(2, 1, 55, 74)).shape == (2, 1, 55, 74)


@pytest.mark.parametrize('variant', [PAPER, RELEASE])
def test_fine_net_uses_the_coarse_prediction(variant):
    torch.manual_seed(0)
    fine = LocalFineNet(variant, pass_through=False).eval()   # every weight random: the full reach
    x = torch.rand(1, 3, 228, 304) * 255
    c = torch.zeros(1, 1, 55, 74)
    c2 = c.clone()
    c2[..., 20, 30] = 1.0
    delta = (fine(x, c2) - fine(x, c)).abs()[0, 0]
    # a change in one coarse cell reaches the fine output only through two 5x5 convs: +-4 cells
    assert delta[20, 30] > 0
    assert delta[:15].max() == 0 and delta[:, :25].max() == 0


def test_fc_layer_sizes_and_dropout():
    net = GlobalCoarseNet(PAPER)
    assert tuple(net.coarse6[1].weight.shape) == (4096, 256 * 6 * 8)
    assert tuple(net.coarse7.weight.shape) == (55 * 74, 4096)
    dropouts = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0] in net.coarse6   # dropout only on coarse6


def test_layer_names_are_the_papers():
    assert layer_names(GlobalCoarseNet()) == [f'coarse{i}' for i in range(1, 8)]
    assert layer_names(LocalFineNet()) == ['fine1', 'fine2', 'fine3']


def _receptive_field(modules):
    rf, jump = 1, 1
    for m in modules:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
            s = m.stride[0] if isinstance(m.stride, tuple) else m.stride
            rf, jump = rf + (k - 1) * jump, jump * s
    return rf


@pytest.mark.parametrize('variant, expected', [(PAPER, 43), (RELEASE, 45)])
def test_fine_field_of_view(variant, expected):
    """Sec. 3.1.2 states a 45x45 field of view per fine output. Fig. 1's 2x2 pool after fine1 gives
    43 (9 + 2*1 + 4*4 + 4*4); the release's 3x3/2 pool gives the stated 45. The paper variant
    follows the figure; docs/paper.md notes the mismatch."""
    assert _receptive_field(LocalFineNet(variant).modules()) == expected


@pytest.mark.parametrize('variant', [PAPER, RELEASE])
def test_a_fresh_fine_net_returns_the_coarse_map_it_is_given(variant):
    """--fine-init pass (the default): the fine net starts as the identity on the coarse log depth,
    negative values (below 1 m) included, whatever the image; its two pass-through weights are
    10 ** (1/4) and 10 ** (-1/4): the fourth root of the paper's fine2 / fine3 rates (0.01 / 0.001)."""
    torch.manual_seed(0)
    fine = LocalFineNet(variant).eval()
    x = torch.rand(2, 3, 228, 304) * 255
    c = torch.randn(2, 1, 55, 74) * 0.8 + 0.8     # log depth: about 0.2 m to 10 m
    assert (c < 0).any()
    with torch.no_grad():
        torch.testing.assert_close(fine(x, c), c, rtol=1e-5, atol=1e-5)
    assert fine.fine2[0].weight[0, 0, 2, 2].item() == pytest.approx(10 ** 0.25)
    assert fine.fine3.weight[0, 1, 2, 2].item() == pytest.approx(-10 ** -0.25)
    assert fine.fine2[0].weight[2:].abs().sum() > 0       # the other filters start random
    with torch.no_grad():                                 # --fine-init random: not the identity
        assert not torch.allclose(LocalFineNet(variant, pass_through=False).eval()(x, c), c, atol=0.1)


@pytest.mark.parametrize('variant', [PAPER, RELEASE])
def test_outputs_are_linear(variant):
    """coarse7 and fine3 are linear (log depth can be negative, below 1 m): a ReLU on either would
    clip these outputs at 0."""
    torch.manual_seed(0)
    coarse, fine = GlobalCoarseNet(variant).eval(), LocalFineNet(variant).eval()
    with torch.no_grad():
        coarse.coarse7.bias.fill_(-5.0)
        fine.fine3.bias.fill_(-5.0)
        x = torch.rand(1, 3, 228, 304) * 255
        c = coarse(x)
        assert (c < -1).all()
        assert (fine(x, c) < -1).all()


# The units of weights without the authors_units mark (converted on loading): coarse input / its
# std, features x 0.01 x that std (the release variant's are the authors' units either way)
IMAGES_STD = 76.18328376
IMAGENET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))
STD_UNITS = {'paper': (IMAGES_STD, 0.01 * IMAGES_STD),
             'alexnet': (IMAGENET_STD, 0.01 * sum(IMAGENET_STD) / 3),
             'release': (1.0, 0.01)}


@pytest.mark.parametrize('variant', [PAPER, ALEXNET, RELEASE], ids=lambda v: v.name)
def test_weights_written_in_the_std_units_load_as_the_same_net(variant, tmp_path, capsys):
    """A coarse.pth written while coarse1-5 worked in units of the input's std (no authors_units
    entry) is converted on loading: the net predicts what the old one did."""
    tiny = Geometry('tiny', frame_hw=(68, 68), input_hw=(68, 68), output_hw=(15, 15))
    std, feature_scale = STD_UNITS[variant.name]
    torch.manual_seed(0)
    old = GlobalCoarseNet(replace(variant, coarse_std=std, feature_scale=feature_scale), tiny).eval()
    with torch.no_grad():
        for name, p in old.named_parameters():
            if name.endswith('bias'):
                p.copy_(0.1 * torch.randn_like(p))
    state = {k: v for k, v in old.state_dict().items() if k != 'authors_units'}
    torch.save(state, tmp_path / 'coarse.pth')
    new = load_weights(GlobalCoarseNet(variant, tiny), str(tmp_path / 'coarse.pth'), 'coarse net').eval()
    x = torch.rand(2, 3, 68, 68) * 255
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
    said = capsys.readouterr().out
    assert ('converted' in said) == (variant is not RELEASE)
    torch.save(new.state_dict(), tmp_path / 'again.pth')   # written now: loaded as it is
    again = load_weights(GlobalCoarseNet(variant, tiny), str(tmp_path / 'again.pth'), 'coarse net')
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), new.state_dict().values()))
    assert capsys.readouterr().out == ''


class _Scale(torch.nn.Module):
    """A stand-in net: the coarse one (no `before`) halves the images' mean, a refining one
    multiplies the map it is given by `factor` and adds 1."""
    def __init__(self, factor=None):
        super().__init__()
        self.factor = factor

    def forward(self, images, before=None):
        if before is None:
            return images.mean(1, keepdim=True) / 2
        return before * self.factor + 1


def test_the_chain_feeds_each_net_the_prediction_before_it():
    from net import Chain
    x = torch.rand(2, 3, 4, 5)
    nets = {'coarse': _Scale(), 'fine': _Scale(3.0), 'refine': _Scale(-2.0)}
    coarse = x.mean(1, keepdim=True) / 2          # by hand: each stage on the one before it
    fine = coarse * 3 + 1
    refine = fine * -2 + 1
    found = Chain(nets).predictions(x)
    assert list(found) == ['coarse', 'fine', 'refine']
    for got, want in zip(found.values(), (coarse, fine, refine)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(Chain(nets)(x), refine)
    torch.testing.assert_close(Chain(nets, last='fine')(x), fine)
    torch.testing.assert_close(Chain({'coarse': nets['coarse'], 'fine': None})(x), coarse)
    with pytest.raises(ValueError):   # a gap would skip a refinement
        Chain({'coarse': nets['coarse'], 'refine': nets['refine']})
