"""Raw NYU Depth v2 frames for training, as the paper did (Sec. 4.1: ~120K raw frames of the 249
training scenes, missing depth left unfilled and masked).

Reads the raw-frame sets people have on disk (formats: docs/data.md):
  bts         BTS "sync": a list file of `<rgb> <depth> <focal>` lines, paths relative to a root;
              RGB JPEG, depth 16-bit PNG in millimetres, 0 = missing; scene = first folder.
  densedepth  DenseDepth's nyu_data.zip (or its extracted folder): data/nyu2_train.csv of
              `<rgb>,<depth>` pairs; training depth 8-bit PNG, metres = png / 255 * 10; the test
              pairs 16-bit millimetres. Scene = the frame's folder without DenseDepth's `_out`.
  folder      users' own data: rgb_<id>.<ext> / depth_<id>.png pairs, any depth, metres = png *
              --depth-scale; scene = the subfolder (the folder itself for flat ones).
  cache       a folder written by this script's conversion (below).
Every set yields what the labeled loader yields: 320x240 RGB uint8 and depth in metres, 0 = missing.
Frames are decoded on demand (DataLoader workers), never all held in memory.

    python nyu_raw.py --data nyu/sync/nyu_train.txt --out nyu/raw_cache   # one-time conversion
    python nyu_dumps.py /data/nyu_raw --out nyu/raw_cache                 # the official raw dumps
converts any set into a compact cache: uint8 RGB and uint16 millimetre depth at 320x240 in .npy
files (375 KiB a frame: 225 KiB of RGB, 150 KiB of depth) that training memory-maps instead of decoding JPEG/PNG each time.
"""
import argparse
import csv
import errno
import io
import json
import math
import os
import re
import shutil
import sys
import zipfile

import numpy as np
import torch

import cli
import files
import util
from net import FRAME_HW
from runtime import DIST

FORMATS = ('bts', 'densedepth', 'folder', 'cache')
CACHE_META = 'raw_cache.json'
DENSEDEPTH_CSV = {'train': 'data/nyu2_train.csv', 'test': 'data/nyu2_test.csv'}
PER_SCENE = 1200   # Sec. 4.1: the scene distribution evened to 1200 frames per scene
FRAME_BYTES_PER_PIXEL = 3 + 2   # uint8 RGB + float16 depth in memory: 375 KiB an NYU frame
TRAINING_HEADROOM = 4 * 2**30   # kept free for the nets, their gradients and a batch's activations
LOAD_CHUNK = 512                 # frames read from the memory maps at a time (190 MB)
DEPTH_CHECK_FRAMES = 32          # convert() checks the depth's unit after this many frames, and at the end
DEPTH_NOTE_SHARE = 0.01          # depth outside the plausible range above this share: a note


def scene_id(name):
    """NYU scene name as the labeled set's `scenes` spells it: DenseDepth's `_out` suffix dropped,
    and (?) a session letter after the number (bedroom_0004a / _0004b) dropped too, so every
    recording of a test room counts as that room: when in doubt, refuse rather than leak."""
    name = os.path.basename(name.rstrip('/'))
    name = re.sub(r'_out$', '', name)
    return re.sub(r'(_\d+)[a-z]$', r'\1', name).lower()


