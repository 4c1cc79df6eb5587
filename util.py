"""NYU Depth v2 loading, the paper's augmentation, synthetic NYU-format scenes, and plots.

Formats: ../shared/nyu-format.md (summarised in the README). The labeled file is MATLAB v7.3,
i.e. HDF5: h5py shows MATLAB's column-major arrays with their axes reversed, so image i is
images[i].transpose(2, 1, 0) -> (480, 640, 3) and depth i is depths[i].T -> (480, 640).
"""
import json
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loss import valid_depth_mask
from net import FRAME_HW, INPUT_HW, OUTPUT_HW, TARGET_OFFSET, TARGET_STRIDE

NYU_HW = (480, 640)
NYU_URL = 'http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat'
SPLITS_URL = 'http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat'
CACHE_VERSION = 2
READ_CHUNK = 32   # frames read from the .mat at a time (a full read would need ~3 GB)


class UserError(Exception):
    """A problem the user can fix (bad input, a refused checkpoint, a full disk, a diverged run).
    The command-line scripts print its message as one `error: ...` line and exit with status 1;
    with --debug they show the traceback instead (run_cli)."""


class DataError(UserError):
    """A dataset or model file that is missing or not what it claims to be; the message says which."""


def run_cli(main):
    """Run a script's main() as a command: its return value is the exit status; a UserError is one
    line on stderr and status 1, Ctrl-C before training has started is one line and status 130."""
    debug = '--debug' in sys.argv[1:]
    try:
        status = main()
    except UserError as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        if debug:
            raise
        print('interrupted', file=sys.stderr)
        status = 130
    sys.exit(status)


