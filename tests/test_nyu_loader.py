"""The NYU labeled-set loader against small files written in NYU's exact on-disk layout."""
import os

import h5py
import numpy as np
import pytest
import scipy.io

import cli
import synthetic
import util
from helpers import pattern_frame, write_nyu_like

H, W = 480, 640


@pytest.fixture
def tiny_mat(tmp_path):
    path = tmp_path / 'nyu_depth_v2_labeled.mat'
    scenes = ['kitchen_0001', 'kitchen_0001', 'office_0003', 'bedroom_0010', 'office_0003']
    frames = write_nyu_like(path, 5, scenes)
    splits = tmp_path / 'splits.mat'
    # as NYU ships it: MATLAB v5, (k, 1) doubles, 1-based
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [2.0], [4.0]]),
                              'testNdxs': np.array([[3.0], [5.0]])})
    return path, splits, frames, scenes


def test_file_really_is_in_matlab_layout(tiny_mat):
    path = tiny_mat[0]
    with open(path, 'rb') as f:
        f.seek(512)
        assert f.read(8) == b'\x89HDF\r\n\x1a\n'   # HDF5 signature after the user block
    with h5py.File(path, 'r') as f:
        assert f['images'].shape == (5, 3, 640, 480) and f['images'].dtype == np.uint8
        assert f['depths'].shape == (5, 640, 480) and f['depths'].dtype == np.float32


def test_images_are_upright_and_unmirrored(tiny_mat):
    path, _, frames, _ = tiny_mat
    data = util.read_nyu_labeled(path, use_cache=False, progress=False)
    img = data['images']
    assert img.shape == (5, 240, 320, 3) and img.dtype == np.uint8
    # red only in the top-left quadrant (catches rotation and both mirrorings)
    assert (img[:, :120, :160, 0] == 200).all()
    assert (img[:, :120, 160:, 0] == 10).all() and (img[:, 120:, :, 0] == 10).all()
    # green grows along the width, blue along the height (catches a transpose)
    assert (np.diff(img[0, 100, :, 1].astype(int)) >= 0).all() and img[0, 100, -1, 1] > 250
    assert (np.diff(img[0, :, 100, 2].astype(int)) >= 0).all() and img[0, -1, 100, 2] > 250
    # the 2x2 block average of the original pixels
    expected = frames[3][0].reshape(240, 2, 320, 2, 3).mean(axis=(1, 3))
    assert np.abs(img[3].astype(float) - expected).max() <= 0.5


def test_depth_matches_the_image(tiny_mat):
    path, _, frames, _ = tiny_mat
    data = util.read_nyu_labeled(path, use_cache=False, progress=False)
    depth, raw = data['depths'].astype(np.float32), data['raw_depths'].astype(np.float32)
    assert depth.shape == (5, 240, 320)
    for i in range(5):
        # depth is linear in x and y, so the 2x2 block mean is its value at the block centre
        y, x = np.mgrid[:240, :320]
        expected = 1.0 + i + (2 * x + 0.5) / W * 4 + (2 * y + 0.5) / H
        np.testing.assert_allclose(depth[i], expected, rtol=2e-3)   # float16 cache
    # the raw hole (top-left 40x80 at full resolution) stays missing, nothing else is
    assert (raw[:, :20, :40] == 0).all()
    assert (raw[:, 20:, :] > 0).all() and (raw[:, :, 40:] > 0).all()


def test_scene_names_decoded(tiny_mat):
    path, _, _, scenes = tiny_mat
    assert util.read_nyu_labeled(path, use_cache=False, progress=False)['scenes'] == scenes


def test_official_split_membership(tiny_mat):
    path, splits, _, _ = tiny_mat
    train, test = util.read_splits(splits, 5)
    assert train.tolist() == [0, 1, 3] and test.tolist() == [2, 4]   # 1-based on disk
    assert train.dtype == np.int64


def test_real_splits_mat(shared):
    train, test = util.read_splits(os.path.join(shared, 'nyu-samples', 'splits', 'splits.mat'), 1449)
    assert len(train) == 795 and len(test) == 654
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1449))
    # the first test frames, as named in the DenseDepth sample ids (testNdxs - 1)
    assert test[:5].tolist() == [0, 1, 8, 13, 14]