class RawFrames(torch.utils.data.Dataset):
    """A list of (RGB, depth) files with their scenes; item i is (3, 240, 320) uint8 RGB and
    (240, 320) float16 depth in metres, 0 = missing, decoded on demand."""
    frame_hw = FRAME_HW
    # convert()'s depth file and unit: millimetres (kitti.KittiFrames: 1/256 m, past 65.5 m)
    cache_depth_file, cache_units_per_m = 'depths_mm.npy', 1000
    # indoor Kinect depth: NYU's lies between ~0.5 and 10 m, typically ~3 m. Most of a set's depth
    # outside this range means the depth unit is wrong (convert() refuses; DepthCheck)
    plausible_depth_m, typical_depth_m = (0.1, 20.0), 3.0

    def __init__(self, description, pairs, scenes, depth_units, zip_path=None, root=''):
        self.description = description
        self.pairs, self.scenes = pairs, scenes
        self.depth_units = depth_units   # (bits, metres per unit): PNG bit depth expected
        self.zip_path, self.root = zip_path, root
        self._zip = None                 # opened per process (a ZipFile cannot cross a fork)

    def __len__(self):
        return len(self.pairs)

    def _open(self, name):
        if self.zip_path is None:
            return open(os.path.join(self.root, name), 'rb')
        if self._zip is None or self._zip[0] != os.getpid():
            self._zip = (os.getpid(), zipfile.ZipFile(self.zip_path))
        try:
            return io.BytesIO(self._zip[1].read(name))
        except KeyError:
            raise cli.DataError(f'{self.zip_path}: has no {name}') from None

    def _image(self, name):
        from PIL import Image, UnidentifiedImageError
        where = os.path.join(self.root, name) if self.zip_path is None else f'{self.zip_path}:{name}'
        try:
            with self._open(name) as f:
                img = Image.open(f)
                img.load()
                return img, where
        except FileNotFoundError:
            raise cli.DataError(f'{os.path.join(self.root, name)}: not found (listed in '
                                 f'{self.description})') from None
        except (UnidentifiedImageError, OSError) as e:
            raise cli.DataError(f'{where}: not a readable image ({e})') from None

    def rgb(self, i):
        """Frame i's RGB as stored (H, W, 3) uint8, and where it was read from."""
        img, where = self._image(self.pairs[i][0])
        if img.mode not in ('RGB', 'RGBA', 'P'):
            raise cli.DataError(f'{where}: a {img.mode} image, not colour')
        return np.asarray(img.convert('RGB')), where

    def depth(self, i):
        """Frame i's depth as stored (H, W) float32 metres, 0 = missing, and where it was read from."""
        dimg, where = self._image(self.pairs[i][1])
        bits, metres_per_unit = self.depth_units
        found = 16 if dimg.mode in ('I;16', 'I;16B', 'I') else 8 if dimg.mode == 'L' else None
        if found is None or (bits is not None and found != bits):
            want = f'{bits}-bit' if bits else '8- or 16-bit'
            raise cli.DataError(f'{where}: depth PNG of mode {dimg.mode}; this set stores {want} '
                                f'grey depth')
        return np.asarray(dimg).astype(np.float32) * metres_per_unit, where

    def __getitem__(self, i):
        return to_frame(*self.rgb(i)), to_depth_frame(*self.depth(i))


def to_frame(rgb, where):
    """640x480 (NYU's Kinect) or 320x240 RGB -> (3, 240, 320) uint8 tensor."""
    if rgb.shape[:2] == tuple(2 * s for s in FRAME_HW):
        rgb = util.downsample_rgb(rgb)
    elif rgb.shape[:2] != FRAME_HW:
        raise cli.DataError(f'{where}: {rgb.shape[1]}x{rgb.shape[0]} pixels; NYU frames are '
                             f'640x480 (or 320x240)')
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


def to_depth_frame(depth, where):
    """Depth in metres, 640x480 or 320x240 -> (240, 320) float16; halved by averaging only the
    valid pixels of each 2x2 block (util.downsample_depth), so holes stay holes (0)."""
    if depth.shape == tuple(2 * s for s in FRAME_HW):
        depth = util.downsample_depth(depth)
    elif depth.shape != FRAME_HW:
        raise cli.DataError(f'{where}: {depth.shape[1]}x{depth.shape[0]} depth; NYU frames are '
                             f'640x480 (or 320x240)')
    return torch.from_numpy(np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float16))


# ----------------------------------------------------------------------------------------------
# The layouts

