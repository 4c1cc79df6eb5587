"""Raw KITTI for the paper's second dataset (Sec. 4.2): the training frames (the paper's list, built
from the drives on disk, or the field's Eigen training list) and the Eigen split's test frames as
a torch Dataset (RGB at half resolution, LIDAR depth projected into the camera), the ground truth
the field evaluates against, and a one-time conversion into a memory-mapped cache.

File layouts (kitti/README.md, docs/kitti.md), in short, under the raw KITTI root:
  <date>/<date>_drive_<NNNN>_sync/image_02|image_03/data/<frame:010d>.png   left / right colour
  <date>/<date>_drive_<NNNN>_sync/velodyne_points/data/<frame:010d>.bin     float32 x, y, z, refl.
  <date>/<date>_drive_<NNNN>_sync/oxts/data/<frame:010d>.txt                GPS/IMU: 30 numbers
  <date>/calib_cam_to_cam.txt, <date>/calib_velo_to_cam.txt                 `KEY: v1 v2 ...` lines
and, optionally, KITTI's annotated depth (data_depth_annotated) under its own root:
  train|val/<drive>/proj_depth/groundtruth/image_02|image_03/<frame:010d>.png   uint16, m = v / 256
The Eigen split lists (kitti/splits/, byte-identical to monodepth2's splits/eigen/test_files.txt
and splits/eigen_full/{train,val}_files.txt) name one frame a line: `<date>/<drive> <frame> l|r`.

The field's conventions were checked against nianticlabs/monodepth2 at commit
b676244e5a1ca55564eb5d16ab521a48f823af31 (2022-01-29): kitti_utils.py (read_calib_file, sub2ind,
generate_depth_map), export_gt_depth.py, evaluate_depth.py (the mask, the Garg crop, the clamp,
median scaling, compute_errors) and datasets/kitti_dataset.py. Our code is our own. Where we differ:
  - generate_depth_map finds the points sharing a pixel with sub2ind, which computes
    row * (W - 1) + col - 1 instead of row * W + col: pixels (r + 1, 0) and (r, W - 1) then count as
    one, the smallest depth of both is written to one of them, and the other keeps whichever of its
    points was written last. We keep the true per-pixel minimum everywhere. Only columns 0 and
    W - 1 differ (checked: identical maps elsewhere, on kitti_tree scans plus 200K random points),
    both outside the Garg crop (columns 44 to 1196 of 1242), so the field's figures are the same.
  - Like monodepth2 (np.round), a pixel coordinate exactly halfway rounds to even; MATLAB's round,
    the devkit's, rounds it away from zero. Points exactly halfway between pixels are rare.
  - monodepth2 (mono models) multiplies each prediction by median(gt) / median(pred) before the
    clamp. We never do: the network predicts metric depth, and the paper reports it unscaled.
The field's metrics (evaluate_depth.compute_errors, per image over the masked pixels, then the mean
over images): abs rel = mean(|gt - p| / gt), sq rel = mean((gt - p)^2 / gt), RMSE =
sqrt(mean((gt - p)^2)), RMSE log = sqrt(mean((log gt - log p)^2)), delta_k = mean(max(gt / p,
p / gt) < 1.25^k); the prediction is resized to the ground truth's full size, then clamped to
FIELD_CLAMP; the mask is field_mask below. The paper's scale-invariant error is not among them.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

import cli
import files
import nyu_raw
import util
from net import KITTI

KITTI_FRAME_HW = KITTI.frame_hw   # Sec. 4.2: frames "downsampled by half (from about 1224x368)"
FIELD_CLAMP = (1e-3, 80.0)    # evaluate_depth.py MIN_DEPTH, MAX_DEPTH: the gt range and the clamp
# The Garg crop as fractions of the ground truth's (H, W): top, bottom, left, right (kitti.md;
# evaluate_depth.py takes int() of each product)
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)

ROOT = 'kitti'   # where train.py, evaluate.py and this script look for raw KITTI by default
ANNOTATED_FOLDER = "KITTI's data_depth_annotated folder (holding train/, val/)"   # --kitti-annotated
SPLIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kitti', 'splits')
SPLIT_FILES = {name: os.path.join(SPLIT_DIR, f'eigen_{name}_files.txt')
               for name in ('train', 'val', 'test')}
CAMERA_FOLDERS = {'l': 'image_02', 'r': 'image_03'}   # kitti.md: l = left colour, r = right
DEPTH_SOURCES = ('camera', 'velodyne', 'annotated')
MISSING_NAMED = 3                          # drives named in the one-line report of missing frames


# ----------------------------------------------------------------------------------------------
# Files: calibration, Velodyne scans, annotated depth, split lists and where each frame lives

def read_calib(path):
    """A KITTI calibration file as {key: float64 array of its numbers, or the text (calib_time)}."""
    files.check_file(path, 'a KITTI calibration file')
    calib = {}
    with open(path, errors='replace') as f:     # not text at all: caught as a line without ':'
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, colon, value = line.partition(':')
            if not colon:
                raise cli.DataError(f'{path}, line {number}: expected `KEY: values`, found '
                                     f'{line.strip()[:60]!r}')
            value = value.strip()
            try:
                calib[key.strip()] = np.array([float(v) for v in value.split()], dtype=np.float64)
            except ValueError:          # calib_time: 09-Jan-2012 13:57:47
                calib[key.strip()] = value
    return calib


def _calib_array(calib, key, size, path):
    """calib[key] as a numeric array of `size` numbers, or a one-line DataError."""
    value = calib.get(key)
    if value is None:
        raise cli.DataError(f'{path}: has no {key} line ({size} numbers expected)')
    if not isinstance(value, np.ndarray) or value.size != size or not np.isfinite(value).all():
        raise cli.DataError(f'{path}: {key} should hold {size} finite numbers, found {str(value)[:60]!r}')
    return value


def camera_number(camera):
    """'l' or 2 -> 2 (image_02, P_rect_02); 'r' or 3 -> 3."""
    number = {'l': 2, 'r': 3, 2: 2, 3: 3, '2': 2, '3': 3}.get(camera)
    if number is None:
        raise ValueError(f"camera {camera!r}: expected 'l' / 2 (left) or 'r' / 3 (right)")
    return number


def projection(calib_dir, camera):
    """The 3x4 matrix taking homogeneous Velodyne points to camera `camera`'s image plane, and the
    image's (H, W), from the date folder's two calibration files (kitti.md, the devkit):
    P_rect_0k @ R_rect_00 (padded to 4x4) @ [[R, T], [0 0 0 1]]. Every camera's frame is S_rect_02's
    size (kitti.md; generate_depth_map)."""
    cam_path = os.path.join(calib_dir, 'calib_cam_to_cam.txt')
    velo_path = os.path.join(calib_dir, 'calib_velo_to_cam.txt')
    cam, velo = read_calib(cam_path), read_calib(velo_path)
    velo_to_cam = np.eye(4)
    velo_to_cam[:3, :3] = _calib_array(velo, 'R', 9, velo_path).reshape(3, 3)   # row-major
    velo_to_cam[:3, 3] = _calib_array(velo, 'T', 3, velo_path)
    rect = np.eye(4)
    rect[:3, :3] = _calib_array(cam, 'R_rect_00', 9, cam_path).reshape(3, 3)
    key = f'P_rect_0{camera_number(camera)}'
    p_rect = _calib_array(cam, key, 12, cam_path).reshape(3, 4)
    width, height = _calib_array(cam, 'S_rect_02', 2, cam_path)
    if width < 1 or height < 1:
        raise cli.DataError(f'{cam_path}: S_rect_02 {width:g} x {height:g} is not an image size')
    return p_rect @ rect @ velo_to_cam, (int(height), int(width))


def read_velodyne(path):
    """A Velodyne scan as (N, 4) float32: x forward, y left, z up (metres), reflectance."""
    files.check_file(path, 'a KITTI Velodyne scan (.bin)')
    size = os.path.getsize(path)
    if size == 0:   # a scan holds about 120,000 points: an empty file is a failed copy
        raise cli.DataError(f'{path}: empty (0 bytes), not a Velodyne scan; copy it again')
    if size % 16:
        raise cli.DataError(f'{path}: {size} bytes, not a whole number of 16-byte points (x, y, z, '
                            f'reflectance as float32); truncated?')
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def read_png(path, what):
    """A PNG as a PIL image, loaded; a missing or unreadable file is one line."""
    from PIL import Image, UnidentifiedImageError
    files.check_file(path, what)
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError) as e:
        raise cli.DataError(f'{path}: not a readable image ({e}); expected {what}') from None


def read_annotated_depth(path):
    """KITTI's annotated depth PNG as (H, W) float32 metres (uint16 / 256), 0 = no depth."""
    img = read_png(path, "KITTI's annotated depth (a 16-bit PNG)")
    if img.mode not in ('I;16', 'I;16B', 'I'):    # Pillow's modes for a 16-bit grey PNG
        raise cli.DataError(f'{path}: a PNG of mode {img.mode}; annotated depth is 16-bit grey '
                            f'(metres = value / 256)')
    return np.asarray(img).astype(np.float32) / 256


