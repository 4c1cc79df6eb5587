"""Depth maps for your own images with the trained nets.

    python predict.py photo.jpg room.png            # writes photo_depth.npy / photo_depth.png ...
    python predict.py --colorbar --out preds/ *.jpg

Each image is preprocessed as in the paper: resized to 320x240 (whatever its size or aspect) and
centre-cropped to 304x228. The 55x74 prediction covers the centre of that frame (rows 10..230 and
columns 12..308 of 240x320, i.e. 4.2% of the height and 3.75% of the width left out on each side);
it is upsampled bilinearly to the input's size, and the uncovered border repeats the nearest
predicted values. Output: depth in metres as float32 .npy (H x W of the input) and a colourised PNG.
No file is ever replaced: an image whose <stem>_depth.npy or .png exists already (an earlier
prediction, or ground truth stored under that name) is refused; photo.jpg and photo.png in one call
get photo.jpg_depth.* and photo.png_depth.*.
KITTI weights (train.py --dataset kitti, recognised by their shapes): resized to 612x184, the centre
576x172 crop, a 142x27 prediction of its lower part (rows 66..174, columns 22..590 of 612x184; the
rows above repeat the top predicted row, as the LIDAR gave no depth there to learn from).
"""
import argparse
import collections
import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import cli
import files
import runtime
import util
from net import Chain, load_pretrained

CONVERTIBLE = {'P', 'CMYK', 'YCbCr'}   # colour images in another encoding: converted silently


class InputError(Exception):
    """An input file we cannot turn into an RGB image; the message says why."""


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
    p.add_argument('--model', default='model', help='folder with coarse.pth [and fine.pth] (default: %(default)s)')
    p.add_argument('--out', default=None, help='output folder (default: next to each image); '
                                                  'an existing file is never replaced')
    p.add_argument('--coarse-only', action='store_true', help='use the coarse net even if fine.pth exists')
    p.add_argument('--colorbar', action='store_true', help='add a colour bar in metres to the PNG')
    p.add_argument('--convert', action='store_true',
                   help='accept 8-bit grayscale and RGBA images by converting them to RGB '
                        '(dropping alpha); by default they are refused, the net was trained on '
                        'colour. 16-bit and float images (depth maps are stored so) are refused '
                        'either way')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    return p.parse_args(argv)


def read_rgb(path, convert=False):
    """RGB uint8 (H, W, 3) from an image file, or InputError with a one-line reason."""
    if not os.path.exists(path):
        raise InputError('file not found')
    if os.path.isdir(path):
        raise InputError('is a directory, not an image')
    if not os.path.isfile(path):   # opening a pipe would wait for a writer, for ever
        raise InputError('is not a regular file (a pipe, a device or a socket), not an image')
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode.startswith(('I', 'F')):   # I;16, I, F: no 8-bit scale to read them on
                raise InputError(f'is a single-channel image of more than 8 bits (mode {mode}), '
                                 f'as depth maps are stored, not a photo; for a gray photo, save '
                                 f'an 8-bit copy and use --convert')
            if mode != 'RGB' and not (convert or mode in CONVERTIBLE):
                if mode in ('RGBA', 'LA', 'PA'):
                    raise InputError(f'has an alpha channel ({mode}); use --convert to drop it')
                raise InputError(f'is not a colour image (mode {mode}); use --convert to '
                                 f'treat it as gray RGB')
            im.load()
            return np.array(im.convert('RGB'))
    except UnidentifiedImageError:
        raise InputError('not an image file PIL can read') from None
    except Image.DecompressionBombError:
        w, h = _declared_size(path)
        raise InputError(f'{w}x{h} pixels ({w * h / 1e6:.0f} million), more than the '
                         f'{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} million PIL decodes (its guard '
                         f'against decompression bombs); shrink it first: the nets see it resized '
                         f'to 320x240 (KITTI: 612x184) anyway') from None
    except ValueError as e:   # a mode PIL cannot turn into RGB (La, ...)
        raise InputError(f'cannot be converted to RGB ({cli.last_line(e)})') from None
    except OSError as e:
        raise InputError(f'cannot be read as an image ({e})') from None


