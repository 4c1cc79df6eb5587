"""The official raw NYU Depth v2 dumps (Sec. 4.1: the paper trained on the raw video of the 249
training scenes, ~120K frames) -> the training cache train.py reads (nyu_raw.CachedFrames).

The raw archive is one folder per scene recording (`bedroom_0001`, some with a session letter,
`basement_0001a`), holding the Kinect's dumps: `d-<time>-<n>.pgm` (640x480 raw depth, 16-bit, its
bytes in the Kinect's little-endian order inside a PGM header, which by the PGM rule is
big-endian), `r-<time>-<n>.ppm` (640x480 RGB), `a-<time>-<n>.dump` (accelerometer) and INDEX.txt.
It is read from the scene folders, or from the official zip files without unpacking them.

Each scene is synchronised and projected as the NYU toolbox does (get_synched_frames.m,
project_depth_map.m and its helpers, with camera_params.m's numbers):
  - depth frames are primary, in name order; each gets the RGB frame nearest in time, found by a
    pointer that moves forward while the time difference does not grow. A depth frame whose RGB
    frame is also matched to another depth frame is dropped (the paper: "frames where one RGB
    image is matched to more than one depth frame are discarded"), every one of them;
  - the RGB image and the raw depth are undistorted, each with its camera's calibration; raw
    values below 600 and the frame's maximum (the Kinect's no-reading value, undistorted as a
    mask) become missing; raw -> metres; each depth pixel becomes a 3D point in the depth camera,
    is moved into the RGB camera and projected onto its image plane; where several points land on
    one pixel the nearest wins; a pixel that no point reaches stays missing (0).
(Held against the toolbox itself, run in Octave 7.3 on a generated frame with a slanted wall, a
near post, no-reading, low and beyond-10-m pixels: the same undistorted RGB to the byte, the same
valid pixels, depths within 1e-12 m; the same RGB frame for each of 400 depth frames.)
The 640x480 result is halved to the paper's 320x240 as the labeled frames are (util.downsample_rgb,
util.downsample_depth) and stored as nyu_raw's cache: uint8 RGB, uint16 millimetres, 0 = missing.

Only scenes of the official training split are converted (the labeled file's scene names and
splits.mat say which): test scenes are skipped, never read.

Resumable: each scene is converted into its own shard in OUT.partial/scenes/ (raw frames, then a
marker written last); after a kill or Ctrl-C the same command keeps the finished scenes and redoes
the rest. Each scene is converted by a worker process of its own: one that dies (the out-of-memory
killer) ends the run at once, in one line naming its scene. Progress: a bar on a terminal; in a
log file (stderr not a terminal) a line per finished scene with the time left. When every scene
is done the shards are joined into OUT's single cache, so the disk holds the shards and the cache
together for a while: twice the cache (375 KiB a frame each).

    python nyu_dumps.py /data/nyu_raw --out nyu/raw_cache
    python nyu_dumps.py /data/bedrooms.zip /data/kitchens.zip ... --out nyu/raw_cache
"""
import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import posixpath
import re
import shutil
import signal
import sys
import time
import traceback
import zipfile
import zlib
from collections import Counter
from multiprocessing.pool import ExceptionWithTraceback

import numpy as np

import cli
import files
import nyu_raw
import util
from data import LABELED, SPLITS   # train.py's defaults

KINECT_HW = (480, 640)
PAPER_FRAMES = 120_000   # Sec. 4.1: "120K unique images"
SHARD_VERSION = 1        # a shard written by another version of this file is converted again
SCENES = 'scenes'        # OUT.partial/scenes/: the per-scene shards
RGB_BYTES, DEPTH_BYTES = 240 * 320 * 3, 240 * 320 * 2   # one 320x240 frame in a shard
FRAME_BYTES = RGB_BYTES + DEPTH_BYTES
DUMP = re.compile(r'^([dra])-(.*)\.(pgm|ppm|dump)$')   # d-<time>-<n>.pgm, r-...ppm, a-...dump
KINDS = {'d': 'pgm', 'r': 'ppm'}   # what is converted (the accelerometer's a-*.dump is not needed)


# ----------------------------------------------------------------------------------------------
# camera_params.m: the Kinect's calibration (RGBDemo), as the toolbox states it

