"""A tiny raw-KITTI tree in KITTI's exact on-disk layout (kitti/README.md), for tests:

  <root>/<date>/calib_cam_to_cam.txt, calib_velo_to_cam.txt        the real text formats
  <root>/<date>/<drive>/image_02|image_03/data/<frame:010d>.png    8-bit RGB, the date's real size
  <root>/<date>/<drive>/velodyne_points/data/<frame:010d>.bin      float32 x, y, z, reflectance
  <root>/<date>/<drive>/oxts/data/<frame:010d>.txt                  30 numbers (GPS/IMU), one line
  <ann_root>/train|val/<drive>/proj_depth/groundtruth/image_02|image_03/<frame:010d>.png  uint16

The scene is learnable: a flat road (camera 1.65 m above it) ending at a wall whose distance
changes from frame to frame; the road's brightness falls with distance and the wall's redness says
how far it is, so the image predicts the depth. The Velodyne scan is sampled along camera 2's pixel
rays (u = col + 1, v = row + 1: the devkit's 1-based pixels), so projecting it back into camera 2
gives the rendered depth exactly on those pixels; a few points lie behind the car (x < 0) and
outside the view. The calibration is close to the real one (2011_09_26's focal and principal point,
its Velodyne-to-camera T and camera baselines) but with exact axis-permutation rotations and an
identity R_rect_00, so tests can work out projections by hand.

    tree = write_tree(tmp_path / 'raw', ENTRIES, ann_root=tmp_path / 'ann')
    tree.entries, tree.split_file, tree.frames[(folder, frame)].points / .depth['l'], tree.calib[date]
"""
import dataclasses
import os

import numpy as np
from PIL import Image

# Eigen test-list frames of two drives each of two days (kitti/splits/eigen_test_files.txt)
ENTRIES = [
    ('2011_09_26/2011_09_26_drive_0002_sync', 69, 'l'),
    ('2011_09_26/2011_09_26_drive_0002_sync', 54, 'l'),
    ('2011_09_26/2011_09_26_drive_0009_sync', 16, 'r'),
    ('2011_09_30/2011_09_30_drive_0016_sync', 132, 'l'),
    ('2011_09_30/2011_09_30_drive_0018_sync', 107, 'r'),
]

# The Velodyne-to-camera-0 rotation: Velodyne (x forward, y left, z up) -> camera (x right, y down,
# z forward), i.e. camera = (-y, -z, x) + T. The real one is this within about a degree.
VELO_TO_CAM_R = np.array([[0., -1., 0.], [0., 0., -1.], [1., 0., 0.]])
VELO_TO_CAM_T = np.array([-4.069766e-03, -7.631618e-02, -2.717806e-01])   # 2011_09_26's
CAMERA_HEIGHT = 1.65     # metres above the road (KITTI's rig)
DRIVING_SPEED = 8.0      # m/s, every frame's OXTS speed unless write_tree is given another
WALL_HEIGHT = 4.0        # metres above the road
SKY = (150, 190, 235)


@dataclasses.dataclass
class Calib:
    """One day's calibration: image size, rectified focal and principal point, P_rect_0k[0, 3]."""
    size: tuple          # S_rect_0x: (W, H)
    f: float
    cx: float
    cy: float
    p03: dict            # camera number -> P_rect_0k[0, 3] = f * baseline offset
    r_rect: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    velo_r: np.ndarray = dataclasses.field(default_factory=lambda: VELO_TO_CAM_R.copy())
    velo_t: np.ndarray = dataclasses.field(default_factory=lambda: VELO_TO_CAM_T.copy())

    def p_rect(self, camera):
        return np.array([[self.f, 0, self.cx, self.p03[camera]], [0, self.f, self.cy, 0],
                         [0, 0, 1, 0]])


# Sizes, focals and principal points of the real days; P_rect_02/03[0, 3] of 2011_09_26 for both
CALIBS = {
    '2011_09_26': Calib((1242, 375), 721.5377, 609.5593, 172.854,
                        {0: 0.0, 1: -3.875744e+02, 2: 4.485728e+01, 3: -3.395242e+02}),
    '2011_09_30': Calib((1226, 370), 707.0912, 601.8873, 183.1104,
                        {0: 0.0, 1: -3.798145e+02, 2: 4.688783e+01, 3: -3.334597e+02}),
}


@dataclasses.dataclass
class Frame:
    points: np.ndarray   # the Velodyne scan written, (N, 4) float32
    depth: dict          # camera 'l' / 'r' -> rendered (H, W) float32 camera depth, 0 = sky
    wall: float          # the wall's distance (camera z), metres


@dataclasses.dataclass
class Tree:
    root: str
    ann_root: str
    entries: list
    split_file: str
    frames: dict         # (folder, frame) -> Frame
    calib: dict          # date -> Calib


