"""predict.py: any image size in, a depth map of that size out; bad input gives one clear line."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _predict(*args):
    """predict.py as a command (its exit status and its stderr, where a traceback would show)."""
    return subprocess.run([sys.executable, 'predict.py', *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _predict_here(*args):
    """predict.main in this process: the same code as the command, without starting Python and
    torch again (for the tests that check outputs, not the command's messages)."""
    import predict
    return predict.main([str(a) for a in args])


def _image(path, size, mode='RGB'):
    rng = np.random.default_rng(0)
    w, h = size
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    data = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    Image.fromarray(data[..., 0] if channels == 1 else data, mode).save(path)
    return path


def test_png_and_jpeg_of_different_sizes(trained, tmp_path):
    png = _image(tmp_path / 'a.png', (200, 150))
    jpg = _image(tmp_path / 'b.jpg', (517, 333))
    assert _predict_here('--model', trained, '--out', tmp_path / 'out', '--colorbar', png, jpg) == 0
    for stem, (w, h) in (('a', (200, 150)), ('b', (517, 333))):
        depth = np.load(tmp_path / 'out' / f'{stem}_depth.npy')
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert np.isfinite(depth).all() and (depth > 0).all()
        assert Image.open(tmp_path / 'out' / f'{stem}_depth.png').format == 'PNG'


def test_outputs_next_to_the_image_by_default(trained, tmp_path):
    png = _image(tmp_path / 'c.png', (64, 48))
    assert _predict_here('--model', trained, png) == 0
    assert np.load(tmp_path / 'c_depth.npy').shape == (48, 64)


def test_bad_inputs_give_one_clear_line_each_and_the_others_are_done(trained, tmp_path):
    """One run over four bad files and a good one: a line each for the bad (naming the file and
    what is wrong, no traceback), the good one's depth written, exit status 1."""
    bad = {'text': 'not an image', 'missing': 'not found', 'gray': 'not a colour image',
           'rgba': 'alpha channel'}
    (tmp_path / 'text.png').write_text('not a picture')
    _image(tmp_path / 'gray.png', (40, 30), 'L')
    _image(tmp_path / 'rgba.png', (40, 30), 'RGBA')
    good = _image(tmp_path / 'ok.png', (40, 30))
    r = _predict('--model', trained, *(tmp_path / f'{kind}.png' for kind in bad), good)
    assert r.returncode == 1
    assert 'Traceback' not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == len(bad)
    for line, (kind, message) in zip(lines, bad.items()):
        assert message in line and str(tmp_path / f'{kind}.png') in line, (kind, line)
    assert (tmp_path / 'ok_depth.npy').exists()


def test_convert_accepts_gray_and_rgba(trained, tmp_path):
    gray = _image(tmp_path / 'g.png', (40, 30), 'L')
    rgba = _image(tmp_path / 'r.png', (40, 30), 'RGBA')
    assert _predict_here('--model', trained, '--convert', gray, rgba) == 0
    assert np.load(tmp_path / 'g_depth.npy').shape == (30, 40)


def test_missing_model_message(tmp_path):
    r = _predict('--model', tmp_path / 'nothing', _image(tmp_path / 'x.png', (40, 30)))
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'train.py' in r.stderr


def test_real_nyu_frame(trained, tmp_path, shared):
    jpg = os.path.join(shared, 'nyu-samples', 'metric3d_nyu_demo', 'rgb', 'rgb_00000.jpg')
    assert _predict_here('--model', trained, '--out', tmp_path, jpg) == 0
    assert np.load(tmp_path / 'rgb_00000_depth.npy').shape == (480, 640)


def test_depth_is_exp_of_the_nets_on_the_centre_crop_of_the_320x240_resize(trained, tmp_path):
    """The whole pipeline written out here: RGB order and 0..255 scale as read, an antialiased
    bilinear resize to 320x240, the centre 304x228 crop, exp of coarse + fine, and the 55x74 map
    upsampled bilinearly onto the rows 20..460 and columns 24..616 of a 640x480 image."""
    import torch
    import torch.nn.functional as F
    from net import load_pretrained
    y, x = np.mgrid[:480, :640]
    rgb = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], -1).astype(np.uint8)  # asymmetric
    Image.fromarray(rgb).save(tmp_path / 'room.png')
    assert _predict_here(tmp_path / 'room.png', '--model', trained, '--device', 'cpu') == 0
    depth = np.load(tmp_path / 'room_depth.npy')
    coarse, fine = load_pretrained(trained)
    with torch.no_grad():
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        half = F.interpolate(image, size=(240, 320), mode='bilinear', align_corners=False, antialias=True)
        crop = half[:, :, 6:234, 8:312]
        expected = fine(crop, coarse(crop)).exp()
        region = F.interpolate(expected, size=(440, 592), mode='bilinear', align_corners=False)[0, 0]
    np.testing.assert_allclose(depth[20:460, 24:616], region.numpy(), rtol=1e-5)
    with torch.no_grad():   # the check has teeth: BGR order gives another depth map
        bgr = fine(crop.flip(1), coarse(crop.flip(1))).exp()
    assert not torch.allclose(bgr, expected, rtol=1e-3)