class Camera:
    max_depth = 10.0   # metres
    # RGB camera: focal lengths, principal point, distortion (k1, k2, p1, p2, k3)
    f_rgb = (5.1885790117450188e+02, 5.1946961112127485e+02)
    c_rgb = (3.2558244941119034e+02, 2.5373616633400465e+02)
    k_rgb = (2.0796615318809061e-01, -5.8613825163911781e-01, 7.2231363135888329e-04,
             1.0479627195765181e-03, 4.9856986684705107e-01)
    # depth camera
    f_d = (5.8262448167737955e+02, 5.8269103270988637e+02)
    c_d = (3.1304475870804731e+02, 2.3844389626620386e+02)
    k_d = (-9.9897236553084481e-02, 3.9065324602765344e-01, 1.9290592870229277e-03,
           -1.9422022475975055e-03, -5.1031725053400578e-01)
    # depth -> RGB camera. The toolbox lists nine numbers, fills a 3x3 matrix with them column
    # by column (MATLAB's reshape), negates it and takes R = inv(M'): M' is the nine numbers row
    # by row, negated. Its translation is [t_x; t_z; t_y], in that order.
    R = np.linalg.inv(-np.array([
        9.9997798940829263e-01, 5.0518419386157446e-03, 4.3011152014118693e-03,
        -5.0359919480810989e-03, 9.9998051861143999e-01, -3.6879781309514218e-03,
        -4.3196624923060242e-03, 3.6662365748484798e-03, 9.9998394948385538e-01]).reshape(3, 3))
    t_x, t_y, t_z = 2.5031875059141302e-02, 6.6238747008330102e-04, -2.9342312935846411e-04
    T = np.array([t_x, t_z, t_y])
    # raw Kinect value -> metres: depthParam1 / (depthParam2 - raw)
    depth_param1, depth_param2 = 351.3, 1092.5
    min_raw = 600      # raw values below this are not depth (project_depth_map.m)
    invalid_raw = 2047  # what the toolbox writes into such pixels: it converts to a negative depth, 0


class Undistortion:
    """undistort.m (from Bouguet's calibration toolbox) as a fixed gather: each pixel of the
    undistorted image is the bilinear blend of the four pixels around where the distortion model
    puts it in the recorded image; pixels whose source falls outside keep the value 255. The
    positions and weights are the same for every frame, so they are computed once."""

    def __init__(self, f, c, k, hw=KINECT_HW):
        h, w = hw
        # undistort.m's rays: 0-based pixel coordinates (px - 1) against the principal point
        y, x = np.mgrid[:h, :w].astype(np.float64)
        x = (x - c[0]) / f[0]
        y = (y - c[1]) / f[1]
        k1, k2, p1, p2, k3 = k
        r2 = x ** 2 + y ** 2
        radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
        xd = x * radial + (p1 * (2 * x * y) + p2 * (r2 + 2 * x ** 2))
        yd = y * radial + (p1 * (r2 + 2 * y ** 2) + p2 * (2 * x * y))
        sx, sy = (f[0] * xd + c[0]).ravel(), (f[1] * yd + c[1]).ravel()
        x0, y0 = np.floor(sx), np.floor(sy)
        self.good = np.flatnonzero((x0 >= 0) & (x0 <= w - 2) & (y0 >= 0) & (y0 <= h - 2))
        ax, ay = (sx - x0)[self.good], (sy - y0)[self.good]
        x0, y0 = x0[self.good].astype(np.int64), y0[self.good].astype(np.int64)
        top_left = y0 * w + x0
        # the four sources and their weights, in undistort.m's order of summation
        self.sources = (top_left, top_left + 1, top_left + w, top_left + w + 1)
        self.weights = ((1 - ay) * (1 - ax), (1 - ay) * ax, ay * (1 - ax), ay * ax)
        self.hw = hw

    def __call__(self, image):
        """(H, W) float64 -> the undistorted image, float64 (a colour image: one channel at a
        time, as the toolbox does)."""
        flat = image.ravel()
        out = np.full(flat.shape, 255.0)
        (i1, i2, i3, i4), (a1, a2, a3, a4) = self.sources, self.weights
        out[self.good] = a1 * flat[i1] + a2 * flat[i2] + a3 * flat[i3] + a4 * flat[i4]
        return out.reshape(image.shape)


