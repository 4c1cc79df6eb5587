"""Helpers that several test modules share: the repository's paths, train.py's arguments for a CPU
run, the one-line refusal check, small files in NYU's on-disk layout, the frames that show where
augmentation moved a pixel, and a few readers of a run's results. Fixtures are in conftest.py."""
import os
import sys

import h5py
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # the scripts are flat modules in the repository's root
# The project's modules are imported inside the helpers that use them: conftest.py imports this
# file, so an import here that fails would stop every test from loading, not only the ones that
# need it.
# Reference material (the real NYU samples, the papers' notes) lies in a folder named `shared`
# beside the checkout on the project's machines; a clone does not have it, and its tests skip.
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')


def train_args(data, out, *extra):
    """train.py arguments for a run on the (mat, splits) pair `data`, CPU, output to `out`."""
    mat, splits = data
    return ['--data', str(mat), '--splits', str(splits), '--out', str(out), '--device', 'cpu',
            '--train-depth', 'filled', *map(str, extra)]


def one_line(error):
    """The message of a pytest.raises `error`, checked to be one non-empty line."""
    message = str(error.value)
    assert message and '\n' not in message
    return message


def refusal(main, options):
    """The one line a script's main refuses `options` ({flag: value}, in order) with."""
    import cli
    with pytest.raises(cli.UserError) as e:
        main([text for pair in options.items() for text in pair])
    return one_line(e)


# (option, value, the refusal's start) that every converter (nyu_raw.py, kitti.py) refuses alike;
# '{file}' stands for a file in the test's folder
CONVERTER_REFUSALS = [
    ('--workers', '-1', 'argument --workers: -1 is below 0'),
    ('--out', '', '--out: an empty path'),
    ('--out', '{file}/cache', '{file}/cache: {file} is a file, so no folder can be made there')]


def per_step_losses(out):
    """The training loss of each step of the last stage, from the run's checkpoint in `out`."""
    history = torch.load(out / 'checkpoint.pth', weights_only=True)['history']
    return torch.tensor([row['train_loss'] for row in history])


def coarse_trace(net, x):
    """The output size (C, H, W), or (features,), of each layer of the coarse net on input x."""
    sizes, h = {}, (x - net.coarse_mean) / net.coarse_std
    for name in ('coarse1', 'coarse2', 'coarse3', 'coarse4', 'coarse5'):
        h = getattr(net, name)(h)
        sizes[name] = tuple(h.shape[1:])
    h = net.coarse6(h * net.variant.feature_scale)
    sizes['coarse6'] = tuple(h.shape[1:])
    sizes['coarse7'] = tuple(net.coarse7(h).shape[1:])
    return sizes


def nan_at_call(monkeypatch, bad_calls):
    """The training loss (loss.LOSSES' default, which train.py looks up at each step) gives nan at
    its calls numbered in `bad_calls` (from 1)."""
    import loss
    real, calls = loss.LOSSES[loss.DEFAULT_LOSS], [0]

    def nan_loss(*args, **kwargs):
        calls[0] += 1
        value = real(*args, **kwargs)
        return value * float('nan') if calls[0] in bad_calls else value

    monkeypatch.setitem(loss.LOSSES, loss.DEFAULT_LOSS, nan_loss)


def run_notebook(model, monkeypatch):
    """demo.ipynb executed headless on the weights in `model`; the text it printed."""
    monkeypatch.setenv('DEPTH_MODEL', str(model))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(os.path.join(ROOT, 'demo.ipynb'), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name='python3',
                   resources={'metadata': {'path': ROOT}}).execute()
    return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


# ----------------------------------------------------------------------------------------------
# NYU's labeled file, written from the format description alone

NYU_H, NYU_W = 480, 640


