"""predict.py: any image size in, a depth map of that size out; bad input gives one clear line."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT


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


@pytest.mark.slow
def test_png_and_jpeg_of_different_sizes(trained, tmp_path):
    png = _image(tmp_path / 'a.png', (200, 150))
    jpg = _image(tmp_path / 'b.jpg', (517, 333))
    assert _predict_here('--model', trained, '--out', tmp_path / 'out', '--colorbar', png, jpg) == 0
    for stem, (w, h) in (('a', (200, 150)), ('b', (517, 333))):
        depth = np.load(tmp_path / 'out' / f'{stem}_depth.npy')
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert np.isfinite(depth).all() and (depth > 0).all()
        assert Image.open(tmp_path / 'out' / f'{stem}_depth.png').format == 'PNG'


@pytest.mark.slow
def test_outputs_next_to_the_image_by_default(trained, tmp_path):
    png = _image(tmp_path / 'c.png', (64, 48))
    assert _predict_here('--model', trained, png) == 0
    assert np.load(tmp_path / 'c_depth.npy').shape == (48, 64)


@pytest.mark.slow
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


@pytest.mark.slow
def test_convert_accepts_gray_and_rgba(trained, tmp_path):
    gray = _image(tmp_path / 'g.png', (40, 30), 'L')
    rgba = _image(tmp_path / 'r.png', (40, 30), 'RGBA')
    assert _predict_here('--model', trained, '--convert', gray, rgba) == 0
    assert np.load(tmp_path / 'g_depth.npy').shape == (30, 40)


@pytest.mark.slow
def test_missing_model_message(tmp_path):
    r = _predict('--model', tmp_path / 'nothing', _image(tmp_path / 'x.png', (40, 30)))
    assert r.returncode != 0 and 'Traceback' not in r.stderr and 'train.py' in r.stderr


@pytest.mark.slow
def test_real_nyu_frame(trained, tmp_path, shared):
    jpg = os.path.join(shared, 'nyu-samples', 'metric3d_nyu_demo', 'rgb', 'rgb_00000.jpg')
    assert _predict_here('--model', trained, '--out', tmp_path, jpg) == 0
    assert np.load(tmp_path / 'rgb_00000_depth.npy').shape == (480, 640)


@pytest.mark.slow
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
    coarse, fine = load_pretrained(trained).values()
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


def _lines(capsys):
    return [l for l in capsys.readouterr().err.splitlines() if l.strip()]


@pytest.fixture(scope='module')
def nets(trained):
    from net import load_pretrained
    return load_pretrained(trained)


@pytest.fixture
def loaded(nets, monkeypatch):
    """predict.main with the trained nets loaded once for the tests of what it does per image."""
    import predict
    monkeypatch.setattr(predict, 'load_pretrained', lambda folder, device: nets)


@pytest.mark.slow
def test_no_file_is_written_over_and_one_stem_gets_two_names(trained, loaded, tmp_path, capsys):
    """Ground truth under the output's name (DIODE's scene_depth.npy) and an input of the same
    call stay as they are, each refused in a line naming the file; photo.jpg and photo.png get
    photo.jpg_depth and photo.png_depth, told apart here by their sizes (photo.jpg.png, whose
    name would still be taken, is refused); a file given twice is done once."""
    truth = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / 'scene_depth.npy', truth)
    scene = _image(tmp_path / 'scene.png', (40, 30))
    first = _image(tmp_path / 'a.png', (40, 30))
    second = _image(tmp_path / 'a_depth.png', (48, 36))   # a.png's output name, an input here
    second_bytes = second.read_bytes()
    jpg, png = _image(tmp_path / 'photo.jpg', (64, 48)), _image(tmp_path / 'photo.png', (40, 30))
    again = f'{tmp_path}/./photo.png'
    third = _image(tmp_path / 'photo.jpg.png', (40, 30))   # its stem is photo.jpg
    assert _predict_here('--model', trained, scene, first, second, jpg, png, again, third) == 1
    lines = _lines(capsys)
    assert len(lines) == 4, lines
    assert f'{tmp_path / "scene_depth.npy"}: exists already' in lines[0] and '--out' in lines[0]
    assert f'{first}: its output {second} is an input of this call' in lines[1]
    assert lines[2] == f'note: {again}: given again; its depth is written once'
    assert f'{third}: its outputs would have the names of {jpg}\'s' in lines[3]
    np.testing.assert_array_equal(np.load(tmp_path / 'scene_depth.npy'), truth)
    assert not (tmp_path / 'scene_depth.png').exists()
    assert second.read_bytes() == second_bytes
    assert np.load(tmp_path / 'a_depth_depth.npy').shape == (36, 48)
    assert np.load(tmp_path / 'photo.jpg_depth.npy').shape == (48, 64)
    assert np.load(tmp_path / 'photo.png_depth.npy').shape == (30, 40)
    assert not (tmp_path / 'photo_depth.npy').exists()


@pytest.mark.slow
def test_a_pipe_is_refused_without_opening_it(trained, loaded, tmp_path, capsys):
    """Opening a FIFO waits for a writer for ever. Should predict.py open it, the thread here
    gives it an empty one after a second (the test then fails instead of hanging)."""
    import threading
    fifo = tmp_path / 'f.jpg'
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():
        while not done.wait(1):
            try:   # succeeds only where a reader has the pipe open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    threading.Thread(target=unblock, daemon=True).start()
    try:
        rc = _predict_here('--model', trained, fifo, _image(tmp_path / 'ok.png', (40, 30)))
    finally:
        done.set()
    assert rc == 1
    assert _lines(capsys) == [f'error: {fifo}: is not a regular file (a pipe, a device or a '
                              f'socket), not an image']
    assert (tmp_path / 'ok_depth.npy').exists()


def _huge_png(path, width, height):
    """A 1x1 PNG whose header claims width x height (the CRC made to match): PIL reads the size
    and refuses it before decoding anything, so no huge file is needed."""
    import struct
    import zlib
    _image(path, (1, 1))
    data = bytearray(path.read_bytes())   # signature (8), IHDR length and type (8), data (13), CRC
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_images_that_are_refused_or_cannot_be_written_are_one_line_each(trained, loaded, tmp_path,
                                                                      capsys, monkeypatch):
    """With --convert: an image over PIL's decompression-bomb limit, 16-bit, 32-bit and float
    single-channel images (depth maps are stored so; PIL's convert would clip them to 255), an
    image whose outputs cannot be written: a line each, the good image done, status 1."""
    import predict
    (tmp_path / 'locked').mkdir()
    bad = {_huge_png(tmp_path / 'huge.png', 14000, 14000): '14000x14000 pixels (196 million)',
           tmp_path / 'depth16.png': 'more than 8 bits (mode I;16)',
           tmp_path / 'depth32.tif': 'more than 8 bits (mode I)',
           tmp_path / 'depthf.tif': 'more than 8 bits (mode F)',
           _image(tmp_path / 'locked' / 'ok.png', (40, 30)):
               f'cannot write {tmp_path / "locked" / "ok_depth"}.npy, .png (Permission denied)'}
    depth = np.arange(1200).reshape(30, 40)
    Image.fromarray(depth.astype(np.uint16)).save(tmp_path / 'depth16.png')
    Image.fromarray(depth.astype(np.int32)).save(tmp_path / 'depth32.tif')
    Image.fromarray(depth.astype(np.float32)).save(tmp_path / 'depthf.tif')
    save_png = predict.save_depth_png

    def read_only_folder(depth, path, colorbar=False):   # root may write anywhere: fail as if not
        if os.path.dirname(path) == str(tmp_path / 'locked'):
            raise PermissionError(13, 'Permission denied', path)
        save_png(depth, path, colorbar)
    monkeypatch.setattr(predict, 'save_depth_png', read_only_folder)
    good = _image(tmp_path / 'good.png', (40, 30))
    assert _predict_here('--model', trained, '--convert', *bad, good) == 1
    lines = _lines(capsys)
    assert len(lines) == len(bad), lines
    for line, (path, message) in zip(lines, bad.items()):
        assert line.startswith(f'error: {path}: ') and message in line, (message, line)
    assert os.listdir(tmp_path / 'locked') == ['ok.png']   # the .npy written first is gone again
    assert np.load(tmp_path / 'good_depth.npy').shape == (30, 40)


def _model_with_fine(trained, folder, fine):
    """A model folder with the trained coarse net and `fine` as fine.pth ('folder': a folder)."""
    import torch
    folder.mkdir()
    os.symlink(os.path.join(trained, 'coarse.pth'), folder / 'coarse.pth')
    if fine == 'folder':
        (folder / 'fine.pth').mkdir()
    else:
        state = torch.load(os.path.join(trained, 'fine.pth'), weights_only=True)
        state['fine1.0.bias'][3] = fine
        torch.save(state, folder / 'fine.pth')
    return folder


@pytest.mark.slow
@pytest.mark.parametrize('case, message', [
    ('--out ""', '--out: an empty path; --out names a folder'),
    ('--out in a file', 'taken/x: {tmp}/taken is a file, so no folder can be made there'),
    ('--out read-only', 'locked/x: cannot write in {tmp}/locked (no write permission'),
    ('--device meta', '--device meta: not a device these scripts run on; use cpu, cuda or cuda:N'),
    ('NaN weights', 'weights/fine.pth: fine1.0.bias holds NaN or inf'),
    ('inf weights', 'weights/fine.pth: fine1.0.bias holds NaN or inf'),
    ('fine.pth a folder', 'weights/fine.pth: is a directory, not fine net weights'),
])
def test_refused_before_any_image_in_one_line(trained, tmp_path, monkeypatch, case, message):
    """Options and weights that cannot work: one line (a UserError), before any image is done."""
    import cli
    model = ['--model', trained]
    (tmp_path / 'taken').write_text('a file')
    (tmp_path / 'locked').mkdir()
    access = os.access   # root may write anywhere: report the folder read-only as for a user
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: (
        os.fspath(path) != str(tmp_path / 'locked') and access(path, mode, **kw)))
    weights = tmp_path / 'weights'
    argv = {'--out ""': lambda: [*model, '--out', ''],
            '--out in a file': lambda: [*model, '--out', tmp_path / 'taken' / 'x'],
            '--out read-only': lambda: [*model, '--out', tmp_path / 'locked' / 'x'],
            '--device meta': lambda: [*model, '--device', 'meta'],
            'NaN weights': lambda: ['--model', _model_with_fine(trained, weights, np.nan)],
            'inf weights': lambda: ['--model', _model_with_fine(trained, weights, np.inf)],
            'fine.pth a folder': lambda: ['--model', _model_with_fine(trained, weights, 'folder')],
            }[case]()
    image = _image(tmp_path / 'ok.png', (40, 30))
    with pytest.raises(cli.UserError) as e:
        _predict_here(*argv, image)
    assert message.format(tmp=tmp_path) in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'ok_depth.npy').exists()
