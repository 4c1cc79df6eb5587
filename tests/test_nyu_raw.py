"""Raw-frame training sets: each layout built tiny in its exact on-disk form (real PNG
and JPEG encodings, 16-bit depth, CSV, list file), checked value by value; scene balancing; the
test-scene refusal; streaming in flat memory."""
import errno
import io
import json
import os
import re
import subprocess
import sys
import threading
import types
import zipfile

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import cli
import nyu_raw
import train
import util
from helpers import CONVERTER_REFUSALS, ROOT, one_line, refusal, train_args, write_nyu_like

H, W = 480, 640


def _frame(seed):
    """640x480 RGB (smooth + noise) and depth in millimetres that is constant on each 2x2 block
    (so the 320x240 result is exact), with holes: whole 2x2 blocks of 0 and a few single zeros
    inside otherwise valid blocks (averaged over the valid pixels only)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:H, :W]
    rgb = np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 40 * seed % 255)], -1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    blocks = rng.integers(700, 9000, (H // 2, W // 2)).astype(np.uint16)
    blocks[:10, :20] = 0                                    # a hole: 20x40 pixels missing
    depth = np.repeat(np.repeat(blocks, 2, 0), 2, 1)
    depth[100, 200] = 0                                     # one missing pixel of block (50, 100)
    return rgb, depth


def _expected(rgb, depth_m):
    """What the loader must give: 2x2 means (RGB rounded), depth over the valid pixels only."""
    r = np.round(rgb.reshape(H // 2, 2, W // 2, 2, 3).astype(np.float32).mean((1, 3))).astype(np.uint8)
    d = depth_m.reshape(H // 2, 2, W // 2, 2)
    valid = d > 0
    mean = np.where(valid, d, 0).sum((1, 3)) / np.maximum(valid.sum((1, 3)), 1)
    return r, np.where(valid.any((1, 3)), mean, 0).astype(np.float16)


def _save_png16(path, depth):
    Image.fromarray(depth.astype(np.uint16)).save(path)
    assert Image.open(path).mode in ('I;16', 'I')           # really a 16-bit PNG


def _check(frames, i, rgb, depth_m, rgb_exact=True):
    img, depth = frames[i]
    want_rgb, want_depth = _expected(rgb, depth_m)
    assert img.shape == (3, 240, 320) and img.dtype == torch.uint8
    assert depth.shape == (240, 320) and depth.dtype == torch.float16
    np.testing.assert_array_equal(depth.numpy(), want_depth)
    assert (depth[:5, :10] == 0).all() and depth[50, 100] == np.float16(depth_m[101, 201])
    if rgb_exact:
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), want_rgb)


@pytest.fixture
def bts_tree(tmp_path):
    """BTS sync layout: <root>/<scene>/rgb_NNNNN.jpg + sync_depth_NNNNN.png, a list of lines."""
    root = tmp_path / 'sync'
    lines, frames = [], []
    for k, scene in enumerate(['living_room_0038', 'living_room_0038', 'kitchen_0019a']):
        (root / scene).mkdir(parents=True, exist_ok=True)
        rgb, depth = _frame(k)
        Image.fromarray(rgb).save(root / scene / f'rgb_{k:05d}.jpg', quality=95)
        _save_png16(root / scene / f'sync_depth_{k:05d}.png', depth)
        lines.append(f'/{scene}/rgb_{k:05d}.jpg /{scene}/sync_depth_{k:05d}.png 518.8579')
        frames.append((root / scene / f'rgb_{k:05d}.jpg', depth))
    listing = tmp_path / 'nyudepthv2_train_files_with_gt.txt'
    listing.write_text('\n'.join(lines) + '\n')
    return listing, root, frames


def test_bts_sync_layout(bts_tree):
    listing, root, frames = bts_tree
    data = nyu_raw.open_raw(str(listing), root=str(root))
    assert isinstance(data, nyu_raw.RawFrames) and len(data) == 3
    assert data.scenes == ['living_room_0038', 'living_room_0038', 'kitchen_0019']
    for i, (jpg, depth_mm) in enumerate(frames):
        decoded = np.asarray(Image.open(jpg).convert('RGB'))   # JPEG: what PIL decodes is the truth
        _check(data, i, decoded, depth_mm / 1000.0)


def test_densedepth_zip_and_extracted_folder(tmp_path):
    folder = tmp_path / 'extracted'
    rows, frames = [], []
    for k, scene in enumerate(['living_room_0038_out', 'bedroom_0004_out']):
        d = folder / 'data' / 'nyu2_train' / scene
        d.mkdir(parents=True)
        rgb, depth_mm = _frame(k + 5)
        png8 = np.round(depth_mm / 10000 * 255).clip(0, 255).astype(np.uint8)   # DenseDepth's 8 bit
        Image.fromarray(rgb).save(d / f'{k + 37}.jpg', quality=95)
        Image.fromarray(png8).save(d / f'{k + 37}.png')
        assert Image.open(d / f'{k + 37}.png').mode == 'L'
        rows.append(f'data/nyu2_train/{scene}/{k + 37}.jpg,data/nyu2_train/{scene}/{k + 37}.png')
        frames.append((d / f'{k + 37}.jpg', png8.astype(np.float32) / 255 * 10))
    (folder / 'data' / 'nyu2_train.csv').write_text('\n'.join(rows) + '\n')
    zpath = tmp_path / 'nyu_data.zip'
    with zipfile.ZipFile(zpath, 'w') as z:
        for path in sorted(folder.rglob('*')):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    for source in (zpath, folder):
        data = nyu_raw.open_raw(str(source))
        assert data.scenes == ['living_room_0038', 'bedroom_0004']
        for i, (jpg, depth_m) in enumerate(frames):
            _check(data, i, np.asarray(Image.open(jpg).convert('RGB')), depth_m)


def test_plain_folder_with_a_stated_scale(tmp_path):
    frames = []
    for k, scene in enumerate(['office_a', 'office_a', 'lab_b']):
        (tmp_path / 'mine' / scene).mkdir(parents=True, exist_ok=True)
        rgb, depth = _frame(k + 9)
        Image.fromarray(rgb).save(tmp_path / 'mine' / scene / f'rgb_{k}.png')   # lossless: exact
        _save_png16(tmp_path / 'mine' / scene / f'depth_{k}.png', depth // 4)
        frames.append((rgb, (depth // 4).astype(np.float32) * 0.004))
    with pytest.raises(cli.DataError, match='--depth-scale'):
        nyu_raw.open_raw(str(tmp_path / 'mine'))
    data = nyu_raw.open_raw(str(tmp_path / 'mine'), depth_scale=0.004)
    assert data.scenes == ['lab_b', 'office_a', 'office_a']
    for i, k in enumerate([2, 0, 1]):
        _check(data, i, *frames[k])
    (tmp_path / 'mine' / 'lab_b' / 'depth_2.png').unlink()
    with pytest.raises(cli.DataError, match='no depth_2.png beside it'):
        nyu_raw.open_raw(str(tmp_path / 'mine'), depth_scale=0.004)


def test_bad_raw_files_give_one_line(bts_tree, tmp_path):
    listing, root, _ = bts_tree
    bad = tmp_path / 'bad_list.txt'
    bad.write_text('/living_room_0038/rgb_00000.jpg\n')
    with pytest.raises(cli.DataError, match='line 1: expected'):
        nyu_raw.open_raw(str(bad))
    jpg = root / 'living_room_0038' / 'sync_depth_00000.png'
    Image.fromarray(np.zeros((H, W), np.uint8)).save(jpg)      # 8-bit where BTS has 16-bit
    with pytest.raises(cli.DataError, match='sync_depth_00000.png: depth PNG of mode L'):
        nyu_raw.open_raw(str(listing), root=str(root))[0]
    (root / 'living_room_0038' / 'rgb_00000.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(cli.DataError, match='rgb_00000.jpg: not a readable image'):
        nyu_raw.open_raw(str(listing), root=str(root))[0]


def test_real_bts_frames(shared, tmp_path):
    demo = os.path.join(shared, 'nyu-samples', 'metric3d_nyu_demo')
    listing = tmp_path / 'list.txt'
    listing.write_text(''.join(f'/rgb/rgb_{k:05d}.jpg /depth/sync_depth_{k:05d}.png 518.8579\n'
                               for k in (0, 50, 100)))
    data = nyu_raw.open_raw(str(listing), root=demo)
    for i, k in enumerate((0, 50, 100)):
        img, depth = data[i]
        raw = np.asarray(Image.open(os.path.join(demo, 'depth', f'sync_depth_{k:05d}.png'))).astype(np.float32) / 1000
        np.testing.assert_array_equal(depth.numpy(), _expected(np.zeros((H, W, 3), np.uint8), raw)[1])
        assert 0.15 < float((depth == 0).float().mean()) < 0.4      # raw Kinect holes kept
        assert 0.3 < float(depth.max()) < 10


@pytest.mark.slow
def test_conversion_to_the_memory_mapped_cache(bts_tree, tmp_path):
    listing, root, _ = bts_tree
    data = nyu_raw.open_raw(str(listing), root=str(root))
    out = nyu_raw.convert(data, str(tmp_path / 'cache'), workers=0, progress=False)
    cached = nyu_raw.open_raw(out)
    assert isinstance(cached, nyu_raw.CachedFrames) and cached.scenes == data.scenes
    assert isinstance(cached.images, np.memmap)
    for i in range(len(data)):
        (a, da), (b, db) = data[i], cached[i]
        assert torch.equal(a, b)
        assert (da == 0).equal(db == 0) and (da.float() - db.float()).abs().max() <= 0.001
    # converting again replaces the cache; a folder that is not one (here the raw frames
    # themselves) or a file is refused before any work, and nothing is deleted
    assert nyu_raw.convert(data, str(tmp_path / 'cache'), workers=0, progress=False) == out
    before = sorted(p.name for p in root.rglob('*'))
    (tmp_path / 'a_file').write_text('mine')
    for taken, what in ((root, 'a folder, but not a cache; .*nothing was deleted'),
                        (tmp_path / 'a_file', 'a file; --out names a folder')):
        with pytest.raises(cli.DataError, match=f'{taken}: is {what}'):
            nyu_raw.convert(data, str(taken), workers=0, progress=False)
    assert sorted(p.name for p in root.rglob('*')) == before
    assert (tmp_path / 'a_file').read_text() == 'mine'
    (tmp_path / 'empty').mkdir()                       # an empty folder is fine
    assert nyu_raw.is_cache(nyu_raw.convert(data, str(tmp_path / 'empty'), workers=0, progress=False))
    (tmp_path / 'new.partial').mkdir()                 # a folder of the user's where the
    (tmp_path / 'new.partial' / 'notes.txt').write_text('mine')   # temporary one would go
    with pytest.raises(cli.DataError, match='new.partial: is a folder, but not a cache'):
        nyu_raw.convert(data, str(tmp_path / 'new'), workers=0, progress=False)
    assert (tmp_path / 'new.partial' / 'notes.txt').read_text() == 'mine'


def _no_space(*_args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_with_room(room):
    """An `open` for nyu_raw whose binary files share `room` bytes, as a small disk without
    posix_fallocate: a write past it fails with ENOSPC."""
    used = [0]

    class File(io.FileIO):
        def write(self, data):
            size = memoryview(data).nbytes
            if used[0] + size > room:
                _no_space()
            used[0] += size
            return super().write(data)

    return lambda path, mode='r', **kw: File(path, mode) if 'b' in mode else open(path, mode, **kw)


@pytest.mark.parametrize('full', ['free space checked first', 'space reserved first',
                                  'a write fails midway'])
def test_a_full_disk_is_one_line_and_leaves_nothing(bts_tree, tmp_path, monkeypatch, full):
    """A full disk is one line and no partial cache is left holding the space: the free space is
    checked first, the files are reserved before writing, and a write that fails midway is an
    error, not a SIGBUS (the cache is written without a memory map)."""
    listing, root, _ = bts_tree
    out = tmp_path / 'cache'
    if full == 'free space checked first':    # 1 MiB free; 3 frames of 320x240 x 5 bytes: 1.1 MiB
        monkeypatch.setattr(os, 'statvfs', lambda path: types.SimpleNamespace(f_bavail=256, f_frsize=4096))
    elif full == 'space reserved first':
        monkeypatch.setattr(os, 'posix_fallocate', _no_space)
    else:                                      # room for the first frame's RGB (225 KiB) only
        monkeypatch.delattr(os, 'posix_fallocate')
        monkeypatch.setattr(nyu_raw, 'open', _disk_with_room(300_000), raising=False)
    with pytest.raises(cli.UserError) as e:
        nyu_raw.main(['--data', str(listing), '--data-root', str(root), '--out', str(out),
                      '--workers', '0'])
    message = one_line(e)
    if full == 'free space checked first':
        assert message.startswith(f'{out}: the cache needs 1.1 MiB, but the file system of '
                                  f'{tmp_path} has 1.0 MiB free')
    else:
        assert message.startswith(f'{out}: could not write ') and '(No space left on device)' in message
    assert sorted(os.listdir(tmp_path)) == ['nyudepthv2_train_files_with_gt.txt', 'sync']


def _mm_folder(folder, count=2, zero=False):
    """rgb_<k>.png / depth_<k>.png pairs, the depth 16-bit millimetres (0.7 to 9 m), or all 0."""
    folder.mkdir()
    for k in range(count):
        rgb, depth = _frame(k)
        Image.fromarray(rgb).save(folder / f'rgb_{k}.png')
        _save_png16(folder / f'depth_{k}.png', depth * 0 if zero else depth)
    return folder


@pytest.mark.parametrize('scale, found', [
    ('1', r'100% of the valid depth is outside 0.1 to 20 m \(median [\d.e+]+ m, 100% clipped at 65.5 m\)'),
    ('1e-06', r'100% of the valid depth is outside 0.1 to 20 m \(median 0.00[45]\d* m\)')],
    ids=['read as metres', 'read as micrometres'])
def test_a_wrong_depth_scale_is_refused_with_the_likely_one(tmp_path, scale, found):
    """Millimetre PNGs read as metres (clipped at the cache's 65.5 m) or as micrometres."""
    folder = _mm_folder(tmp_path / 'mine')
    with pytest.raises(cli.DataError) as e:
        nyu_raw.main(['--data', str(folder), '--depth-scale', scale, '--out', str(tmp_path / 'c'),
                      '--workers', '0'])
    message = one_line(e)
    assert re.match(f'{folder}: {found}: the depth unit looks wrong; --depth-scale 0.001 gives a '
                    f'median of 4', message), message
    assert sorted(os.listdir(tmp_path)) == ['mine']


def test_the_depth_unit_is_checked_on_the_first_frames_and_no_depth_is_refused(tmp_path, monkeypatch):
    folder = _mm_folder(tmp_path / 'mine', count=3)
    (folder / 'rgb_2.png').write_bytes(b'not a png')   # never reached: refused after 2 frames
    monkeypatch.setattr(nyu_raw, 'DEPTH_CHECK_FRAMES', 2)
    with pytest.raises(cli.DataError, match='the depth unit looks wrong; --depth-scale 0.001 '):
        nyu_raw.main(['--data', str(folder), '--depth-scale', '1', '--out', str(tmp_path / 'c'),
                      '--workers', '0'])
    empty = _mm_folder(tmp_path / 'zeros', zero=True)
    with pytest.raises(cli.DataError, match=f'{empty}: none of its 2 frames has a valid depth pixel'):
        nyu_raw.main(['--data', str(empty), '--depth-scale', '0.001', '--out', str(tmp_path / 'c'),
                      '--workers', '0'])
    assert sorted(os.listdir(tmp_path)) == ['mine', 'zeros']


@pytest.mark.parametrize('option, value, refused', [
    ('--depth-scale', 'nan', 'argument --depth-scale: nan is not a finite number'),
    ('--depth-scale', 'inf', 'argument --depth-scale: inf is not a finite number'),
    ('--depth-scale', '0', 'argument --depth-scale: 0 must be above 0'),
    ('--depth-scale', '-0.001', 'argument --depth-scale: -0.001 must be above 0'),
    ('--data', '{cache}', '{cache}: is already a converted cache'), *CONVERTER_REFUSALS])
def test_bad_options_are_one_line_before_any_work(tmp_path, option, value, refused):
    file, cache = tmp_path / 'a_file', _generated_cache(tmp_path / 'cache', n=2)
    file.write_text('mine')
    argv = {'--data': str(tmp_path / 'missing'), '--depth-scale': '0.001',   # --data: read last
            '--out': str(tmp_path / 'out'), '--workers': '0'}
    argv[option] = value.format(file=file, cache=cache)
    assert refusal(nyu_raw.main, argv).startswith(refused.format(file=file, cache=cache))
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'cache']


