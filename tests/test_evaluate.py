"""evaluate.py end to end, both protocols; the upsampling the protocols rely on."""
import json
import math

import numpy as np
import pytest
import scipy.io
import torch

import cli
import evaluate
import util
from test_nyu_loader import write_nyu_like


def _run(capsys, *args):
    assert evaluate.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def _check_output(out, folder):
    for protocol in ('paper', 'crop'):
        assert f'protocol: {protocol}' in out
    # the paper's rows, verbatim, in both tables
    for name, values in evaluate.PAPER_TABLE1.items():
        line = [l for l in out.splitlines() if l.startswith(f'[paper] {name}  ')]
        assert len(line) == 2, name
        assert line[0].split()[-9:-1] == values
    for name in ('Mean', 'Coarse', 'Coarse + Fine'):
        assert sum(l.startswith(f'[ours]  {name}  ') for l in out.splitlines()) == 2
    report = json.loads((folder / 'eval.json').read_text())
    assert set(report['results']) == {'paper', 'crop'}
    for protocol, rows in report['results'].items():
        for method, values in rows.items():
            assert all(math.isfinite(v) for v in values.values()), (protocol, method)
            assert 0 <= values['d1'] <= values['d2'] <= values['d3'] <= 1
    assert (folder / 'eval_examples.png').read_bytes()[:4] == b'\x89PNG'
    return report


def test_evaluate_on_the_synthetic_test_split(synthetic, trained, tmp_path, capsys):
    mat, splits = synthetic
    out = _run(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
               '--device', 'cpu')
    report = _check_output(out, tmp_path)
    _, test_idx = util.read_splits(splits, 42)
    assert report['test_images'] == len(test_idx)
    # the trained coarse net beats the training-set mean on held-out rooms (sc-inv error)
    paper = report['results']['paper']
    assert paper['Coarse']['si_log'] < paper['Mean']['si_log']


def test_evaluate_on_a_file_in_nyu_layout(trained, tmp_path, capsys):
    mat = tmp_path / 'nyu_depth_v2_labeled.mat'
    write_nyu_like(mat, 6)
    splits = tmp_path / 'splits.mat'
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [3.0], [4.0]]),
                              'testNdxs': np.array([[2.0], [5.0], [6.0]])})
    out = _run(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
               '--device', 'cpu')
    report = _check_output(out, tmp_path)
    assert report['test_images'] == 3


def test_one_protocol_only(synthetic, trained, tmp_path, capsys):
    mat, splits = synthetic
    out = _run(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
               '--device', 'cpu', '--protocol', 'crop')
    assert 'protocol: crop' in out and 'protocol: paper' not in out


def test_paper_protocol_upsamples_by_nearest_neighbour_on_the_covered_region():
    pred = torch.arange(55 * 74, dtype=torch.float32).view(1, 1, 55, 74) + 1
    up = util.upsample_depth(pred, (480, 640), mode='nearest', outside='nan')
    assert util.output_region((480, 640)) == (20, 460, 24, 616)
    inner = up[0, 0, 20:460, 24:616]
    assert torch.isfinite(inner).all() and torch.isnan(up[0, 0, :20]).all()
    assert torch.isnan(up[0, 0, :, :24]).all() and torch.isnan(up[0, 0, 460:]).all()
    # each cell becomes one 8x8 block
    assert torch.equal(inner[::8, ::8], pred[0, 0])
    assert torch.equal(inner[7::8, 7::8], pred[0, 0])


def test_crop_protocol_region_range_and_clamp():
    pred = torch.full((1, 1, 55, 74), 20.0)     # beyond 10 m: clamped
    gt = torch.full((1, 1, 480, 640), 5.0)
    gt[..., 100, 100] = 12.0                     # beyond 10 m: not evaluated
    valid = gt > 0
    p, g, m = evaluate.protocol_pixels('crop', pred, gt, valid)
    assert p.max() == 10.0 and torch.isfinite(p).all()
    assert not m[..., :45, :].any() and not m[..., 471:, :].any()
    assert not m[..., :, :41].any() and not m[..., :, 601:].any()
    assert int(m.sum()) == 426 * 560 - 1


def test_missing_weights_message(tmp_path, synthetic):
    mat, splits = synthetic
    with pytest.raises(cli.DataError, match='run train.py'):
        evaluate.main(['--data', str(mat), '--splits', str(splits), '--model', str(tmp_path)])