def pattern_frame(i):
    """An asymmetric RGB-D frame: red fills only the top-left quadrant, green grows to the right,
    blue grows downwards; depth grows right and (less) downwards, by a frame-specific offset.
    A loader that rotates, mirrors or transposes the frame breaks at least one of these."""
    H, W = NYU_H, NYU_W
    y, x = np.mgrid[:H, :W]
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = np.where((y < H // 2) & (x < W // 2), 200, 10)
    rgb[..., 1] = (x * 255 // (W - 1)).astype(np.uint8)
    rgb[..., 2] = (y * 255 // (H - 1)).astype(np.uint8)
    depth = (1.0 + i + x / W * 4 + y / H).astype(np.float32)
    raw = depth.copy()
    raw[:40, :80] = 0        # a hole in the top-left corner
    return rgb, depth, raw


def write_nyu_like(path, n, scenes=None, frame=pattern_frame):
    """Written from the format description alone (not from util's writer): MATLAB v7.3 = HDF5 with
    a 512-byte user block; MATLAB is column-major, so a 480x640x3xN array is stored (N, 3, 640, 480)."""
    frames = [frame(i) for i in range(n)]
    with h5py.File(path, 'w', userblock_size=512) as f:
        img = f.create_dataset('images', data=np.stack([fr[0].transpose(2, 1, 0) for fr in frames]))
        img.attrs['MATLAB_class'] = np.bytes_('uint8')
        for name, k in (('depths', 1), ('rawDepths', 2)):
            d = f.create_dataset(name, data=np.stack([fr[k].T for fr in frames]))
            d.attrs['MATLAB_class'] = np.bytes_('single')
        lab = f.create_dataset('labels', data=np.zeros((n, NYU_W, NYU_H), np.uint16))
        lab.attrs['MATLAB_class'] = np.bytes_('uint16')
        if scenes is not None:
            refs = f.create_group('#refs#')
            cell = f.create_dataset('scenes', (1, n), dtype=h5py.ref_dtype)
            for i, s in enumerate(scenes):
                chars = refs.create_dataset(str(i), data=np.array([[ord(c)] for c in s], np.uint16))
                chars.attrs['MATLAB_class'] = np.bytes_('char')
                cell[0, i] = chars.ref
            cell.attrs['MATLAB_class'] = np.bytes_('cell')
    return frames


# ----------------------------------------------------------------------------------------------
# Frames that say where augmentation took each pixel from

CODE0 = 1000.0   # the depth code of pixel (0, 0)


def position_frame(frame_hw=None):
    """A frame of frame_hw (H, W; default NYU's) whose image channels hold each pixel's own x, y
    and a constant 100, and whose depth encodes CODE0 + y * W + x."""
    from net import FRAME_HW
    fh, fw = frame_hw or FRAME_HW
    y, x = torch.meshgrid(torch.arange(fh, dtype=torch.float32),
                          torch.arange(fw, dtype=torch.float32), indexing='ij')
    image = torch.stack([x, y, torch.full_like(x, 100.0)])[None]
    depth = (CODE0 + y * fw + x)[None]
    return image, depth, torch.ones_like(depth, dtype=torch.bool)


def check_aligned(params, min_cells=1500):
    """At every valid target cell, the depth's source pixel is the nearest pixel to where the
    image sample at that cell came from (bilinear sample of a linear image = exact position)."""
    import util
    from net import FRAME_HW, INPUT_HW, OUTPUT_HW
    fw = FRAME_HW[1]
    image, depth, mask = position_frame()
    img, d, m = util.augment(image, depth, mask, params)
    assert img.shape == (1, 3, *INPUT_HW) and d.shape == m.shape == (1, 1, *OUTPUT_HW)
    c = params.color[0]
    at_cells = img[0, :, 5::4, 5::4][:, :OUTPUT_HW[0], :OUTPUT_HW[1]] / c.view(3, 1, 1)
    inside = (at_cells[2] - 100).abs() < 1e-3           # all four bilinear taps inside the frame
    code = torch.round(d[0, 0] * params.scale[0]) - CODE0   # undo the division of depth by s
    dy, dx = torch.div(code, fw, rounding_mode='floor'), code % fw
    ok = m[0, 0] & inside
    assert int(ok.sum()) >= min_cells
    assert (dx[ok] - at_cells[0][ok]).abs().max() <= 0.5 + 1e-3
    assert (dy[ok] - at_cells[1][ok]).abs().max() <= 0.5 + 1e-3
    return img, d, m, at_cells