class _ThreadErrors(torch.utils.data.Dataset):
    """Item 0 reports a dropped connection from a thread as multiprocessing's resource sharer
    does (sys.excepthook), item 1 one from a plain thread, item 2 another error."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        def fail():
            if i == 0:
                try:
                    raise ConnectionResetError('dropped')
                except ConnectionResetError:
                    sys.excepthook(*sys.exc_info())
            else:
                raise BrokenPipeError('dropped') if i == 1 else ValueError('a real error')
        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
        return i


def test_loader_workers_keep_quiet_about_a_connection_the_main_process_dropped(capfd, monkeypatch):
    """A Ctrl-C in the main process while it receives a frame drops the worker's connection; the
    worker's traceback of it came after the `interrupted` line."""
    monkeypatch.setattr(threading, 'excepthook', threading.__excepthook__)   # not pytest's
    assert list(util.FrameLoader(_ThreadErrors(), batch_size=None, num_workers=1)) == [0, 1, 2]
    err = capfd.readouterr().err
    assert 'ValueError: a real error' in err
    assert 'Error: dropped' not in err                 # the line ending each dropped one's traceback


CTRL_C = r"""
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)   # whatever the test runner had
# a terminal's Ctrl-C reaches the whole process group, once, while the workers start: each one
# takes a second to start (at fork, where logging's own hooks run too)
pressed = []
def ctrl_c_soon():
    if not pressed:
        pressed.append(threading.Timer(0.3, os.killpg, (0, signal.SIGINT)))
        pressed[0].start()
os.register_at_fork(after_in_child=lambda: time.sleep(1), after_in_parent=ctrl_c_soon)
import cli, nyu_raw
sys.argv[1:] = sys.argv[2:]
cli.run_cli(nyu_raw.main)
"""