def _numbers(values):
    return ' '.join(f'{v:e}' for v in np.ravel(values))


def write_calib(date_dir, calib):
    """calib_cam_to_cam.txt and calib_velo_to_cam.txt in the real files' format and line order."""
    os.makedirs(date_dir, exist_ok=True)
    w, h = calib.size
    lines = ['calib_time: 09-Jan-2012 13:57:47', 'corner_dist: 9.950000e-02']
    for cam in range(4):
        k = np.array([[calib.f, 0, calib.cx], [0, calib.f, calib.cy], [0, 0, 1]])
        lines += [f'S_{cam:02d}: {_numbers([1392, 512])}',          # the unrectified sensor
                  f'K_{cam:02d}: {_numbers(k)}',
                  f'D_{cam:02d}: {_numbers([-0.37, 0.2, 0.002, 0.001, -0.07])}',
                  f'R_{cam:02d}: {_numbers(np.eye(3))}',
                  f'T_{cam:02d}: {_numbers([calib.p03[cam] / calib.f, 0, 0])}',
                  f'S_rect_{cam:02d}: {_numbers([w, h])}',
                  f'R_rect_{cam:02d}: {_numbers(calib.r_rect if cam == 0 else np.eye(3))}',
                  f'P_rect_{cam:02d}: {_numbers(calib.p_rect(cam))}']
    with open(os.path.join(date_dir, 'calib_cam_to_cam.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(date_dir, 'calib_velo_to_cam.txt'), 'w') as f:
        f.write(f'calib_time: 15-Mar-2012 11:37:16\nR: {_numbers(calib.velo_r)}\n'
                f'T: {_numbers(calib.velo_t)}\ndelta_f: {_numbers([0, 0])}\n'
                f'delta_c: {_numbers([0, 0])}\n')


def write_velodyne(path, points):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.asarray(points, dtype=np.float32).tofile(path)


def write_oxts(path, speed, heading=0.6):
    """An OXTS record as raw KITTI writes it: one line of 30 numbers in the devkit readme's order
    (lat lon alt roll pitch yaw vn ve vf vl vu ax ay az af al au wx wy wz wf wl wu posacc velacc
    navstat numsats posmode velmode orimode), the car driving at `speed` m/s towards `heading`
    (rad, 0 = east): vf = speed, vl = 0. The accelerations are a steady car's whatever the speed
    (ax, ay near 0; az, au near 9.8 m/s^2, gravity, which raw KITTI's records hold)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ve, vn = speed * np.cos(heading), speed * np.sin(heading)
    numbers = [49.011212804408, 8.4228850417969, 112.83492279053, 0.022447, 1e-05, heading,
               vn, ve, speed, 0.0, 0.017, 0.05, -0.02, 9.81, 0.05, -0.02, 9.81, 0.001, -0.002, 0.003,
               0.001, -0.002, 0.003, 0.45, 0.02, 4, 10, 4, 4, 0]
    with open(path, 'w') as f:
        f.write(' '.join(f'{v:.12g}' for v in numbers) + '\n')


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def write_split(path, entries):
    """A split list in the Eigen lists' format."""
    os.makedirs(os.path.dirname(os.fspath(path)) or '.', exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(f'{folder} {frame:010d} {camera}\n' for folder, frame, camera in entries)


def camera_offset(calib, camera):
    """Camera 2's or 3's centre along x in rectified camera-0 coordinates: P = K [I | (t, 0, 0)]
    puts it at x = -t, t = P_rect_0k[0, 3] / f."""
    return -calib.p03[{'l': 2, 'r': 3}[camera]] / calib.f


def render(calib, camera, wall):
    """The scene seen by camera 'l' or 'r': (H, W, 3) uint8 RGB, (H, W) camera depth (0 = sky), and
    the rays' x, y per unit depth, for pixel (row, col) at the devkit's u = col + 1, v = row + 1."""
    w, h = calib.size
    ray_x = (np.arange(w) + 1 - calib.cx) / calib.f
    ray_y = (np.arange(h) + 1 - calib.cy) / calib.f
    ray_x, ray_y = np.meshgrid(ray_x, ray_y)
    with np.errstate(divide='ignore'):
        road = np.where(ray_y > 0, CAMERA_HEIGHT / ray_y, np.inf)   # where the ray meets the road
    on_wall = (road >= wall) & (wall * ray_y >= CAMERA_HEIGHT - WALL_HEIGHT)
    depth = np.where(road < wall, road, np.where(on_wall, wall, 0.0))
    # colours from the world position (x in camera-0 coordinates): tiles on the road and the wall
    world_x = depth * ray_x + camera_offset(calib, camera)
    tile = ((np.floor(world_x) + np.floor(np.where(road < wall, depth, depth * ray_y))) % 2) * 24
    brightness = 60 + 150 * np.exp(-depth / 25)
    rgb = np.empty((h, w, 3))
    rgb[...] = SKY
    is_road = road < wall
    rgb[is_road] = np.stack([brightness, brightness, brightness], -1)[is_road]
    redness = 255 - 3 * wall
    rgb[on_wall] = [redness, 60, 40]
    rgb[..., 2] += np.where(depth > 0, tile, 0)
    return np.clip(rgb, 0, 255).astype(np.uint8), depth.astype(np.float32), ray_x, ray_y


def velodyne_scan(calib, depth, ray_x, ray_y, rng, every=(3, 4)):
    """Points along camera 2's rays at every (3rd row, 4th column) pixel that sees the scene, in
    Velodyne coordinates, plus points behind the car and far outside the view."""
    rows, cols = every
    picked = np.zeros(depth.shape, dtype=bool)
    picked[::rows, ::cols] = True
    picked &= depth > 0
    z = depth[picked].astype(np.float64)
    rect = np.stack([z * ray_x[picked] + camera_offset(calib, 'l'), z * ray_y[picked], z], -1)
    cam0 = rect @ calib.r_rect                                # R_rect^-1 = R_rect^T
    velo = (cam0 - calib.velo_t) @ calib.velo_r               # R^-1 = R^T
    behind = np.c_[-rng.uniform(1, 30, 50), rng.uniform(-10, 10, 50), rng.uniform(-1.7, 1, 50)]
    aside = np.c_[rng.uniform(0.5, 3, 50), rng.choice([-40, 40], 50), rng.uniform(-1.7, 1, 50)]
    xyz = np.concatenate([velo, behind, aside])
    reflectance = rng.uniform(0, 1, (len(xyz), 1))
    return np.concatenate([xyz, reflectance], 1).astype(np.float32)


def write_tree(root, entries=ENTRIES, ann_root=None, unannotated=(), calibs=CALIBS, seed=0,
               split_file=None, speeds=None):
    """Write every frame of `entries` (both cameras, the scan, the OXTS record, the day's
    calibration) under `root`, annotated depth for both cameras under `ann_root` (if given; the
    first drive of each day in train/, the others in val/, except the (folder, frame) pairs in
    `unannotated`) and the entries as a split list (default <root>/split.txt). `speeds`: (folder,
    frame) -> the car's speed in m/s (default DRIVING_SPEED). Returns a Tree of what was written."""
    root = os.fspath(root)
    rng = np.random.default_rng(seed)
    frames = {}
    unannotated = set(unannotated)
    drives = sorted({folder for folder, _, _ in entries})
    first_drive = {}
    for folder in drives:
        first_drive.setdefault(folder.split('/')[0], folder)
    for folder, frame in sorted({(e[0], e[1]) for e in entries}):
        date = folder.split('/')[0]
        calib = calibs[date]
        if not os.path.isfile(os.path.join(root, date, 'calib_velo_to_cam.txt')):
            write_calib(os.path.join(root, date), calib)
        wall = 8.0 + 7.0 * ((frame + drives.index(folder)) % 8)   # 8 .. 57 m, by frame
        depth = {}
        for camera, image in (('l', 'image_02'), ('r', 'image_03')):
            rgb, depth[camera], ray_x, ray_y = render(calib, camera, wall)
            write_png(os.path.join(root, folder, image, 'data', f'{frame:010d}.png'), rgb)
            if camera == 'l':
                points = velodyne_scan(calib, depth['l'], ray_x, ray_y, rng)
            if ann_root is not None and (folder, frame) not in unannotated:
                part = 'train' if first_drive[date] == folder else 'val'
                ann = np.round(depth[camera] * 256).astype(np.uint16)
                ann[::2, ::3] = 0                                  # holes, as real maps have
                write_png(os.path.join(os.fspath(ann_root), part, folder.split('/')[1], 'proj_depth',
                                       'groundtruth', image, f'{frame:010d}.png'), ann)
        write_velodyne(os.path.join(root, folder, 'velodyne_points', 'data', f'{frame:010d}.bin'),
                       points)
        write_oxts(os.path.join(root, folder, 'oxts', 'data', f'{frame:010d}.txt'),
                   (speeds or {}).get((folder, frame), DRIVING_SPEED))
        frames[(folder, frame)] = Frame(points, depth, wall)
    split_file = os.fspath(split_file or os.path.join(root, 'split.txt'))
    write_split(split_file, entries)
    return Tree(root, None if ann_root is None else os.fspath(ann_root), list(entries), split_file,
                frames, dict(calibs))
