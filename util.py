"""NYU Depth v2 loading, the paper's augmentation, and plots.

Formats: docs/data.md and nyu/README.md. The labeled file is MATLAB v7.3,
i.e. HDF5: h5py shows MATLAB's column-major arrays with their axes reversed, so image i is
images[i].transpose(2, 1, 0) -> (480, 640, 3) and depth i is depths[i].T -> (480, 640).
"""
import contextlib
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cli import DataError, progress as progress_bar
from files import atomic_write, check_file
from loss import DEFAULT_LOSS, valid_depth_mask
from net import FRAME_HW, NYU, STAGE_NAMES, TARGET_STRIDE
from runtime import StopControl

NYU_HW = (480, 640)
NYU_URL = 'http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat'
SPLITS_URL = 'http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat'
CACHE_VERSION = 2
READ_CHUNK = 32   # frames read from the .mat at a time (a full read would need ~3 GB)


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
    check_file(mat_path, 'the labeled NYU Depth v2 file', NYU_URL)
    cache = cache_path_for(mat_path)
    key = _cache_key(mat_path)
    if use_cache and os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if json.loads(str(z['key'])) == key:
                    return {'images': z['images'], 'depths': z['depths'],
                            'raw_depths': z['raw_depths'], 'scenes': json.loads(str(z['scenes'])),
                            'invalid': json.loads(str(z['invalid']))}
            # stale (the .mat changed since): rebuilt below
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            # cut short (a copy, a full disk) or otherwise damaged: it is only a copy of the .mat
            print(f'note: {cache}: damaged ({type(e).__name__}); reading {mat_path} again to '
                  f'rebuild it')
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


# The start of the synthetic demo's .mat (the 512-byte user block where MATLAB writes its header
# text; synthetic.py writes it): it names the file as the demo's, so that a damaged one is made
# anew rather than downloaded
DEMO_MAT_HEADER = b'MATLAB 7.3 MAT-file, synthetic rooms of train.py --demo, not NYU Depth v2'


def _is_demo_file(mat_path):
    """Whether a labeled file is the synthetic demo's (its MATLAB header says so): one that is cut
    short or damaged is deleted and made anew, not downloaded."""
    try:
        with open(mat_path, 'rb') as f:
            return f.read(len(DEMO_MAT_HEADER)) == DEMO_MAT_HEADER
    except OSError:
        return False


DEMO_AGAIN = 'it is the synthetic demo data: delete it, and train.py --demo makes it again'


@contextlib.contextmanager
def open_mat(mat_path):
    """The labeled file open with h5py, its read errors as one line naming it: HDF5 opens a file
    whose middle is damaged (a block zeroed or overwritten) and fails only when that part is
    read, with an OSError, RuntimeError or KeyError of its own."""
    import h5py
    try:
        f = h5py.File(mat_path, 'r')
    except OSError:
        if _is_demo_file(mat_path):
            raise DataError(f'{mat_path}: not a complete HDF5 file (cut short?); {DEMO_AGAIN}') from None
        raise DataError(f"{mat_path}: not an HDF5 (MATLAB v7.3) file; the labeled NYU file is "
                        f"saved with -v7.3. (A MATLAB v5 .mat, or a partial download? Then "
                        f"download it again.)") from None
    with f:
        try:
            yield f
        except (OSError, RuntimeError, KeyError) as e:
            reason = ' '.join(str(e.args[0] if e.args else type(e).__name__).split())
            again = DEMO_AGAIN if _is_demo_file(mat_path) else f'download it again ({NYU_URL})'
            raise DataError(f'{mat_path}: damaged: HDF5 cannot read it ({reason}); {again}') from None


def read_scene_names(mat_path):
    """The labeled file's scene name of every frame, without reading any image (milliseconds,
    where read_nyu_labeled takes minutes the first time)."""
    mat_path = os.fspath(mat_path)
    check_file(mat_path, 'the labeled NYU Depth v2 file', NYU_URL)
    with open_mat(mat_path) as f:
        scenes = _decode_cell_strings(f, 'scenes')
    if scenes is None:
        raise DataError(f"{mat_path}: has no 'scenes'; not the labeled NYU file")
    return scenes


