"""KITTI end to end on a tiny raw-KITTI tree (tests/kitti_tree.py): train.py --dataset kitti trains
both stages on the paper's list (the coarse from the raw tree, the fine from kitti.py's cache), the
Eigen training list on request, evaluate.py scores the Eigen test frames on both protocols,
predict.py writes full-size depth."""
import os

import numpy as np
import pytest
import torch

import checkpoint
import cli
import data
import evaluate
import kitti
import kitti_tree
import nyu_raw
import predict
import train
from net import PAPER, GlobalCoarseNet

pytestmark = pytest.mark.slow   # training runs on KITTI and the scripts on their nets

DATES = tuple(kitti_tree.CALIBS)


def _first(split, count):
    """The first `count` frames of a shipped split list recorded on the tree's days."""
    return [e for e in kitti.read_split(kitti.SPLIT_FILES[split]) if e[0].startswith(DATES)][:count]


# conftest's `tree` writes these training frames too, so that the runs have a training list
KITTI_TRAIN_FRAMES = _first('train', 6)


def _argv(tree, out, *extra):
    return list(map(str, [
        '--dataset', 'kitti', '--data', tree.root, '--out', out, '--device', 'cpu', '--batch-size', 2,
        '--coarse-samples', 4, '--fine-samples', 4, '--workers', 0, '--log-every', 1, *extra]))


def _train(tree, out, *extra):
    return train.main(_argv(tree, out, *extra))


@pytest.fixture(scope='module')
def trained_kitti(tree, tmp_path_factory):
    """Both stages on the paper's list (the default): the coarse from the raw tree, then the fine
    from the cache kitti.py writes."""
    out = tmp_path_factory.mktemp('model_kitti')
    assert _train(tree, out, '--stage', 'coarse') == 0
    cache = os.path.join(tree.root, 'cache')
    assert kitti.main(['--data', tree.root, '--out', cache, '--workers', '0']) == 0
    assert _train(tree, out, '--stage', 'fine', '--data', cache) == 0
    return out


def test_a_kitti_cache_is_refused_as_nyu_data(trained_kitti, tree, tmp_path):
    cache = os.path.join(tree.root, 'cache')
    with pytest.raises(cli.DataError, match='612x184 frames; a KITTI cache trains with --dataset kitti'):
        train.main(['--data', cache, '--out', str(tmp_path), '--device', 'cpu'])


def test_both_stages_train_and_write_kitti_weights(trained_kitti, capsys):
    for stage in ('coarse', 'fine'):
        assert os.path.isfile(trained_kitti / f'{stage}.pth')
        assert os.path.isfile(trained_kitti / f'loss_{stage}.png')
    state = torch.load(trained_kitti / 'coarse.pth', weights_only=True)
    assert state['coarse7.weight'].shape == (27 * 142, 4096)          # Fig. 1: 142x27
    assert state['coarse6.1.weight'].shape == (4096, 256 * 4 * 17)    # coarse5 17x4
    history = (trained_kitti / 'history_coarse.csv').read_text().splitlines()
    assert len(history) == 1 + 2   # header, a row a step (--log-every 1; 4 samples of 2)


def test_a_fine_stage_on_an_nyu_coarse_net_is_refused_naming_both(tree, tmp_path):
    torch.save(GlobalCoarseNet(PAPER).state_dict(), tmp_path / 'coarse.pth')   # NYU's shapes
    with pytest.raises(cli.DataError, match=r'coarse.pth: holds a coarse net of the paper variant '
                                            r'for NYU; this run builds the paper variant for KITTI'):
        _train(tree, tmp_path, '--stage', 'fine')