class Projector:
    """project_depth_map.m, vectorised: raw Kinect depth (already in the right byte order) and
    the RGB frame it was matched to -> (depth in metres on the RGB image, 0 = missing; the
    undistorted RGB), both 640x480."""

    def __init__(self):
        cam = Camera
        self.undistort_rgb = Undistortion(cam.f_rgb, cam.c_rgb, cam.k_rgb)
        self.undistort_depth = Undistortion(cam.f_d, cam.c_d, cam.k_d)
        h, w = KINECT_HW
        # depth_plane2depth_world.m: 1-based pixel coordinates against the principal point
        yy, xx = np.mgrid[1:h + 1, 1:w + 1].astype(np.float64)
        self.rays_x = ((xx - cam.c_d[0]) / cam.f_d[0]).ravel()
        self.rays_y = ((yy - cam.c_d[1]) / cam.f_d[1]).ravel()

    def __call__(self, raw, rgb):
        cam = Camera
        h, w = KINECT_HW
        planes = [self.undistort_rgb(rgb[..., c].astype(np.float64)) for c in range(3)]
        rgb_out = np.clip(_round_half_up(np.stack(planes, -1)), 0, 255).astype(np.uint8)
        noise = self.undistort_depth(255.0 * (raw == raw.max())) > 0
        raw = self.undistort_depth(raw.astype(np.float64))
        raw[(raw < cam.min_raw) | noise] = cam.invalid_raw
        with np.errstate(divide='ignore'):
            metres = cam.depth_param1 / (cam.depth_param2 - raw)   # depth_rel2depth_abs.m
        metres = np.where(metres > cam.max_depth, cam.max_depth, np.maximum(metres, 0)).ravel()
        # Points of depth 0 all land on one spot far outside the image (the translation alone,
        # projected), so the toolbox draws them nowhere: leaving them out is the same.
        valid = np.flatnonzero(metres > 0)
        z = metres[valid]
        points = np.stack([self.rays_x[valid] * z, self.rays_y[valid] * z, z])
        points = cam.R @ points + cam.T[:, None]                   # depth_world2rgb_world.m
        u = _round_half_up(points[0] * cam.f_rgb[0] / points[2] + cam.c_rgb[0])   # 1-based
        v = _round_half_up(points[1] * cam.f_rgb[1] / points[2] + cam.c_rgb[1])
        # project_depth_map.m keeps 0 < u < W and 0 < v < H (1-based: the last column and row of
        # the image never receive a point)
        inside = (u > 0) & (u < w) & (v > 0) & (v < h)
        pixel = (v[inside].astype(np.int64) - 1) * w + (u[inside].astype(np.int64) - 1)
        depth = np.full(h * w, np.inf)
        np.minimum.at(depth, pixel, z[inside])                     # the nearest point wins
        depth[~np.isfinite(depth)] = 0
        return np.minimum(depth, cam.max_depth).reshape(h, w), rgb_out


def _round_half_up(x):
    """MATLAB's round: halves away from zero (numpy's round takes halves to even)."""
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5))


# ----------------------------------------------------------------------------------------------
# The dump files

class DamagedFrame(Exception):
    """A dump file that cannot be read as the frame it names (cut short, another size, a zip
    member failing its CRC): that frame is skipped and counted, the conversion goes on."""


def _pnm(data, magic, where):
    """A binary PGM/PPM's (width, height, maxval, raster bytes)."""
    pos, tokens = 0, []
    while len(tokens) < 4:
        while pos < len(data) and (data[pos:pos + 1].isspace() or data[pos:pos + 1] == b'#'):
            if data[pos:pos + 1] == b'#':   # a comment runs to the end of its line
                end = data.find(b'\n', pos)
                pos = len(data) if end < 0 else end
            pos += 1
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace() and len(tokens) < 4:
            pos += 1
        if start == pos:
            raise DamagedFrame(f'{where}: cut short inside its header')
        tokens.append(data[start:pos])
    if tokens[0] != magic or not all(t.isdigit() for t in tokens[1:]):
        raise DamagedFrame(f'{where}: not a binary {"PGM" if magic == b"P5" else "PPM"} file '
                           f'(its header begins {bytes(data[:16])!r})')
    width, height, maxval = map(int, tokens[1:])
    return width, height, maxval, data[pos + 1:]


def _raster(data, magic, channels, where):
    width, height, maxval, raster = _pnm(data, magic, where)
    if (height, width) != KINECT_HW:
        raise DamagedFrame(f'{where}: {width}x{height} pixels; the Kinect dumps are 640x480')
    sample = 2 if maxval > 255 else 1
    if sample != (2 if magic == b'P5' else 1):
        raise DamagedFrame(f'{where}: {8 * sample}-bit samples (maxval {maxval}); the Kinect '
                           f'dumps {"16-bit depth" if magic == b"P5" else "8-bit colour"}')
    want = width * height * channels * sample
    if len(raster) != want:
        state = 'cut short' if len(raster) < want else 'longer than its header says'
        raise DamagedFrame(f'{where}: {state} ({len(raster)} bytes of pixels, {width}x{height} '
                           f'needs {want})')
    return raster


def read_depth(data, where):
    """A d-*.pgm's raw Kinect values (480, 640) uint16. The bytes are the Kinect's, little-endian,
    where the PGM rule reads big-endian (the toolbox's swapbytes after imread)."""
    return np.frombuffer(_raster(data, b'P5', 1, where), '<u2').reshape(KINECT_HW)


def read_rgb(data, where):
    """An r-*.ppm's (480, 640, 3) uint8 RGB."""
    return np.frombuffer(_raster(data, b'P6', 3, where), np.uint8).reshape(KINECT_HW + (3,))