def load_torch_file(path, what):
    """torch.load a checkpoint or weights file safely: weights_only=True, so a file holding a
    pickled program is refused instead of run, and every failure is a one-line DataError."""
    path = os.fspath(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            raise DataError(f'{path}: refused: it holds Python objects other than tensors, which '
                            f'could run code when loaded; only files written by this project '
                            f'are read ({what})') from None
        raise DataError(f'{path}: truncated or not a PyTorch file ({what})') from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise DataError(f'{path}: truncated or not a PyTorch file (a copy or save that was cut '
                        f'short?); expected {what}') from None


def load_weights(net, path, what, state=None):
    """Load a state_dict file into `net` (or `state`, already read from `path`), refusing (one
    line) weights of another layer layout."""
    state = load_torch_file(path, what) if state is None else state
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise DataError(f'{path}: does not fit the {net.variant.name} variant\'s '
                        f'{type(net).__name__} ({first})') from None
    return net


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over `path`: a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# NYU labeled .mat (v7.3 / HDF5) and splits.mat (v5)

def _decode_cell_strings(f, name):
    """A MATLAB cellstr (1 x N object references to uint16 char arrays) as a list of str."""
    if name not in f:
        return None
    refs = f[name][()].ravel()
    return [''.join(chr(c) for c in f[r][()].ravel()) for r in refs]


def downsample_rgb(image_hwc):
    """640x480 -> 320x240 by averaging 2x2 blocks (Sec. 4.1: inputs are half resolution)."""
    h, w, c = image_hwc.shape
    blocks = image_hwc.reshape(h // 2, 2, w // 2, 2, c).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def downsample_depth(depth_hw):
    """640x480 -> 320x240 averaging only the valid (> 0, finite) pixels of each 2x2 block, so a
    missing pixel never drags a depth towards 0; a block with no valid pixel stays 0 (missing)."""
    h, w = depth_hw.shape
    d = depth_hw.reshape(h // 2, 2, w // 2, 2).astype(np.float32)
    valid = np.isfinite(d) & (d > 0)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, d, 0).sum(axis=(1, 3))
    return np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float32)


def _cache_key(mat_path):
    st = os.stat(mat_path)
    return {'version': CACHE_VERSION, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def cache_path_for(mat_path):
    return os.path.splitext(os.fspath(mat_path))[0] + '.cache.npz'


def read_nyu_labeled(mat_path, use_cache=True, progress=True):
    """Read the labeled NYU Depth v2 .mat once into compact 320x240 arrays.

    Returns a dict: images (N, 240, 320, 3) uint8 RGB, depths (N, 240, 320) float16 filled depth in
    metres, raw_depths (same) raw Kinect depth with 0 = missing, scenes (list of N str or None),
    invalid (per depth array, counts of the full-resolution pixels that are 0, NaN, inf or negative;
    all of them end up masked: describe_invalid words it). The arrays are written next to the .mat
    as <name>.cache.npz (about 0.6 GB for the real file); later calls read that instead (seconds
    instead of minutes) while the .mat is unchanged.
    """
    mat_path = os.fspath(mat_path)
    _check_file(mat_path, 'the labeled NYU Depth v2 file', NYU_URL)
    cache = cache_path_for(mat_path)
    key = _cache_key(mat_path)
    if use_cache and os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if json.loads(str(z['key'])) == key:
                    return {'images': z['images'], 'depths': z['depths'],
                            'raw_depths': z['raw_depths'], 'scenes': json.loads(str(z['scenes'])),
                            'invalid': json.loads(str(z['invalid']))}
        except (OSError, ValueError, KeyError):
            pass   # stale or broken cache: rebuild it below
    data = _read_mat(mat_path, progress)
    if use_cache:
        def write(tmp):
            with open(tmp, 'wb') as f:
                np.savez(f, key=json.dumps(key), scenes=json.dumps(data['scenes']),
                         invalid=json.dumps(data['invalid']),
                         images=data['images'], depths=data['depths'], raw_depths=data['raw_depths'])
        try:
            atomic_write(cache, write)
        except OSError as e:   # a read-only dataset folder costs speed, never the run
            print(f'note: could not write the cache {cache}: {e.strerror}')
    return data


def check_exists(path, what, url=None):
    """A DataError naming `path` and what it should be (and where to get it) if it is missing."""
    if not os.path.exists(path):
        if url is None:
            raise DataError(f'{path}: not found ({what})')
        raise DataError(f"{path}: not found. This should be {what}; download it from {url} "
                        f"into nyu/, or run `python train.py --demo` to use synthetic scenes.")


def _check_file(path, what, url=None):
    check_exists(path, what, url)
    if not os.path.isfile(path):
        raise DataError(f"{path}: is a directory, not {what}")


def _open_mat(mat_path):
    import h5py
    try:
        return h5py.File(mat_path, 'r')
    except OSError:
        raise DataError(f"{mat_path}: not an HDF5 (MATLAB v7.3) file; the labeled NYU file is "
                        f"saved with -v7.3. (A MATLAB v5 .mat or a partial download?)") from None


def read_scene_names(mat_path):
    """The labeled file's scene name of every frame, without reading any image (milliseconds,
    where read_nyu_labeled takes minutes the first time)."""
    mat_path = os.fspath(mat_path)
    _check_file(mat_path, 'the labeled NYU Depth v2 file', NYU_URL)
    with _open_mat(mat_path) as f:
        scenes = _decode_cell_strings(f, 'scenes')
    if scenes is None:
        raise DataError(f"{mat_path}: has no 'scenes'; not the labeled NYU file")
    return scenes


def _read_mat(mat_path, progress):
    from tqdm import tqdm
    with _open_mat(mat_path) as f:
        for name in ('images', 'depths'):
            if name not in f:
                raise DataError(f"{mat_path}: has no '{name}' dataset; not the labeled NYU file")
        images, depths = f['images'], f['depths']
        raw = f['rawDepths'] if 'rawDepths' in f else None
        n = images.shape[0]
        w, h = NYU_HW[1], NYU_HW[0]
        if images.shape[1:] != (3, w, h) or images.dtype != np.uint8:
            raise DataError(f"{mat_path}: 'images' is {images.shape} {images.dtype}; NYU's is "
                            f"(N, 3, 640, 480) uint8 (MATLAB 480x640x3xN)")
        for d in (depths, raw):
            if d is not None and (d.shape != (n, w, h) or d.dtype.kind != 'f'):
                raise DataError(f"{mat_path}: '{d.name[1:]}' is {d.shape} {d.dtype}; NYU's is "
                                f"({n}, 640, 480) float (MATLAB 480x640xN)")
        fh, fw = FRAME_HW
        out = {'images': np.empty((n, fh, fw, 3), np.uint8),
               'depths': np.empty((n, fh, fw), np.float16),
               'raw_depths': np.empty((n, fh, fw), np.float16)}
        bar = tqdm(total=n, desc=f'reading {os.path.basename(mat_path)}', unit='frame',
                   disable=not progress)
        invalid = {'depths': InvalidDepth(), 'raw_depths': InvalidDepth()}
        for start in range(0, n, READ_CHUNK):
            stop = min(start + READ_CHUNK, n)
            img = images[start:stop]           # (k, 3, 640, 480)
            dep = depths[start:stop]           # (k, 640, 480)
            rdep = raw[start:stop] if raw is not None else dep
            invalid['depths'].add(dep)
            invalid['raw_depths'].add(rdep)
            for k in range(stop - start):
                # MATLAB column-major: reverse the axes to get upright H x W (x C).
                out['images'][start + k] = downsample_rgb(img[k].transpose(2, 1, 0))
                out['depths'][start + k] = downsample_depth(dep[k].T)
                out['raw_depths'][start + k] = downsample_depth(rdep[k].T)
            bar.update(stop - start)
        bar.close()
        out['scenes'] = _decode_cell_strings(f, 'scenes')
        out['invalid'] = {k: v.counts for k, v in invalid.items()}
    return out


class InvalidDepth:
    """Counts of the depth pixels that are masked as invalid, by kind, for one report per file:
    0 is NYU's "missing" (Kinect holes, expected in raw depth); NaN, inf and negative values are
    not in NYU's files but come with converted or corrupted data. All are masked, never used."""
    KINDS = ('zero', 'nan', 'inf', 'negative')

    def __init__(self):
        self.counts = dict.fromkeys(self.KINDS + ('pixels', 'frames_with_nonfinite'), 0)

    def add(self, depth):
        d = np.asarray(depth)
        c = self.counts
        c['pixels'] += d.size
        c['zero'] += int((d == 0).sum())
        nan, inf = np.isnan(d), np.isinf(d)
        c['nan'] += int(nan.sum())
        c['inf'] += int(inf.sum())
        c['negative'] += int((d < 0).sum())
        bad = (nan | inf | (d < 0)).reshape(len(d), -1).any(axis=1)
        c['frames_with_nonfinite'] += int(bad.sum())


def describe_invalid(counts):
    """One line for the report: 'raw 18.2% missing (0); 12 NaN, 3 negative in 2 frames'."""
    parts = []
    for name, c in counts.items():
        if not c.get('pixels'):
            continue
        text = f"{name} {100 * c['zero'] / c['pixels']:.1f}% missing (0)"
        odd = [f'{c[k]} {k if k != "nan" else "NaN"}' for k in ('nan', 'inf', 'negative') if c[k]]
        if odd:
            text += f" and {', '.join(odd)} in {c['frames_with_nonfinite']} frames"
        parts.append(text)
    return '; '.join(parts) + ' (all masked as invalid)'


def read_splits(splits_path, num_frames):
    """The official split (splits.mat, MATLAB v5): 0-based train and test indices (int64)."""
    import scipy.io
    splits_path = os.fspath(splits_path)
    _check_file(splits_path, "NYU's official split file", SPLITS_URL)
    try:
        m = scipy.io.loadmat(splits_path)
    except Exception as e:
        raise DataError(f"{splits_path}: not a readable MATLAB v5 file ({e})") from None
    out = []
    for name in ('trainNdxs', 'testNdxs'):
        if name not in m:
            raise DataError(f"{splits_path}: has no '{name}'; not NYU's splits.mat")
        # scipy reads MATLAB double as uint16 here: widen before subtracting 1 (1-based indices).
        idx = np.asarray(m[name]).astype(np.int64).ravel()
        if idx.size and idx.min() == 0:
            raise DataError(f"{splits_path}: '{name}' contains index 0: these indices look 0-based, "
                            f"but NYU's splits.mat is MATLAB's 1-based (1..{num_frames})")
        if idx.size and (idx.min() < 1 or idx.max() > num_frames):
            raise DataError(f"{splits_path}: '{name}' holds {idx.min()}..{idx.max()}, outside the "
                            f"1-based range 1..{num_frames} of the dataset")
        out.append(idx - 1)
    train, test = out
    if np.intersect1d(train, test).size:
        raise DataError(f"{splits_path}: train and test indices overlap")
    return train, test


def split_train_val(train_idx, scenes=None, val_fraction=0.1, seed=0):
    """Carve a validation set out of the official training indices (never the test split).

    Whole scenes go to validation when scene names are known (frames of one room are near
    duplicates, so a frame-level split would flatter the validation loss)."""
    rng = np.random.default_rng(seed)
    train_idx = np.asarray(train_idx)
    if val_fraction <= 0:
        return train_idx, train_idx[:0]
    if scenes is not None:
        names = sorted({scenes[i] for i in train_idx})
        rng.shuffle(names)
        target = max(1, int(round(val_fraction * len(train_idx))))
        val_scenes, count = set(), 0
        for name in names:
            if count >= target or len(val_scenes) == len(names) - 1:
                break
            val_scenes.add(name)
            count += sum(scenes[i] == name for i in train_idx)
        is_val = np.array([scenes[i] in val_scenes for i in train_idx])
    else:
        is_val = np.zeros(len(train_idx), bool)
        is_val[rng.permutation(len(train_idx))[:max(1, int(round(val_fraction * len(train_idx))))]] = True
    return train_idx[~is_val], train_idx[is_val]


# ----------------------------------------------------------------------------------------------
# Frames in memory and the paper's augmentation (Sec. 3.4)

class Frames:
    """A set of 240x320 frames as torch tensors: images (N, 3, H, W) uint8, depths (N, H, W)
    float16 in metres with 0 = missing. Batches are drawn by index, on any device."""

    def __init__(self, images_nhwc, depths):
        self.images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
        self.depths = torch.from_numpy(np.ascontiguousarray(depths, dtype=np.float16))

    def __len__(self):
        return len(self.images)

    def to(self, device):
        self.images, self.depths = self.images.to(device), self.depths.to(device)
        return self

    @staticmethod
    def from_dataset(dataset, indices, workers=0):
        """Decode the given items of a (3, H, W) uint8 / (H, W) float16 Dataset into memory."""
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(indices)),
                                             batch_size=32, num_workers=workers)
        frames = Frames(np.zeros((0, *FRAME_HW, 3), np.uint8), np.zeros((0, *FRAME_HW)))
        parts = list(loader)
        if parts:
            frames.images = torch.cat([p[0] for p in parts])
            frames.depths = torch.cat([p[1] for p in parts])
        return frames

    def __getitem__(self, i):
        return self.images[i], self.depths[i]

    def get(self, idx, mask_min_max=True):
        """Images as float 0..255, depths as float32 and their validity masks."""
        idx = torch.as_tensor(idx, device=self.images.device)
        return as_float_batch(self.images[idx], self.depths[idx], mask_min_max)