@pytest.mark.slow
def test_ctrl_c_while_workers_start_is_one_line(bts_tree, tmp_path):
    listing, root, _ = bts_tree
    out = tmp_path / 'cache'
    r = subprocess.run([sys.executable, '-W', 'ignore::UserWarning', '-c', CTRL_C, ROOT,
                        '--data', str(listing), '--data-root', str(root), '--out', str(out),
                        '--workers', '2'], capture_output=True, text=True, timeout=120,
                       start_new_session=True)
    assert (r.returncode, r.stderr) == (130, 'interrupted\n')
    assert sorted(os.listdir(tmp_path)) == ['nyudepthv2_train_files_with_gt.txt', 'sync']


@pytest.mark.parametrize('damage', ['images.npy cut short', 'no depths file', 'json cut short',
                                    'json without scenes', 'images.npy not an array'])
def test_a_damaged_cache_is_one_line(tmp_path, damage):
    folder = _generated_cache(tmp_path / 'cache', n=4)
    images, meta = folder / 'images.npy', folder / nyu_raw.CACHE_META
    if damage == 'images.npy cut short':
        images.write_bytes(images.read_bytes()[:100_000])
    elif damage == 'no depths file':
        (folder / 'depths_mm.npy').unlink()
    elif damage == 'json cut short':
        meta.write_text(meta.read_text()[:20])
    elif damage == 'json without scenes':
        meta.write_text('{"source": "x"}')
    else:
        images.write_bytes(os.urandom(1000))
    with pytest.raises(cli.DataError, match=f'{folder}: not a complete cache .*convert again'):
        nyu_raw.CachedFrames(str(folder))