def timestamp(name):
    """The time in a dump's name, `d-1315166703.129542-2466101449.pgm` -> 1315166703.129542
    (get_synched_frames.m: the text between the first two dashes); None when it does not parse."""
    try:
        value = float(name[2:].split('-')[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def synchronise(depth_times, rgb_times):
    """get_synched_frames.m: for each depth frame, in order, the index of its RGB frame: a pointer
    that starts at the first RGB frame and moves on while the next one is no farther in time
    (a tie moves on), never back."""
    j, matches = 0, []
    for t in depth_times:
        diff = abs(t - rgb_times[j])
        while j + 1 < len(rgb_times) and abs(t - rgb_times[j + 1]) <= diff:
            j += 1
            diff = abs(t - rgb_times[j])
        matches.append(j)
    return matches


# ----------------------------------------------------------------------------------------------
# Scenes: folders or zip members

class Scene:
    """One scene recording: where its dumps are (a folder, or a folder inside a zip file), its
    synchronised (depth, RGB) pairs and their counts."""

    def __init__(self, name, where, zip_path, prefix, names):
        self.name, self.where, self.zip_path, self.prefix = name, where, zip_path, prefix
        kinds = {k: sorted(n for n in names if DUMP.match(n) and n[0] == k
                           and n.endswith('.' + KINDS[k])) for k in KINDS}
        self.depth_names, self.rgb_names = kinds['d'], kinds['r']
        self.pairs = []
        self.counts = {}

    def path(self, name):
        return os.path.join(self.where, name) if self.zip_path is None else f'{self.where}/{name}'

    def synchronise(self):
        """Match every depth frame (refused in one line, before anything is converted, when a
        name's time does not parse) and keep those whose RGB frame is theirs alone."""
        times = {}
        for name in self.depth_names + self.rgb_names:
            times[name] = timestamp(name)
            if times[name] is None:
                raise cli.DataError(f'{self.path(name)}: its time stamp {name[2:].split("-")[0]!r} '
                                    f'does not parse (dumps are named d-<seconds>-<n>.pgm, '
                                    f'r-<seconds>-<n>.ppm); rename or remove that file, then run '
                                    f'the same command again (the scenes already converted are '
                                    f'kept)')
        matches = synchronise([times[n] for n in self.depth_names],
                              [times[n] for n in self.rgb_names])
        uses = Counter(matches)
        self.pairs = [(d, self.rgb_names[j]) for d, j in zip(self.depth_names, matches)
                      if uses[j] == 1]
        self.counts = {'depth_frames': len(self.depth_names), 'rgb_frames': len(self.rgb_names),
                       'matched': len(self.pairs),
                       'dropped_one_to_many': len(self.depth_names) - len(self.pairs)}

    def source(self):
        """What identifies this scene's input for a resumed conversion."""
        return {'where': self.where, 'depth_frames': len(self.depth_names),
                'rgb_frames': len(self.rgb_names), 'version': SHARD_VERSION}


_zips = {}   # zip path -> ZipFile, opened once per process (a ZipFile cannot cross a fork)


def _zip(path):
    key = (path, os.getpid())
    if key not in _zips:
        _zips[key] = zipfile.ZipFile(path)
    return _zips[key]


def read_member(scene, name):
    """The bytes of one dump file; a damaged one (unreadable, a zip member failing its CRC or
    whose compressed data is broken) is a DamagedFrame naming it."""
    where = scene.path(name)
    try:
        if scene.zip_path is None:
            with open(where, 'rb') as f:
                return f.read()
        return _zip(scene.zip_path).read(scene.prefix + name)
    except zipfile.BadZipFile as e:           # "Bad CRC-32 for file ...", a broken local header
        raise DamagedFrame(f'{where}: {e}; download that zip file again') from None
    except (zlib.error, EOFError) as e:       # deflate data cut short or garbled
        raise DamagedFrame(f'{where}: its compressed data is damaged ({e}); download that zip '
                           f'file again') from None
    except OSError as e:
        raise DamagedFrame(f'{where}: cannot be read ({e.strerror or e})') from None


def _tree_of_folder(root):
    """{folder relative to root ('' = root itself): [file names]} for every folder under root."""
    tree = {}
    for here, dirs, names in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(here, root)
        tree['' if rel == '.' else rel.replace(os.sep, '/')] = names
    return tree


def _tree_of_zip(path):
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
    except zipfile.BadZipFile:
        raise cli.DataError(f'{path}: not a zip file (cut short?); the official raw dumps come '
                            f'as zip files or as the folders they unpack into') from None
    tree = {'': []}
    for member in members:
        folder, name = posixpath.split(member.rstrip('/'))
        parts = folder.split('/') if folder else []
        for i in range(len(parts) + 1):   # every folder above, also those without an entry
            tree.setdefault('/'.join(parts[:i]), [])
        if member.endswith('/'):
            tree.setdefault(member.rstrip('/'), [])
        else:
            tree[folder].append(name)
    return tree


def list_scenes(sources, known, test):
    """The training scenes of the raw dumps in `sources` (scene folders' roots, or zip files),
    sorted by name, and what was passed over, with one `note:` line each: test scenes (never
    read), folders that are not scenes of NYU Depth v2, scenes without depth or RGB frames.
    `known`: every scene of the labeled set (scene_id); `test`: those of the test split."""
    scenes, skipped = {}, {'test_scenes': [], 'not_scenes': [], 'without_frames': []}
    for source in sources:
        files.check_exists(source, 'a folder of NYU raw scene folders, or an official raw zip file')
        # absolute: a finished shard is recognised by where its scene was read (finished_shard),
        # so the same command from another folder, or with an absolute path, keeps it
        source = os.path.abspath(source)
        zip_path = None if os.path.isdir(source) else source
        tree = _tree_of_folder(source) if zip_path is None else _tree_of_zip(source)
        has_dumps = {d for d, names in tree.items() if any(DUMP.match(n) for n in names)}
        above = {'/'.join(d.split('/')[:i]) for d in has_dumps for i in range(d.count('/') + 1)}
        for folder in sorted(tree):
            base = posixpath.basename(folder) or os.path.basename(source)
            where = (os.path.join(source, *folder.split('/')) if zip_path is None
                     else f'{source}:{folder}')
            if folder not in has_dumps:
                # named once: the topmost folder that holds no scene (not those inside it)
                if folder and folder not in above and posixpath.dirname(folder) in above:
                    if nyu_raw.scene_id(base) in known:
                        skipped['without_frames'].append(where)
                        _note(f'{where}: a scene folder without Kinect dumps (d-*.pgm, r-*.ppm); '
                              f'scene skipped')
                    else:
                        skipped['not_scenes'].append(where)
                        _note(f'{where}: not a scene folder (no Kinect dumps d-*.pgm, r-*.ppm); '
                              f'skipped')
                continue
            sid = nyu_raw.scene_id(base)
            if sid in test:
                skipped['test_scenes'].append(base)
                continue
            if sid not in known:
                skipped['not_scenes'].append(where)
                _note(f'{where}: holds Kinect dumps, but {base!r} is not a scene of NYU Depth v2 '
                      f'(the labeled file names every training and test scene), so its split is '
                      f'unknown; skipped')
                continue
            scene = Scene(base, where, zip_path, folder + '/' if folder else '', tree[folder])
            missing = [kind for kind, names in (('depth frames (d-*.pgm)', scene.depth_names),
                                                ('RGB frames (r-*.ppm)', scene.rgb_names)) if not names]
            if missing:
                skipped['without_frames'].append(where)
                _note(f'{where}: a scene folder without {" or ".join(missing)}; scene skipped')
                continue
            if base in scenes:
                raise cli.DataError(f'{where}: scene {base} is also in {scenes[base].where}; give '
                                    f'each scene once')
            scenes[base] = scene
        if not has_dumps:
            raise cli.DataError(f'{source}: holds no scene folders of Kinect dumps (d-*.pgm, '
                                f'r-*.ppm); nyu_dumps.py takes the folder the official raw zip '
                                f'files were unpacked into, or the zip files themselves')
    if skipped['test_scenes']:
        names = sorted(skipped['test_scenes'])
        _note(f'skipped {len(names)} scenes of the official test split (never read): '
              f'{", ".join(names[:5])}{", ..." if len(names) > 5 else ""}')
    if not scenes:
        raise cli.DataError(f'{", ".join(map(str, sources))}: no scene of the official training '
                            f'split to convert (see the notes above)')
    ordered = [scenes[name] for name in sorted(scenes)]
    for scene in ordered:
        scene.synchronise()
    return ordered, skipped


# ----------------------------------------------------------------------------------------------
# Converting one scene into its shard

_report = None   # where a scene's progress and notes go: a queue in a worker, else the bar


def _note(text):
    if _report is not None:
        _report(('note', text))
    else:
        print(f'note: {text}', file=sys.stderr)


def shard_paths(shard_dir, scene):
    base = os.path.join(shard_dir, scene.name)
    return base + '.rgb', base + '.depth', base + '.json'


def convert_scene(scene, shard_dir, projector=None):
    """Read, project and halve every kept frame of `scene` into its shard: <name>.rgb (uint8
    320x240x3 frames), <name>.depth (uint16 millimetres), then <name>.json with the counts, written
    last (atomically): a shard without it is redone. A damaged frame is skipped, counted and named
    (one note line). Returns the counts."""
    projector = projector or Projector()
    rgb_path, depth_path, marker = shard_paths(shard_dir, scene)
    damaged = []
    with nyu_raw._ArrayFile(rgb_path, np.uint8) as rgb_file, \
            nyu_raw._ArrayFile(depth_path, np.uint16) as depth_file:
        for depth_name, rgb_name in scene.pairs:
            try:
                raw = read_depth(read_member(scene, depth_name), scene.path(depth_name))
                rgb = read_rgb(read_member(scene, rgb_name), scene.path(rgb_name))
            except DamagedFrame as e:
                damaged.append(depth_name)
                _note(f'{e}; frame {depth_name} skipped')
            else:
                depth_m, rgb_u = projector(raw, rgb)
                rgb_file.write(util.downsample_rgb(rgb_u))
                mm = np.round(util.downsample_depth(depth_m) * nyu_raw.RawFrames.cache_units_per_m)
                depth_file.write(mm.astype(np.uint16))
            if _report:
                _report(('frames', 1))
    counts = dict(scene.counts, damaged=len(damaged), kept=len(scene.pairs) - len(damaged))
    _write_json(marker, {'source': scene.source(), 'counts': counts, 'damaged': damaged})
    return counts


def _write_json(path, value):
    """`value` as JSON in `path`, written atomically; a failure is a _WriteFailed."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(value, f)
    try:
        files.atomic_write(path, write)
    except OSError as e:
        raise nyu_raw._WriteFailed(path, e) from None


def finished_shard(shard_dir, scene):
    """The counts of `scene`'s shard if it was finished from the same input, else None."""
    rgb_path, depth_path, marker = shard_paths(shard_dir, scene)
    try:
        with open(marker) as f:
            done = json.load(f)
        kept = done['counts']['kept']
        if (done['source'] == scene.source() and os.path.getsize(rgb_path) == kept * RGB_BYTES
                and os.path.getsize(depth_path) == kept * DEPTH_BYTES):
            return done['counts']
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ----------------------------------------------------------------------------------------------
# Running the scenes (in worker processes) and joining their shards

def _worker_scene(channel, scene, shard_dir):
    """One scene, in a worker process of its own: its progress and notes, then its counts (or its
    error) go to `channel`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process stops the workers
    global _report
    _report = channel.put
    try:
        channel.put(('done', (scene.name, convert_scene(scene, shard_dir))))
    except Exception as e:
        channel.put(('error', _sendable(e)))


def _sendable(error):
    """A worker's exception as the main process can raise it: itself with the worker's traceback
    attached (as multiprocessing.Pool sends it), or, if it cannot be rebuilt there, a
    RuntimeError holding that traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return ExceptionWithTraceback(error, error.__traceback__)
    except Exception:
        return RuntimeError(traceback.format_exc())


class _WorkerDied(Exception):
    """A worker process ended without finishing its scene (the out-of-memory killer, a signal):
    convert_dumps reports it in one line. Its args: the scene, the process's exit code."""


def run_scenes(todo, shard_dir, workers, bar):
    """Convert the scenes of `todo` (their shards), in `workers` processes (0: here), updating
    `bar` frame by frame and printing the notes; yields (name, counts) as scenes finish. A worker
    converts one scene and ends, so one that dies (the out-of-memory killer) is seen, with its
    scene, at once: a pool would wait for it forever."""
    global _report
    if workers == 0 or len(todo) <= 1:
        _report = lambda item: _show(item, bar)
        try:
            projector = Projector()
            for scene in todo:
                yield scene.name, convert_scene(scene, shard_dir, projector)
        finally:
            _report = None
        return
    context = multiprocessing.get_context('fork' if 'fork' in multiprocessing.get_all_start_methods()
                                          else 'spawn')
    # a SimpleQueue's put is written before it returns: a worker's last words are in the queue
    # when its process has ended
    channel = context.SimpleQueue()
    waiting = sorted(todo, key=lambda s: len(s.pairs))   # pop() takes the largest first: the
    running, finished = {}, set()                       # last ones to finish are then short
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                scene = waiting.pop()
                process = context.Process(target=_worker_scene, args=(channel, scene, shard_dir),
                                          daemon=True)
                process.start()
                running[process] = scene
            multiprocessing.connection.wait([p.sentinel for p in running], timeout=0.2)
            ended = [p for p in running if not p.is_alive()]   # before their messages are read
            while not channel.empty():
                kind, value = channel.get()
                if kind == 'done':
                    finished.add(value[0])
                    yield value
                elif kind == 'error':
                    raise value   # a worker's error, raised here
                else:
                    _show((kind, value), bar)
            for process in ended:
                scene = running.pop(process)
                process.join()
                if scene.name not in finished:
                    raise _WorkerDied(scene.name, process.exitcode)
    finally:   # an error, a dead worker, Ctrl-C: the other workers are stopped
        for process in running:
            process.kill()
            process.join()


def _show(item, bar):
    kind, value = item
    if kind == 'frames':
        bar.update(value)
    else:
        bar.write(f'note: {value}', file=sys.stderr)


def convert_dumps(sources, out, labeled, splits, workers=4, progress=True):
    """The whole conversion: list and synchronise the training scenes, convert each into its
    shard (finished ones of an earlier run kept), then join them into OUT's cache with the
    counts in raw_cache.json. Returns the metadata written."""
    # the partial folder also holds the shards
    out, tmp = nyu_raw.check_out(out, partial_extra={SCENES})
    nyu_raw.remove_temporaries(tmp)
    shard_dir = os.path.join(tmp, SCENES)
    joined = _joined(tmp)
    if joined is not None:   # an earlier run was stopped after joining its cache: finish that first
        _swap_in(out, tmp, shard_dir)
        print(f'{out}: the cache an earlier run joined is now in place')
        if joined['source'] == _source(sources):   # of these very dumps
            return joined
    labeled_scenes = util.read_scene_names(labeled)
    test = nyu_raw.test_scenes(labeled, splits, labeled_scenes)
    known = {nyu_raw.scene_id(s) for s in labeled_scenes}
    scenes, skipped = list_scenes(sources, known, test)
    counts = {s.name: finished_shard(shard_dir, s) for s in scenes}
    todo = [s for s in scenes if counts[s.name] is None]
    frames_all, frames_todo = (sum(len(s.pairs) for s in group) for group in (scenes, todo))
    # at the end the shards and the joined cache are on disk together
    nyu_raw.check_free_space(out, (frames_all + frames_todo) * FRAME_BYTES,
                             what='the conversion needs (the scenes, then the cache joined from '
                                  'them)')
    try:
        os.makedirs(shard_dir, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f'{shard_dir}: cannot be made ({e.strerror or e}); choose another '
                            f'--out') from None
    if len(todo) < len(scenes):
        print(f'{len(scenes) - len(todo)} of {len(scenes)} scenes were converted by an earlier run '
              f'and are kept; converting the other {len(todo)}')
    bar = cli.progress(None, progress, total=frames_todo, desc='converting', unit='frame')
    frames_done, start = 0, time.perf_counter()
    try:
        for name, done in run_scenes(todo, shard_dir, workers, bar):
            counts[name] = done
            frames_done += done['matched']
            if progress and bar.disable:   # no bar (stderr is a log file or a pipe): a line
                # per scene instead
                print(_scene_line(name, done, counts, frames_done / max(frames_todo, 1),
                                  time.perf_counter() - start), flush=True)
    except nyu_raw._WriteFailed as e:
        raise cli.UserError(_write_failed(out, tmp, e)) from None
    except _WorkerDied as e:
        fewer = f'fewer --workers than {workers} or ' if workers > 1 else ''
        raise cli.UserError(f'{out}: {_worker_died(*e.args)}; {_kept(scenes, shard_dir)} (with '
                            f'{fewer}more memory if memory ran out)') from None
    except KeyboardInterrupt:
        bar.close()
        print(_kept(scenes, shard_dir), file=sys.stderr)
        raise
    finally:
        bar.close()
    meta = _metadata(sources, scenes, counts, skipped)
    try:
        _join(scenes, counts, shard_dir, tmp, meta)
    except nyu_raw._WriteFailed as e:
        raise cli.UserError(_write_failed(out, tmp, e)) from None
    _swap_in(out, tmp, shard_dir)
    return meta


def _scene_line(name, done, counts, share, elapsed):
    """A finished scene, the scenes done and the time left (from the share of this run's frames
    converted so far)."""
    left = f'about {cli.clock(elapsed * (1 - share) / share)}' if share else 'unknown time'
    return (f'converted {name}: {done["kept"]} frames kept ({_scenes_done(counts)} done, '
            f'{cli.clock(elapsed)} elapsed, {left} left)')


def _scenes_done(counts):
    return f'{sum(c is not None for c in counts.values())} of {len(counts)} scenes'


def _kept(scenes, shard_dir):
    """What a stopped conversion keeps: the finished shards on disk (a worker may have finished
    its scene just before the stop, unreported)."""
    on_disk = {s.name: finished_shard(shard_dir, s) for s in scenes}
    return (f'{_scenes_done(on_disk)} are converted and kept in {shard_dir}; the same command '
            f'goes on from there')


def _worker_died(scene, exitcode):
    """What ended a worker process (a negative exit code: the signal that killed it)."""
    if exitcode < 0:
        try:
            how = f'was killed by {signal.Signals(-exitcode).name}'
        except ValueError:   # a signal without a name (a real-time one)
            how = f'was killed by signal {-exitcode}'
        if -exitcode == signal.SIGKILL:
            how += ' (as the out-of-memory killer does)'
    else:
        how = f'ended with exit status {exitcode}'
    return f'the worker process converting scene {scene} {how}'


def _write_failed(out, tmp, error):
    path, e = error.args
    return (f'{out}: could not write {os.path.basename(path)} ({e.strerror or e}); the scenes '
            f'converted so far are kept in {tmp}: free space, then run the same command again')


def _source(sources):
    """What raw_cache.json names as the cache's source: the dumps, by absolute path."""
    return 'NYU Depth v2 raw dumps in ' + ', '.join(os.path.abspath(s) for s in sources)


def _metadata(sources, scenes, counts, skipped):
    per_scene = {s.name: counts[s.name] for s in scenes}
    keys = ('depth_frames', 'rgb_frames', 'matched', 'dropped_one_to_many', 'damaged', 'kept')
    total = {k: sum(c[k] for c in per_scene.values()) for k in keys}
    frame_scenes = [sid for s in scenes
                    for sid in [nyu_raw.scene_id(s.name)] * counts[s.name]['kept']]
    return {'source': _source(sources),
            'scenes': frame_scenes, 'frame_hw': [240, 320],
            'depth_file': nyu_raw.RawFrames.cache_depth_file,
            'depth_units_per_m': nyu_raw.RawFrames.cache_units_per_m,
            'dumps': {'per_scene': per_scene, 'total': total, 'paper_frames': PAPER_FRAMES,
                      'skipped': skipped}}


def _join(scenes, counts, shard_dir, tmp, meta):
    """The shards, in scene order, into tmp/images.npy and depths_mm.npy, then raw_cache.json
    (written last: with it the joined cache is complete)."""
    n = len(meta['scenes'])
    with nyu_raw._NpyFile(os.path.join(tmp, 'images.npy'), np.uint8, (n, 240, 320, 3)) as images, \
            nyu_raw._NpyFile(os.path.join(tmp, meta['depth_file']), np.uint16, (n, 240, 320)) as depths:
        for scene in scenes:
            kept = counts[scene.name]['kept']
            for array, path, shape in zip((images, depths), shard_paths(shard_dir, scene)[:2],
                                          ((240, 320, 3), (240, 320))):
                data = np.memmap(path, array.dtype, 'r', shape=(kept,) + shape) if kept else []
                for start in range(0, kept, nyu_raw.LOAD_CHUNK):
                    array.write(np.asarray(data[start:start + nyu_raw.LOAD_CHUNK]))
                del data
    _write_json(os.path.join(tmp, nyu_raw.CACHE_META), meta)


def _joined(tmp):
    """The metadata of a cache this conversion joined completely in tmp (its raw_cache.json is
    written last), or None."""
    try:
        with open(os.path.join(tmp, nyu_raw.CACHE_META)) as f:
            meta = json.load(f)
    except (OSError, ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) and 'dumps' in meta else None


def _swap_in(out, tmp, shard_dir):
    """The joined cache in tmp becomes OUT (an older cache there replaced); the shards go."""
    try:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        raise cli.UserError(f'{out}: could not put the joined cache in place ({e.strerror or e}); '
                            f'it is complete in {tmp}') from None


def summary(meta):
    """The per-scene and total counts, as printed at the end."""
    d = meta['dumps']

    def row(label, depth, matched, one_to_many, damaged, kept):
        return f'{label:<28}{depth:>8}{matched:>9}{one_to_many:>11}{damaged:>9}{kept:>8}'

    def counted(label, c):
        return row(label, *(c[k] for k in ('depth_frames', 'matched', 'dropped_one_to_many',
                                           'damaged', 'kept')))

    rows = [row('scene', 'depth', 'matched', '1-to-many', 'damaged', 'kept')]
    rows += [counted(name, c) for name, c in d['per_scene'].items()]
    t = d['total']
    rows.append(counted(f'total ({len(d["per_scene"])} scenes)', t))
    rows.append(f'{t["kept"]:,} frames kept (the paper: {PAPER_FRAMES // 1000}K unique frames of 249 '
                f'training scenes); depth frames whose RGB frame was matched to another depth frame '
                f'are dropped')
    skipped = d['skipped']
    rows.append(f'skipped: {len(skipped["test_scenes"])} test scenes, {len(skipped["not_scenes"])} '
                f'folders that are not training or test scenes, {len(skipped["without_frames"])} '
                f'scenes without depth or RGB frames (named in the notes above)')
    return '\n'.join(rows)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dumps', nargs='+', metavar='DUMPS',
                   help='the folder of scene folders, or the official zip files (read without '
                        'unpacking)')
    p.add_argument('--out', required=True, help='cache folder to write (resumable: run the same '
                                                'command again)')
    p.add_argument('--workers', type=cli.whole(0), default=4,
                   help='scenes converted at once, each by a process of its own; 0: one '
                        'at a time in this process (default: %(default)s)')
    p.add_argument('--labeled', default=LABELED,
                   help="the labeled .mat whose scene names, with --splits, say which scenes are "
                        'test scenes, never converted (default: %(default)s)')
    p.add_argument('--splits', default=SPLITS, help="NYU's official split (default: %(default)s)")
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    args = p.parse_args(argv)
    meta = convert_dumps(args.dumps, args.out, args.labeled, args.splits, args.workers)
    print(summary(meta))
    print(f'{len(meta["scenes"])} frames of {len(meta["dumps"]["per_scene"])} scenes -> {args.out}')
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
