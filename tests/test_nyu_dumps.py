"""The official raw NYU dumps -> the training cache (python nyu_dumps.py): tiny scenes
written in the exact dump formats (16-bit PGM with the Kinect's little-endian samples, PPM, the
accelerometer's .dump, INDEX.txt, the real file naming), as folders and as a zip file; the
synchronisation, the projection (checked against camera_params.m's numbers, written out here), the
counts, resuming, the one-line reports of bad input."""
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import time
import zipfile

import numpy as np
import pytest
import scipy.io

import cli
import nyu_dumps
import nyu_raw
import train
from helpers import one_line, train_args, write_nyu_like

H, W = 480, 640
T0 = 1315166703.0   # a time stamp of the NYU recordings (seconds)

# camera_params.m of the NYU toolbox, the numbers as it states them
FX_D, FY_D, CX_D, CY_D = 5.8262448167737955e+02, 5.8269103270988637e+02, 3.1304475870804731e+02, 2.3844389626620386e+02
FX_RGB, FY_RGB, CX_RGB, CY_RGB = 5.1885790117450188e+02, 5.1946961112127485e+02, 3.2558244941119034e+02, 2.5373616633400465e+02
R_NUMBERS = [9.9997798940829263e-01, 5.0518419386157446e-03, 4.3011152014118693e-03,
             -5.0359919480810989e-03, 9.9998051861143999e-01, -3.6879781309514218e-03,
             -4.3196624923060242e-03, 3.6662365748484798e-03, 9.9998394948385538e-01]
T_X, T_Y, T_Z = 2.5031875059141302e-02, 6.6238747008330102e-04, -2.9342312935846411e-04
K_D = (-9.9897236553084481e-02, 3.9065324602765344e-01, 1.9290592870229277e-03,
       -1.9422022475975055e-03, -5.1031725053400578e-01)   # the depth camera's k1, k2, p1, p2, k3


def metres(raw):
    """depth_rel2depth_abs.m: 351.3 / (1092.5 - raw)."""
    return 351.3 / (1092.5 - raw)


def rgb_pixel(u, v, z):
    """Where the depth pixel (u, v) (1-based, as the toolbox counts) at depth z lands in the RGB
    image, 0-based (row, column): the point (u - cx, v - cy) z / f in the depth camera, moved by
    R = inv(M') where M is the nine numbers filled column by column and negated (camera_params.m)
    and T = [t_x, t_z, t_y], projected with the RGB intrinsics and rounded (halves up)."""
    m = -np.reshape(R_NUMBERS, (3, 3), order='F')   # MATLAB's reshape: column by column
    rot = np.linalg.inv(m.T)
    u, v = np.broadcast_arrays(u, v)
    p = np.stack([(u - CX_D) * z / FX_D, (v - CY_D) * z / FY_D, np.full(u.shape, z)])
    q = np.tensordot(rot, p, 1) + np.array([T_X, T_Z, T_Y]).reshape((3,) + (1,) * u.ndim)
    x, y = q[0] * FX_RGB / q[2] + CX_RGB, q[1] * FY_RGB / q[2] + CY_RGB
    return np.floor(y + 0.5).astype(int) - 1, np.floor(x + 0.5).astype(int) - 1


def depth_source(x, y):
    """undistort.m with the depth camera's numbers: where the undistorted depth image's pixel
    (x, y) (0-based column and row) is read in the recorded one, (column, row)."""
    xn, yn = (x - CX_D) / FX_D, (y - CY_D) / FY_D
    k1, k2, p1, p2, k3 = K_D
    r2 = xn ** 2 + yn ** 2
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    xd = xn * radial + 2 * p1 * xn * yn + p2 * (r2 + 2 * xn ** 2)
    yd = yn * radial + p1 * (r2 + 2 * yn ** 2) + 2 * p2 * xn * yn
    return FX_D * xd + CX_D, FY_D * yd + CY_D


# ----------------------------------------------------------------------------------------------
# Dump files, as the Kinect recorder writes them

def pgm(raw):
    """A d-*.pgm: a PGM header, then 16-bit samples in the Kinect's (little-endian) byte order."""
    return b'P5\n640 480\n65535\n' + raw.astype('<u2').tobytes()


