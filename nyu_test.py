"""The 654 NYU Depth v2 test images in each form people have them, for evaluate.py (formats:
docs/evaluation.md):

  labeled     nyu_depth_v2_labeled.mat + splits.mat: RGB, filled `depths` and `rawDepths`; the
              training images too (the Mean row).
  bts         BTS's official test folder (official_splits/test): <scene type>/rgb_NNNNN.jpg and
              sync_depth_NNNNN.png, 16-bit millimetres = rawDepths x 1000 with the holes (0) kept;
              NNNNN = the labeled index (testNdxs - 1). Raw ground truth only.
  densedepth  DenseDepth's nyu_test.zip (or the folder it was extracted into): eigen_test_rgb.npy
              (654, 480, 640, 3) uint8 RGB and eigen_test_depth.npy (654, 480, 640) float32
              metres, the labeled set's filled `depths` (DenseDepth's own evaluation divides by it
              without a mask, which only works without holes; (?) checked on loading: a file with
              zeros is taken as raw). eigen_test_crop.npy ([20, 459, 24, 615], Eigen's region)
              is not needed: the protocols define their regions.
  nyu2_test   the test pairs of DenseDepth's nyu_data.zip (data/nyu2_test.csv): NNNNN_colors.png
              and NNNNN_depth.png, 16-bit millimetres, filled.
Each gives the test images in testNdxs order as 320x240 frames for the nets, and the 640x480 ground
truth of the kinds it carries.
"""
import glob
import io
import os
import re
import zipfile

import numpy as np

import cli
import files
import nyu_raw
import util

GROUND_TRUTH = {
    'filled': "filled depth (the labeled set's `depths`, inpainted: no holes)",
    'raw': 'raw Kinect depth (`rawDepths`; BTS: its test PNGs / 1000), holes excluded',
}
NPY = ('eigen_test_rgb.npy', 'eigen_test_depth.npy')
BTS_RGB = re.compile(r'rgb_(\d+)\.jpg$')


class TestSet:
    """Test images (`frames`, 320x240 uint8 in util.Frames) and their full-resolution ground truth
    of the kinds in `ground_truth` ('filled', 'raw'), read by `depths(kind, positions)`; `train`:
    the labeled training images (the Mean row), or None."""

    def __init__(self, description, images_nhwc, ground_truth, read_depth, train=None):
        self.description = description
        self.frames = util.Frames(images_nhwc, np.zeros(images_nhwc.shape[:3], np.float16))
        self.ground_truth, self._read_depth, self.train = ground_truth, read_depth, train

    def __len__(self):
        return len(self.frames)

    def depths(self, kind, positions):
        """Full-resolution float32 metres (NYU 480x640) of the test images at `positions`, in order."""
        return self._read_depth(kind, [int(p) for p in positions])


def open_test_set(path, splits=None):
    kind = detect_format(path)
    return {'labeled': lambda: labeled(path, splits), 'bts': lambda: bts_folder(path),
            'densedepth': lambda: densedepth_arrays(path), 'nyu2_test': lambda: nyu2_test(path)}[kind]()


def detect_format(path):
    """'labeled' (anything that is not a folder or a .zip: the labeled loader says what is wrong
    with it), 'bts', 'densedepth' or 'nyu2_test'."""
    accepted = ("the labeled .mat, BTS's official test folder (<scene type>/rgb_NNNNN.jpg + "
                "sync_depth_NNNNN.png), DenseDepth's nyu_test.zip (eigen_test_*.npy) or its folder, "
                "or nyu_data.zip's test pairs (data/nyu2_test.csv)")
    if os.path.isdir(path):
        here = os.listdir(path)
        if all(n in here for n in NPY):
            return 'densedepth'
        if os.path.isfile(os.path.join(path, nyu_raw.DENSEDEPTH_CSV['test'])):
            return 'nyu2_test'
        if glob.glob(os.path.join(glob.escape(path), '*', 'rgb_*.jpg')):
            return 'bts'
        raise cli.DataError(f'{path}: a folder, but not a test set; --data takes {accepted}')
    if path.lower().endswith('.zip'):
        files.check_exists(path, "DenseDepth's nyu_test.zip or nyu_data.zip")
        if not zipfile.is_zipfile(path):
            raise cli.DataError(f'{path}: not a zip file')
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
        if all(n in names for n in NPY):
            return 'densedepth'
        if nyu_raw.DENSEDEPTH_CSV['test'] in names:
            return 'nyu2_test'
        raise cli.DataError(f'{path}: has neither {" nor ".join(NPY)} nor '
                            f'{nyu_raw.DENSEDEPTH_CSV["test"]}; --data takes {accepted}')
    return 'labeled'