def read_image(path):
    """A colour PNG as (H, W, 3) uint8 RGB."""
    img = read_png(path, 'a KITTI colour image (PNG)')
    if img.mode not in ('RGB', 'RGBA', 'P'):
        raise cli.DataError(f'{path}: a {img.mode} image, not colour (image_02 / image_03 are RGB)')
    return np.array(img.convert('RGB'))   # a writable copy (torch.from_numpy warns on read-only)


def read_split(path):
    """A split list's entries: (folder '<date>/<drive>', frame index, camera 'l' | 'r')."""
    files.check_file(path, 'a KITTI split list (`<date>/<drive> <frame> l|r` lines)')
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if (len(fields) != 3 or not fields[1].isdigit() or fields[2] not in CAMERA_FOLDERS
                    or fields[0].count('/') != 1):
                raise cli.DataError(f'{path}, line {number}: expected `<date>/<drive> <frame> l|r`'
                                     f', found {line.strip()[:80]!r}')
            entries.append((fields[0], int(fields[1]), fields[2]))
    return entries


def drive_name(folder):
    """'2011_09_26/2011_09_26_drive_0002_sync' -> '2011_09_26_drive_0002_sync' (unique: it holds
    the date), the scene name of every frame of that drive."""
    return folder.rstrip('/').split('/')[-1]