def test_scene_balancing_draws_the_requested_count_per_scene():
    scenes = ['big'] * 50 + ['small'] * 3 + ['tiny'] * 1 + ['mid'] * 12
    g = torch.Generator().manual_seed(0)
    chosen = util.balanced_pass(scenes, 20, g).tolist()
    assert len(chosen) == 80
    per_scene = {s: [i for i in chosen if scenes[i] == s] for s in set(scenes)}
    assert {s: len(v) for s, v in per_scene.items()} == {'big': 20, 'small': 20, 'tiny': 20, 'mid': 20}
    assert len(set(per_scene['big'])) == 20                   # a subset of a large scene
    assert set(per_scene['small']) == {50, 51, 52}            # every frame of a small one...
    assert max(per_scene['small'].count(i) for i in (50, 51, 52)) == 7   # ...evenly repeated
    order = util.SampleOrder(len(scenes), 0, scenes, per_scene=20)
    drawn = [i for step in range(10) for i in order.indices(step, 8)]   # one pass: 80 frames
    assert {s: sum(scenes[i] == s for i in drawn) for s in set(scenes)} == \
        {'big': 20, 'small': 20, 'tiny': 20, 'mid': 20}


@pytest.mark.parametrize('leak', ['office_0003', 'office_0003_out', 'office_0003b'])
def test_frames_of_a_test_scene_are_refused(bts_tree, tmp_path, leak):
    listing, root, frames = bts_tree
    labeled, splits = tmp_path / 'labeled.mat', tmp_path / 'splits.mat'
    write_nyu_like(labeled, 5, ['kitchen_0001', 'kitchen_0001', 'office_0003', 'bedroom_0010', 'office_0003'])
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [2.0], [4.0]]),
                              'testNdxs': np.array([[3.0], [5.0]])})
    (root / leak).mkdir()
    for name in ('rgb_00000.jpg', 'sync_depth_00000.png'):
        (root / leak / name).write_bytes((root / 'living_room_0038' / name).read_bytes())
    with open(listing, 'a') as f:
        f.write(f'/{leak}/rgb_00000.jpg /{leak}/sync_depth_00000.png 518.8579\n')
    argv = train_args((listing, splits), tmp_path / 'out', '--labeled', labeled, '--data-root', root)
    with pytest.raises(cli.DataError, match=r'1 training frames come from 1 scenes of the official '
                                             r'test split \(office_0003\)'):
        train.main(argv)
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