def as_float_batch(images_u8, depths, mask_min_max=True):
    """A drawn batch as the nets and the loss take it: images float 0..255, depth float32 in
    metres, and the mask of the usable depth pixels (loss.valid_depth_mask)."""
    depth = depths.float()
    return images_u8.float(), depth, valid_depth_mask(depth, mask_min_max)


class PerSampleAugmented(torch.utils.data.Dataset):
    """The plain pipeline's dataset: item (step, j, frame) is that frame augmented alone with the
    j-th draw of the step, on the CPU, in a DataLoader worker. The same draws as the batched
    fast path (SampleOrder.aug_params), so both paths train on the same batches."""

    def __init__(self, frames, order, batch):
        self.frames, self.order, self.batch = frames, order, batch

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, key):
        step, j, i = key
        image_u8, depth = self.frames[i]
        img, depth, mask = as_float_batch(image_u8[None], depth[None])
        x, y, m = augment(img, depth, mask, self.order.aug_params(step, self.batch).take(j))
        return x[0], y[0], m[0]


def balanced_pass(scene_of_frame, per_scene, generator):
    """One pass of the paper's evened scene distribution (Sec. 4.1, 1200 per scene): per_scene
    frames of every scene (all its frames in random order, repeated as often as a small scene
    needs; a random subset of a large one), all shuffled together. Frame indices (LongTensor)."""
    by_scene = {}
    for i, s in enumerate(scene_of_frame):
        by_scene.setdefault(s, []).append(i)
    chosen = []
    for s in sorted(by_scene):
        frames = torch.tensor(by_scene[s])
        repeats = -(-per_scene // len(frames))
        order = torch.cat([frames[torch.randperm(len(frames), generator=generator)]
                           for _ in range(repeats)])
        chosen.append(order[:per_scene])
    chosen = torch.cat(chosen)
    return chosen[torch.randperm(len(chosen), generator=generator)]


class SampleOrder:
    """Which frames and which augmentation draws make training step k, as a pure function of
    (seed, k): shuffled passes over all frames, or with per_scene the paper's evened passes. So a
    resumed run, and DataLoader workers running ahead of the loop, see exactly the batches of an
    uninterrupted run, with nothing to checkpoint but the step."""

    def __init__(self, num, seed, scenes=None, per_scene=0):
        self.num, self.seed, self.per_scene = num, seed, per_scene
        self.scenes = scenes
        self.pass_len = per_scene * len(set(scenes)) if per_scene else num
        self._last = (None, None)

    def _generator(self, kind, k):
        return torch.Generator().manual_seed(((self.seed + 1) << 40) + (kind << 38) + k)

    def _pass(self, p):
        if self._last[0] != p:
            g = self._generator(0, p)
            order = (balanced_pass(self.scenes, self.per_scene, g) if self.per_scene
                     else torch.randperm(self.num, generator=g))
            self._last = (p, order)
        return self._last[1]

    def indices(self, step, batch):
        positions = range(step * batch, (step + 1) * batch)
        return [int(self._pass(q // self.pass_len)[q % self.pass_len]) for q in positions]

    def aug_params(self, step, batch):
        return AugParams.sample(batch, self._generator(1, step))


# (row, column) of the test-time crop's top-left corner in the 240x320 frame: (6, 8)
CENTRE_CROP_CORNER = ((FRAME_HW[0] - INPUT_HW[0]) // 2, (FRAME_HW[1] - INPUT_HW[1]) // 2)


@dataclass
class AugParams:
    """One random draw per sample, applied to image, depth and mask together."""
    scale: torch.Tensor     # (B,) s in [1, 1.5]: image and depth map zoomed by s, depths / s
    angle: torch.Tensor     # (B,) degrees in [-5, 5]
    offset: torch.Tensor    # (B, 2) crop corner (x, y) in the scaled image, integer pixels
    color: torch.Tensor     # (B, 3) RGB multipliers in [0.8, 1.2]
    flip: torch.Tensor      # (B,) bool, horizontal flip with probability 0.5

    @staticmethod
    def identity(batch, device='cpu'):
        """Test time (Sec. 3.3): the centre crop at scale 1, no rotation, colour or flip."""
        off = torch.tensor(CENTRE_CROP_CORNER[::-1], dtype=torch.float32)   # (x, y)
        return AugParams(torch.ones(batch), torch.zeros(batch), off.repeat(batch, 1),
                         torch.ones(batch, 3), torch.zeros(batch, dtype=torch.bool)).to(device)

    @staticmethod
    def sample(batch, generator=None, scale=(1.0, 1.5), angle=5.0, color=(0.8, 1.2), flip=True):
        """The paper's ranges (Sec. 3.4), drawn from `generator` on the CPU (reproducible)."""
        u = lambda *shape: torch.rand(*shape, generator=generator)
        s = scale[0] + (scale[1] - scale[0]) * u(batch)
        a = angle * (2 * u(batch) - 1)
        fh, fw = FRAME_HW
        ih, iw = INPUT_HW
        # the crop corner ranges over every position inside the scaled frame
        room = torch.stack([fw * s - iw, fh * s - ih], dim=1).clamp(min=0)
        off = torch.floor(u(batch, 2) * (room.floor() + 1))
        c = color[0] + (color[1] - color[0]) * u(batch, 3)
        fl = (u(batch) < 0.5) if flip else torch.zeros(batch, dtype=torch.bool)
        return AugParams(s, a, off, c, fl)

    def to(self, device):
        return AugParams(*(t.to(device) for t in
                           (self.scale, self.angle, self.offset, self.color, self.flip)))

    def take(self, rows):
        """The draws of some samples of the batch (an index, slice or list of rows)."""
        rows = [rows] if isinstance(rows, int) else rows
        return AugParams(*(t[rows] for t in (self.scale, self.angle, self.offset, self.color, self.flip)))

    # One float32 row per sample, [scale, angle, x, y, r, g, b, flip], so that the draws of many
    # steps travel to the GPU in one copy (train.draw_block). Exact: offsets are whole pixels.
    PACKED = 8

    def pack(self):
        return torch.cat([self.scale[:, None], self.angle[:, None], self.offset, self.color,
                          self.flip[:, None].float()], dim=1)

    @staticmethod
    def unpack(rows):
        return AugParams(rows[:, 0], rows[:, 1], rows[:, 2:4], rows[:, 4:7], rows[:, 7] > 0.5)


def _source_coords(params, out_x, out_y):
    """Where in the 240x320 source frame each output crop pixel comes from.

    Forward model: scale the frame by s (continuous resize), rotate it by `angle` about its centre,
    cut the 304x228 crop at `offset`, mirror it if `flip`. Inverted here for sampling.
    out_x, out_y: 1-D crop pixel coordinates. Returns (B, len(out_y), len(out_x)) source x and y.
    """
    fh, fw = FRAME_HW
    iw = INPUT_HW[1]
    s = params.scale.view(-1, 1, 1)
    theta = torch.deg2rad(params.angle).view(-1, 1, 1)
    x = out_x.view(1, 1, -1)
    y = out_y.view(1, -1, 1)
    x = torch.where(params.flip.view(-1, 1, 1), (iw - 1) - x, x)
    # position in the scaled frame, relative to its centre
    cx, cy = (fw * s - 1) / 2, (fh * s - 1) / 2
    px = x + params.offset[:, 0].view(-1, 1, 1) - cx
    py = y + params.offset[:, 1].view(-1, 1, 1) - cy
    # undo the rotation, then the scaling (pixel centres: x_scaled = s (x + 0.5) - 0.5)
    cos, sin = torch.cos(theta), torch.sin(theta)
    qx = cos * px + sin * py + cx
    qy = -sin * px + cos * py + cy
    return (qx + 0.5) / s - 0.5, (qy + 0.5) / s - 0.5


def _grid(sx, sy):
    fh, fw = FRAME_HW
    return torch.stack([(2 * sx + 1) / fw - 1, (2 * sy + 1) / fh - 1], dim=-1)


def augment(images, depths, masks, params):
    """Apply one AugParams draw per sample to image, depth and mask together.

    images (B, 3, 240, 320) float 0..255; depths (B, 240, 320) metres; masks (B, 240, 320) bool.
    Returns the (B, 3, 228, 304) network input and the (B, 1, 55, 74) target depth and mask, the
    target sampled at the output grid's pixels of the same crop (TARGET_OFFSET + 4k). Image:
    bilinear; depth and mask: nearest neighbour, never blending depths; pixels brought in from
    outside the frame (rotation, flip of a scaled crop) are black in the image and invalid.
    """
    device = images.device
    params = params.to(device)
    ih, iw = INPUT_HW
    oh, ow = OUTPUT_HW
    ar = lambda n, start=0, step=1: torch.arange(n, device=device, dtype=torch.float32) * step + start
    sx, sy = _source_coords(params, ar(iw), ar(ih))
    img = F.grid_sample(images, _grid(sx, sy), mode='bilinear', padding_mode='zeros',
                        align_corners=False)
    img = img * params.color.view(-1, 3, 1, 1)
    tx, ty = _source_coords(params, ar(ow, TARGET_OFFSET, TARGET_STRIDE),
                            ar(oh, TARGET_OFFSET, TARGET_STRIDE))
    grid = _grid(tx, ty)
    dm = torch.stack([depths, masks.to(depths.dtype)], dim=1)
    dm = F.grid_sample(dm, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    depth = dm[:, :1] / params.scale.view(-1, 1, 1, 1)
    mask = dm[:, 1:] > 0.5
    return img, depth, mask


def crop_input(images):
    """The centre 228x304 crop of (B, 3, 240, 320) frames: the test-time input (Sec. 3.3)."""
    (y0, x0), (ih, iw) = CENTRE_CROP_CORNER, INPUT_HW
    return images[:, :, y0:y0 + ih, x0:x0 + iw]


def center_crop(images, depths, masks):
    """Test-time input (Sec. 3.3): the exact centre crop and the target grid inside it."""
    y0, x0 = CENTRE_CROP_CORNER
    oh, ow = OUTPUT_HW
    img = crop_input(images)
    ty = slice(y0 + TARGET_OFFSET, y0 + TARGET_OFFSET + TARGET_STRIDE * oh, TARGET_STRIDE)
    tx = slice(x0 + TARGET_OFFSET, x0 + TARGET_OFFSET + TARGET_STRIDE * ow, TARGET_STRIDE)
    return img, depths[:, None, ty, tx], masks[:, None, ty, tx]


# ----------------------------------------------------------------------------------------------
# From network output back to a frame: the region the 55x74 map covers, upsampling

# The release's get_predicted_depth_region: the output grid covers rows 10..230 and columns
# 12..308 of the 240x320 frame, one 4x4 block per cell (the centre 220x296 of the input crop).
OUTPUT_REGION_240x320 = (10, 230, 12, 308)


def output_region(hw):
    """(top, bottom, left, right) of an (H, W) frame covered by the network output."""
    h, w = hw
    t, b, l, r = OUTPUT_REGION_240x320
    fh, fw = FRAME_HW
    return round(t * h / fh), round(b * h / fh), round(l * w / fw), round(r * w / fw)


def upsample_depth(depth, hw, mode='nearest', outside='nan'):
    """(B, 1, 55, 74) depth -> (B, 1, H, W) of a frame of size hw, placed on the region it covers.

    mode: 'nearest' (the paper's evaluation, Sec. 4.3) or 'bilinear'. Outside the covered region:
    'nan' (not predicted) or 'edge' (the border cells repeated, to fill a whole frame)."""
    t, b, l, r = output_region(hw)
    kwargs = {'align_corners': False} if mode == 'bilinear' else {}
    inner = F.interpolate(depth, size=(b - t, r - l), mode=mode, **kwargs)
    pad = (l, hw[1] - r, t, hw[0] - b)
    if outside == 'edge':
        return F.pad(inner, pad, mode='replicate')
    return F.pad(inner, pad, mode='constant', value=float('nan'))


def prepare_image(rgb):
    """Any-size RGB uint8 (H, W, 3) -> the network input (1, 3, 228, 304) float 0..255, as the paper
    preprocesses: resized to 320x240 (antialiased), then the centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    return crop_input(F.interpolate(x, size=FRAME_HW, mode='bilinear', align_corners=False,
                                    antialias=True))


def read_full_depths(mat_path, indices, name='depths', chunk=READ_CHUNK):
    """Yield (index, upright 480x640 float32 depth) from the labeled .mat for the given frames, a
    chunk at a time (evaluation compares against the full-resolution ground truth)."""
    import h5py
    indices = [int(i) for i in indices]
    with h5py.File(mat_path, 'r') as f:
        d = f[name]
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            unique = sorted(set(part))        # h5py reads strictly increasing indices only
            block = d[unique]
            row = {i: k for k, i in enumerate(unique)}
            for i in part:                    # back in the order asked for, repeats included
                yield i, np.asarray(block[row[i]].T, np.float32)


# ----------------------------------------------------------------------------------------------
# Synthetic indoor scenes, written in NYU's labeled .mat layout

def render_room(room_rng, view_rng, hw=NYU_HW):
    """One RGB-D frame of a random box room seen by a Kinect-like camera.

    room_rng draws the room (size, furniture-like boxes standing on the floor, colours), view_rng
    the camera (position, heading, pitch, roll) and the sensor (noise, holes), so frames rendered
    with one room seed are views of the same room. NYU's intrinsics; textures and Lambert shading.
    Returns rgb (H, W, 3) uint8, depth (H, W) float32 z-depth in metres (complete), raw depth with
    Kinect-like holes (0 = missing), labels (H, W) uint16 (surface class) and instances (uint8).
    """
    h, w = hw
    fx, fy, cx, cy = 518.8579, 519.4696, 325.5824, 253.7362
    sx, sy = w / 640, h / 480
    room = np.array([room_rng.uniform(3.0, 6.0), room_rng.uniform(2.4, 3.0), room_rng.uniform(4.0, 8.0)])
    boxes = []
    for _ in range(room_rng.integers(2, 7)):
        size = room_rng.uniform([0.4, 0.4, 0.4], [1.6, 1.8, 1.2])
        lo = np.array([room_rng.uniform(0, room[0] - size[0]), 0.0,
                       room_rng.uniform(1.2, room[2] - size[2])])
        boxes.append((lo, lo + size))
    palette = room_rng.uniform(0.25, 0.95, size=(4 + len(boxes), 3))
    # world: x across, y up, z away from the camera's wall; the camera stands near z = 0
    cam = np.array([view_rng.uniform(0.5, room[0] - 0.5), view_rng.uniform(1.0, 1.7),
                    view_rng.uniform(0.3, 1.0)])
    yaw, pitch, roll = np.deg2rad([view_rng.uniform(-35, 35), view_rng.uniform(-15, 5),
                                   view_rng.uniform(-3, 3)])
    # rays in camera coordinates with z = 1 (x right, y up here), so the hit distance t along a
    # ray is its z-depth, which is what NYU's depth maps hold
    u, v = np.meshgrid((np.arange(w) + 0.5) / sx - 0.5, (np.arange(h) + 0.5) / sy - 0.5)
    rays_cam = np.stack([(u - cx) / fx, -(v - cy) / fy, np.ones_like(u)], -1)
    cr, sr, cp, sp, cyw, syw = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    ry = np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]])
    rays = rays_cam @ (ry @ rx @ rz).T
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1.0 / rays
        # from inside the room, the ray leaves the box [0, room] through the nearest face
        t_far = np.maximum(-cam * inv, (room - cam) * inv)
        t = t_far.min(-1)
        axis = t_far.argmin(-1)
        hit_dir = np.take_along_axis(rays, axis[..., None], -1)[..., 0]
        label = np.where(axis == 1, np.where(hit_dir < 0, 1, 2), 3).astype(np.uint16)  # floor, ceiling, wall
        normal = np.zeros_like(rays)
        np.put_along_axis(normal, axis[..., None], -np.sign(hit_dir)[..., None], -1)
        instance = np.zeros((h, w), np.uint8)
        for k, (lo, hi) in enumerate(boxes):   # slab test; boxes are labels 4, 5, ...
            t0, t1 = (lo - cam) * inv, (hi - cam) * inv
            tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
            enter, leave = tmin.max(-1), tmax.min(-1)
            hit = (enter <= leave) & (enter > 0) & (enter < t)
            t = np.where(hit, enter, t)
            face = tmin.argmax(-1)
            fdir = np.take_along_axis(rays, face[..., None], -1)[..., 0]
            n_box = np.zeros_like(rays)
            np.put_along_axis(n_box, face[..., None], -np.sign(fdir)[..., None], -1)
            normal = np.where(hit[..., None], n_box, normal)
            label = np.where(hit, 4 + k, label).astype(np.uint16)
            instance = np.where(hit, k + 1, instance).astype(np.uint8)
    point = cam + t[..., None] * rays
    depth = np.round(np.clip(t, 0.5, 10.0), 3).astype(np.float32)   # millimetre steps, like a sensor
    base = palette[label - 1]
    stripes = 0.5 + 0.5 * np.sin(point[..., 0] * 9.0 + point[..., 2] * 3.0)
    checker = (np.floor(point[..., 0] * 2) + np.floor(point[..., 2] * 2)) % 2
    texture = np.where(label == 1, 0.75 + 0.25 * checker,
                       np.where(label == 3, 0.85 + 0.15 * stripes, 0.9 + 0.1 * stripes))
    light = np.array([room[0] / 2, room[1] - 0.1, room[2] / 2])
    to_light = light - point
    to_light /= np.linalg.norm(to_light, axis=-1, keepdims=True)
    shade = 0.35 + 0.65 * np.clip((normal * to_light).sum(-1), 0, 1)
    noise = view_rng.normal(0, 0.02, size=(h, w, 1))
    rgb = (np.clip(base * (texture * shade)[..., None] + noise, 0, 1) * 255).astype(np.uint8)
    # Kinect-like raw depth: holes at grazing angles, along depth edges, in blobs and far away
    raw = depth.copy()
    grazing = np.abs((normal * rays).sum(-1)) / np.linalg.norm(rays, axis=-1) < 0.15
    gy, gx = np.gradient(depth)
    edges = np.hypot(gx, gy) > 0.1
    blobs = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(view_rng.integers(1, 5)):
        r = view_rng.uniform(5, 30) * sx
        blobs |= (yy - view_rng.uniform(0, h)) ** 2 + (xx - view_rng.uniform(0, w)) ** 2 < r * r
    raw[grazing | edges | blobs | (depth > 9.5)] = 0
    return rgb, depth, raw, label, instance


def write_nyu_labeled_mat(path, frames, scenes, progress=True):
    """Write frames in exactly the layout of nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5 with a
    512-byte user block): datasets named and shaped as MATLAB stores them, axes reversed.

    frames: a sized iterable of (rgb (480, 640, 3) uint8, depth, raw depth, labels, instances).
    scenes: one scene name per frame (the `scenes` cellstr)."""
    import h5py
    from tqdm import tqdm
    n = len(scenes)
    h, w = NYU_HW

    def write(tmp):
        with h5py.File(tmp, 'w', userblock_size=512) as f:
            specs = {'images': ((n, 3, w, h), np.uint8, 'uint8'),
                     'depths': ((n, w, h), np.float32, 'single'),
                     'rawDepths': ((n, w, h), np.float32, 'single'),
                     'labels': ((n, w, h), np.uint16, 'uint16'),
                     'instances': ((n, w, h), np.uint8, 'uint8')}
            dsets = {}
            for name, (shape, dtype, mclass) in specs.items():
                # one frame per chunk, gzip: MATLAB's -v7.3 writes compressed chunked datasets too
                dsets[name] = f.create_dataset(name, shape, dtype, chunks=(1,) + shape[1:],
                                               compression='gzip', compression_opts=1,
                                               shuffle=True)
                dsets[name].attrs['MATLAB_class'] = np.bytes_(mclass)
            for i, (rgb, depth, raw, label, inst) in enumerate(tqdm(
                    frames, total=n, desc='writing synthetic NYU .mat', unit='frame',
                    disable=not progress)):
                dsets['images'][i] = rgb.transpose(2, 1, 0)
                dsets['depths'][i] = depth.T
                dsets['rawDepths'][i] = raw.T
                dsets['labels'][i] = label.T
                dsets['instances'][i] = inst.T
            refs = f.create_group('#refs#')
            for name, values in (('scenes', scenes), ('sceneTypes', [s.rsplit('_', 1)[0] for s in scenes])):
                ds = f.create_dataset(name, (1, n), dtype=h5py.ref_dtype)
                for i, text in enumerate(values):
                    chars = refs.create_dataset(f'{name}_{i}', data=np.array(
                        [[ord(c)] for c in text], np.uint16))   # MATLAB 1xL char -> (L, 1)
                    chars.attrs['MATLAB_class'] = np.bytes_('char')
                    ds[0, i] = chars.ref
                ds.attrs['MATLAB_class'] = np.bytes_('cell')
    atomic_write(path, write)


def write_splits_mat(path, train_idx, test_idx):
    """splits.mat as NYU ships it: MATLAB v5, trainNdxs / testNdxs (k, 1) doubles, 1-based."""
    import scipy.io

    def write(tmp):
        with open(tmp, 'wb') as f:
            scipy.io.savemat(f, {'trainNdxs': (np.asarray(train_idx, np.float64) + 1)[:, None],
                                 'testNdxs': (np.asarray(test_idx, np.float64) + 1)[:, None]})
    atomic_write(path, write)


def make_synthetic_nyu(folder, num_scenes=40, frames_per_scene=6, test_fraction=0.45, seed=0,
                       progress=True):
    """Write <folder>/synthetic_labeled.mat and <folder>/synthetic_splits.mat: random rooms (several
    camera poses each) in NYU's labeled layout, split by scene like NYU's official split (which has
    654 of 1449 frames, 45 %, in test). Returns the two paths. Synthetic, not NYU."""
    os.makedirs(folder, exist_ok=True)
    mat = os.path.join(folder, 'synthetic_labeled.mat')
    splits = os.path.join(folder, 'synthetic_splits.mat')
    scenes = [f'synthetic_room_{s:04d}' for s in range(num_scenes) for _ in range(frames_per_scene)]

    class Views:   # rendered lazily, one at a time, while the file is written
        def __len__(self):
            return len(scenes)

        def __iter__(self):
            for s in range(num_scenes):
                for k in range(frames_per_scene):   # one room per scene, a new view per frame
                    yield render_room(np.random.default_rng([seed, s]),
                                      np.random.default_rng([seed, s, k + 1]))

    write_nyu_labeled_mat(mat, Views(), scenes, progress)
    order = np.random.default_rng(seed).permutation(num_scenes)
    test_scenes = set(order[:int(round(test_fraction * num_scenes))].tolist())
    scene_of = np.repeat(np.arange(num_scenes), frames_per_scene)
    test = np.flatnonzero(np.isin(scene_of, list(test_scenes)))
    train = np.flatnonzero(~np.isin(scene_of, list(test_scenes)))
    write_splits_mat(splits, train, test)
    return mat, splits


# ----------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')   # files only: works on a headless cluster node
    import matplotlib.pyplot as plt
    return plt


def plot_losses(history, stage, path):
    """Training loss (mean over each validation interval) and validation loss / error vs samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if history['train']:
        s, l = zip(*history['train'])
        ax.plot(s, l, label='train loss (Eq. 4, augmented)')
    if history['val']:
        s, vl, ve = zip(*history['val'])
        ax.plot(s, vl, label='validation loss (Eq. 4, centre crop)')
        ax.plot(s, np.square(ve), '--', label='validation scale-invariant error (Eq. 1)')
    ax.set_xlabel('training samples')
    ax.set_ylabel('loss (log depth$^2$)')
    ax.set_title(f'{stage} network')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    plt.close(fig)


def _panel(rows, titles, labels, path, dpi=80):
    """A grid of images: each row a list of RGB arrays (H, W, 3) or depth maps (H, W) in metres
    (one colour scale per row, from its ground truth, the second entry); NaN shows blank."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(3.2 * len(titles), 2.5 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        gt = row[1][np.isfinite(row[1]) & (row[1] > 0)]
        lo, hi = (float(gt.min()), float(gt.max())) if gt.size else (0.5, 10.0)
        for j, image in enumerate(row):
            ax = axes[i, j]
            if image.ndim == 3:
                ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
            elif titles[j].startswith('|error|'):
                err = ax.imshow(image, cmap='magma', vmin=0, vmax=max(hi - lo, 1e-3) / 2)
                fig.colorbar(err, ax=ax, fraction=0.04, label='m')
            else:
                im = ax.imshow(image, cmap='jet_r', vmin=lo, vmax=hi, interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j])
        if labels:
            axes[i, 0].set_ylabel(labels[i])
        depth_axes = [a for a, t in zip(axes[i], titles) if not t.startswith('|error|')]
        fig.colorbar(im, ax=depth_axes, label='depth (m)', fraction=0.03)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=dpi))
    plt.close(fig)


def _set_eval(nets):
    for n in nets:
        if n is not None:
            n.eval()


@torch.no_grad()
def plot_predictions(coarse, fine, frames, device, path, count=4):
    """RGB | ground truth | coarse | coarse + fine for the first `count` frames, at the 55x74 grid."""
    _set_eval([coarse, fine])
    count = min(count, len(frames))
    img, depth, mask = (t.to(device) for t in frames.get(list(range(count))))
    x, y, m = center_crop(img, depth, mask)
    c = coarse(x)
    maps = [torch.where(m, y, torch.full_like(y, float('nan'))), c.exp()]   # missing depth blank
    if fine is not None:
        maps.append(fine(x, c).exp())
    rows = [[x[i].permute(1, 2, 0).cpu().numpy()] + [d[i, 0].cpu().numpy() for d in maps]
            for i in range(count)]
    titles = ['input', 'ground truth', 'coarse'] + (['coarse + fine'] if fine is not None else [])
    _panel(rows, titles, None, path)


@torch.no_grad()
def plot_examples(coarse, fine, frames, picks, gts, labels, device, path):
    """RGB | ground truth | coarse | fine | |error| of the last net, at full resolution (the
    prediction shown where the network covers the frame, nearest-neighbour upsampled)."""
    _set_eval([coarse, fine])
    img, _, _ = frames.get(picks)
    x = crop_input(img.to(device))
    c = coarse(x)
    maps = [c.exp()] + ([fine(x, c).exp()] if fine is not None else [])
    hw = gts[0].shape
    maps = [upsample_depth(d, hw, 'nearest', 'nan')[:, 0].cpu().numpy() for d in maps]
    rows = []
    for k in range(len(picks)):
        rgb = F.interpolate(img[k:k + 1], size=hw, mode='nearest')[0].permute(1, 2, 0).cpu().numpy()
        gt = np.where(gts[k] > 0, gts[k], np.nan)
        rows.append([rgb, gt] + [d[k] for d in maps] + [np.abs(maps[-1][k] - gt)])
    titles = ['input', 'ground truth', 'coarse'] + (['coarse + fine'] if fine is not None else []) + ['|error| (m)']
    _panel(rows, titles, labels, path)