def image_path(root, entry):
    folder, frame, camera = entry
    return os.path.join(root, folder, CAMERA_FOLDERS[camera], 'data', f'{frame:010d}.png')


def velodyne_path(root, entry):
    folder, frame, _ = entry
    return os.path.join(root, folder, 'velodyne_points', 'data', f'{frame:010d}.bin')


def calib_dir(root, entry):
    """The date folder that holds the drive's calibration files."""
    return os.path.join(root, entry[0].split('/')[0])


def annotated_paths(ann_root, entry):
    """Where the frame's annotated depth may be: data_depth_annotated puts each drive in train/ or
    val/ (the benchmark's split, not Eigen's), so both are candidates."""
    folder, frame, camera = entry
    return [os.path.join(ann_root, part, drive_name(folder), 'proj_depth', 'groundtruth',
                         CAMERA_FOLDERS[camera], f'{frame:010d}.png') for part in ('train', 'val')]


def annotated_path(ann_root, entry):
    """The frame's annotated depth PNG (under train/ or val/), or None if there is none."""
    return next((p for p in annotated_paths(ann_root, entry) if os.path.isfile(p)), None)


# ----------------------------------------------------------------------------------------------
# Depth maps: the devkit's projection, and the reduction to the training frame

def nearest_per_pixel(pixel, depth, size):
    """A flat map of `size` pixels holding, for each pixel, the smallest of the depths whose
    `pixel` index is that pixel, and 0 where none falls. (np.minimum.at, not `map[pixel] = depth`
    in descending order: NumPy does not promise which of repeated indices is written last.)"""
    nearest = np.full(size, np.inf)
    np.minimum.at(nearest, pixel, depth)
    nearest[np.isinf(nearest)] = 0
    return nearest


def velo_to_depth_map(velo_points, calib_dir, camera, depth='camera'):
    """A Velodyne scan projected into camera 'l' / 2 or 'r' / 3 as a sparse (H, W) float32 depth
    map of S_rect_02's size, 0 where no point falls: the KITTI devkit's projection as kitti.md
    states it (and monodepth2's generate_depth_map). `depth`: 'camera' = the point's camera z (w),
    'velodyne' = its Velodyne x (the field's Eigen-split ground truth, vel_depth=True)."""
    if depth not in ('camera', 'velodyne'):
        raise ValueError(f"depth {depth!r}: 'camera' or 'velodyne'")
    to_image, (height, width) = projection(calib_dir, camera)
    points = np.asarray(velo_points, dtype=np.float64)[:, :3]
    points = points[points[:, 0] >= 0]              # points behind the Velodyne dropped (x < 0)
    projected = np.c_[points, np.ones(len(points))] @ to_image.T       # (u', v', w)
    w = projected[:, 2]
    with np.errstate(divide='ignore', invalid='ignore'):   # w = 0: inf / nan, dropped below
        # the devkit is 1-based (MATLAB): pixel column round(u) - 1, row round(v) - 1
        col = np.round(projected[:, 0] / w) - 1
        row = np.round(projected[:, 1] / w) - 1
    inside = (col >= 0) & (row >= 0) & (col < width) & (row < height)
    values = (w if depth == 'camera' else points[:, 0])[inside]
    pixel = row[inside].astype(np.int64) * width + col[inside].astype(np.int64)
    # The nearest point on a pixel wins, then negative depths become 0 (missing), in this order as
    # in the devkit: a point just in front of the Velodyne but behind the camera (0 <= x < 0.27 m,
    # w < 0) blanks its pixel with camera depth.
    depth_map = nearest_per_pixel(pixel, values, height * width).reshape(height, width)
    depth_map[depth_map < 0] = 0
    return depth_map.astype(np.float32)