@pytest.mark.slow
def test_training_streams_raw_frames_and_the_cache_gives_the_same_batches(bts_tree, tmp_path):
    listing, root, _ = bts_tree
    labeled, splits = tmp_path / 'labeled.mat', tmp_path / 'splits.mat'
    write_nyu_like(labeled, 2, ['office_0003', 'bedroom_0010'])
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0]]), 'testNdxs': np.array([[2.0]])})
    cache = nyu_raw.convert(nyu_raw.open_raw(str(listing), root=str(root)), str(tmp_path / 'cache'),
                            workers=0, progress=False)
    schedule = ['--labeled', labeled, '--coarse-samples', 8, '--batch-size', 2, '--stage', 'coarse',
                '--per-scene', 3, '--val-fraction', 0.3, '--val-every', 2, '--seed', 3]
    losses = []
    for data, out, workers in ((listing, 'streamed', 2), (cache, 'cached', 0)):
        assert train.main(train_args((data, splits), tmp_path / out, *schedule, '--data-root', root,
                                     '--workers', workers)) == 0
        history = torch.load(tmp_path / out / 'checkpoint.pth', weights_only=True)['history']
        losses.append(torch.tensor([row['train_loss'] for row in history]))   # one row a step
    # the same frames in the same order (workers or not): the same loss at every step, up to the
    # cache's millimetre rounding of depth; another frame would change a loss by far more
    assert len(losses[0]) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=0)
    changed = torch.load(tmp_path / 'cached' / 'checkpoint.pth', weights_only=True)
    assert changed['config']['per_scene'] == 3 and changed['done']