def ppm(rgb):
    return b'P6\n640 480\n255\n' + rgb.astype(np.uint8).tobytes()


def accel():
    """An a-*.dump: libfreenect's freenect_raw_tilt_state (3 int16 accelerations, int8 tilt,
    padding, int32 status)."""
    return struct.pack('<hhhbxi', 12, -820, 40, 0, 0)


def wall(raw_value, noise=True):
    """A flat wall of one raw value, and a block of the Kinect's no-reading value 2047 (the
    frame's maximum) in a corner."""
    raw = np.full((H, W), raw_value, np.uint16)
    if noise:
        raw[20:60, 20:80] = 2047
    return raw


def colour(j):
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[:] = (20 + 30 * j, 200 - 20 * j, 90)
    return rgb


# The two training scenes: (depth times, RGB times) after T0, and each depth frame's raw wall.
# bedroom_0001: depth 0.10 and 0.20 both find RGB 0.12 nearest: both dropped (one-to-many).
# kitchen_0002a: each depth frame lies exactly between two RGB frames: the pointer moves on at a
# tie, so depth 1.0 takes RGB 1.25 (not 0.75) and depth 1.5 takes 1.75.
SCENES = {'bedroom_0001': ([0.0, 0.1, 0.2, 0.3], [0.01, 0.12, 0.31], [700, 750, 800, 850]),
          'kitchen_0002a': ([1.0, 1.5], [0.75, 1.25, 1.75], [900, 950])}
# (scene, depth frame, RGB frame) of every frame kept, in the cache's order
KEPT = [('bedroom_0001', 0, 0), ('bedroom_0001', 3, 2), ('kitchen_0002a', 0, 1),
        ('kitchen_0002a', 1, 2)]


def name(kind, t, n):
    return f'{kind}-{T0 + t:.6f}-{n}.{ {"d": "pgm", "r": "ppm", "a": "dump"}[kind]}'


def write_scene(folder, depth_times, rgb_times, raws):
    folder.mkdir(parents=True)
    index = []
    for n, (t, raw) in enumerate(zip(depth_times, raws)):
        (folder / name('d', t, 1000 + n)).write_bytes(pgm(wall(raw)))
        (folder / name('a', t + 0.002, 2000 + n)).write_bytes(accel())
        index += [name('d', t, 1000 + n), name('a', t + 0.002, 2000 + n)]
    for j, t in enumerate(rgb_times):
        (folder / name('r', t, 3000 + j)).write_bytes(ppm(colour(j)))
        index.append(name('r', t, 3000 + j))
    (folder / 'INDEX.txt').write_text('\n'.join(sorted(index)) + '\n')


def zip_folder(folder, path):
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob('*')):
            z.write(f, f.relative_to(folder).as_posix())
    return path


def write_dumps(folder):
    """The raw root with the two training scenes, and a labeled file + splits.mat naming them as
    training scenes and office_0003 as a test scene."""
    root = folder / 'nyu_raw'
    for scene, (depth_times, rgb_times, raws) in SCENES.items():
        write_scene(root / scene, depth_times, rgb_times, raws)
    labeled, splits = folder / 'labeled.mat', folder / 'splits.mat'
    write_nyu_like(labeled, 3, ['bedroom_0001', 'kitchen_0002', 'office_0003'])
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [2.0]]), 'testNdxs': np.array([[3.0]])})
    return root, labeled, splits


@pytest.fixture
def dumps(tmp_path):
    return write_dumps(tmp_path)


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
    """The cache of an uninterrupted conversion of the dumps (cache_bytes), made once."""
    folder = tmp_path_factory.mktemp('whole')
    root, labeled, splits = write_dumps(folder)
    convert(root, folder / 'cache', labeled, splits)
    return cache_bytes(folder / 'cache')


def convert(sources, out, labeled, splits, workers=0):
    sources = [sources] if not isinstance(sources, list) else sources
    return nyu_dumps.main([*map(str, sources), '--out', str(out), '--labeled',
                         str(labeled), '--splits', str(splits), '--workers', str(workers)])


def cache_bytes(out):
    return [(out / f).read_bytes() for f in ('images.npy', 'depths_mm.npy')] + \
        [json.loads((out / 'raw_cache.json').read_text())['scenes']]


# ----------------------------------------------------------------------------------------------