def _declared_size(path):
    """The width and height an image file's header declares, read without PIL's size limit (the
    header alone: nothing is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@torch.no_grad()
def predict_depth(nets, rgb, device='cpu'):
    """Depth in metres, (H, W) float32, for an RGB uint8 (H, W, 3) image of any size: the
    prediction of the last of `nets` (a Chain)."""
    geometry = nets.geometry   # NYU's or KITTI's sizes, as the weights were trained
    log_depth = nets(util.prepare_image(rgb, geometry).to(device))
    depth = util.upsample_depth(log_depth.exp(), rgb.shape[:2], mode='bilinear', outside='edge',
                                geometry=geometry)
    return depth[0, 0].cpu().numpy().astype(np.float32)


def _save_npy(path, array):
    with open(path, 'wb') as f:
        np.save(f, array)


def save_depth_png(depth, path, colorbar=False):
    plt = util._pyplot()
    h, w = depth.shape
    if colorbar:
        fig, ax = plt.subplots(figsize=(w / 100 + 1.2, h / 100))
        try:
            im = ax.imshow(depth, cmap='jet_r')
            ax.axis('off')
            fig.colorbar(im, ax=ax, label='depth (m)', fraction=0.05)
            files.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100,
                                                             bbox_inches='tight'))
        finally:
            plt.close(fig)
    else:
        files.atomic_write(path, lambda tmp: plt.imsave(tmp, depth, cmap='jet_r', format='png'))


OUTPUTS = ('.npy', '.png')


def plan_outputs(images, out=None):
    """For each image, (its outputs' path without the suffix, a reason it gets none or None):
    '<stem>_depth' in --out, or by default next to the image. Two images of one stem going to one
    folder (photo.jpg and photo.png) keep their extension instead: photo.jpg_depth,
    photo.png_depth. An image given again gets (None, None): it is done once. Refused: an image
    whose outputs would still be another image's of this call, or an input of this call (written
    first, it would then be read as an image)."""
    def folder(path):
        return out if out is not None else os.path.dirname(os.path.abspath(path))

    def stem(path):
        return os.path.splitext(os.path.basename(path))[0]

    inputs = {os.path.realpath(p) for p in images}
    names = collections.defaultdict(set)   # the file names of each output folder and stem
    for path in images:
        names[os.path.realpath(os.path.join(folder(path), stem(path)))].add(os.path.basename(path))
    plan, seen, taken = [], set(), {}
    for path in images:
        real = os.path.realpath(path)
        if real in seen:
            plan.append((None, None))
            continue
        seen.add(real)
        shared = len(names[os.path.realpath(os.path.join(folder(path), stem(path)))]) > 1
        base = os.path.join(folder(path), (os.path.basename(path) if shared else stem(path)) + '_depth')
        key = os.path.realpath(base)
        clash = [base + s for s in OUTPUTS if key + s in inputs]
        if key in taken:
            plan.append((None, f'its outputs would have the names of {taken[key]}\'s '
                               f'({base}.npy, .png); predict it with another --out'))
        elif clash:
            plan.append((None, f'its output {clash[0]} is an input of this call; predict them '
                               f'with another --out'))
        else:
            taken[key] = path
            plan.append((base, None))
    return plan


def write_outputs(base, depth, colorbar=False):
    """<base>.npy and <base>.png, both or neither (the .npy goes again if the .png fails)."""
    files.atomic_write(base + '.npy', lambda tmp: _save_npy(tmp, depth))
    try:
        save_depth_png(depth, base + '.png', colorbar)
    except BaseException:
        os.remove(base + '.npy')
        raise


def _say(line):
    sys.stderr.write(line + '\n')   # one write: lines of processes sharing stderr stay whole
    sys.stderr.flush()


def main(argv=None):
    args = parse_args(argv)
    device = runtime.resolve_device(args.device)[0]
    if args.out is not None:
        files.check_out_folder(args.out)
    nets = load_pretrained(args.model, device)
    if args.coarse_only:
        nets = Chain(nets, last='coarse')
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
    failed = 0
    for path, (base, problem) in zip(args.images, plan_outputs(args.images, args.out)):
        if base is None and problem is None:
            _say(f'note: {path}: given again; its depth is written once')
            continue
        try:
            if problem is not None:
                raise InputError(problem)
            rgb = read_rgb(path, args.convert)
        except InputError as e:
            _say(f'error: {path}: {e}')
            failed += 1
            continue
        existing = [base + s for s in OUTPUTS if os.path.lexists(base + s)]
        if existing:   # ground truth stored under this name, an earlier prediction, ...
            _say(f'error: {existing[0]}: exists already (the depth of {path} would replace it); '
                 f'predict.py replaces no file: write elsewhere with --out, or remove it')
            failed += 1
            continue
        depth = predict_depth(nets, rgb, device)
        try:
            write_outputs(base, depth, args.colorbar)
        except OSError as e:
            _say(f'error: {path}: cannot write {base}.npy, .png ({e.strerror or e}); write '
                 f'elsewhere with --out')
            failed += 1
            continue
        print(f'{path}: {depth.shape[1]}x{depth.shape[0]}, {depth.min():.2f}-{depth.max():.2f} m '
              f'-> {base}.npy, {base}.png')
    return 1 if failed else 0


if __name__ == '__main__':
    cli.run_cli(main)
