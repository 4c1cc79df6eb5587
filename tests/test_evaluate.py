"""evaluate.py end to end, both protocols; the upsampling the protocols rely on."""
import json
import math

import pytest
import torch

import cli
import evaluate
import util


def _evaluate_main(capsys, *args):
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


@pytest.mark.slow
def test_evaluate_on_the_synthetic_test_split(synthetic, trained, tmp_path, capsys):
    mat, splits = synthetic
    out = _evaluate_main(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
                         '--device', 'cpu')
    report = _check_output(out, tmp_path)
    _, test_idx = util.read_splits(splits, 42)
    assert report['test_images'] == len(test_idx)
    # the trained coarse net beats the training-set mean on held-out rooms (sc-inv error)
    paper = report['results']['paper']
    assert paper['Coarse']['si_log'] < paper['Mean']['si_log']


@pytest.mark.slow
def test_evaluate_on_a_file_in_nyu_layout(nyu_like, trained, tmp_path, capsys):
    mat, splits = nyu_like
    out = _evaluate_main(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
                         '--device', 'cpu')
    report = _check_output(out, tmp_path)
    assert report['test_images'] == 3


@pytest.mark.slow
def test_one_protocol_only(nyu_like, trained, tmp_path, capsys):
    mat, splits = nyu_like
    out = _evaluate_main(capsys, '--data', mat, '--splits', splits, '--model', trained, '--out', tmp_path,
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


def test_missing_weights_message(tmp_path, nyu_like):
    mat, splits = nyu_like
    with pytest.raises(cli.DataError, match='run train.py'):
        evaluate.main(['--data', str(mat), '--splits', str(splits), '--model', str(tmp_path)])


READ_ONLY = 'read-only'   # a folder without write permission (as root, os.access is told so)


@pytest.mark.parametrize('script, argv, expected', [
    ('evaluate', ['--batch-size', '0'], 'argument --batch-size: 0 is below 1'),
    ('evaluate', ['--workers', '-1'], 'argument --workers: -1 is below 0'),   # KITTI's decoding
    ('evaluate', ['--demo', '--data', '{tmp}/x.mat'], '--data: --demo uses its synthetic rooms'),
    ('evaluate', ['--out', ''], '--out: an empty path'),
    ('evaluate', ['--out', '{tmp}/file/sub'], '{tmp}/file is a file, so no folder can be made'),
    ('evaluate', ['--out', f'{{tmp}}/{READ_ONLY}/out'], f'cannot write in {{tmp}}/{READ_ONLY}'),
    ('evaluate', ['--model', '{tmp}/text'], 'coarse.pth: not a PyTorch file'),
    ('evaluate', ['--model', '{tmp}/pickle'], 'coarse.pth: a Python pickle, not a PyTorch file'),
    ('train', ['--demo', '--data', '{tmp}/x.mat'], '--data: --demo uses its synthetic rooms'),
    ('train', ['--demo', '--splits', '{tmp}/s.mat'], '--splits: --demo uses its synthetic rooms'),
    ('train', ['--data', '/dev/null', '--data-format', 'labeled'], '/dev/null: is not a regular file'),
    ('train', ['--workers', '-1'], 'argument --workers: -1 is below 0'),
    ('train', ['--per-scene', 'nan'], "argument --per-scene: 'nan' is not a whole number"),
    ('train', ['--val-fraction', 'inf'], 'argument --val-fraction: inf is not a finite number'),
    ('train', ['--val-fraction', '1'], 'argument --val-fraction: 1 must be below 1'),
    ('train', ['--depth-scale', '-0.001'], 'argument --depth-scale: -0.001 must be above 0'),
])
def test_bad_options_and_files_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch,
                                                                        script, argv, expected):
    """evaluate.py's (and train.py's data options) refusals: one line, before any test image is
    read (the --out cases: before the weights are even looked for, so nothing is lost)."""
    import os
    import pickle
    import train
    (tmp_path / 'file').write_text('a file where a folder would be made')
    (tmp_path / READ_ONLY).mkdir()
    (tmp_path / READ_ONLY).chmod(0o555)
    if os.access(tmp_path / READ_ONLY, os.W_OK):   # root writes anywhere: have os.access say no
        real_access = os.access
        monkeypatch.setattr(os, 'access', lambda path, mode: os.path.abspath(path) != str(
            tmp_path / READ_ONLY) and real_access(path, mode))
    for name, write in (('text', lambda f: f.write_text('coarse1.weight 0.1 0.2\n')),
                        ('pickle', lambda f: f.write_bytes(pickle.dumps({'coarse1.weight': [0.1]})))):
        (tmp_path / name).mkdir()
        write(tmp_path / name / 'coarse.pth')
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    if script == 'evaluate':
        argv = ['--data', str(tmp_path / 'file'), '--model', str(tmp_path / 'no_model'), *argv]
    else:
        argv = ['--out', str(tmp_path / 'out'), *argv]
    with pytest.raises(cli.UserError) as e:
        {'evaluate': evaluate, 'train': train}[script].main(argv + ['--device', 'cpu'])
    assert expected.replace('{tmp}', str(tmp_path)) in str(e.value) and '\n' not in str(e.value)
    (tmp_path / READ_ONLY).chmod(0o755)