def _read_mat(mat_path, progress):
    with open_mat(mat_path) as f:
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
        bar = progress_bar(None, progress, total=n, desc=f'reading {os.path.basename(mat_path)}',
                           unit='frame')
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


def read_splits(splits_path, num_frames, test_may_be_empty=False):
    """The official split (splits.mat, MATLAB v5): 0-based train and test indices (int64).
    test_may_be_empty: for training, which never reads the test frames (a benchmark's split)."""
    import scipy.io
    splits_path = os.fspath(splits_path)
    check_file(splits_path, "NYU's official split file", SPLITS_URL)
    try:
        m = scipy.io.loadmat(splits_path)
    except Exception as e:
        raise DataError(f"{splits_path}: not a readable MATLAB v5 file ({e})") from None
    out = []
    for name in ('trainNdxs', 'testNdxs'):
        if name not in m:
            raise DataError(f"{splits_path}: has no '{name}'; not NYU's splits.mat")
        idx = _frame_numbers(m[name], f"{splits_path}: '{name}'",
                             may_be_empty=test_may_be_empty and name == 'testNdxs')
        if not idx.size:
            out.append(idx)
            continue
        if idx.min() == 0:
            raise DataError(f"{splits_path}: '{name}' contains index 0: these indices look 0-based, "
                            f"but NYU's splits.mat is MATLAB's 1-based (1..{num_frames})")
        if idx.min() < 1 or idx.max() > num_frames:
            raise DataError(f"{splits_path}: '{name}' holds {idx.min()}..{idx.max()}, outside the "
                            f"1-based range 1..{num_frames} of the dataset")
        out.append(idx - 1)
    train, test = out
    if np.intersect1d(train, test).size:
        raise DataError(f"{splits_path}: train and test indices overlap")
    return train, test


def _frame_numbers(array, where, may_be_empty=False):
    """A splits.mat variable as int64 frame numbers, or a one-line DataError (`where` names the
    file and the variable): each frame a whole number, listed once; empty only if may_be_empty."""
    array = np.asarray(array)
    kinds = {'U': 'text', 'S': 'text', 'O': 'cells', 'V': 'a struct', 'c': 'complex numbers'}
    if array.dtype.kind not in 'iuf':
        raise DataError(f"{where} holds {kinds.get(array.dtype.kind, array.dtype)}, not frame "
                        f"numbers; use NYU's splits.mat")
    values = array.ravel()
    if not values.size and may_be_empty:
        return np.zeros(0, np.int64)
    if not values.size:
        raise DataError(f"{where} is empty; NYU's splits.mat lists 795 training and 654 test frames")
    if not np.isfinite(values).all():
        raise DataError(f"{where} holds NaN or inf, not frame numbers; use NYU's splits.mat")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DataError(f"{where} holds {fractional[0]:g}, not a whole frame number; use NYU's "
                        f"splits.mat")
    # scipy reads MATLAB double as uint16 here: widen before subtracting 1 (1-based indices).
    idx = values.astype(np.int64)
    unique, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        k = int(np.argmax(counts > 1))
        raise DataError(f"{where} lists frame {unique[k]} {counts[k]} times, and a split lists "
                        f"each frame once; use NYU's splits.mat")
    return idx


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
# Frames decoded from files in DataLoader workers

