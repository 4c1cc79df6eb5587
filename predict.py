"""Depth maps for your own images with the trained nets.

    python predict.py photo.jpg room.png            # writes photo_depth.npy / photo_depth.png ...
    python predict.py --colorbar --out preds/ *.jpg

Each image is preprocessed as in the paper: resized to 320x240 (whatever its size or aspect) and
centre-cropped to 304x228. The 55x74 prediction covers the centre of that frame (rows 10..230 and
columns 12..308 of 240x320, i.e. 4.2% of the height and 3.75% of the width left out on each side);
it is upsampled bilinearly to the input's size, and the uncovered border repeats the nearest
predicted values. Output: depth in metres as float32 .npy (H x W of the input) and a colourised PNG.
KITTI weights (train.py --dataset kitti, recognised by their shapes): resized to 612x184, the centre
576x172 crop, a 142x27 prediction of its lower part (rows 66..174, columns 22..590 of 612x184; the
rows above repeat the top predicted row, as the LIDAR gave no depth there to learn from).
"""
import argparse
import os
import sys

import numpy as np
import torch

import cli
import files
import runtime
import util
from net import load_pretrained, predict_log_depth

CONVERTIBLE = {'P', 'CMYK', 'YCbCr'}   # colour images in another encoding: converted silently


class InputError(Exception):
    """An input file we cannot turn into an RGB image; the message says why."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='+', help='image files (JPEG, PNG, ...)')
    p.add_argument('--model', default='model', help='folder with coarse.pth [and fine.pth] (default: %(default)s)')
    p.add_argument('--out', default=None, help='output folder (default: next to each image)')
    p.add_argument('--coarse-only', action='store_true', help='use the coarse net even if fine.pth exists')
    p.add_argument('--colorbar', action='store_true', help='add a colour bar in metres to the PNG')
    p.add_argument('--convert', action='store_true',
                   help='accept grayscale and RGBA images by converting them to RGB (dropping '
                        'alpha); by default they are refused, the net was trained on colour')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    return p.parse_args(argv)


def read_rgb(path, convert=False):
    """RGB uint8 (H, W, 3) from an image file, or InputError with a one-line reason."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise InputError('file not found')
    if os.path.isdir(path):
        raise InputError('is a directory, not an image')
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode != 'RGB' and not (convert or mode in CONVERTIBLE):
                if mode in ('RGBA', 'LA', 'PA'):
                    raise InputError(f'has an alpha channel ({mode}); use --convert to drop it')
                raise InputError(f'is not a colour image (mode {mode}); use --convert to '
                                 f'treat it as gray RGB')
            return np.array(im.convert('RGB'))
    except UnidentifiedImageError:
        raise InputError('not an image file PIL can read') from None
    except OSError as e:
        raise InputError(f'cannot be read as an image ({e})') from None


@torch.no_grad()
def predict_depth(coarse, fine, rgb, device='cpu'):
    """Depth in metres, (H, W) float32, for an RGB uint8 (H, W, 3) image of any size."""
    geometry = coarse.geometry   # NYU's or KITTI's sizes, as the weights were trained
    log_depth = predict_log_depth(coarse, fine, util.prepare_image(rgb, geometry).to(device))
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
        im = ax.imshow(depth, cmap='jet_r')
        ax.axis('off')
        fig.colorbar(im, ax=ax, label='depth (m)', fraction=0.05)
        files.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight'))
        plt.close(fig)
    else:
        files.atomic_write(path, lambda tmp: plt.imsave(tmp, depth, cmap='jet_r', format='png'))


def main(argv=None):
    args = parse_args(argv)
    device = runtime.resolve_device(args.device)[0]
    if args.out:
        files.check_out_folder(args.out)
    coarse, fine = load_pretrained(args.model, device)
    if args.coarse_only:
        fine = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    failed = 0
    for path in args.images:
        try:
            rgb = read_rgb(path, args.convert)
        except InputError as e:
            print(f'error: {path}: {e}', file=sys.stderr)
            failed += 1
            continue
        depth = predict_depth(coarse, fine, rgb, device)
        stem = os.path.splitext(os.path.basename(path))[0] + '_depth'
        base = os.path.join(args.out or os.path.dirname(os.path.abspath(path)), stem)
        files.atomic_write(base + '.npy', lambda tmp: _save_npy(tmp, depth))
        save_depth_png(depth, base + '.png', args.colorbar)
        print(f'{path}: {depth.shape[1]}x{depth.shape[0]}, {depth.min():.2f}-{depth.max():.2f} m '
              f'-> {base}.npy, {base}.png')
    return 1 if failed else 0


if __name__ == '__main__':
    cli.run_cli(main)