def reduce_depth_nearest(depth, out_hw=KITTI_FRAME_HW):
    """A full-resolution sparse depth map (0 = missing) -> `out_hw`, keeping for each output pixel
    the nearest valid depth among the input pixels whose centres fall in it: the projection's
    z-buffer rule applied at the coarser grid (averaging would blend a foreground object into the
    background behind it; a resize would mix in the zeros of the missing pixels). Input pixel
    (r, c) has its centre at (r + 0.5, c + 0.5); it falls in output pixel
    (floor((r + 0.5) * out_h / H), floor((c + 0.5) * out_w / W)), the same geometry as the RGB's
    resize (align_corners=False)."""
    height, width = depth.shape
    out_h, out_w = out_hw
    rows, cols = np.nonzero(np.isfinite(depth) & (depth > 0))
    out_rows = ((2 * rows + 1) * out_h) // (2 * height)   # floor((r + 0.5) * out_h / H), exactly
    out_cols = ((2 * cols + 1) * out_w) // (2 * width)
    reduced = nearest_per_pixel(out_rows * out_w + out_cols, depth[rows, cols], out_h * out_w)
    return reduced.reshape(out_hw).astype(np.float32)


def resize_rgb(rgb, out_hw=KITTI_FRAME_HW):
    """(H, W, 3) uint8 -> (3, out_h, out_w) uint8 tensor, antialiased bilinear (as util's
    prepare_image resizes network inputs)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=out_hw, mode='bilinear', align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def full_depth(root, entry, source, ann_root=None):
    """The frame's depth at full resolution, float32 metres, 0 = missing, from `source`:
    'camera' / 'velodyne' (the Velodyne scan projected, camera z / Velodyne x) or 'annotated'."""
    if source == 'annotated':
        if ann_root is None:
            raise ValueError("annotated depth needs ann_root (the data_depth_annotated folder)")
        path = annotated_path(ann_root, entry)
        if path is None:
            raise cli.DataError(f'{annotated_paths(ann_root, entry)[0]}: not found (nor under '
                                 f'val/): no annotated depth for this frame')
        return read_annotated_depth(path)
    if source not in ('camera', 'velodyne'):
        raise ValueError(f'depth source {source!r}: one of {", ".join(DEPTH_SOURCES)}')
    return velo_to_depth_map(read_velodyne(velodyne_path(root, entry)), calib_dir(root, entry),
                             entry[2], source)


def eval_ground_truth(root, entry, gt='velodyne', ann_root=None):
    """The full-resolution ground truth (H, W) float32 metres, 0 = missing, that the field scores a
    prediction against: 'velodyne' = the Velodyne x projected into the frame's camera (the Eigen
    test list's are all left), as monodepth2's export_gt_depth.py exports the Eigen split
    (vel_depth=True); 'camera' = camera z;
    'annotated' = KITTI's annotated depth PNG (the "improved ground truth")."""
    return full_depth(root, entry, gt, ann_root)


def field_mask(gt, min_depth=FIELD_CLAMP[0], max_depth=FIELD_CLAMP[1]):
    """The pixels the field scores (evaluate_depth.py): min < gt < max, inside the Garg crop of the
    ground truth's own size."""
    height, width = gt.shape
    top, bottom, left, right = garg_crop(height, width)
    crop = np.zeros(gt.shape, dtype=bool)
    crop[top:bottom, left:right] = True
    return (gt > min_depth) & (gt < max_depth) & crop


def garg_crop(height, width):
    """The Garg crop's (top, bottom, left, right) bounds, Python slice style, for an H x W map."""
    top, bottom, left, right = GARG_CROP
    return int(top * height), int(bottom * height), int(left * width), int(right * width)


# ----------------------------------------------------------------------------------------------
# The dataset