def test_synchronisation_follows_the_forward_pointer():
    # each depth frame's nearest RGB frame, written out by hand: depth 0.25 lies midway between
    # 0.0 and 0.5 (a tie moves the pointer on); depth 0.9 is nearest 1.0, and 1.0 stays its
    # match for 1.4 (1.0 is 0.4 away, 1.9 is 0.5)
    assert nyu_dumps.synchronise([0.25, 0.9, 1.4, 2.0], [0.0, 0.5, 1.0, 1.9, 2.6]) == [1, 2, 2, 3]
    # the pointer never goes back: a later depth frame cannot take an earlier RGB frame
    assert nyu_dumps.synchronise([0.0, 0.0], [0.0, 0.0, 5.0]) == [1, 1]


def test_a_flat_wall_lands_where_the_camera_numbers_put_it():
    raw = wall(800)
    raw[400:440, 500:580] = 500                       # below 600: not depth
    data = pgm(raw)
    assert data[17:19] == struct.pack('<H', 800)      # the Kinect's byte order in the file
    read = nyu_dumps.read_depth(data, 'd-test.pgm')
    depth, rgb = nyu_dumps.Projector()(read, colour(1))
    z = metres(800.0)                                 # 1.8249 m
    # the depth pixels of a central window land at the pixels the formula gives, with z
    v, u = np.mgrid[150:331, 200:441]                 # 1-based rows and columns
    rows, cols = rgb_pixel(u, v, z)
    np.testing.assert_allclose(depth[rows, cols], z, rtol=1e-9)
    assert len(set(zip(rows.ravel(), cols.ravel()))) > 30000   # 43,621 points, ~0.8 x as many pixels
    # the noise value (the frame's maximum) and raw values below 600 come out missing: where the
    # inside of those blocks would land (5 px in from their edges) no depth is left
    for top, bottom, left, right in ((20, 60, 20, 80), (400, 440, 500, 580)):
        v, u = np.mgrid[top + 6:bottom - 4, left + 6:right - 4]
        rows, cols = rgb_pixel(u, v, z)
        assert (depth[rows, cols] == 0).all()
    assert np.isclose(depth.max(), z, rtol=1e-9)      # nothing beyond the wall
    # the RGB image undistorted: its colour inside, the toolbox's white (255) where its source
    # falls outside the recorded image
    assert (rgb[200:280, 280:360] == colour(1)[0, 0]).all() and (rgb == 255).all(-1).any()


def test_a_slanted_surface_lands_pixel_by_pixel_where_the_camera_numbers_put_it():
    """A surface whose raw value grows by one a pixel to the right and one down, 0.7 to 10 m
    across a diagonal band: neighbouring pixels differ by millimetres, so a point put even a
    fraction of a pixel off (a swapped t_y and t_z moves it ~0.3 px) leaves another depth there."""
    y, x = np.mgrid[:H, :W]
    raw = (200 + x + y).astype(np.uint16)
    depth, _ = nyu_dumps.Projector()(raw, colour(0))
    # where each undistorted pixel is read: a bilinear blend of a linear ramp is the ramp there
    sx, sy = depth_source(x, y)
    raw_there = 200 + sx + sy
    kept = (sx >= 0) & (sx < W - 1) & (sy >= 0) & (sy < H - 1) & (raw_there >= 600) & (
        raw_there < 1092.5)   # read inside the image; 600 and up; a positive depth
    z = np.minimum(metres(raw_there[kept]), 10.0)
    rows, cols = rgb_pixel(x[kept] + 1, y[kept] + 1, z)
    inside = (rows >= 0) & (rows < H - 1) & (cols >= 0) & (cols < W - 1)
    expected = np.full((H, W), np.inf)
    np.minimum.at(expected, (rows[inside], cols[inside]), z[inside])   # the nearest point wins
    expected[np.isinf(expected)] = 0
    crop = np.s_[40:H - 40, 40:W - 40]   # clear of the image's edges
    assert (expected[crop] > 0).sum() > 100_000
    np.testing.assert_allclose(depth[crop], expected[crop], rtol=1e-9)