def read_bts(list_path, root=None):
    """BTS's list file: `/scene/rgb_00037.jpg /scene/sync_depth_00037.png 518.8579` a line, paths
    relative to `root` (default: the list file's folder)."""
    files.check_file(list_path, 'a BTS file list')
    root = os.path.dirname(os.path.abspath(list_path)) if root is None else root
    pairs, scenes = [], []
    with open(list_path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (2, 3) or fields[1] == 'None':
                raise cli.DataError(f'{list_path}, line {number}: expected `<rgb path> <depth '
                                     f'path> <focal>`, found {line.strip()!r}')
            rgb, depth = (p.lstrip('/') for p in fields[:2])
            pairs.append((rgb, depth))
            scenes.append(scene_id(rgb.split('/')[0]))
    return RawFrames(list_path, pairs, scenes, (16, 0.001), root=root)


def read_densedepth(path, split='train'):
    """DenseDepth's nyu_data.zip, read in place, or the folder it was extracted into."""
    files.check_exists(path, "DenseDepth's nyu_data.zip or its extracted folder")
    csv_name = DENSEDEPTH_CSV[split]
    if os.path.isdir(path):
        zip_path, root = None, path
        csv_file = os.path.join(path, csv_name)
        if not os.path.isfile(csv_file):
            raise cli.DataError(f'{path}: has no {csv_name}; not an extracted nyu_data.zip')
        with open(csv_file, newline='') as f:
            rows = list(csv.reader(f))
    else:
        zip_path, root = path, ''
        try:
            with zipfile.ZipFile(path) as z:
                rows = list(csv.reader(io.TextIOWrapper(z.open(csv_name), newline='')))
        except zipfile.BadZipFile:
            raise cli.DataError(f'{path}: not a zip file') from None
        except KeyError:
            raise cli.DataError(f'{path}: has no {csv_name}; not nyu_data.zip') from None
    rows = [r for r in rows if r]
    bad = next((n for n, r in enumerate(rows, 1) if len(r) != 2), None)
    if bad:
        raise cli.DataError(f'{path}: {csv_name} line {bad} is not `<rgb path>,<depth path>`')
    pairs = [(a.strip(), b.strip()) for a, b in rows]
    scenes = [scene_id(os.path.dirname(a)) if split == 'train' else None for a, _ in pairs]
    # training depth: 8-bit, 0..255 -> 0..10 m; test depth: 16-bit millimetres
    units = (8, 10.0 / 255) if split == 'train' else (16, 0.001)
    return RawFrames(path, pairs, scenes, units, zip_path=zip_path, root=root)


RGB_NAME = re.compile(r'^rgb_(.+)\.(png|jpg|jpeg)$', re.IGNORECASE)


def read_folder(folder, depth_scale):
    """rgb_<id>.png|jpg next to depth_<id>.png, in `folder` or its subfolders (one per scene)."""
    files.check_exists(folder, 'a folder of rgb_*.png / depth_*.png pairs')
    if not os.path.isdir(folder):
        raise cli.DataError(f'{folder}: not a folder (of rgb_*.png / depth_*.png pairs)')
    pairs, scenes = [], []
    for here, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            m = RGB_NAME.match(name)
            if not m:
                continue
            rel = os.path.relpath(os.path.join(here, name), folder)
            depth = os.path.join(os.path.dirname(rel), f'depth_{m.group(1)}.png')
            if not os.path.isfile(os.path.join(folder, depth)):
                raise cli.DataError(f'{os.path.join(folder, rel)}: no {os.path.basename(depth)} '
                                     f'beside it')
            pairs.append((rel, depth))
            scene = os.path.dirname(rel) or os.path.basename(os.path.abspath(folder))
            scenes.append(scene_id(scene.split(os.sep)[0]))
    if not pairs:
        raise cli.DataError(f'{folder}: is a folder without rgb_*.png / rgb_*.jpg files; --data '
                             f"takes the labeled .mat, a BTS list .txt, DenseDepth's nyu_data.zip "
                             f'(or its folder), a folder of rgb_*/depth_* pairs or a converted cache')
    if depth_scale is None or depth_scale <= 0:
        raise cli.DataError(f'{folder}: a plain folder needs --depth-scale (metres per depth '
                             f'PNG unit, e.g. 0.001 for millimetres)')
    return RawFrames(folder, pairs, scenes, (None, depth_scale), root=folder)


def is_cache(path):
    """Whether `path` is a folder converted by nyu_raw.py or kitti.py (its raw_cache.json)."""
    return os.path.isfile(os.path.join(path, CACHE_META))


class CachedFrames(torch.utils.data.Dataset):
    """A converted set: memory-mapped uint8 RGB (N, H, W, 3) and uint16 depth (N, H, W) (NYU:
    240x320 in millimetres; KITTI: 184x612 in 1/256 m, its raw_cache.json says so); only the
    pages of the frames drawn are read."""

    def __init__(self, folder):
        meta_path = os.path.join(folder, CACHE_META)
        files.check_file(meta_path, 'a raw-frame cache written by nyu_raw.py or kitti.py')
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            self.folder = folder
            self.description = f"{folder} (converted from {meta['source']})"
            self.scenes = meta['scenes']
            # caches written before KITTI have none of these keys: NYU's 240x320 in millimetres
            self.frame_hw = tuple(meta.get('frame_hw', FRAME_HW))
            self.units_per_m = meta.get('depth_units_per_m', 1000)
            self.images = np.load(os.path.join(folder, 'images.npy'), mmap_mode='r')
            self.depths = np.load(os.path.join(folder, meta.get('depth_file', 'depths_mm.npy')),
                                  mmap_mode='r')
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:   # JSON, .npy
            raise cli.DataError(f'{folder}: not a complete cache ({type(e).__name__}: {e}); '
                                f'convert again') from None
        if len(self.images) != len(self.scenes) or len(self.depths) != len(self.scenes):
            raise cli.DataError(f'{folder}: images, depths and {CACHE_META} disagree in length; '
                                 f'convert again')
        if self.images.shape[1:3] != self.frame_hw or self.depths.shape[1:] != self.frame_hw:
            raise cli.DataError(f'{folder}: its arrays are not the {self.frame_hw} frames '
                                 f'{CACHE_META} names; convert again')

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        rgb = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).contiguous()
        depth = torch.from_numpy(self.depths[i].astype(np.float32) / self.units_per_m).to(torch.float16)
        return rgb, depth

    def to_frames(self, indices, device):
        """The frames at `indices` as util.Frames on `device` (the GPU, or RAM for the CPU), read
        from the memory maps a chunk at a time with a progress bar: what `--path fast` trains from,
        with no decoding and no worker processes. Refused (one line, nothing loaded) when they do
        not fit in the device's free memory."""
        n = len(indices)
        fh, fw = self.frame_hw
        need = n * fh * fw * FRAME_BYTES_PER_PIXEL
        free = free_memory(device)
        if need + TRAINING_HEADROOM > free:
            raise cli.UserError(
                f'{self.folder}: its {n} training frames need {_size(need)} on {device}, which has '
                f'{_size(free)} free ({_size(TRAINING_HEADROOM)} are kept for training itself); '
                f'stream it from disk instead with --path plain')
        images = torch.empty((n, 3, fh, fw), dtype=torch.uint8, device=device)
        depths = torch.empty((n, fh, fw), dtype=torch.float16, device=device)
        for start in cli.progress(range(0, n, LOAD_CHUNK), DIST.main, unit='chunk',
                                  desc=f'loading {self.folder} onto {device}'):
            rows = np.asarray(indices[start:start + LOAD_CHUNK])
            images[start:start + len(rows)] = torch.from_numpy(np.asarray(self.images[rows])).to(
                device).permute(0, 3, 1, 2)
            # the same conversion as __getitem__: float32 units / units per metre, then float16
            units = torch.from_numpy(np.asarray(self.depths[rows]).astype(np.float32)).to(device)
            depths[start:start + len(rows)] = (units / self.units_per_m).to(torch.float16)
        return util.Frames.from_tensors(images, depths)