STREAM = r'''
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import nyu_raw
data = nyu_raw.open_raw(sys.argv[2], depth_scale=0.001)
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, num_workers=2, prefetch_factor=2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = 0
for images, depths in loader:
    count += len(images)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(count, base, peak, workers)
'''


@pytest.mark.slow
def test_memory_stays_flat_while_streaming_a_large_set(tmp_path):
    """400 frames (each decoded to 230 KB of RGB + 150 KB of depth: 150 MB in all); the main
    process's peak RSS may grow by far less than that while every frame passes through."""
    folder = tmp_path / 'big'
    folder.mkdir()
    rgb, depth = _frame(1)
    Image.fromarray(rgb).save(folder / 'rgb_0.jpg', quality=90)
    _save_png16(folder / 'depth_0.png', depth)
    for k in range(1, 400):   # distinct files (hard links would do for decoding, but be honest)
        (folder / f'rgb_{k}.jpg').write_bytes((folder / 'rgb_0.jpg').read_bytes())
        (folder / f'depth_{k}.png').write_bytes((folder / 'depth_0.png').read_bytes())
    r = subprocess.run([sys.executable, '-c', STREAM, ROOT, str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    count, base, peak, workers = map(int, r.stdout.split())
    decoded_mb = 400 * (3 * 240 * 320 + 2 * 240 * 320) / 2**20
    growth_mb = (peak - base) / 1024
    assert count == 400
    assert growth_mb < decoded_mb / 4, (growth_mb, decoded_mb)
    print(f'streamed 400 frames ({decoded_mb:.0f} MB decoded): main RSS grew {growth_mb:.1f} MB, '
          f'worker peak {workers / 1024:.0f} MB')


def _generated_cache(folder, n=16, scenes=('scene_a', 'scene_b', 'scene_c', 'scene_d')):
    """A converted cache written in its format (raw_cache.json, images.npy uint8, depths_mm.npy
    uint16), frames of four scenes with holes in their depth."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:240, :320]
    images = np.stack([np.stack([(x + 17 * i) % 256, (y * 2 + 5 * i) % 256, np.full_like(x, 9 * i)], -1)
                       for i in range(n)]).astype(np.uint8)
    depths = (900 + 20 * x + 7 * y + rng.integers(0, 400, (n, 240, 320))).astype(np.uint16)
    depths[:, 30:60, 40:90] = 0
    folder.mkdir()
    np.save(folder / 'images.npy', images)
    np.save(folder / 'depths_mm.npy', depths)
    (folder / nyu_raw.CACHE_META).write_text(json.dumps(
        {'source': 'generated', 'scenes': [scenes[i % len(scenes)] for i in range(n)]}))
    return folder


def _labeled_pair(tmp_path):
    labeled, splits = tmp_path / 'labeled.mat', tmp_path / 'splits.mat'
    write_nyu_like(labeled, 2, ['office_0003', 'bedroom_0010'])
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0]]), 'testNdxs': np.array([[2.0]])})
    return labeled, splits


@pytest.mark.slow
def test_fast_path_trains_from_the_cache_on_the_device_with_the_streamed_batches(tmp_path, monkeypatch):
    """--path fast loads the converted cache into the device's memory (here the CPU's) and trains
    on exactly the batches that streaming it (--path plain, decoded in workers) gives: the same
    frames, per-scene balancing on, the same draws, so the same loss at every step and the same
    weights (fp32)."""
    cache = _generated_cache(tmp_path / 'cache')
    labeled, splits = _labeled_pair(tmp_path)
    loaded, real = [], nyu_raw.CachedFrames.to_frames
    monkeypatch.setattr(nyu_raw.CachedFrames, 'to_frames',
                        lambda self, idx, device: loaded.append(len(idx)) or real(self, idx, device))
    schedule = ['--labeled', labeled, '--coarse-samples', 12, '--fine-samples', 8, '--batch-size', 4,
                '--per-scene', 3, '--val-fraction', 0.25, '--val-every', 4, '--seed', 4, '--no-amp']
    runs = {}
    for path, workers in (('fast', 0), ('plain', 2)):
        assert train.main(train_args((cache, splits), tmp_path / path, *schedule, '--path', path,
                                     '--workers', workers)) == 0
        runs[path] = tmp_path / path
    assert loaded == [12]                       # the fast run held the 12 training frames
    losses = [torch.tensor([r['train_loss'] for r in torch.load(runs[p] / 'checkpoint.pth',
                                                                 weights_only=True)['history']])
              for p in ('fast', 'plain')]
    assert len(losses[0]) == 2                  # the fine stage's rows: one a step
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for net in ('coarse.pth', 'fine.pth'):
        a, b = (torch.load(runs[p] / net, weights_only=True) for p in ('fast', 'plain'))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_a_cache_larger_than_the_free_memory_is_refused(tmp_path, monkeypatch):
    cache = _generated_cache(tmp_path / 'cache')
    labeled, splits = _labeled_pair(tmp_path)
    monkeypatch.setattr(nyu_raw, 'free_memory', lambda device: 3 * 2**30)   # 3 GiB free
    out = tmp_path / 'out'
    with pytest.raises(cli.UserError) as e:
        train.main(train_args((cache, splits), out, '--labeled', labeled, '--per-scene', 3,
                              '--val-fraction', 0.25))
    message = str(e.value)
    assert '\n' not in message and str(cache) in message and '--path plain' in message
    assert '12 training frames need 4.4 MiB' in message and '3.0 GiB free' in message
    assert not out.exists()                     # nothing written
