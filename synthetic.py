"""The demo's data: synthetic indoor rooms rendered as RGB-D frames, written in exactly the layout of
NYU Depth v2's labeled .mat (HDF5 with a 512-byte user block, MATLAB's reversed axes,
`MATLAB_class` attributes, `scenes` as a cellstr) with a splits.mat like NYU's, so that the demo
and the tests run the real NYU loading path. Synthetic scenes, not NYU."""
import os

import numpy as np

import cli
from files import atomic_write
from util import DEMO_MAT_HEADER, NYU_HW

def _min3(a):
    """a.min(-1) and a.argmin(-1) (the first of equal ones) of an (..., 3) array, component by
    component: numpy's reductions over a last axis of length 3 are several times slower."""
    x, y, z = a[..., 0], a[..., 1], a[..., 2]
    xy = np.minimum(x, y)
    return np.minimum(xy, z), np.where(x <= y, np.where(x <= z, 0, 2), np.where(y <= z, 1, 2))


def render_room(room_rng, view_rng, hw=NYU_HW):
    """One RGB-D frame of a random box room seen by a Kinect-like camera. Long because the
    renderer is one pass (room, boxes, ray casting, shading, sensor) over shared arrays.

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
        t, axis = _min3(t_far)
        hit_dir = np.take_along_axis(rays, axis[..., None], -1)[..., 0]
        label = np.where(axis == 1, np.where(hit_dir < 0, 1, 2), 3).astype(np.uint16)  # floor, ceiling, wall
        normal = np.zeros_like(rays)
        np.put_along_axis(normal, axis[..., None], -np.sign(hit_dir)[..., None], -1)
        instance = np.zeros((h, w), np.uint8)
        for k, (lo, hi) in enumerate(boxes):   # slab test; boxes are labels 4, 5, ...
            t0, t1 = (lo - cam) * inv, (hi - cam) * inv
            tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
            (neg_enter, face), (leave, _) = _min3(-tmin), _min3(tmax)
            enter = -neg_enter
            hit = (enter <= leave) & (enter > 0) & (enter < t)
            t = np.where(hit, enter, t)
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
    512-byte user block holding a MATLAB header, ours util.DEMO_MAT_HEADER): datasets named and shaped as
    MATLAB stores them, axes reversed.

    frames: a sized iterable of (rgb (480, 640, 3) uint8, depth, raw depth, labels, instances).
    scenes: one scene name per frame (the `scenes` cellstr)."""
    import h5py
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
            for i, (rgb, depth, raw, label, inst) in enumerate(cli.progress(
                    frames, progress, total=n, desc='writing synthetic NYU .mat', unit='frame')):
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
        with open(tmp, 'r+b') as f:   # MATLAB's header: 116 bytes of text, then version 2, 'IM'
            f.write(DEMO_MAT_HEADER.ljust(116) + bytes(8) + b'\x00\x02IM')
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