def _size(count):
    if count >= 2**30:
        return f'{count / 2**30:.1f} GiB'
    if count >= 2**20:
        return f'{count / 2**20:.{1 if count < 10 * 2**20 else 0}f} MiB'
    return f'{math.ceil(count / 2**10)} KiB'


def free_memory(device):
    """Bytes free on `device`: the GPU's free memory, or the RAM available to the CPU."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration):
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def open_raw(path, fmt='auto', root=None, depth_scale=None):
    """The raw-frame set at `path` (format by name: .txt = bts, .zip or a folder with
    data/nyu2_train.csv = densedepth, a folder with raw_cache.json = cache, else folder)."""
    fmt = detect_format(path) if fmt == 'auto' else fmt
    if fmt == 'bts':
        return read_bts(path, root)
    if fmt == 'densedepth':
        return read_densedepth(path)
    if fmt == 'cache':
        return CachedFrames(path)
    return read_folder(path, depth_scale)


def detect_format(path):
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CACHE_META)):
            return 'cache'
        if os.path.isfile(os.path.join(path, DENSEDEPTH_CSV['train'])):
            return 'densedepth'
        return 'folder'
    return {'.txt': 'bts', '.zip': 'densedepth', '.mat': 'labeled'}.get(
        os.path.splitext(path)[1].lower(), 'labeled')


# ----------------------------------------------------------------------------------------------
# The official scene split (the paper's scene balancing: util.balanced_pass)

def test_scenes(labeled_mat, splits, scenes=None):
    """The scene names of NYU's 654 test images (215 scenes), from the labeled file's `scenes`
    (read here unless given: util.read_scene_names)."""
    scenes = util.read_scene_names(labeled_mat) if scenes is None else scenes
    _, test_idx = util.read_splits(splits, len(scenes), test_may_be_empty=True)
    return {scene_id(scenes[i]) for i in test_idx}


def refuse_test_scenes(frames, forbidden):
    """A training frame from a test scene is a leak: refuse the whole set, loudly."""
    leaked = sorted({s for s in frames.scenes if s in forbidden})
    if leaked:
        count = sum(s in forbidden for s in frames.scenes)
        raise cli.DataError(f'{frames.description}: {count} training frames come from '
                             f'{len(leaked)} scenes of the official test split ({", ".join(leaked[:5])}'
                             f'{", ..." if len(leaked) > 5 else ""}); remove them, training on '
                             f'test scenes makes every test figure meaningless')


# ----------------------------------------------------------------------------------------------
# One-time conversion into a memory-mappable cache

CACHE_FILES = {'images.npy', RawFrames.cache_depth_file, 'depths.npy', CACHE_META}   # what
# a conversion writes (depths.npy: KITTI's depth file); nothing else is ever deleted


def check_out(out, partial_extra=frozenset()):
    """The cache folder `out` and the temporary folder beside it that convert() writes into,
    checked before any work (one line each): a path where no folder can be written (empty, a file
    at or above it, no permission, a read-only file system) or a folder that is not a cache.
    partial_extra: the names a conversion may also keep in the temporary folder (nyu_dumps: its
    per-scene shards). What files.atomic_write leaves of a cache file when it is killed
    (<name>.tmp<pid>) is no reason to refuse (and no part of a cache: remove_temporaries). Returns
    both, normalised."""
    files.check_out_folder(out)
    out = os.path.normpath(out)
    tmp = out + '.partial'
    for folder, allowed in ((out, CACHE_FILES), (tmp, CACHE_FILES | set(partial_extra))):
        files.check_out_folder(folder)
        if os.path.isdir(folder) and not set(os.listdir(folder)) <= allowed | {
                os.path.basename(t) for t in files.temporaries(folder, CACHE_FILES)}:
            raise cli.DataError(f'{folder}: is a folder, but not a cache; --out names a new or '
                                f'empty folder, or a cache to replace (nothing was deleted)')
    return out, tmp


def remove_temporaries(folder):
    """What files.atomic_write left of the cache files in `folder` when it was killed: clutter, the
    complete file (or none) is what counts."""
    for path in files.temporaries(folder, CACHE_FILES):
        os.remove(path)


def check_free_space(out, need, what='the cache needs'):
    """Refuse (one line, nothing written) when the file system `out` would be on has fewer than
    `need` bytes free for an ordinary user."""
    where = files.nearest_existing(os.path.dirname(os.path.abspath(out)))
    try:
        stat = os.statvfs(where)
    except (OSError, AttributeError):   # no statvfs (Windows): the writes themselves will tell
        return
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise cli.UserError(f'{out}: {what} {_size(need)}, but the file system of {where} '
                            f'has {_size(free)} free; free space there or choose another --out '
                            f'(nothing was written)')


class _WriteFailed(Exception):
    """An OSError while writing the cache (disk full, quota, I/O error): convert() removes the
    partial cache and reports it in one line."""


class _ArrayFile:
    """Arrays of one dtype written front to back with plain file writes (nyu_dumps' shards: the
    frames one after another, no header); a write that fails is a _WriteFailed. As a context
    manager: closed (fsynced) at the end, discarded on an error."""

    def __init__(self, path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        try:
            self.file = open(path, 'wb')
        except OSError as e:
            raise _WriteFailed(path, e) from None

    def write(self, array):
        assert array.dtype == self.dtype
        try:
            self.file.write(np.ascontiguousarray(array).data)
        except OSError as e:
            raise _WriteFailed(self.path, e) from None

    def close(self):
        """Flush and fsync (a file system that reports a full disk only then does so here)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            raise _WriteFailed(self.path, e) from None

    def discard(self):
        try:
            self.file.close()
        except OSError:   # its flush fails as the write did
            pass

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.close()
        else:
            self.discard()