def test_validation_split_takes_whole_training_scenes():
    scenes = [f'room_{i // 4}' for i in range(40)]
    train_idx = np.arange(0, 40)
    tr, val = util.split_train_val(train_idx, scenes, 0.2, seed=0)
    assert len(np.intersect1d(tr, val)) == 0 and len(tr) + len(val) == 40
    assert {scenes[i] for i in tr}.isdisjoint({scenes[i] for i in val})
    assert len(val) == 8


def test_frames_across_read_chunks(tmp_path, monkeypatch):
    """The .mat is read a chunk of frames at a time: with chunks of 2, five frames whose images
    and depths carry their own number come out in their places."""
    def numbered(i):
        rgb, depth, raw = pattern_frame(i)
        rgb = rgb.copy()
        rgb[..., 0] = 30 * i + 5
        return rgb, depth, raw
    path = tmp_path / 'chunks.mat'
    write_nyu_like(path, 5, frame=numbered)
    monkeypatch.setattr(util, 'READ_CHUNK', 2)
    data = util.read_nyu_labeled(path, use_cache=False, progress=False)
    assert [int(data['images'][i, 0, 0, 0]) for i in range(5)] == [5, 35, 65, 95, 125]
    assert [float(data['depths'][i, 0, 0]) for i in range(5)] == pytest.approx([1, 2, 3, 4, 5], abs=0.02)


def test_cache_is_reused_and_refreshed(tiny_mat, monkeypatch):
    path = tiny_mat[0]
    first = util.read_nyu_labeled(path, progress=False)
    assert os.path.isfile(util.cache_path_for(path))
    real_read = util._read_mat

    def must_not_read(*args):
        raise AssertionError('the .mat was read again although the cache is valid')
    monkeypatch.setattr(util, '_read_mat', must_not_read)
    second = util.read_nyu_labeled(path, progress=False)
    np.testing.assert_array_equal(first['images'], second['images'])
    np.testing.assert_array_equal(first['raw_depths'], second['raw_depths'])
    # the .mat changed in place, same size: read again, not served from the stale cache
    monkeypatch.setattr(util, '_read_mat', real_read)
    size = os.path.getsize(path)
    with h5py.File(path, 'r+') as f:
        f['images'][0, 0, 10, 10] = 77
    assert os.path.getsize(path) == size
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert util.read_nyu_labeled(path, progress=False)['images'][0, 5, 5, 0] != first['images'][0, 5, 5, 0]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(cli.DataError, match='not found'):
        util.read_nyu_labeled(tmp_path / 'missing.mat')
    with pytest.raises(cli.DataError, match='directory'):
        util.read_nyu_labeled(tmp_path)
    v5 = tmp_path / 'v5.mat'
    scipy.io.savemat(v5, {'images': np.zeros((2, 2))})
    with pytest.raises(cli.DataError, match='v7.3'):
        util.read_nyu_labeled(v5, use_cache=False)


def test_synthetic_writer_produces_nyu_layout(tmp_path):
    mat, splits = synthetic.make_synthetic_nyu(tmp_path, num_scenes=2, frames_per_scene=2,
                                          test_fraction=0.5, progress=False)
    with open(mat, 'rb') as f:
        f.seek(512)
        assert f.read(4) == b'\x89HDF'
    with h5py.File(mat, 'r') as f:
        for name, shape, dtype, mclass in (('images', (4, 3, 640, 480), np.uint8, b'uint8'),
                                           ('depths', (4, 640, 480), np.float32, b'single'),
                                           ('rawDepths', (4, 640, 480), np.float32, b'single'),
                                           ('labels', (4, 640, 480), np.uint16, b'uint16'),
                                           ('instances', (4, 640, 480), np.uint8, b'uint8')):
            assert f[name].shape == shape and f[name].dtype == dtype
            assert f[name].attrs['MATLAB_class'] == mclass
        assert f['scenes'].shape == (1, 4)
    m = scipy.io.loadmat(splits)
    assert m['trainNdxs'].shape == (2, 1) and m['testNdxs'].shape == (2, 1)
    data = util.read_nyu_labeled(mat, use_cache=False, progress=False)
    assert data['scenes'] == ['synthetic_room_0000'] * 2 + ['synthetic_room_0001'] * 2
    d = data['depths'].astype(np.float32)
    assert d.min() >= 0.5 and d.max() <= 10.0
    # floor at the bottom of an upright frame is nearer than the top (wall or ceiling far away)
    assert np.median(d[:, -20:]) < np.median(d[:, 100:140])
    assert (data['raw_depths'] == 0).any() and (data['depths'] > 0).all()