class KittiFrames(torch.utils.data.Dataset):
    """Frames of raw KITTI (split entries); item i is (3, 184, 612) uint8 RGB and (184, 612) float16
    depth in metres, 0 = missing, decoded on demand, like nyu_raw.RawFrames.

    depth: 'camera' (default, the training target) = the Velodyne scan projected into the frame's
    camera with each point's camera z. That is the depth the network is asked for: the distance
    along the camera's optical axis, the quantity NYU's Kinect depth is too, and the one the scale
    augmentation's rule (image scaled by s, depth divided by s) holds for. Velodyne x, which the
    field's Eigen-split ground truth uses, is measured from the LIDAR, ~0.27 m behind the cameras
    (calib_velo_to_cam T), so it is the image's depth plus an offset. 'velodyne' = that x;
    'annotated' = KITTI's annotated PNGs under ann_root (denser, filtered; not every frame has
    one)."""

    def __init__(self, root, entries, description, depth='camera', ann_root=None):
        if depth not in DEPTH_SOURCES:
            raise ValueError(f'depth {depth!r}: one of {", ".join(DEPTH_SOURCES)}')
        if depth == 'annotated' and ann_root is None:
            raise ValueError("depth='annotated' needs ann_root (the data_depth_annotated folder)")
        self.root, self.entries, self.description = root, list(entries), description
        self.depth_source, self.ann_root = depth, ann_root
        self.scenes = [drive_name(folder) for folder, _, _ in self.entries]
        self.frame_hw = KITTI_FRAME_HW
        # nyu_raw.convert stores depth as uint16 in KITTI's own unit, 1/256 m (that of the annotated
        # PNGs, held exactly): NYU's millimetres would stop at 65.5 m; LIDAR reaches 80 m and more
        self.cache_depth_file, self.cache_units_per_m = 'depths.npy', 256
        # LIDAR depth: the Velodyne HDL-64E measures up to ~120 m, typically ~15 m in the frame;
        # most of it outside this range means a wrong scan or calibration (nyu_raw.DepthCheck)
        self.plausible_depth_m, self.typical_depth_m = (0.1, 200.0), 15.0

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        entry = self.entries[i]
        path = image_path(self.root, entry)
        rgb = read_image(path)
        depth = full_depth(self.root, entry, self.depth_source, self.ann_root)
        check_same_size(path, rgb.shape[:2], depth.shape, self.depth_source)
        return (resize_rgb(rgb, self.frame_hw),
                torch.from_numpy(reduce_depth_nearest(depth, self.frame_hw)).to(torch.float16))


def check_same_size(path, image_hw, depth_hw, source):
    """A frame's image and its depth (the calibration's S_rect_02, or the annotated PNG) must be
    the same size; else one line (a wrong file would be resized and scored silently)."""
    if tuple(depth_hw) != tuple(image_hw):
        raise cli.DataError(f'{path}: {image_hw[1]}x{image_hw[0]} pixels, but its {source} depth is '
                            f'{depth_hw[1]}x{depth_hw[0]} (calib_cam_to_cam.txt S_rect_02, or the '
                            f'annotated PNG)')


def _present(root, entry, depth, ann_root, calib_ok):
    """Whether everything the frame needs is on disk."""
    if not os.path.isfile(image_path(root, entry)):
        return False
    if depth == 'annotated':
        return annotated_path(ann_root, entry) is not None
    return os.path.isfile(velodyne_path(root, entry)) and calib_ok(calib_dir(root, entry))


def test_drives():
    """The drives of the Eigen test split (28): no training frame may come from them."""
    return {drive_name(folder) for folder, _, _ in read_split(SPLIT_FILES['test'])}