class _NpyFile(_ArrayFile):
    """An .npy array written front to back with plain file writes, its whole size reserved on
    disk first (posix_fallocate). A full disk or quota is then an OSError at the start, or at the
    latest at a write: never the SIGBUS (no message, the process killed) that a memory map gives
    when one of its pages cannot be backed by the file system."""

    def __init__(self, path, dtype, shape):
        super().__init__(path, dtype)
        try:
            np.lib.format.write_array_header_1_0(self.file, {
                'descr': np.lib.format.dtype_to_descr(self.dtype), 'fortran_order': False,
                'shape': tuple(shape)})
            self.file.flush()
            size = self.file.tell() + math.prod(shape) * self.dtype.itemsize
            try:
                os.posix_fallocate(self.file.fileno(), 0, size)
            except AttributeError:   # not on this system (macOS, Windows): the writes will tell
                pass
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise            # ENOSPC, EDQUOT, EIO; the others: no reservation here
        except OSError as e:
            self.discard()
            raise _WriteFailed(path, e) from None


class DepthCheck:
    """Watches the depth convert() writes, in metres: when most valid pixels lie outside the
    frames' plausible range (RawFrames.plausible_depth_m), the depth unit is wrong (a --depth-scale
    of 1 on millimetre PNGs, ...): a cache of such depth would train on nonsense, so it is refused
    in one line that says what scale would fit. A small share outside is a one-line note."""

    def __init__(self, frames, units_per_m):
        self.frames, self.units_per_m = frames, units_per_m
        self.low, self.high = frames.plausible_depth_m
        self.valid = self.outside = self.clipped = 0
        self.medians = []            # of each frame's valid depth

    def add(self, depth_m, clipped):
        valid = depth_m > 0
        count = int(valid.sum())
        if count:
            d = depth_m[valid]
            self.valid += count
            self.outside += int(((d < self.low) | (d > self.high)).sum())
            self.clipped += clipped
            self.medians.append(float(np.median(d)))

    def check(self, final):
        """Refuse a set whose depth is mostly implausible (at the end: also one without any valid
        depth pixel); at the end, note a small share outside the range."""
        where = self.frames.description
        if not self.valid:
            if final:
                raise cli.DataError(f'{where}: none of its {len(self.frames)} frames has a valid '
                                    f'depth pixel (all 0 or missing); check the depth files')
            return
        share = self.outside / self.valid
        clipped = (f', {self.clipped / self.valid:.0%} clipped at {65535 / self.units_per_m:.1f} m'
                   if self.clipped else '')
        found = (f'{share:.0%} of the valid depth is outside {self.low:g} to {self.high:g} m '
                 f'(median {np.median(self.medians):.3g} m{clipped})')
        if share > 0.5:
            raise cli.DataError(f'{where}: {found}: the depth unit looks wrong; {self._advice()}; '
                                f'nothing was kept')
        if final and share > DEPTH_NOTE_SHARE:
            print(f'note: {where}: {found}; converted as it is', file=sys.stderr)

    def _advice(self):
        """The power of ten that brings the median depth nearest the typical one, as the
        --depth-scale to use where the user states the unit (the folder format)."""
        median = float(np.median(self.medians))
        factor = 10.0 ** round(math.log10(self.frames.typical_depth_m / median)) if (
            math.isfinite(median) and median > 0) else None
        bits, per_unit = getattr(self.frames, 'depth_units', (0, None))
        if bits is None and factor is not None:   # read_folder: metres per unit = --depth-scale
            return (f'--depth-scale {per_unit * factor:g} gives a median of {median * factor:.3g} '
                    f'm (metres per PNG unit: 0.001 for millimetres)')
        return 'its depth files are not in the unit this format stores; check them'