@pytest.mark.parametrize('damage', ['empty', 'cut short'])
def test_a_damaged_cache_is_rebuilt_with_a_note(tiny_mat, capsys, damage):
    """A cache cut short (a copy, a full disk) is only a copy of the .mat: read the .mat again."""
    path = tiny_mat[0]
    first = util.read_nyu_labeled(path, progress=False)
    cache = util.cache_path_for(path)
    whole = open(cache, 'rb').read()
    open(cache, 'wb').write(b'' if damage == 'empty' else whole[:len(whole) // 2])
    capsys.readouterr()
    again = util.read_nyu_labeled(path, progress=False)
    np.testing.assert_array_equal(again['images'], first['images'])
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f'note: {cache}: damaged')
    assert open(cache, 'rb').read() == whole          # rebuilt, the same arrays


def _chunked_mat(path, n=3):
    """A labeled file written as MATLAB -v7.3 writes it (one gzip chunk per frame)."""
    zeros = np.zeros((H, W), np.uint16)
    frames = [(*pattern_frame(i), zeros, zeros.astype(np.uint8)) for i in range(n)]
    synthetic.write_nyu_labeled_mat(path, frames, [f'room_{i}' for i in range(n)], progress=False)


@pytest.mark.parametrize('whose', ['NYU', 'demo'])
def test_a_damaged_mat_is_one_line_naming_it(tmp_path, whose):
    """A block zeroed in the middle (the depths of frame 1): HDF5 opens the file and fails only
    when reading that part; training's read and evaluation's full-resolution one both say so in
    one line. The synthetic demo's file (its MATLAB header names it) is made anew, not downloaded."""
    mat = tmp_path / 'labeled.mat'
    _chunked_mat(mat)
    with h5py.File(mat, 'r') as f:
        chunk = f['depths'].id.get_chunk_info(1)
    with open(mat, 'r+b') as f:
        if whose == 'NYU':
            f.write(bytes(128))                          # no header: not the demo's file
        f.seek(chunk.byte_offset + chunk.size // 4)
        f.write(bytes(chunk.size // 2))
    remedy = 'download it again' if whose == 'NYU' else 'train.py --demo makes it again'
    with pytest.raises(cli.DataError) as train_read:
        util.read_nyu_labeled(mat, use_cache=False, progress=False)
    with pytest.raises(cli.DataError) as eval_read:
        list(util.read_full_depths(mat, [0, 1]))
    for e in (train_read, eval_read):
        message = str(e.value)
        assert message.startswith(f'{mat}: damaged') and remedy in message and '\n' not in message


@pytest.mark.parametrize('name, value, expected', [
    ('trainNdxs', np.zeros((0, 1)), 'is empty'),
    ('testNdxs', np.zeros((0, 1)), 'is empty'),
    ('trainNdxs', np.array([[1.0], [2.5]]), 'holds 2.5, not a whole frame number'),
    ('testNdxs', np.array([[3.0], [5.0], [3.0]]), 'lists frame 3 2 times'),
    ('trainNdxs', '1 2 4', 'holds text, not frame numbers'),
    ('testNdxs', np.array([[np.nan]]), 'holds NaN or inf'),
])
def test_splits_that_are_not_a_split_are_refused_in_one_line(tmp_path, name, value, expected):
    """An empty side, fractional or repeated frame numbers, text: never scored silently."""
    splits = tmp_path / 'splits.mat'
    variables = {'trainNdxs': np.array([[1.0], [2.0], [4.0]]), 'testNdxs': np.array([[3.0], [5.0]])}
    variables[name] = value
    scipy.io.savemat(splits, variables)
    with pytest.raises(cli.DataError) as e:
        util.read_splits(splits, 5)
    assert str(e.value).startswith(f"{splits}: '{name}' {expected}") and '\n' not in str(e.value)


def test_the_demo_makes_its_data_again_when_it_is_cut_short(tmp_path, monkeypatch, capsys):
    import data
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, 'DEMO_SCENES', 2)
    monkeypatch.setattr(data, 'DEMO_VIEWS', 1)
    mat, splits = data.demo_paths()
    whole = open(mat, 'rb').read()
    open(mat, 'wb').write(whole[:len(whole) // 2])
    capsys.readouterr()
    assert data.demo_paths() == (mat, splits)
    assert 'making the synthetic demo data again' in capsys.readouterr().out
    assert os.path.getsize(mat) == len(whole) and len(util.read_scene_names(mat)) == 2
