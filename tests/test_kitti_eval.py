"""evaluate.py on KITTI: both protocols against hand computations for a constant predictor, and the
field's protocol against our transcription of the field's own evaluation (monodepth2's
evaluate_depth.py and compute_errors, nianticlabs/monodepth2 at b676244, 2022-01-29: the mask
1e-3 < gt < 80 and the Garg crop, predictions clamped to [1e-3, 80], per-image metrics averaged)."""
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import evaluate
import kitti
import kitti_tree
import util
from net import KITTI, PAPER, GlobalCoarseNet

pytestmark = pytest.mark.slow   # each test evaluates full-size KITTI nets on five frames

CONSTANT = 12.0   # metres, the constant predictor's depth everywhere


def _test_entries(tree):
    """The shipped test list's frames that the tree holds (all left camera, as the list)."""
    return [e for e in kitti.read_split(kitti.SPLIT_FILES['test']) if (e[0], e[1]) in tree.frames]


def _kitti_model(folder, constant=None):
    """A KITTI coarse net: random (seed 0), or predicting `constant` metres everywhere."""
    torch.manual_seed(0)
    net = GlobalCoarseNet(PAPER, KITTI)
    if constant is not None:
        with torch.no_grad():
            net.coarse7.weight.zero_()
            net.coarse7.bias.fill_(math.log(constant) / PAPER.log_depth_std)
    os.makedirs(folder, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(folder, 'coarse.pth'))
    return str(folder)


@pytest.fixture(scope='module')
def constant_model(tmp_path_factory):
    """A model folder whose KITTI coarse net predicts CONSTANT metres everywhere."""
    return _kitti_model(tmp_path_factory.mktemp('constant'), CONSTANT)


@pytest.fixture(scope='module')
def random_model(tmp_path_factory):
    """A model folder with a random KITTI coarse net (seed 0)."""
    return _kitti_model(tmp_path_factory.mktemp('random'))


def _constant_in_float32():
    """CONSTANT as the net computes it (exp of log in float32): 1e-7 off, which moves pixels whose
    ratio to it sits right at a threshold."""
    return float(torch.exp(torch.tensor(math.log(CONSTANT) / PAPER.log_depth_std) * PAPER.log_depth_std))


def _evaluate_kitti(model, tree, *extra):
    return evaluate.evaluate(evaluate.parse_args(['--model', model, '--data', tree.root, '--device', 'cpu',
                                                  '--workers', '0', *extra]))


def _metrics(p, g):
    """Table 1's metrics of predictions p against ground truth g (1-D arrays of the scored pixels)."""
    p, g = np.float64(p), np.float64(g)
    ratio = np.maximum(p / g, g / p)
    d = np.log(p) - np.log(g)
    return {'d1': np.mean(ratio < 1.25), 'd2': np.mean(ratio < 1.25 ** 2), 'd3': np.mean(ratio < 1.25 ** 3),
            'abs_rel': np.mean(np.abs(p - g) / g), 'sq_rel': np.mean((p - g) ** 2 / g),
            'rmse': np.sqrt(np.mean((p - g) ** 2)), 'rmse_log': np.sqrt(np.mean(d ** 2)),
            'eq1': np.mean(d ** 2) - np.mean(d) ** 2}


def _garg(gt):
    """evaluate_depth.py's crop: int32 of the fractions times the ground truth's height / width."""
    h, w = gt.shape
    crop = np.zeros(gt.shape, bool)
    crop[int(0.40810811 * h):int(0.99189189 * h), int(0.03594771 * w):int(0.96405229 * w)] = True
    return crop


def test_both_protocols_of_a_constant_predictor_equal_a_hand_computation(tree, constant_model):
    results = _evaluate_kitti(constant_model, tree)
    constant = _constant_in_float32()
    paper_p, paper_g, field = [], [], []
    for entry in _test_entries(tree):
        camera = kitti.eval_ground_truth(tree.root, entry, 'camera')
        velodyne = kitti.eval_ground_truth(tree.root, entry, 'velodyne')
        h, w = camera.shape
        # the paper's: the network region of the 612x184 frame (rows 66..174, columns 22..590:
        # the 172x576 centre crop's bottom 27 x 4 rows from row 56 + 5 - 1, 142 x 4 columns from
        # column 4), scaled to the frame's full size; every LIDAR pixel pooled, no cap
        region = np.zeros(camera.shape, bool)
        region[round(66 * h / 184):round(174 * h / 184), round(22 * w / 612):round(590 * w / 612)] = True
        g = camera[region & (camera > 0)]
        paper_g.append(g)
        paper_p.append(np.full_like(g, constant))
        # the field's: Velodyne x, 1e-3 < gt < 80 in the Garg crop, per image
        g = velodyne[(velodyne > 1e-3) & (velodyne < 80) & _garg(velodyne)]
        field.append(_metrics(np.full_like(g, constant), g))
    pooled = _metrics(np.concatenate(paper_p), np.concatenate(paper_g))
    per_image_eq1 = [_metrics(p, g)['eq1'] for p, g in zip(paper_p, paper_g)]
    got = results['paper']['Coarse']
    for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log'):
        assert got[k] == pytest.approx(pooled[k], rel=1e-5), k
    # a constant prediction has Eq. 1 = the variance of log gt: sc-inv = sqrt of its image mean
    assert got['si_log'] == pytest.approx(math.sqrt(np.mean(per_image_eq1)), rel=1e-5)
    got = results['field']['Coarse']
    for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log'):
        assert got[k] == pytest.approx(np.mean([m[k] for m in field]), rel=1e-5), k
    assert 0.05 < got['d1'] < 0.95   # the constant is right on some pixels and wrong on others