def convert(frames, out, workers=4, progress=True):
    """Decode every frame once (in DataLoader workers) into OUT/images.npy (N, H, W, 3) uint8, the
    depths as uint16 and OUT/raw_cache.json, written front to back with plain file writes (flat
    RAM) into a temporary folder renamed at the end, at the frames' `frame_hw`, in their
    `cache_depth_file` and `cache_units_per_m` (NYU: 240x320, depths_mm.npy in millimetres;
    KITTI: 184x612, depths.npy in 1/256 m), which raw_cache.json names for CachedFrames.
    Refused in one line, with nothing half-done left behind (the temporary folder removed): an
    unusable OUT, too little free space (checked first), a write that fails (disk full, quota),
    a frame that does not decode, depth in an implausible unit (DepthCheck), Ctrl-C."""
    out, tmp = check_out(out)
    n = len(frames)
    (fh, fw), depth_file, units_per_m = frames.frame_hw, frames.cache_depth_file, frames.cache_units_per_m
    meta = json.dumps({'source': os.fspath(frames.description), 'scenes': frames.scenes,
                       'frame_hw': [fh, fw], 'depth_file': depth_file,
                       'depth_units_per_m': units_per_m})
    header = 2 * 4096   # the two .npy headers, and a file system block each, at most
    need = n * fh * fw * (3 + 2) + len(meta) + header
    check_free_space(out, need)
    shutil.rmtree(tmp, ignore_errors=True)   # left by a conversion that was killed
    arrays = []
    try:
        try:
            os.makedirs(tmp)
        except OSError as e:
            raise _WriteFailed(tmp, e) from None
        for name, dtype, shape in (('images.npy', np.uint8, (n, fh, fw, 3)),
                                   (depth_file, np.uint16, (n, fh, fw))):
            arrays.append(_NpyFile(os.path.join(tmp, name), dtype, shape))
        images, depths = arrays
        depth_check = DepthCheck(frames, units_per_m)
        loader = util.FrameLoader(frames, batch_size=None, num_workers=workers)
        for i, (rgb, depth) in enumerate(cli.progress(loader, progress, total=n, desc='converting',
                                                      unit='frame')):
            images.write(rgb.permute(1, 2, 0).numpy())
            metres = depth.float().numpy()
            units = np.round(metres * units_per_m)
            depths.write(units.clip(0, 65535).astype(np.uint16))
            depth_check.add(metres, int((units > 65535).sum()))
            if i + 1 == DEPTH_CHECK_FRAMES:
                depth_check.check(final=False)   # a wrong unit is refused early, not in hours
        depth_check.check(final=True)
        for array in arrays:
            array.close()
        try:
            with open(os.path.join(tmp, CACHE_META), 'w') as f:
                f.write(meta)
            if os.path.exists(out):
                shutil.rmtree(out)
            os.replace(tmp, out)
        except OSError as e:
            raise _WriteFailed(out, e) from None
    except BaseException as e:   # nothing half-done left behind
        for array in arrays:
            array.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _WriteFailed):
            path, error = e.args
            raise cli.UserError(f'{out}: could not write {os.path.basename(path)} '
                                f'({error.strerror or error}); the cache needs {_size(need)}: '
                                f'free space or choose another --out (the partial cache was '
                                f'removed)') from None
        raise
    return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help="the raw-frame set (list file, zip or folder); "
                                                 "NYU's official raw dumps: python nyu_dumps.py")
    p.add_argument('--format', choices=('auto',) + FORMATS[:-1], default='auto',
                   help='(default: %(default)s: by the file name)')
    p.add_argument('--data-root', help='BTS: the folder the list paths are relative to '
                                       '(default: the list file\'s folder)')
    p.add_argument('--depth-scale', type=cli.real(above=0),
                   help='folder: metres per depth PNG unit (0.001 for millimetres)')
    p.add_argument('--out', required=True, help='cache folder to write')
    p.add_argument('--workers', type=cli.whole(0), default=4,
                   help='decoding processes (default: %(default)s)')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    args = p.parse_args(argv)
    check_out(args.out)   # before the frames are listed, which can take a while
    frames = open_raw(args.data, args.format, args.data_root, args.depth_scale)
    if isinstance(frames, CachedFrames):
        raise cli.UserError(f'{args.data}: is already a converted cache; train from it as it is')
    convert(frames, args.out, args.workers)
    print(f'{len(frames)} frames of {len(set(frames.scenes))} scenes -> {args.out}')
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
