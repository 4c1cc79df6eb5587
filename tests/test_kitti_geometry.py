"""KITTI's sizes: the networks of Fig. 1's KITTI column, layer by layer, the fine net's bottom crop,
and the augmentation (Sec. 4.2) on 612x184 frames with its target grid on that crop."""
import pytest
import torch

import util
from helpers import CODE0, coarse_trace, position_frame
from net import ALEXNET, KITTI, PAPER, GlobalCoarseNet, LocalFineNet, variant_of

# Fig. 1, KITTI column, W x H: input 576x172 | coarse1 71x20 | coarse2-4 35x9 | coarse5 17x4 |
# coarse6 4096 | coarse7 142x27 | fine1-3 142x27. Here (C, H, W), channels as for NYU.
FIG1_KITTI = {
    'coarse1': (96, 20, 71), 'coarse2': (256, 9, 35), 'coarse3': (384, 9, 35),
    'coarse4': (384, 9, 35), 'coarse5': (256, 4, 17), 'coarse6': (4096,), 'coarse7': (142 * 27,),
}
# torchvision's AlexNet convs (64-192-384-256-256 channels) reach the same sizes on 576x172
ALEXNET_KITTI = dict(FIG1_KITTI, coarse1=(64, 20, 71), coarse2=(192, 9, 35), coarse4=(256, 9, 35))
INPUT = (172, 576)


@pytest.fixture(scope='module')
def kitti_nets():
    torch.manual_seed(0)
    return {v.name: (GlobalCoarseNet(v, KITTI).eval(), LocalFineNet(v, pass_through=False, geometry=KITTI).eval())
            for v in (PAPER, ALEXNET)}


@pytest.mark.parametrize('layer', list(FIG1_KITTI))
@pytest.mark.parametrize('variant, sizes', [('paper', FIG1_KITTI), ('alexnet', ALEXNET_KITTI)])
def test_coarse_layer_sizes_are_fig1s_kitti_column(kitti_nets, variant, sizes, layer):
    coarse, _ = kitti_nets[variant]
    with torch.no_grad():
        assert coarse_trace(coarse, torch.rand(1, 3, *INPUT) * 255)[layer] == sizes[layer]


@pytest.mark.parametrize('variant', ['paper', 'alexnet'])
def test_fine_layer_sizes_are_fig1s_kitti_column(kitti_nets, variant):
    coarse, fine = kitti_nets[variant]
    x = torch.rand(2, 3, *INPUT) * 255
    with torch.no_grad():
        c = coarse(x)
        f1 = fine.fine1((x[:, :, 172 - 116:] - fine.fine_mean) / fine.fine_std)
        f2 = fine.fine2(torch.cat([c, f1], dim=1))
        assert c.shape == (2, 1, 27, 142)              # coarse7 as a map: 142x27
        assert tuple(f1.shape[1:]) == (63, 27, 142)    # fine1, with the coarse map 64 channels
        assert tuple(f2.shape[1:]) == (64, 27, 142)    # fine2
        assert fine(x, c).shape == (2, 1, 27, 142)     # fine3


def test_the_fine_net_sees_the_bottom_116_rows_centred_on_its_cells(kitti_nets):
    """Sec. 4.2: the fine net sees the bottom crop its 142x27 output covers. Rows above 172 - 116
    never reach it; a pixel at crop row 56 + 5 + 4i, column 5 + 4j (the target grid) reaches the
    cells around (i, j) symmetrically (fine1's 9x9/2 conv and 2x2 pool)."""
    _, fine = kitti_nets['paper']
    x = torch.rand(1, 3, *INPUT) * 255
    c = torch.zeros(1, 1, 27, 142)
    with torch.no_grad():
        base = fine(x, c)
        above = x.clone()
        above[:, :, :56] = torch.rand(1, 3, 56, 576) * 255
        assert torch.equal(fine(above, c), base)
        f1 = lambda img: fine.fine1((img[:, :, 56:] - fine.fine_mean) / fine.fine_std)
        i, j = 10, 20
        poked = x.clone()
        poked[:, :, 56 + 5 + 4 * i, 5 + 4 * j] += 100
        changed = (f1(poked) - f1(x)).abs().amax(dim=1)[0] > 0
        rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (rows.min() + rows.max()) / 2 == i and (cols.min() + cols.max()) / 2 == j


def test_weights_tell_kitti_from_nyu():
    with torch.device('meta'):
        kitti_state = GlobalCoarseNet(PAPER, KITTI).state_dict()
        nyu_state = GlobalCoarseNet(PAPER).state_dict()
    assert variant_of(kitti_state) == (PAPER, KITTI)
    assert variant_of(nyu_state)[1].name == 'nyu'


def test_the_test_crop_and_its_targets_sit_where_the_geometry_says():
    image, depth, mask = position_frame(KITTI.frame_hw)
    img, d, m = util.augment(image, depth, mask, util.AugParams.identity(1, geometry=KITTI), KITTI)
    ci, cd, cm = util.center_crop(image, depth, mask, KITTI)
    assert (img - ci).abs().max() < 1e-3 and torch.equal(d, cd) and torch.equal(m, cm)
    # centred: (612 - 576) / 2 = 18 columns, (184 - 172) / 2 = 6 rows cut on each side
    assert ci.shape == (1, 3, 172, 576) and ci[0, 0, 0, 0] == 18 and ci[0, 1, 0, 0] == 6
    # target cell (i, j) = crop pixel (56 + 5 + 4i, 5 + 4j), the fine net's bottom crop
    for i, j in ((0, 0), (26, 141), (13, 70)):
        assert cd[0, 0, i, j] == CODE0 + (6 + 61 + 4 * i) * 612 + (18 + 5 + 4 * j)
    assert KITTI.output_region == (6 + 60, 6 + 60 + 108, 18 + 4, 18 + 4 + 568)


def test_kitti_draws_scale_1_to_1_2_without_rotation_and_stay_aligned():
    """Sec. 4.2: scale in [1, 1.2], no rotation; colour and flip as NYU. Under every draw the depth
    at a target cell comes from the pixel the image sample there came from."""
    p = util.AugParams.sample(2000, torch.Generator().manual_seed(0), KITTI)
    assert 1.0 <= p.scale.min() and p.scale.max() <= 1.2 and p.scale.max() > 1.19
    assert (p.angle == 0).all() and 0.4 < p.flip.float().mean() < 0.6
    image, depth, mask = position_frame(KITTI.frame_hw)
    for k in range(6):
        one = p.take(k)
        img, d, m = util.augment(image, depth, mask, one, KITTI)
        at_cells = img[0, :, 61::4, 5::4][:, :27, :142]
        code = torch.round(d[0, 0] * one.scale[0]) - CODE0
        ok = m[0, 0]
        assert ok.sum() > 0.9 * 27 * 142
        # the image sample's x was multiplied by the colour draw of channel 0, y by channel 1's
        assert ((code % 612)[ok] - at_cells[0][ok] / one.color[0, 0]).abs().max() <= 0.5 + 1e-3
        assert ((code // 612)[ok] - at_cells[1][ok] / one.color[0, 1]).abs().max() <= 0.5 + 1e-3