def labeled(mat, splits):
    arrays = util.read_nyu_labeled(mat)
    train_idx, test_idx = util.read_splits(splits, len(arrays['images']))
    names = {'filled': 'depths', 'raw': 'rawDepths'}
    with util.open_mat(mat) as f:
        kinds = [k for k, name in names.items() if name in f]

    def read(kind, positions):
        for _, depth in util.read_full_depths(mat, test_idx[positions], names[kind]):
            yield depth
    train = util.Frames(arrays['images'][train_idx], arrays['depths'][train_idx])
    return TestSet(f'{mat} ({len(test_idx)} test images of {splits})', arrays['images'][test_idx],
                   kinds, read, train)


def _from_pairs(frames, kinds):
    """A TestSet over nyu_raw.RawFrames (JPEG/PNG pairs), images decoded once."""
    images = np.stack([nyu_raw.to_frame(*frames.rgb(i)).permute(1, 2, 0).numpy()
                       for i in cli.progress(range(len(frames)), desc='reading test images', unit='image')])

    def read(kind, positions):
        for p in positions:
            yield frames.depth(p)[0]
    return TestSet(frames.description, images, kinds, read)


def bts_folder(folder):
    """BTS's official_splits/test: frames in the order of their labeled index NNNNN."""
    found = []
    for rgb in glob.glob(os.path.join(glob.escape(folder), '*', 'rgb_*.jpg')):
        index = int(BTS_RGB.search(rgb).group(1))
        depth = os.path.join(os.path.dirname(rgb), f'sync_depth_{BTS_RGB.search(rgb).group(1)}.png')
        if not os.path.isfile(depth):
            raise cli.DataError(f'{rgb}: no {os.path.basename(depth)} beside it')
        found.append((index, os.path.relpath(rgb, folder), os.path.relpath(depth, folder)))
    found.sort()
    pairs = [(rgb, depth) for _, rgb, depth in found]
    frames = nyu_raw.RawFrames(f"{folder} (BTS's official test set, {len(pairs)} images)", pairs,
                               None, (16, 0.001), root=folder)
    return _from_pairs(frames, ['raw'])


def nyu2_test(path):
    frames = nyu_raw.read_densedepth(path, split='test')
    frames.description = f"{path} (DenseDepth's nyu2_test pairs, {len(frames)} images)"
    return _from_pairs(frames, ['filled'])


def densedepth_arrays(path):
    """nyu_test.zip or its folder: the arrays in memory (a zip cannot be memory-mapped)."""
    def load(name):
        if os.path.isdir(path):
            return np.load(os.path.join(path, name), mmap_mode='r')
        with zipfile.ZipFile(path) as z:
            return np.load(io.BytesIO(z.read(name)))
    rgb, depth = load(NPY[0]), load(NPY[1])
    if rgb.ndim != 4 or rgb.shape[1:] != (*util.NYU_HW, 3) or depth.shape != rgb.shape[:3]:
        raise cli.DataError(f'{path}: eigen_test_rgb.npy is {rgb.shape}, eigen_test_depth.npy '
                            f'{depth.shape}; DenseDepth\'s are (654, 480, 640, 3) and (654, 480, 640)')
    kind = 'raw' if (np.asarray(depth) == 0).any() else 'filled'
    if kind == 'raw':
        print(f'note: {path}: eigen_test_depth.npy has holes (0), so it is taken as raw depth')
    images = np.stack([util.downsample_rgb(np.asarray(im)) for im in rgb])

    def read(_kind, positions):
        for p in positions:
            yield np.asarray(depth[p], np.float32)
    return TestSet(f"{path} (DenseDepth's test arrays, {len(rgb)} images)", images, [kind], read)