def test_of_two_surfaces_on_one_pixel_the_nearer_is_kept():
    raw = wall(1000)                                  # 3.80 m away
    raw[:, 300:340] = 700                             # a post 0.895 m away
    depth, _ = nyu_dumps.Projector()(raw, colour(0))
    near, far = metres(700.0), metres(1000.0)
    v = np.arange(150, 331)[:, None]
    u_near, u_far = np.arange(304, 338), np.r_[250:297, 344:390]   # 1-based, 3 px from the edges
    hit_near = set(zip(*(a.ravel() for a in rgb_pixel(u_near[None], v, near))))
    hit_far = set(zip(*(a.ravel() for a in rgb_pixel(u_far[None], v, far))))
    both = hit_near & hit_far                         # the RGB camera sees the post move sideways
    assert len(both) > 600                            # ~5 columns of ~160 rows
    rows, cols = np.array(sorted(both)).T
    np.testing.assert_allclose(depth[rows, cols], near, rtol=1e-9)
    # away from the post (and the blended depths of its edges), the wall
    post = set(zip(*(a.ravel() for a in rgb_pixel(np.arange(290, 351)[None], v, near))))
    rows, cols = np.array(sorted(hit_far - post)).T
    np.testing.assert_allclose(depth[rows, cols], far, rtol=1e-9)


@pytest.mark.slow   # a conversion of ~2 s
def test_dumps_become_the_training_cache_the_same_from_folders_and_zip(dumps, tmp_path, capsys):
    root, labeled, splits = dumps
    assert convert(root, tmp_path / 'cache', labeled, splits) == 0
    printed = capsys.readouterr().out
    cache = nyu_raw.CachedFrames(str(tmp_path / 'cache'))
    assert cache.scenes == ['bedroom_0001', 'bedroom_0001', 'kitchen_0002', 'kitchen_0002']
    for k, (scene, i, j) in enumerate(KEPT):
        rgb, depth = cache.images[k], cache.depths[k]
        assert (rgb[100:140, 140:180] == colour(j)[0, 0]).all()          # its RGB frame
        assert (depth[75:165, 100:220] == round(metres(SCENES[scene][2][i]) * 1000)).all()
    meta = json.loads((tmp_path / 'cache' / 'raw_cache.json').read_text())['dumps']
    assert meta['per_scene']['bedroom_0001'] == {
        'depth_frames': 4, 'rgb_frames': 3, 'matched': 2, 'dropped_one_to_many': 2, 'damaged': 0,
        'kept': 2}
    assert meta['total'] == {'depth_frames': 6, 'rgb_frames': 6, 'matched': 4,
                             'dropped_one_to_many': 2, 'damaged': 0, 'kept': 4}
    assert 'total (2 scenes)' in printed and '4 frames kept (the paper: 120K' in printed
    # stderr is no terminal here: no bar, a line per scene, the time left from the frames left
    assert re.search(r'^converted bedroom_0001: 2 frames kept \(1 of 2 scenes done, 0:00:0\d '
                     r'elapsed, about 0:00:0\d left\)\nconverted kitchen_0002a: 2 frames kept '
                     r'\(2 of 2 scenes done, 0:00:0\d elapsed, about 0:00:00 left\)$', printed,
                     re.M), printed
    # a quarter of the frames in 10 min: 30 min left
    assert nyu_dumps._scene_line('a', {'kept': 7}, {'a': {}, 'b': None, 'c': None}, 0.25, 600) == \
        'converted a: 7 frames kept (1 of 3 scenes done, 0:10:00 elapsed, about 0:30:00 left)'
    # the same bytes from the official zip form, read in place, in two worker processes
    archive = zip_folder(root, tmp_path / 'nyu_raw.zip')
    assert convert(archive, tmp_path / 'from_zip', labeled, splits, workers=2) == 0
    assert cache_bytes(tmp_path / 'from_zip') == cache_bytes(tmp_path / 'cache')
    assert not (tmp_path / 'from_zip.partial').exists()


def _ctrl_c(scene, shards, real, *args):
    """Ctrl-C while this process writes the second scene: half a shard is left."""
    if scene.name == 'kitchen_0002a':
        (shards / f'{scene.name}.rgb').write_bytes(b'half')
        raise KeyboardInterrupt
    return real(scene, *args)


def _after_the_first_scene(shards):
    """Wait (at most 10 s) until the other worker has finished the first scene."""
    for _ in range(1000):
        if (shards / 'bedroom_0001.json').exists():
            break
        time.sleep(0.01)