def open_kitti(root, split='train', ann_root=None, depth=None):
    """The frames of a split ('train', 'val', 'test', 'paper': the paper's training list built by
    paper_entries, or a list file's path) that are on disk under the raw KITTI `root`, as
    KittiFrames. Depth: annotated PNGs when ann_root is given, else the Velodyne scans with camera
    z (or `depth` as KittiFrames takes it). Missing frames are reported in one printed line and
    left out; none at all is a DataError."""
    files.check_folder(root, 'the raw KITTI folder (holding 2011_09_26/ ...)')
    depth = depth or ('annotated' if ann_root is not None else 'camera')
    if depth == 'annotated' and ann_root is None:
        raise cli.UserError('annotated depth needs the data_depth_annotated folder (ann_root)')
    if ann_root is not None:
        files.check_folder(ann_root, ANNOTATED_FOLDER)
    if split == 'paper':
        entries, counts = paper_entries(root)
        name, details = LIST_NAMES['paper'], f'{LIST_NAMES["paper"]} (Sec. 4.2): {counts}'
    else:
        if split not in SPLIT_FILES:
            files.check_file(split, f'a KITTI split list, or one of {", ".join(SPLIT_FILES)}, paper')
        list_path = SPLIT_FILES.get(split, split)
        entries = read_split(list_path)
        name = details = f'Eigen {split} split' if split in SPLIT_FILES else list_path

    calib_found = {}

    def calib_ok(date_dir):
        if date_dir not in calib_found:
            calib_found[date_dir] = all(os.path.isfile(os.path.join(date_dir, f)) for f in
                                        ('calib_cam_to_cam.txt', 'calib_velo_to_cam.txt'))
        return calib_found[date_dir]

    present = [e for e in entries if _present(root, e, depth, ann_root, calib_ok)]
    needs = ('the colour PNG and its annotated depth PNG' if depth == 'annotated' else
             'the colour PNG, the Velodyne .bin and the date\'s two calib files')
    if not present:
        first = entries[0] if entries else None
        example = f' (e.g. {image_path(root, first)})' if first else ''
        raise cli.DataError(f'{root}: none of the {len(entries)} frames of the {name} found with '
                            f'{needs}{example}; expected raw KITTI\'s <date>/<date>_drive_*_sync '
                            f'folders')
    if len(present) < len(entries):
        kept = set(present)
        drives = sorted({drive_name(e[0]) for e in entries if e not in kept})
        named = ', '.join(drives[:MISSING_NAMED]) + (
            f' and {len(drives) - MISSING_NAMED} more' if len(drives) > MISSING_NAMED else '')
        print(f'{root}: {len(entries) - len(present)} of the {len(entries)} frames of the {name} '
              f'are missing ({needs} needed) in {len(drives)} drive{"s" * (len(drives) != 1)}: '
              f'{named}; using the other {len(present)}')
    source = {'camera': 'Velodyne, camera depth', 'velodyne': 'Velodyne, Velodyne x',
              'annotated': f'annotated depth from {ann_root}'}[depth]
    return KittiFrames(root, present, f'{root} ({details}, {source})', depth, ann_root)


# ----------------------------------------------------------------------------------------------
# The training list: the paper's (Sec. 4.2), or the field's Eigen training list

# --kitti-list of train.py and of this script: 'paper' = the list Sec. 4.2 describes, built from
# the drives on disk (paper_entries); 'eigen' = the field's (kitti/splits/eigen_train_files.txt,
# monodepth2's: 33 drives, 22,600 frames x 2 cameras). Each name is also how a frames'
# description, and so a cache's, says which list it holds.
LIST_NAMES = {'paper': "paper's training list", 'eigen': 'Eigen train split'}
LIST_SPLITS = {'paper': 'paper', 'eigen': 'train'}   # open_kitti's name of each
PER_DRIVE = 800   # Sec. 4.2: "about 800 images per scene", spread evenly over a longer drive
# Sec. 4.2 drops the frames "where the car is stationary (acceleration below a threshold)". (?) We
# drop by speed, not acceleration: a car standing and a car cruising at a steady speed both have an
# acceleration near 0, and only the first is stationary. (?) The threshold is ours: 0.5 m/s (1.8
# km/h), far above the OXTS unit's velocity noise (centimetres a second), below any driving.
STATIONARY_SPEED = 0.5    # m/s, the speed over ground: hypot(vf, vl)
# An OXTS record (raw KITTI's devkit readme, dataformat.txt): one line of 30 numbers, lat lon alt
# roll pitch yaw vn ve vf vl vu ax ay az af al au wx wy wz wf wl wu posacc velacc navstat numsats
# posmode velmode orimode; vf, vl: the forward and leftward velocity parallel to the ground, m/s.
OXTS_NUMBERS, OXTS_VF, OXTS_VL = 30, 8, 9
# Sec. 4.2: 20K unique images of 28 training scenes shuffled into a list of 40K. A list of
# duplicates changes training only if images repeat unequally: (?) the scenes are evened, as NYU's
# list of the same form is "after evening the scene distribution" (Sec. 4.1). Every drive gives
# PER_SCENE images a pass (util.SampleOrder's per_scene, --per-scene; a short drive's images
# repeat more), a pass of 40K on 28 drives, PER_SCENE x drives on ours.
PAPER_LIST_LENGTH, PAPER_TRAIN_SCENES = 40000, 28
PER_SCENE = round(PAPER_LIST_LENGTH / PAPER_TRAIN_SCENES)   # 1429


def training_drives():
    """The folders ('<date>/<drive>') of the drives the paper trains on: raw KITTI's city,
    residential and road drives that are not test drives. No file of a drive says its category;
    the Eigen lists name exactly those 61 drives (raw KITTI's download page: 28 city, 21
    residential, 12 road), 28 of them the test drives, so the other 33, the Eigen training list's,
    are taken. (?) The paper trains on 28 scenes it does not name: which 5 of the 33 it left out
    cannot be told."""
    test = test_drives()
    return sorted({folder for folder, _, _ in read_split(SPLIT_FILES['train'])
                   if drive_name(folder) not in test})


