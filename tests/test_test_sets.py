"""Evaluation against each protocol's own ground truth, and the test sets people already have:
BTS's official test folder and DenseDepth's test arrays, built tiny in their real encodings, give
exactly the labeled file's evaluation of the same frames; the real DenseDepth test PNGs of the
reference material (the `shared` fixture) load as what they are."""
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import evaluate
import nyu_test
import synthetic
import util
from net import PAPER, GlobalCoarseNet, LocalFineNet

H, W = util.NYU_HW


def _jpeg_roundtrip(rgb):
    """(JPEG bytes, the pixels a decoder gives back): the labeled file gets the decoded pixels, so
    that BTS's JPEGs hold exactly the labeled images."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG', quality=92)
    return buf.getvalue(), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'))


def _frames(n, seed=0):
    """n frames: smooth RGB, filled depth (float32, no holes), raw depth in whole millimetres as
    BTS stores it (mm * 0.001 in float32, the loaders' own conversion) with holes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:H, :W]
    out = []
    for i in range(n):
        rgb = np.stack([(x * 255 // W + 40 * i) % 256, y * 255 // H,
                        rng.integers(0, 256, (H, W)) // 4 + 100], -1).astype(np.uint8)
        jpeg, rgb = _jpeg_roundtrip(rgb)
        filled = (1.0 + 3 * x / W + y / H + 0.5 * i + rng.random((H, W)) * 0.01).astype(np.float32)
        mm = np.round(filled * 1000 + rng.integers(-30, 30, (H, W))).astype(np.uint16)
        mm[100 + 20 * i:160 + 20 * i, 200:300] = 0             # a hole, inside both regions
        raw = mm.astype(np.float32) * 0.001
        out.append({'rgb': rgb, 'jpeg': jpeg, 'filled': filled, 'raw': raw, 'mm': mm})
    return out


def _labeled(folder, frames, test_idx):
    mat, splits = folder / 'labeled.mat', folder / 'splits.mat'
    zeros = np.zeros((H, W), np.uint16)
    synthetic.write_nyu_labeled_mat(mat, [(f['rgb'], f['filled'], f['raw'], zeros, zeros.astype(np.uint8))
                                          for f in frames], [f'room_{i:04d}' for i in range(len(frames))],
                                    progress=False)
    train_idx = [i for i in range(len(frames)) if i not in test_idx]
    synthetic.write_splits_mat(splits, train_idx, test_idx)
    return mat, splits


def _random_model(folder):
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(GlobalCoarseNet(PAPER).state_dict(), folder / 'coarse.pth')
    torch.save(LocalFineNet(PAPER).state_dict(), folder / 'fine.pth')
    return folder


def _evaluate_set(data, model, out, *extra, splits=None):
    args = ['--data', str(data), '--model', str(model), '--out', str(out), '--device', 'cpu', *extra]
    return evaluate.evaluate(evaluate.parse_args(args + (['--splits', str(splits)] if splits else [])))


@pytest.mark.slow
def test_each_protocol_uses_its_own_ground_truth(tmp_path, capsys):
    """A constant prediction of 3 m. Filled depth 2 m, but 8 m where raw depth has a hole; raw
    depth 4 m. Paper protocol (filled): abs rel 0.5 and, in the hole, 5/8, pooled by pixel counts.
    Crop protocol (raw): 1/4 everywhere, the hole excluded; with --gt filled, the filled mix over
    the crop region."""
    frame = np.full((H, W), 2.0, np.float32)
    hole = (slice(100, 200), slice(100, 300))                # inside both regions
    filled, raw = frame.copy(), np.full((H, W), 4.0, np.float32)
    filled[hole], raw[hole] = 8.0, 0.0
    rgb = np.full((H, W, 3), 128, np.uint8)
    frames = [{'rgb': rgb, 'filled': filled, 'raw': raw}] * 2
    mat, splits = _labeled(tmp_path, frames, [1])
    model = tmp_path / 'model'
    model.mkdir()
    coarse = GlobalCoarseNet(PAPER)
    with torch.no_grad():
        coarse.coarse7.weight.zero_()
        coarse.coarse7.bias.fill_(float(np.log(3.0)) / PAPER.log_depth_std)   # in the output unit
    torch.save(coarse.state_dict(), model / 'coarse.pth')

    results = _evaluate_set(mat, model, tmp_path / 'out', splits=splits)
    out = capsys.readouterr().out
    hole_px = 100 * 200
    paper_px, crop_px = 440 * 592, 426 * 560
    assert results['paper']['Coarse']['abs_rel'] == pytest.approx(
        (0.5 * (paper_px - hole_px) + 5 / 8 * hole_px) / paper_px, rel=1e-6)
    assert results['crop']['Coarse']['abs_rel'] == pytest.approx(0.25, rel=1e-6)
    assert 'protocol: paper; ground truth: filled depth' in out
    assert 'protocol: crop; ground truth: raw Kinect depth' in out
    report = json.loads((tmp_path / 'out' / 'eval.json').read_text())
    assert report['ground_truth']['paper'].startswith('filled') and report['ground_truth']['crop'].startswith('raw')

    results = _evaluate_set(mat, model, tmp_path / 'out', '--gt', 'filled', splits=splits)
    assert results['crop']['Coarse']['abs_rel'] == pytest.approx(
        (0.5 * (crop_px - hole_px) + 5 / 8 * hole_px) / crop_px, rel=1e-6)
    results = _evaluate_set(mat, model, tmp_path / 'out', '--gt', 'raw', splits=splits)
    assert results['paper']['Coarse']['abs_rel'] == pytest.approx(0.25, rel=1e-6)


@pytest.mark.slow
def test_the_mean_row_by_hand(tmp_path):
    """Training depths all 2 m, test depths all 5 m: the Mean row predicts 2 m, abs rel 3/5."""
    rgb = np.full((H, W, 3), 90, np.uint8)
    frames = [{'rgb': rgb, 'filled': np.full((H, W), d, np.float32), 'raw': np.full((H, W), d, np.float32)}
              for d in (2.0, 2.0, 5.0)]
    mat, splits = _labeled(tmp_path, frames, [2])
    results = _evaluate_set(mat, _random_model(tmp_path / 'model'), tmp_path / 'out', splits=splits)
    for protocol in ('paper', 'crop'):
        mean = results[protocol]['Mean']
        assert mean['abs_rel'] == pytest.approx(0.6) and mean['rmse'] == pytest.approx(3.0)
        assert mean['d1'] == mean['d3'] == 0.0              # 5/2 = 2.5 > 1.25^3


def _bts_folder(root, frames, test_idx, scene_types):
    test = root / 'official_splits' / 'test'
    for i, scene in zip(test_idx, scene_types):
        folder = test / scene
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'rgb_{i:05d}.jpg').write_bytes(frames[i]['jpeg'])
        Image.fromarray(frames[i]['mm']).save(folder / f'sync_depth_{i:05d}.png')   # 16-bit
    return test


def _densedepth_zip(path, frames, test_idx):
    arrays = {'eigen_test_rgb.npy': np.stack([frames[i]['rgb'] for i in test_idx]),
              'eigen_test_depth.npy': np.stack([frames[i]['filled'] for i in test_idx]),
              'eigen_test_crop.npy': np.array([20, 459, 24, 615])}
    with zipfile.ZipFile(path, 'w') as z:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.save(buf, array)
            z.writestr(name, buf.getvalue())
    return path


@pytest.mark.slow
def test_bts_and_densedepth_test_sets_agree_exactly_with_the_labeled_file(tmp_path, capsys):
    frames = _frames(5)
    test_idx = [1, 3, 4]
    mat, splits = _labeled(tmp_path, frames, test_idx)
    # scene folders whose listing order is not the index order: the loader sorts by index
    bts = _bts_folder(tmp_path / 'bts', frames, test_idx, ['office', 'bathroom', 'kitchen'])
    dense = _densedepth_zip(tmp_path / 'nyu_test.zip', frames, test_idx)
    sets = {'labeled': nyu_test.open_test_set(str(mat), str(splits)),
            'bts': nyu_test.open_test_set(str(bts)), 'densedepth': nyu_test.open_test_set(str(dense))}
    assert sets['bts'].ground_truth == ['raw'] and sets['densedepth'].ground_truth == ['filled']
    for name, test in sets.items():   # frame by frame: images and ground truth
        assert torch.equal(test.frames.images, sets['labeled'].frames.images), name
        kind = test.ground_truth[0]
        for got, want in zip(test.depths(kind, range(3)), sets['labeled'].depths(kind, range(3))):
            assert np.array_equal(got, want), name
    assert np.array_equal(next(sets['bts'].depths('raw', [2])), frames[4]['raw'])

    model = _random_model(tmp_path / 'model')
    labeled = _evaluate_set(mat, model, tmp_path / 'l', splits=splits)
    on_bts = _evaluate_set(bts, model, tmp_path / 'b')
    assert 'the paper protocol needs filled ground truth' in capsys.readouterr().out
    on_dense = _evaluate_set(dense, model, tmp_path / 'd')
    assert set(on_bts) == {'crop'} and set(on_dense) == {'paper'}
    for method in ('Coarse', 'Coarse + Fine'):
        assert on_bts['crop'][method] == labeled['crop'][method]
        assert on_dense['paper'][method] == labeled['paper'][method]
    filled = _evaluate_set(mat, model, tmp_path / 'l', '--gt', 'filled', splits=splits)
    on_dense = _evaluate_set(dense, model, tmp_path / 'd', '--gt', 'filled')
    assert on_dense['crop']['Coarse'] == filled['crop']['Coarse']
    with pytest.raises(cli.DataError) as e:                 # asked for, and impossible: one line
        _evaluate_set(bts, model, tmp_path / 'b', '--protocol', 'paper')
    assert 'needs filled ground truth' in str(e.value) and '--gt raw' in str(e.value)
    assert '\n' not in str(e.value)


def test_the_real_densedepth_test_pngs_load_as_what_they_are(shared, tmp_path):
    """The 50 real DenseDepth test pairs of the reference material in nyu_data.zip's layout (linked, not
    copied): RGB as decoded, depth = PNG / 1000 at full resolution, filled (no holes)."""
    source = os.path.join(shared, 'nyu-samples', 'densedepth_nyu2_test')
    names = [line.strip().split(',') for line in open(os.path.join(source, 'nyu2_test.csv')) if line.strip()]
    data = tmp_path / 'data'
    (data / 'nyu2_test').mkdir(parents=True)
    for pair in names:
        for name in pair:
            os.symlink(os.path.join(source, 'nyu2_test', name), data / 'nyu2_test' / name)
    (data / 'nyu2_test.csv').write_text(''.join(f'data/nyu2_test/{a},data/nyu2_test/{b}\n' for a, b in names))
    test = nyu_test.open_test_set(str(tmp_path))
    assert len(test) == 50 and test.ground_truth == ['filled']
    for k, depth in enumerate(test.depths('filled', range(50))):
        png = np.asarray(Image.open(os.path.join(source, 'nyu2_test', names[k][1])))
        assert png.dtype == np.uint16 and (png > 0).all()   # filled: no holes
        assert depth.shape == (H, W) and np.array_equal(depth, png.astype(np.float32) * 0.001)
    rgb = np.asarray(Image.open(os.path.join(source, 'nyu2_test', names[7][0])).convert('RGB'))
    assert np.array_equal(test.frames.images[7].permute(1, 2, 0).numpy(), util.downsample_rgb(rgb))