def _killed_worker(scene, shards, real, *args):
    """The worker converting the second scene is killed (SIGKILL, as by the out-of-memory killer)
    once the first scene's worker has finished it."""
    if scene.name == 'kitchen_0002a':
        _after_the_first_scene(shards)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(scene, *args)


def _disk_full_in_a_worker(scene, shards, real, *args):
    """The worker converting the second scene finds the disk full: its error, sent to the main
    process, stops the run."""
    if scene.name == 'kitchen_0002a':
        _after_the_first_scene(shards)
        raise nyu_raw._WriteFailed(str(shards / 'kitchen_0002a.rgb'),
                                   OSError(errno.ENOSPC, 'No space left on device'))
    return real(scene, *args)


# how the first run is stopped: (what converts a scene, --workers, what the run ends with, its line)
KILLS = {
    'ctrl-c': (_ctrl_c, 0, KeyboardInterrupt, None),
    'worker killed': (_killed_worker, 2, cli.UserError,
                      r'\S+cache: the worker process converting scene kitchen_0002a was killed by '
                      r'SIGKILL \(as the out-of-memory killer does\); 1 of 2 scenes are converted and '
                      r'kept in \S+cache.partial/scenes; the same command goes on from there \(with '
                      r'fewer --workers than 2 or more memory if memory ran out\)'),
    'disk full in a worker': (_disk_full_in_a_worker, 2, cli.UserError,
                              r'\S+cache: could not write kitchen_0002a.rgb \(No space left on '
                              r'device\); the scenes converted so far are kept in \S+cache.partial: '
                              r'free space, then run the same command again'),
}


@pytest.mark.slow   # conversions of ~1 s
@pytest.mark.parametrize('kill', list(KILLS))
def test_a_killed_conversion_goes_on_to_the_same_cache(kill, dumps, whole, tmp_path, monkeypatch):
    root, labeled, splits = dumps
    stopped, workers, ending, line = KILLS[kill]
    shards = tmp_path / 'cache.partial' / 'scenes'
    if workers and 'fork' not in multiprocessing.get_all_start_methods():
        pytest.skip('the workers must be forked to inherit the patched convert_scene')
    real, calls = nyu_dumps.convert_scene, []
    monkeypatch.setattr(nyu_dumps, 'convert_scene',
                        lambda scene, *args: stopped(scene, shards, real, *args))
    with pytest.raises(ending) as e:
        convert(root, tmp_path / 'cache', labeled, splits, workers=workers)
    if line:   # one line, at once: not a wait for the dead worker
        assert re.fullmatch(line, one_line(e)), one_line(e)
    assert (shards / 'bedroom_0001.json').exists()
    # what files.atomic_write leaves when killed while writing raw_cache.json: no reason to
    # refuse, and no part of the cache
    (tmp_path / 'cache.partial' / 'raw_cache.json.tmp4242').write_text('{"half')
    monkeypatch.setattr(nyu_dumps, 'convert_scene',
                        lambda scene, *args: calls.append(scene.name) or real(scene, *args))
    assert convert(root, tmp_path / 'cache', labeled, splits) == 0
    assert calls == ['kitchen_0002a']                  # the finished scene was kept
    assert cache_bytes(tmp_path / 'cache') == whole
    assert not (tmp_path / 'cache' / 'raw_cache.json.tmp4242').exists()


def _truncate(root):
    f = sorted((root / 'bedroom_0001').glob('d-*.pgm'))[0]
    f.write_bytes(f.read_bytes()[:-1000])
    return f.name


def _small_ppm(root):
    f = sorted((root / 'kitchen_0002a').glob('r-*.ppm'))[1]
    f.write_bytes(b'P6\n320 240\n255\n' + bytes(320 * 240 * 3))
    return f.name


def _no_rgb(root):
    for f in (root / 'kitchen_0002a').glob('r-*.ppm'):
        f.unlink()
    return 'kitchen_0002a'


def _bad_time(root):
    (root / 'bedroom_0001' / 'd-1315166703.1x-77.pgm').write_bytes(pgm(wall(700)))
    return 'd-1315166703.1x-77.pgm'