def test_the_field_protocol_equals_the_fields_evaluation_of_the_same_predictions(tree, random_model):
    """A random net's predictions, upsampled onto their region as written out here, scored by our
    transcription of evaluate_depth.py (mask, crop, clamp after masking, compute_errors, mean over
    images)."""
    results = _evaluate_kitti(random_model, tree, '--protocol', 'field')
    test = kitti.open_test_set(tree.root, workers=0)
    coarse = GlobalCoarseNet(PAPER, KITTI).eval()
    coarse.load_state_dict(torch.load(os.path.join(random_model, 'coarse.pth'), weights_only=True))
    with torch.no_grad():
        images, _, _ = test.frames.get(list(range(len(test))))
        preds = coarse(util.crop_input(images, KITTI)).exp()
    errors = []
    for k, gt in enumerate(test.depths('velodyne', range(len(test)))):
        # bilinear onto the network's region of the frame (rows 66..174, columns 22..590 of 612x184,
        # scaled), the border cells repeated outside it: the field resizes a full-frame prediction
        h, w = gt.shape
        top, bottom, left, right = (round(66 * h / 184), round(174 * h / 184), round(22 * w / 612),
                                    round(590 * w / 612))
        inner = F.interpolate(preds[k:k + 1], size=(bottom - top, right - left), mode='bilinear',
                              align_corners=False)
        pred = F.pad(inner, (left, w - right, top, h - bottom), mode='replicate')[0, 0].numpy()
        mask = (gt > 1e-3) & (gt < 80) & _garg(gt)
        p, g = pred[mask].copy(), gt[mask]
        p[p < 1e-3], p[p > 80] = 1e-3, 80
        errors.append(_metrics(p, g))
    got = results['field']['Coarse']
    for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log'):
        assert got[k] == pytest.approx(np.mean([e[k] for e in errors]), rel=1e-5), k


def test_annotated_ground_truth_skips_the_frames_without_one(tree, constant_model, tmp_path, capsys):
    results = _evaluate_kitti(constant_model, tree, '--gt', 'annotated', '--kitti-annotated', tree.ann_root,
                              '--protocol', 'field')
    field = []
    entries = _test_entries(tree)
    assert len(entries) == 5 and entries[-1][:2] == kitti_tree.ENTRIES[-1][:2]
    for entry in entries[:-1]:   # the last frame has no annotated PNG
        gt = kitti.read_annotated_depth(kitti.annotated_path(tree.ann_root, entry))
        g = gt[(gt > 1e-3) & (gt < 80) & _garg(gt)]
        field.append(_metrics(np.full_like(g, _constant_in_float32()), g))
    assert results['field']['Coarse']['abs_rel'] == pytest.approx(np.mean([m['abs_rel'] for m in field]), rel=1e-5)
    assert "KITTI's annotated depth" in capsys.readouterr().out
    with pytest.raises(cli.DataError, match='--kitti-annotated'):   # annotated without the folder
        _evaluate_kitti(constant_model, tree, '--gt', 'annotated')
    empty = tmp_path / 'empty_annotated'
    empty.mkdir()
    with pytest.raises(cli.DataError, match='none of the 5 test frames has an annotated depth PNG'):
        _evaluate_kitti(constant_model, tree, '--gt', 'annotated', '--kitti-annotated', str(empty))
    nyu = tmp_path / 'nyu_model'
    nyu.mkdir()
    torch.save(GlobalCoarseNet(PAPER).state_dict(), nyu / 'coarse.pth')
    with pytest.raises(cli.UserError, match='--kitti-annotated: .* these are nyu weights'):
        _evaluate_kitti(str(nyu), tree, '--kitti-annotated', tree.ann_root)
    with pytest.raises(cli.DataError, match='split.txt: is a file, not KITTI\'s data_depth_annotated'):
        _evaluate_kitti(constant_model, tree, '--gt', 'annotated',
                        '--kitti-annotated', os.path.join(tree.root, 'split.txt'))


def test_a_test_image_of_another_size_than_its_depth_is_refused(tree, random_model, tmp_path):
    """A wrong file in place of a test frame would be resized and scored: one line instead."""
    shutil.copytree(tree.root, tmp_path / 'raw')
    entry = _test_entries(tree)[0]
    Image.new('RGB', (600, 200)).save(kitti.image_path(str(tmp_path / 'raw'), entry))
    with pytest.raises(cli.DataError, match=r'\.png: 600x200 pixels, but its velodyne depth is'):
        evaluate.evaluate(evaluate.parse_args(['--model', random_model, '--data',
                                               str(tmp_path / 'raw'), '--device', 'cpu', '--workers',
                                               '0', '--protocol', 'field']))