class _ErrorsAsMessages(torch.utils.data.Dataset):
    """`frames` with a frame's DataError returned as its message (FrameLoader)."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        try:
            return self.frames[i]
        except DataError as e:
            return str(e)


def _batch_or_message(items):
    """collate_fn: a batch of the items, or the message of the first that failed to decode."""
    failed = [item for item in items if isinstance(item, str)]
    return failed[0] if failed else torch.utils.data.default_collate(items)


class FrameLoader(torch.utils.data.DataLoader):
    """A DataLoader (same arguments) over frames decoded from files: a frame that does not decode
    (its DataError, naming the file) ends the iteration with that one line. Raised in a worker,
    the error would come back as the worker's traceback, holding the loader's iterator in a
    reference cycle that keeps its workers alive until a garbage collection: at the program's
    end, workers that ignore SIGTERM would then be waited for forever. Its workers leave signals
    to the main process (Ctrl-C is one `interrupted` line, not a worker's traceback). Without
    workers the error is raised as it is (--debug shows where)."""

    def __init__(self, dataset, **kwargs):
        if kwargs.get('num_workers'):
            kwargs.setdefault('worker_init_fn', FrameLoader.start_worker)
            StopControl.end_workers_at_exit()
            batched = kwargs.get('batch_sampler') is not None or kwargs.get('batch_size', 1) is not None
            dataset, kwargs['collate_fn'] = _ErrorsAsMessages(dataset), _batch_or_message if batched else None
        super().__init__(dataset, **kwargs)

    @staticmethod
    def start_worker(_worker_id=None):
        """worker_init_fn: the worker leaves the stop signals to the main process
        (StopControl.ignore_signals), then unblocks them (__iter__ starts workers with them
        blocked). It stays silent about a connection the main process dropped (multiprocessing's
        thread that hands a frame's shared memory over reports it through sys.excepthook, other
        threads through threading.excepthook): that happens only when the main process was
        stopped while receiving a frame from this worker, and it reports that itself, in one line."""
        import signal
        import sys
        import threading
        StopControl.ignore_signals()
        if hasattr(signal, 'pthread_sigmask'):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, StopControl.SIGNALS)
        report, report_thread = sys.excepthook, threading.excepthook

        def unless_dropped(kind, value, traceback):
            if not issubclass(kind, ConnectionError):
                report(kind, value, traceback)

        def thread_unless_dropped(args):
            if not issubclass(args.exc_type, ConnectionError):
                report_thread(args)
        sys.excepthook, threading.excepthook = unless_dropped, thread_unless_dropped

    def _start(self):
        """DataLoader.__iter__, its workers started with the stop signals blocked: a Ctrl-C while
        they start waits until each ignores it (start_worker); otherwise it would end a worker
        before then, with its traceback, and the loader with 'worker exited unexpectedly'. In the
        main process the signal arrives once all have started."""
        import signal
        if not (self.num_workers and hasattr(signal, 'pthread_sigmask')):
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, StopControl.SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __iter__(self):
        # the workers' iterator is never a local variable: an error leaves it to be collected
        # (and its workers ended) at once, not when the error's traceback is
        for item in self._start():
            if isinstance(item, str):
                raise DataError(item)
            yield item


# ----------------------------------------------------------------------------------------------
# Frames in memory and the paper's augmentation (Sec. 3.4)

class Frames:
    """A set of 240x320 frames as torch tensors: images (N, 3, H, W) uint8, depths (N, H, W)
    float16 in metres with 0 = missing. Batches are drawn by index, on any device."""

    def __init__(self, images_nhwc, depths):
        self.images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
        self.depths = torch.from_numpy(np.ascontiguousarray(depths, dtype=np.float16))

    @staticmethod
    def from_tensors(images, depths):
        """Frames of (N, 3, H, W) uint8 images and (N, H, W) float16 depths already in torch."""
        frames = Frames.__new__(Frames)
        frames.images, frames.depths = images, depths
        return frames

    def __len__(self):
        return len(self.images)

    def to(self, device):
        self.images, self.depths = self.images.to(device), self.depths.to(device)
        return self

    @staticmethod
    def from_dataset(dataset, indices, workers=0, frame_hw=FRAME_HW):
        """Decode the given items of a (3, H, W) uint8 / (H, W) float16 Dataset into memory."""
        loader = FrameLoader(torch.utils.data.Subset(dataset, list(indices)), batch_size=32,
                             num_workers=workers)
        parts = list(loader)
        if not parts:
            return Frames.from_tensors(torch.zeros((0, 3, *frame_hw), dtype=torch.uint8),
                                       torch.zeros((0, *frame_hw), dtype=torch.float16))
        return Frames.from_tensors(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

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
        x, y, m = augment(img, depth, mask, self.order.aug_params(step, self.batch).take(j),
                          self.order.geometry)
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


def spread(indices, count):
    """At most `count` of `indices`, spread evenly over them, the first and the last kept
    (validation frames held in memory; kitti.paper_entries: the frames of a drive)."""
    if len(indices) <= count:
        return indices
    return np.asarray(indices)[np.linspace(0, len(indices) - 1, count).astype(int)]


class SampleOrder:
    """Which frames and which augmentation draws make training step k, as a pure function of
    (seed, k): shuffled passes over all frames, or with per_scene the paper's evened passes. So a
    resumed run, and DataLoader workers running ahead of the loop, see exactly the batches of an
    uninterrupted run, with nothing to checkpoint but the step. geometry: the dataset's sizes
    and augmentation ranges (net.Geometry)."""

    def __init__(self, num, seed, scenes=None, per_scene=0, geometry=NYU):
        self.num, self.seed, self.per_scene, self.geometry = num, seed, per_scene, geometry
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
        return AugParams.sample(batch, self._generator(1, step), self.geometry)


@dataclass
class AugParams:
    """One random draw per sample, applied to image, depth and mask together."""
    scale: torch.Tensor     # (B,) s in [1, 1.5] (KITTI [1, 1.2]): image and depth zoomed by s, depths / s
    angle: torch.Tensor     # (B,) degrees in [-5, 5] (KITTI 0)
    offset: torch.Tensor    # (B, 2) crop corner (x, y) in the scaled image, integer pixels
    color: torch.Tensor     # (B, 3) RGB multipliers in [0.8, 1.2]
    flip: torch.Tensor      # (B,) bool, horizontal flip with probability 0.5

    @staticmethod
    def identity(batch, device='cpu', geometry=NYU):
        """Test time (Sec. 3.3): the centre crop at scale 1, no rotation, colour or flip."""
        off = torch.tensor(geometry.crop_corner[::-1], dtype=torch.float32)   # (x, y)
        return AugParams(torch.ones(batch), torch.zeros(batch), off.repeat(batch, 1),
                         torch.ones(batch, 3), torch.zeros(batch, dtype=torch.bool)).to(device)

    @staticmethod
    def sample(batch, generator=None, geometry=NYU, color=(0.8, 1.2), flip=True):
        """The paper's ranges (Sec. 3.4; KITTI's scale and rotation: Sec. 4.2, net.Geometry),
        drawn from `generator` on the CPU (reproducible)."""
        u = lambda *shape: torch.rand(*shape, generator=generator)
        scale = geometry.scale
        s = scale[0] + (scale[1] - scale[0]) * u(batch)
        a = geometry.angle * (2 * u(batch) - 1)
        fh, fw = geometry.frame_hw
        ih, iw = geometry.input_hw
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
    # steps travel to the GPU in one copy (data.draw_block). Exact: offsets are whole pixels.
    PACKED = 8

    def pack(self):
        return torch.cat([self.scale[:, None], self.angle[:, None], self.offset, self.color,
                          self.flip[:, None].float()], dim=1)

    @staticmethod
    def unpack(rows):
        return AugParams(rows[:, 0], rows[:, 1], rows[:, 2:4], rows[:, 4:7], rows[:, 7] > 0.5)


def _source_coords(params, out_x, out_y, geometry):
    """Where in the (240x320) source frame each output crop pixel comes from.

    Forward model: scale the frame by s (continuous resize), rotate it by `angle` about its centre,
    cut the 304x228 crop at `offset`, mirror it if `flip`. Inverted here for sampling.
    out_x, out_y: 1-D crop pixel coordinates. Returns (B, len(out_y), len(out_x)) source x and y.
    """
    fh, fw = geometry.frame_hw
    iw = geometry.input_hw[1]
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


def _grid(sx, sy, geometry):
    fh, fw = geometry.frame_hw
    return torch.stack([(2 * sx + 1) / fw - 1, (2 * sy + 1) / fh - 1], dim=-1)


def augment(images, depths, masks, params, geometry=NYU):
    """Apply one AugParams draw per sample to image, depth and mask together.

    images (B, 3, 240, 320) float 0..255; depths (B, 240, 320) metres; masks (B, 240, 320) bool.
    Returns the (B, 3, 228, 304) network input and the (B, 1, 55, 74) target depth and mask, the
    target sampled at the output grid's pixels of the same crop (Geometry.target_origin + 4k);
    (KITTI: 184x612 frames, 172x576 input, 27x142 target; the sparse LIDAR depth is sampled
    like the Kinect's, its missing pixels masked). Image:
    bilinear; depth and mask: nearest neighbour, never blending depths; pixels brought in from
    outside the frame (rotation, flip of a scaled crop) are black in the image and invalid.
    """
    device = images.device
    params = params.to(device)
    ih, iw = geometry.input_hw
    oh, ow = geometry.output_hw
    (ty0, tx0) = geometry.target_origin
    ar = lambda n, start=0, step=1: torch.arange(n, device=device, dtype=torch.float32) * step + start
    sx, sy = _source_coords(params, ar(iw), ar(ih), geometry)
    img = F.grid_sample(images, _grid(sx, sy, geometry), mode='bilinear', padding_mode='zeros',
                        align_corners=False)
    img = img * params.color.view(-1, 3, 1, 1)
    tx, ty = _source_coords(params, ar(ow, tx0, TARGET_STRIDE), ar(oh, ty0, TARGET_STRIDE), geometry)
    grid = _grid(tx, ty, geometry)
    dm = torch.stack([depths, masks.to(depths.dtype)], dim=1)
    dm = F.grid_sample(dm, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    depth = dm[:, :1] / params.scale.view(-1, 1, 1, 1)
    mask = dm[:, 1:] > 0.5
    return img, depth, mask


def crop_input(images, geometry=NYU):
    """The centre 228x304 crop of (B, 3, 240, 320) frames: the test-time input (Sec. 3.3)."""
    (y0, x0), (ih, iw) = geometry.crop_corner, geometry.input_hw
    return images[:, :, y0:y0 + ih, x0:x0 + iw]


def center_crop(images, depths, masks, geometry=NYU):
    """Test-time input (Sec. 3.3): the exact centre crop and the target grid inside it."""
    (y0, x0), (ty0, tx0) = geometry.crop_corner, geometry.target_origin
    oh, ow = geometry.output_hw
    img = crop_input(images, geometry)
    ty = slice(y0 + ty0, y0 + ty0 + TARGET_STRIDE * oh, TARGET_STRIDE)
    tx = slice(x0 + tx0, x0 + tx0 + TARGET_STRIDE * ow, TARGET_STRIDE)
    return img, depths[:, None, ty, tx], masks[:, None, ty, tx]


# ----------------------------------------------------------------------------------------------
# From network output back to a frame: the region the 55x74 map covers, upsampling

def output_region(hw, geometry=NYU):
    """(top, bottom, left, right) of an (H, W) frame covered by the network output: the frame's
    Geometry.output_region (NYU: rows 10..230, columns 12..308 of 240x320) scaled to (H, W)."""
    h, w = hw
    t, b, l, r = geometry.output_region
    fh, fw = geometry.frame_hw
    return round(t * h / fh), round(b * h / fh), round(l * w / fw), round(r * w / fw)


def upsample_depth(depth, hw, mode='nearest', outside='nan', geometry=NYU):
    """(B, 1, 55, 74) depth -> (B, 1, H, W) of a frame of size hw, placed on the region it covers.

    mode: 'nearest' (the paper's evaluation, Sec. 4.3) or 'bilinear'. Outside the covered region:
    'nan' (not predicted) or 'edge' (the border cells repeated, to fill a whole frame)."""
    t, b, l, r = output_region(hw, geometry)
    kwargs = {'align_corners': False} if mode == 'bilinear' else {}
    inner = F.interpolate(depth, size=(b - t, r - l), mode=mode, **kwargs)
    pad = (l, hw[1] - r, t, hw[0] - b)
    if outside == 'edge':
        return F.pad(inner, pad, mode='replicate')
    return F.pad(inner, pad, mode='constant', value=float('nan'))


def prepare_image(rgb, geometry=NYU):
    """Any-size RGB uint8 (H, W, 3) -> the network input (1, 3, 228, 304) float 0..255, as the paper
    preprocesses: resized to 320x240 (antialiased; KITTI 612x184), then the centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    return crop_input(F.interpolate(x, size=geometry.frame_hw, mode='bilinear', align_corners=False,
                                    antialias=True), geometry)


def read_full_depths(mat_path, indices, name='depths', chunk=READ_CHUNK):
    """Yield (index, upright 480x640 float32 depth) from the labeled .mat for the given frames, a
    chunk at a time (evaluation compares against the full-resolution ground truth)."""
    indices = [int(i) for i in indices]
    with open_mat(mat_path) as f:
        d = f[name]
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            unique = sorted(set(part))        # h5py reads strictly increasing indices only
            block = d[unique]
            row = {i: k for k, i in enumerate(unique)}
            for i in part:                    # back in the order asked for, repeats included
                yield i, np.asarray(block[row[i]].T, np.float32)


# ----------------------------------------------------------------------------------------------
# Plots

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')   # files only: works on a headless cluster node
    import matplotlib.pyplot as plt
    return plt


def plot_losses(history, stage, path, loss=DEFAULT_LOSS):
    """Training loss (mean over each validation interval) and validation loss / error vs samples,
    all in (log metres)^2. history: the rows of runlog.read_history; loss: train.py's --loss, which
    the training loss is (validation also reports it, beside Eq. 4, when it is another)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    name = 'Eq. 4' if loss == DEFAULT_LOSS else loss
    if history:
        ax.plot([r['samples'] for r in history], [r['train_loss'] for r in history],
                label=f'train loss ({name}, augmented)')
    validated = [r for r in history if r.get('val_loss') is not None]
    if validated:
        s = [r['samples'] for r in validated]
        ax.plot(s, [r['val_loss'] for r in validated], label='validation loss (Eq. 4, centre crop)')
        if loss != DEFAULT_LOSS and validated[0].get(f'val_loss_{loss}') is not None:
            ax.plot(s, [r[f'val_loss_{loss}'] for r in validated],
                    label=f'validation loss ({name}, centre crop)')
        ax.plot(s, [r['val_si_log'] ** 2 for r in validated], '--',
                label='validation scale-invariant error (Eq. 1)')
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


@contextlib.contextmanager
def eval_mode(nets):
    """The nets in eval mode inside the block, each module back in its own mode afterwards."""
    modes = [(m, m.training) for m in nets.modules()]
    nets.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def plot_predictions(nets, frames, device, path, count=4):
    """RGB | ground truth | each stage's prediction of the Chain `nets` (coarse, coarse + fine, ...)
    for the first `count` frames, at the 55x74 grid."""
    with eval_mode(nets):
        count = min(count, len(frames))
        img, depth, mask = (t.to(device) for t in frames.get(list(range(count))))
        x, y, m = center_crop(img, depth, mask, nets.geometry)
        predictions = nets.predictions(x)
        maps = [torch.where(m, y, torch.full_like(y, float('nan')))] + \
            [p.exp() for p in predictions.values()]   # missing depth blank
        rows = [[x[i].permute(1, 2, 0).cpu().numpy()] + [d[i, 0].cpu().numpy() for d in maps]
                for i in range(count)]
        titles = ['input', 'ground truth'] + [STAGE_NAMES[s].lower() for s in predictions]
        _panel(rows, titles, None, path)


@torch.no_grad()
def plot_examples(nets, frames, picks, gts, labels, device, path):
    """RGB | ground truth | each stage's prediction of the Chain `nets` | |error| of the last, at
    full resolution (the prediction shown where the network covers the frame, nearest-neighbour
    upsampled); each image at its own ground truth's size (KITTI's frames differ)."""
    geometry = nets.geometry
    with eval_mode(nets):
        img, _, _ = frames.get(picks)
        x = crop_input(img.to(device), geometry)
        predictions = nets.predictions(x)
        maps = [p.exp() for p in predictions.values()]
        rows = []
        for k in range(len(picks)):
            hw = gts[k].shape
            shown = [upsample_depth(d[k:k + 1], hw, 'nearest', 'nan', geometry)[0, 0].cpu().numpy()
                     for d in maps]
            rgb = F.interpolate(img[k:k + 1], size=hw, mode='nearest')[0].permute(1, 2, 0).cpu().numpy()
            gt = np.where(gts[k] > 0, gts[k], np.nan)
            rows.append([rgb, gt] + shown + [np.abs(shown[-1] - gt)])
        titles = ['input', 'ground truth'] + [STAGE_NAMES[s].lower() for s in predictions] + ['|error| (m)']
        _panel(rows, titles, labels, path)