def _not_a_scene(root):
    (root / 'toolbox').mkdir()
    (root / 'toolbox' / 'project_depth_map.m').write_text('% not a scene\n')
    return 'toolbox'


def _test_scene(root):
    shutil.copytree(root / 'kitchen_0002a', root / 'office_0003')
    return 'office_0003'


def _bad_crc(root):
    """The zip form, with one byte of a depth frame's stored data changed."""
    archive = root.parent / 'bad.zip'
    with zipfile.ZipFile(archive, 'w', zipfile.ZIP_STORED) as z:
        for f in sorted(root.rglob('*')):
            z.write(f, f.relative_to(root).as_posix())
    data = bytearray(archive.read_bytes())
    at = data.index(pgm(wall(850))[:64]) + 5000     # inside bedroom_0001's last depth frame
    data[at] ^= 0xFF
    archive.write_bytes(bytes(data))
    return archive, 'bedroom_0001/' + name('d', 0.3, 1003)


# (what to do to the dumps, the line expected, whether the conversion goes on, what is counted)
BAD = {
    'truncated pgm': (_truncate, r'bedroom_0001/{}: cut short \(613400 bytes of pixels, 640x480 '
                      r'needs 614400\); frame {} skipped', ('bedroom_0001', 'damaged', 1)),
    'wrong-size ppm': (_small_ppm, r'kitchen_0002a/{}: 320x240 pixels; the Kinect dumps are '
                       r'640x480; frame d-\S+ skipped', ('kitchen_0002a', 'damaged', 1)),
    'scene without RGB': (_no_rgb, r'{}: a scene folder without RGB frames \(r-\*\.ppm\); scene '
                          r'skipped', ('without_frames', 1)),
    'time stamp': (_bad_time, r"bedroom_0001/{}: its time stamp '1315166703.1x' does not parse",
                   None),
    'not a scene': (_not_a_scene, r'{}: not a scene folder \(no Kinect dumps d-\*\.pgm, r-\*\.ppm\); '
                    r'skipped', ('not_scenes', 1)),
    'test scene': (_test_scene, r'skipped 1 scenes of the official test split \(never read\): {}',
                   ('test_scenes', 1)),
    'zip CRC': (_bad_crc, r'{}: Bad CRC-32 for file .*; download that zip file again; frame \S+ '
                r'skipped', ('bedroom_0001', 'damaged', 1)),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_dumps_give_one_line_each(case, dumps, tmp_path, capsys):
    root, labeled, splits = dumps
    spoil, line, counted = BAD[case]
    made = spoil(root)
    source, named = made if isinstance(made, tuple) else (root, made)
    out = tmp_path / 'cache'
    if counted is None:                                  # the conversion stops, nothing written
        with pytest.raises(cli.DataError) as e:
            convert(source, out, labeled, splits)
        assert re.search(line.format(re.escape(named)), one_line(e))
        assert not out.exists()
        return
    # the conversion goes on; the truncated frame's note is sent by a worker process
    assert convert(source, out, labeled, splits, workers=2 if case == 'truncated pgm' else 0) == 0
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith('note: ')]
    assert any(re.search(line.format(re.escape(named), re.escape(named)), l) for l in notes), notes
    meta = json.loads((out / 'raw_cache.json').read_text())['dumps']
    if counted[0] in meta['per_scene']:
        assert meta['per_scene'][counted[0]][counted[1]] == counted[2]
        assert meta['total']['kept'] == 3
    else:
        assert len(meta['skipped'][counted[0]]) == counted[1]
        assert meta['total']['kept'] == (2 if case == 'scene without RGB' else 4)
        assert 'office_0003' not in json.loads((out / 'raw_cache.json').read_text())['scenes']


@pytest.mark.slow
def test_the_converted_dumps_train_both_stages(dumps, tmp_path):
    root, labeled, splits = dumps
    convert(root, tmp_path / 'cache', labeled, splits)
    out = tmp_path / 'run'
    assert train.main(train_args((tmp_path / 'cache', splits), out, '--labeled', labeled,
                                 '--coarse-samples', 4, '--fine-samples', 4, '--batch-size', 2,
                                 '--per-scene', 2, '--val-fraction', 0, '--workers', 0)) == 0
    assert (out / 'coarse.pth').exists() and (out / 'fine.pth').exists()