def oxts_path(root, folder, frame):
    return os.path.join(root, folder, 'oxts', 'data', f'{frame:010d}.txt')


def read_speed(path):
    """The car's speed over ground (m/s) in an OXTS record: hypot(vf, vl)."""
    files.check_file(path, 'a KITTI OXTS record (one line of 30 numbers)')
    with open(path, errors='replace') as f:
        text = f.read()
    try:
        numbers = np.array([float(v) for v in text.split()])
    except ValueError:
        numbers = np.array([])
    if len(numbers) != OXTS_NUMBERS or not np.isfinite(numbers[[OXTS_VF, OXTS_VL]]).all():
        raise cli.DataError(f'{path}: expected one line of {OXTS_NUMBERS} numbers (lat lon alt roll '
                            f'pitch yaw vn ve vf vl ...), found {text.strip()[:60]!r}')
    return float(np.hypot(numbers[OXTS_VF], numbers[OXTS_VL]))


def drive_frames(root, folder):
    """The frame indices of a drive's left images on disk (image_02/data/<frame>.png), sorted."""
    folder_path = os.path.join(root, folder, CAMERA_FOLDERS['l'], 'data')
    if not os.path.isdir(folder_path):
        return []
    return sorted(int(name[:-4]) for name in os.listdir(folder_path)
                  if name.endswith('.png') and name[:-4].isdigit())


def paper_entries(root, per_drive=PER_DRIVE, min_speed=STATIONARY_SPEED):
    """The paper's training list (Sec. 4.2) from the drives under `root`: of every training drive
    on disk (training_drives), the frames where the car moves (its OXTS speed at least
    `min_speed`), at most `per_drive` of them spread evenly over the drive, each as two entries, the
    left and the right image ("unassociated shots"). Returns (entries, a line of the counts).
    Frames without an OXTS record are left out and counted; the evening of the drives is the
    training order's (PER_SCENE)."""
    folders = training_drives()
    entries, drives, frames, stationary, no_record = [], 0, 0, 0, 0
    for folder in folders:
        indices = drive_frames(root, folder)
        drives, frames, moving = drives + bool(indices), frames + len(indices), []
        for frame in indices:
            path = oxts_path(root, folder, frame)
            if not os.path.isfile(path):
                no_record += 1
            elif read_speed(path) >= min_speed:
                moving.append(frame)
            else:
                stationary += 1
        entries += [(folder, int(frame), camera) for frame in util.spread(moving, per_drive)
                    for camera in CAMERA_FOLDERS]
    if not drives:
        example = os.path.join(root, folders[0], CAMERA_FOLDERS['l'], 'data')
        raise cli.DataError(f'{root}: none of the {len(folders)} training drives of the paper\'s '
                            f'list found (e.g. {example}); expected raw KITTI\'s '
                            f'<date>/<date>_drive_*_sync folders')
    if no_record == frames:
        raise cli.DataError(f'{os.path.join(root, folders[0], "oxts", "data")} and the like: none of '
                            f'the {frames} frames of {drives} drives has an OXTS record, which the '
                            f"paper's list needs to drop stationary frames (raw KITTI's synced drive "
                            f'downloads hold oxts/); add them, or train on --kitti-list eigen')
    counts = (f'{drives} drives, {frames} frames, {stationary} stationary (speed < {min_speed:g} m/s) '
              f'dropped' + (f', {no_record} without an OXTS record left out' if no_record else '')
              + f', at most {per_drive} a drive: {len(entries) // 2} frames x 2 cameras')
    if not entries:
        raise cli.DataError(f'{root}: every frame of the paper\'s list is stationary ({counts})')
    return entries, counts


def open_training_list(root, kitti_list):
    """The training frames of --kitti-list 'paper' or 'eigen' under the raw KITTI `root`."""
    return open_kitti(root, LIST_SPLITS[kitti_list])


def check_cache_list(frames, kitti_list):
    """A cache converted from the other training list (its description names the list): one
    line."""
    if LIST_NAMES[kitti_list] not in frames.description:
        held = next((k for k, name in LIST_NAMES.items() if name in frames.description), None)
        what = f'the {LIST_NAMES[held]}' if held else 'another list'
        hint = f'train with --kitti-list {held}, or ' if held else ''
        raise cli.DataError(f'{frames.folder}: holds {what}, not the {LIST_NAMES[kitti_list]} '
                            f'(--kitti-list {kitti_list}); {hint}convert it with python kitti.py '
                            f'--kitti-list {kitti_list}')