def test_the_training_data_is_the_eigen_split_without_test_drives(tree, capsys, tmp_path):
    assert _train(tree, tmp_path, '--stage', 'coarse', '--coarse-samples', 2, '--kitti-list', 'eigen') == 0
    out = capsys.readouterr().out
    # the shipped train list, of which the tree holds 6 frames: one line, no traceback
    # 6 frames of the list, each with both cameras, which the list names as separate shots
    assert '45188 of the 45200 frames of the Eigen train split are missing' in out
    # validation: whole drives held out (10% of the frames: one drive of two frames here)
    assert '10 training frames of 4 drives, 2 validation frames of 1 held-out drives' in out
    assert out.count('Eigen train split') == 2 and "paper's" not in out
    leaked = os.path.join(tree.root, 'leak.txt')
    with open(leaked, 'w') as f:   # a list naming a test drive's frame: refused
        f.write(f'{kitti_tree.ENTRIES[0][0]} {kitti_tree.ENTRIES[0][1]:010d} l\n')
    frames = kitti.open_kitti(tree.root, leaked)
    with pytest.raises(cli.DataError, match='official test split'):
        nyu_raw.refuse_test_scenes(frames, kitti.test_drives())


def test_a_cache_or_a_run_of_the_other_list_is_refused(trained_kitti, tree):
    # the cache kitti.py converted from the paper's list (its default), asked for as the Eigen list
    cache = os.path.join(tree.root, 'cache')
    args = train.parse_args(['--dataset', 'kitti', '--data', cache, '--kitti-list', 'eigen'])
    with pytest.raises(cli.DataError, match=r"cache: holds the paper's training list, not the Eigen "
                                            r"train split \(--kitti-list eigen\); train with "
                                            r"--kitti-list paper, or convert"):
        data.load_data(args, torch.device('cpu'))
    # the run trained on the paper's list, resumed on the Eigen list: refused, with the paper's
    # evening given as well
    path = os.path.join(trained_kitti, 'checkpoint.pth')
    ckpt = torch.load(path, weights_only=False)
    assert ckpt['config']['per_scene'] == kitti.PER_SCENE
    for same_evening in ([], ['--per-scene', kitti.PER_SCENE]):
        args = train.parse_args(_argv(tree, trained_kitti, '--stage', 'fine', '--kitti-list', 'eigen',
                                      *map(str, same_evening)))
        with pytest.raises(cli.DataError, match='was started with --kitti-list paper, this run asks for eigen'):
            checkpoint.check_schedule(path, ckpt, args)


def test_evaluate_scores_the_test_frames_under_table_2(trained_kitti, tree, capsys):
    results = evaluate.evaluate(evaluate.parse_args(
        ['--model', str(trained_kitti), '--data', tree.root, '--device', 'cpu', '--workers', '0']))
    out = capsys.readouterr().out
    assert set(results) == {'paper', 'field'}
    assert set(results['field']) == {'Coarse', 'Coarse + Fine'}
    table2 = [line.split()[4:12] for line in out.splitlines() if line.startswith('[paper] Coarse + Fine')]
    # only above the paper's protocol: the field's is another one
    assert table2 == [['0.692', '0.899', '0.967', '0.190', '1.515', '7.156', '0.270', '0.246']]
    assert "Paper rows: none: Table 2 is on the paper's protocol" in out
    assert 'Velodyne x' in out and 'camera z' in out and '5 test images' in out
    for protocol in results.values():
        for row in protocol.values():
            assert all(np.isfinite(v) for v in row.values())
    assert os.path.isfile(trained_kitti / 'eval.json') and os.path.isfile(trained_kitti / 'eval_examples.png')


def test_predict_writes_depth_at_the_kitti_frames_size(trained_kitti, tree, tmp_path):
    image = kitti.image_path(tree.root, kitti_tree.ENTRIES[3])   # a 1226x370 frame of 2011_09_30
    assert predict.main([image, '--model', str(trained_kitti), '--out', str(tmp_path),
                         '--device', 'cpu']) == 0
    depth = np.load(tmp_path / (os.path.basename(image)[:-4] + '_depth.npy'))
    assert depth.shape == (370, 1226) and np.isfinite(depth).all() and (depth > 0).all()