# ----------------------------------------------------------------------------------------------
# The test set evaluate.py scores (the 697 frames of the Eigen test list)

GROUND_TRUTH = {
    'camera': 'the Velodyne scan projected with the devkit, camera z (the depth trained on)',
    'velodyne': "the Velodyne scan projected, Velodyne x: the field's Eigen-split ground truth "
                "(monodepth2's export_gt_depth.py)",
    'annotated': "KITTI's annotated depth (data_depth_annotated; frames without one are skipped)",
}


class _Images(torch.utils.data.Dataset):
    """The colour frames of split entries at 612x184, as the network sees them (no depth), and
    each one's (H, W) as stored: the size its ground truth must have, and the one predictions are
    resized to for evaluation (also where a frame has no ground truth to take it from)."""

    def __init__(self, root, entries):
        self.root, self.entries = root, entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        rgb = read_image(image_path(self.root, self.entries[i]))
        return resize_rgb(rgb, KITTI_FRAME_HW), rgb.shape[:2]


def open_test_set(root, ann_root=None, workers=4):
    """The Eigen test split's frames under `root` (missing ones reported in one line) as a
    nyu_test.TestSet: 612x184 images in memory, full-resolution ground truth read as scored, of
    the kinds in GROUND_TRUTH ('annotated' with ann_root)."""
    import nyu_test
    frames = open_kitti(root, 'test')
    if ann_root is not None:
        files.check_folder(ann_root, ANNOTATED_FOLDER)
        annotated = sum(annotated_path(ann_root, e) is not None for e in frames.entries)
        if not annotated:
            raise cli.DataError(f'{ann_root}: none of the {len(frames)} test frames has an annotated '
                                f'depth PNG (expected train|val/<drive>/proj_depth/groundtruth/image_02/)')
        print(f'{ann_root}: {annotated} of the {len(frames)} test frames have annotated depth; '
              f'the others are skipped by --gt annotated')
    loader = util.FrameLoader(_Images(root, frames.entries), batch_size=None, num_workers=workers)
    images, stored_hw = zip(*cli.progress(loader, total=len(frames), desc='reading the test images',
                                          unit='frame'))
    images = torch.stack(images)
    kinds = {k: v for k, v in GROUND_TRUTH.items() if k != 'annotated' or ann_root is not None}

    def read(kind, positions):
        for p in positions:
            entry = frames.entries[p]
            if kind == 'annotated' and annotated_path(ann_root, entry) is None:
                yield np.zeros(stored_hw[p], np.float32)   # no pixel: the image is skipped
            else:
                gt = eval_ground_truth(root, entry, kind, ann_root)
                check_same_size(image_path(root, entry), stored_hw[p], gt.shape, kind)
                yield gt

    return nyu_test.TestSet(f'{root} (Eigen test split)', images.permute(0, 2, 3, 1).numpy(), kinds, read)


# ----------------------------------------------------------------------------------------------
# One-time conversion into a memory-mappable cache (nyu_raw.convert, in KITTI's depth unit)

def main(argv=None):
    p = cli.ArgumentParser(description='Convert the training frames of raw KITTI once into the '
                                'memory-mapped cache train.py --dataset kitti reads fastest: RGB at '
                                '612x184 and LIDAR depth (camera z), 0.56 MB a frame (the paper\'s '
                                'list: about 13K frames x 2 cameras, 15 GB; the Eigen list: '
                                '45,200, 25 GB).')
    p.add_argument('--data', default=ROOT, help='the raw KITTI folder (default: %(default)s)')
    p.add_argument('--out', default=os.path.join(ROOT, 'cache'), help='(default: %(default)s)')
    p.add_argument('--kitti-list', choices=tuple(LIST_NAMES), default='paper',
                   help="the training frames: 'paper' = Sec. 4.2's list (moving frames, at most "
                        f"{PER_DRIVE} a drive, both cameras), 'eigen' = the field's Eigen training "
                        'list; train.py --kitti-list must name the same (default: %(default)s)')
    p.add_argument('--workers', type=cli.whole(0), default=4,
                   help='decoding processes (default: %(default)s)')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    args = p.parse_args(argv)
    nyu_raw.check_out(args.out)   # before the frames are looked for, which can take a while
    frames = open_training_list(args.data, args.kitti_list)
    print(frames.description)
    nyu_raw.convert(frames, args.out, args.workers)
    print(f'{len(frames)} frames of {len(set(frames.scenes))} drives -> {args.out}')
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
