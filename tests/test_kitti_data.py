"""KITTI data (kitti.py): the devkit's Velodyne projection checked point by point against
projections worked out by hand, annotated depth PNGs, the shipped Eigen split lists, the dataset on
a tiny raw-KITTI tree written in KITTI's exact layout (tests/kitti_tree.py), the missing-frame
report, the 184x612 depth reduction, the field's evaluation mask and the cache conversion."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import kitti
import nyu_raw
import kitti_tree
from helpers import CONVERTER_REFUSALS, SHARED, one_line, refusal


# ----------------------------------------------------------------------------------------------
# The projection, on a small hand-checkable calibration

# f = 50, principal point (40, 20), P_rect_02[0, 3] = 5, P_rect_03[0, 3] = -25, a 100x50 frame,
# Velodyne -> camera: camera = (-y, -z, x) + T with T = (0.1, -0.2, -0.3).
SMALL = kitti_tree.Calib((100, 50), 50.0, 40.0, 20.0, {0: 0.0, 1: 0.0, 2: 5.0, 3: -25.0},
                         velo_t=np.array([0.1, -0.2, -0.3]))


@pytest.fixture
def small_calib(tmp_path):
    kitti_tree.write_calib(tmp_path, SMALL)
    return str(tmp_path)


def velo_point(u, v, z_cam):
    """The Velodyne point that camera 2 sees at (u, v) at camera depth z_cam, inverting SMALL's
    projection by hand: u = (50 x_c + 40 z_c + 5) / z_c, v = (50 y_c + 20 z_c) / z_c, and
    camera = (-y + 0.1, -z - 0.2, x - 0.3)."""
    x_c = (u * z_cam - 40 * z_cam - 5) / 50
    y_c = (v * z_cam - 20 * z_cam) / 50
    return [z_cam + 0.3, 0.1 - x_c, -0.2 - y_c, 0.5]


def project(points, calib_dir, camera='l', depth='camera'):
    return kitti.velo_to_depth_map(np.array(points, dtype=np.float32), calib_dir, camera, depth)


def only_pixel(depth_map):
    """The one non-zero pixel of a depth map: ((row, col), depth)."""
    rows, cols = np.nonzero(depth_map)
    assert len(rows) == 1, f'{len(rows)} pixels hold depth'
    return (rows[0], cols[0]), depth_map[rows[0], cols[0]]


def test_a_point_lands_where_the_devkit_puts_it(small_calib):
    # the point (10.3, -1.0, 0.4): camera x = 1.0 + 0.1 = 1.1, y = -0.4 - 0.2 = -0.6, z = 10.3 - 0.3
    # = 10.0; u = (50 * 1.1 + 40 * 10 + 5) / 10 = 46.0, v = (50 * -0.6 + 20 * 10) / 10 = 17.0;
    # the devkit is 1-based: column 46 - 1 = 45, row 17 - 1 = 16
    point = [10.3, -1.0, 0.4, 0.7]
    depth_map = project([point], small_calib)
    assert depth_map.shape == (50, 100) and depth_map.dtype == np.float32   # S_rect_02 is 100x50
    (row, col), depth = only_pixel(depth_map)
    assert (row, col) == (16, 45)
    assert depth == pytest.approx(10.0, abs=1e-5)                   # camera z
    # Velodyne depth is the point's x, on the same pixel
    assert only_pixel(project([point], small_calib, depth='velodyne')) == ((16, 45), pytest.approx(10.3))
    # the right camera: P_rect_03[0, 3] = -25, u = (55 + 400 - 25) / 10 = 43.0 -> column 42
    assert only_pixel(project([point], small_calib, camera='r'))[0] == (16, 42)
    assert only_pixel(project([point], small_calib, camera=3))[0] == (16, 42)


def test_rectifying_rotation_is_applied_between_velodyne_and_p(tmp_path):
    # R_rect_00 = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]: rectified = (-y_c, x_c, z_c). The point
    # (10.3, -0.9, 0.8) is camera (0.9 + 0.1, -0.8 - 0.2, 10.3 - 0.3) = (1, -1, 10), rectified
    # (1, 1, 10); with P_rect_02[0, 3] = 0: u = (50 + 400) / 10 = 45, v = (50 + 200) / 10 = 25, so
    # column 44, row 24 (without R_rect_00: row 14; with it transposed: column 34, row 14)
    rotated = dataclasses.replace(SMALL, r_rect=np.array([[0., -1., 0.], [1., 0., 0.], [0., 0., 1.]]),
                                  p03={0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})
    kitti_tree.write_calib(tmp_path, rotated)
    (row, col), depth = only_pixel(project([[10.3, -0.9, 0.8, 0]], str(tmp_path)))
    assert (row, col) == (24, 44) and depth == pytest.approx(10.0, abs=1e-5)


def test_several_points_on_one_pixel_keep_the_nearest(small_calib):
    near = [10.3, -1.0, 0.4, 0]          # pixel (16, 45), camera depth 10 (above)
    # camera (2.4, -1.2, 20): u = (120 + 800 + 5) / 20 = 46.25, v = (-60 + 400) / 20 = 17.0: the
    # same pixel, 20 m away
    far = [20.3, -2.3, 1.0, 0]
    for points in ([near, far], [far, near], [far, near, far]):
        assert only_pixel(project(points, small_calib)) == ((16, 45), pytest.approx(10.0, abs=1e-5))
        assert only_pixel(project(points, small_calib, depth='velodyne'))[1] == pytest.approx(10.3)


def test_points_behind_are_dropped_and_negative_depths_blank_a_pixel(small_calib):
    near = [10.3, -1.0, 0.4, 0]
    # x = -4.7 < 0, camera (-0.7, 0.3, -5): u = (50 * -0.7 - 200 + 5) / -5 = 46, v = (50 * 0.3 - 100)
    # / -5 = 17: `near`'s pixel; were it kept, its negative depth would win the pixel and blank it
    behind = [-4.7, 0.8, -0.5, 0]
    assert only_pixel(project([behind, near], small_calib)) == ((16, 45), pytest.approx(10.0, abs=1e-5))
    assert not project([behind], small_calib).any()
    # x = 0.1 >= 0 is kept though its camera z is -0.2 (the Velodyne sits 0.3 m behind the
    # camera): u = (50 * -0.124 - 8 + 5) / -0.2 = 46, v = (50 * 0.012 - 4) / -0.2 = 17: it lands on
    # `near`'s pixel; the devkit takes the smallest depth (-0.2), then sets negatives to 0
    just_in_front = [0.1, 0.224, -0.212, 0]
    assert not project([near, just_in_front], small_calib).any()
    # with Velodyne depth its x (0.1) is the nearest, and positive
    assert only_pixel(project([near, just_in_front], small_calib, depth='velodyne')) == (
        (16, 45), pytest.approx(0.1))


@pytest.mark.parametrize('u, v, pixel', [
    (0.7, 17, (16, 0)), (0.3, 17, None),           # round(0.7) - 1 = 0; round(0.3) - 1 = -1
    (100.3, 17, (16, 99)), (100.7, 17, None),      # column 99 is the last of 100
    (46, 0.7, (0, 45)), (46, 0.3, None),
    (46, 50.3, (49, 45)), (46, 50.7, None),        # row 49 is the last of 50
])
def test_points_outside_the_frame_are_dropped(small_calib, u, v, pixel):
    depth_map = project([velo_point(u, v, 10.0)], small_calib)
    if pixel is None:
        assert not depth_map.any()
    else:
        assert only_pixel(depth_map) == (pixel, pytest.approx(10.0, abs=1e-4))


def test_velodyne_depth_is_camera_depth_plus_the_offset(tree):
    # camera z = x + T_z with kitti_tree's rotation, so on every pixel Velodyne x - camera z = -T_z
    entry = kitti_tree.ENTRIES[0]
    camera = kitti.eval_ground_truth(tree.root, entry, 'camera')
    velodyne = kitti.eval_ground_truth(tree.root, entry, 'velodyne')
    assert camera.shape == (375, 1242) and ((camera > 0) == (velodyne > 0)).all()
    valid = camera > 0
    np.testing.assert_allclose(velodyne[valid] - camera[valid], -kitti_tree.VELO_TO_CAM_T[2], atol=2e-5)


def test_the_tree_projects_back_onto_the_rendered_depth(tree):
    # kitti_tree samples the scan along camera 2's rays at rows 0, 3, ..., columns 0, 4, ...: the
    # projection puts each point back on its pixel with the rendered depth, and nothing elsewhere
    for folder, frame, _ in kitti_tree.ENTRIES:
        rendered = tree.frames[(folder, frame)].depth['l']
        expected = np.zeros_like(rendered)
        expected[::3, ::4] = rendered[::3, ::4]
        got = kitti.velo_to_depth_map(tree.frames[(folder, frame)].points,
                                      kitti.calib_dir(tree.root, (folder, frame, 'l')), 'l')
        assert ((got > 0) == (expected > 0)).all()
        np.testing.assert_allclose(got, expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Files

def test_calibration_file_is_parsed(tree):
    calib = kitti.read_calib(os.path.join(tree.root, '2011_09_26', 'calib_cam_to_cam.txt'))
    assert calib['calib_time'] == '09-Jan-2012 13:57:47'
    assert calib['S_rect_02'].tolist() == [1242, 375]
    assert calib['P_rect_03'].shape == (12,) and calib['P_rect_03'][3] == -3.395242e+02
    assert calib['corner_dist'].tolist() == [0.0995]
    velo = kitti.read_calib(os.path.join(tree.root, '2011_09_26', 'calib_velo_to_cam.txt'))
    assert velo['R'].reshape(3, 3).tolist() == kitti_tree.VELO_TO_CAM_R.tolist()   # row-major


def test_broken_calibration_and_scans_are_one_line(tmp_path):
    kitti_tree.write_calib(tmp_path, SMALL)
    path = tmp_path / 'calib_cam_to_cam.txt'
    path.write_text('\n'.join(l for l in path.read_text().splitlines() if not l.startswith('P_rect_03')))
    with pytest.raises(cli.DataError) as e:
        kitti.velo_to_depth_map(np.zeros((1, 4), np.float32), str(tmp_path), 'r')
    assert 'P_rect_03' in one_line(e)
    path.write_text('S_rect_02 1242 375\n')
    with pytest.raises(cli.DataError) as e:
        kitti.read_calib(str(path))
    assert 'line 1' in one_line(e)
    scan = tmp_path / 'cut.bin'
    scan.write_bytes(np.zeros(7, np.float32).tobytes())             # 1.75 points
    with pytest.raises(cli.DataError) as e:
        kitti.read_velodyne(str(scan))
    assert 'truncated' in one_line(e)
    scan.write_bytes(b'')                                            # a failed copy, not "no points"
    with pytest.raises(cli.DataError, match='cut.bin: empty'):
        kitti.read_velodyne(str(scan))
    for key, numbers in (('S_rect_02', '-100 50'), ('P_rect_02', 'nan ' + '0 ' * 11)):
        kitti_tree.write_calib(tmp_path, SMALL)
        path.write_text(''.join(f'{key}: {numbers}\n' if l.startswith(key) else l + '\n'
                                for l in path.read_text().splitlines()))
        with pytest.raises(cli.DataError, match=key):                 # not a map without depth
            kitti.velo_to_depth_map(np.zeros((1, 4), np.float32), str(tmp_path), 'l')


def test_velodyne_scan_reads_as_written(tmp_path):
    points = np.arange(20, dtype=np.float32).reshape(5, 4) / 3
    kitti_tree.write_velodyne(str(tmp_path / 'a.bin'), points)
    got = kitti.read_velodyne(str(tmp_path / 'a.bin'))
    assert got.dtype == np.float32 and (got == points).all()


def test_annotated_depth_is_value_over_256(tmp_path):
    path = str(tmp_path / 'd.png')
    kitti_tree.write_png(path, np.array([[0, 256], [1000, 65535]], dtype=np.uint16))
    got = kitti.read_annotated_depth(path)
    assert got.dtype == np.float32
    assert got.tolist() == [[0.0, 1.0], [1000 / 256, 65535 / 256]]   # 0 = no depth
    kitti_tree.write_png(path, np.array([[0, 200]], dtype=np.uint8))
    with pytest.raises(cli.DataError) as e:
        kitti.read_annotated_depth(path)
    assert 'mode L' in one_line(e) and '16-bit' in one_line(e)


def test_shipped_split_lists():
    lists = {name: kitti.read_split(path) for name, path in kitti.SPLIT_FILES.items()}
    assert {name: len(entries) for name, entries in lists.items()} == {
        'test': 697, 'train': 45200, 'val': 1776}
    assert lists['test'][0] == ('2011_09_26/2011_09_26_drive_0002_sync', 69, 'l')
    drives = {name: {kitti.drive_name(folder) for folder, _, _ in entries}
              for name, entries in lists.items()}
    assert len(drives['test']) == 28 and len(drives['train']) == 33
    assert not drives['test'] & (drives['train'] | drives['val'])   # no test drive is trained on
    assert {camera for _, _, camera in lists['test']} == {'l'}
    if os.path.isdir(os.path.join(SHARED, 'kitti')):                 # the copies are byte-identical
        for name, path in kitti.SPLIT_FILES.items():
            with open(path, 'rb') as ours, open(os.path.join(SHARED, 'kitti', os.path.basename(path)),
                                                'rb') as theirs:
                assert ours.read() == theirs.read(), name


def test_bad_split_line_is_one_line(tmp_path):
    path = tmp_path / 'split.txt'
    path.write_text('2011_09_26/2011_09_26_drive_0002_sync 69 l\n\n'
                    '2011_09_26/2011_09_26_drive_0002_sync 70 left\n')
    with pytest.raises(cli.DataError) as e:
        kitti.read_split(str(path))
    assert 'line 3' in one_line(e)


def test_paths_follow_kittis_layout():
    entry = ('2011_09_26/2011_09_26_drive_0002_sync', 69, 'r')
    assert kitti.image_path('/k', entry) == \
        '/k/2011_09_26/2011_09_26_drive_0002_sync/image_03/data/0000000069.png'
    assert kitti.image_path('/k', entry[:2] + ('l',)).endswith('_sync/image_02/data/0000000069.png')
    assert kitti.velodyne_path('/k', entry) == \
        '/k/2011_09_26/2011_09_26_drive_0002_sync/velodyne_points/data/0000000069.bin'
    assert kitti.calib_dir('/k', entry) == '/k/2011_09_26'
    assert kitti.annotated_paths('/a', entry) == [
        f'/a/{part}/2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_03/0000000069.png'
        for part in ('train', 'val')]


def test_annotated_depth_is_found_in_train_or_val(tree):
    # kitti_tree puts each day's first drive in train/, the others in val/
    for entry, part in ((kitti_tree.ENTRIES[0], 'train'), (kitti_tree.ENTRIES[2], 'val')):
        path = kitti.annotated_path(tree.ann_root, entry)
        assert path.split(os.sep)[-6] == part
        gt = kitti.eval_ground_truth(tree.root, entry, 'annotated', tree.ann_root)
        written = np.round(tree.frames[entry[:2]].depth[entry[2]] * 256)
        written[::2, ::3] = 0
        assert (gt == written / 256).all()
    assert kitti.annotated_path(tree.ann_root, kitti_tree.ENTRIES[-1]) is None   # the tree's
    with pytest.raises(cli.DataError) as e:                                     # unannotated frame
        kitti.eval_ground_truth(tree.root, kitti_tree.ENTRIES[-1], 'annotated', tree.ann_root)
    assert '0000000107.png' in one_line(e)


def test_image_size_is_the_pngs(tree):
    images = kitti._Images(tree.root, [kitti_tree.ENTRIES[0], kitti_tree.ENTRIES[3]])
    assert images[0][1] == (375, 1242) and images[0][0].shape == (3, 184, 612)
    assert images[1][1] == (370, 1226)


# ----------------------------------------------------------------------------------------------
# The reduction to 184x612 and the dataset

def test_reduction_keeps_the_nearest_depth_of_each_coarse_pixel():
    # 375 rows -> 184: input row r's centre r + 0.5 falls in output row floor((r + 0.5) * 184 / 375):
    # rows 0 and 1 (centres at 0.245, 0.736) -> 0, row 2 (1.227) -> 1, row 374 (183.75) -> 183;
    # 1242 columns -> 612: column 1 (0.739) -> 0, column 2 (1.232) -> 1, 1241 (611.75) -> 611
    depth = np.zeros((375, 1242), np.float32)
    depth[0, 0], depth[1, 1], depth[0, 1] = 5.0, 3.0, 4.0          # one coarse pixel: 3 wins
    depth[2, 0] = 1.0                                              # the next coarse row
    depth[0, 2] = 0.5                                              # the next coarse column
    depth[374, 1241] = 7.0
    depth[200, 600] = np.nan                                       # never valid
    reduced = kitti.reduce_depth_nearest(depth)
    assert reduced.shape == kitti.KITTI_FRAME_HW == (184, 612) and reduced.dtype == np.float32
    assert reduced[0, 0] == 3.0 and reduced[1, 0] == 1.0 and reduced[0, 1] == 0.5
    assert reduced[183, 611] == 7.0 and np.count_nonzero(reduced) == 4


def test_reduction_matches_a_pixel_by_pixel_loop():
    rng = np.random.default_rng(3)
    depth = np.where(rng.random((37, 124)) < 0.3, rng.uniform(1, 80, (37, 124)), 0).astype(np.float32)
    expected = np.zeros((18, 61), np.float32)
    for r, c in zip(*np.nonzero(depth)):
        out = int((r + 0.5) * 18 / 37), int((c + 0.5) * 61 / 124)
        if expected[out] == 0 or depth[r, c] < expected[out]:
            expected[out] = depth[r, c]
    assert (kitti.reduce_depth_nearest(depth, (18, 61)) == expected).all()


def test_frames_are_half_resolution_rgb_and_reduced_camera_depth(tree):
    frames = kitti.KittiFrames(tree.root, tree.entries, 'the tree')
    assert len(frames) == 5 and frames.description == 'the tree'
    assert frames.scenes == [kitti.drive_name(folder) for folder, _, _ in kitti_tree.ENTRIES]
    for i in (0, 2, 3):                  # 2011_09_26 left, right; 2011_09_30 (1226x370) left
        entry = tree.entries[i]
        rgb, depth = frames[i]
        assert rgb.shape == (3, 184, 612) and rgb.dtype == torch.uint8
        assert depth.shape == (184, 612) and depth.dtype == torch.float16
        # the RGB: an antialiased bilinear resize, as PIL's (an independent implementation) does
        with Image.open(kitti.image_path(tree.root, entry)) as img:
            pil = np.asarray(img.resize((612, 184), Image.BILINEAR)).astype(int)
        diff = np.abs(rgb.permute(1, 2, 0).numpy().astype(int) - pil)
        assert diff.mean() < 0.5 and diff.max() <= 3
        # the depth: camera z projected at full size, then the nearest per coarse pixel
        full = kitti.eval_ground_truth(tree.root, entry, 'camera')
        expected = torch.from_numpy(kitti.reduce_depth_nearest(full)).to(torch.float16)
        assert torch.equal(depth, expected)
        assert depth.float().max() <= 57 and (depth > 0).float().mean() > 0.1   # the wall: 8-57 m


def test_frames_from_annotated_depth(tree):
    entry = kitti_tree.ENTRIES[0]
    frames = kitti.KittiFrames(tree.root, [entry], 'annotated', depth='annotated',
                               ann_root=tree.ann_root)
    _, depth = frames[0]
    gt = kitti.read_annotated_depth(kitti.annotated_path(tree.ann_root, entry))
    assert torch.equal(depth, torch.from_numpy(kitti.reduce_depth_nearest(gt)).to(torch.float16))


def test_image_and_depth_of_different_sizes_are_refused(tmp_path):
    entry = kitti_tree.ENTRIES[0]
    tree = kitti_tree.write_tree(tmp_path, [entry])
    wrong = dataclasses.replace(kitti_tree.CALIBS['2011_09_26'], size=(1240, 375))
    kitti_tree.write_calib(kitti.calib_dir(tree.root, entry), wrong)
    with pytest.raises(cli.DataError) as e:
        kitti.KittiFrames(tree.root, [entry], 'x')[0]
    assert '1242x375 pixels' in one_line(e) and '1240x375' in one_line(e)


# ----------------------------------------------------------------------------------------------
# open_kitti: what is on disk

def test_missing_frames_are_reported_in_one_line_and_the_rest_load(tree, tmp_path, capsys):
    listed = tree.entries + [('2011_09_26/2011_09_26_drive_0013_sync', 40, 'l'),   # not on disk
                             ('2011_09_26/2011_09_26_drive_0002_sync', 70, 'l')]   # frame absent
    split = str(tmp_path / 'split.txt')
    kitti_tree.write_split(split, listed)
    frames = kitti.open_kitti(tree.root, split)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert '2 of the 7 frames' in lines[0] and 'in 2 drives' in lines[0]
    assert '2011_09_26_drive_0002_sync' in lines[0] and '2011_09_26_drive_0013_sync' in lines[0]
    assert frames.entries == tree.entries and frames.depth_source == 'camera'
    assert frames[4][0].shape == (3, 184, 612)


def test_missing_scans_or_annotations_count_as_missing(tree, tmp_path, capsys):
    # with ann_root the annotated PNG is what must be there: ENTRIES[-1] has none
    frames = kitti.open_kitti(tree.root, tree.split_file, ann_root=tree.ann_root)
    assert '1 of the 5 frames' in capsys.readouterr().out
    assert len(frames) == 4 and frames.depth_source == 'annotated'
    # a frame without its Velodyne scan, in a tree of its own
    small = kitti_tree.write_tree(tmp_path, kitti_tree.ENTRIES[:2])
    os.remove(kitti.velodyne_path(small.root, kitti_tree.ENTRIES[0]))
    assert len(kitti.open_kitti(small.root, small.split_file)) == 1
    assert '1 of the 2 frames' in capsys.readouterr().out


def test_no_frame_at_all_is_one_line(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(cli.DataError) as e:
        kitti.open_kitti(str(tmp_path / 'empty'), 'test')
    assert 'none of the 697 frames of the Eigen test split' in one_line(e)
    with pytest.raises(cli.DataError) as e:
        kitti.open_kitti(str(tmp_path / 'nowhere'), 'test')
    assert 'not found' in one_line(e)
    with pytest.raises(cli.DataError) as e:
        kitti.open_kitti(str(tmp_path / 'empty'), 'tset')
    assert 'one of train, val, test' in one_line(e)
    assert capsys.readouterr().out == ''


# ----------------------------------------------------------------------------------------------
# The field's evaluation mask

def test_field_mask_is_the_depth_range_inside_the_garg_crop():
    # 375 x 1242: rows int(0.40810811 * 375) = int(153.04) = 153 to int(0.99189189 * 375) =
    # int(371.96) = 371; columns int(0.03594771 * 1242) = int(44.65) = 44 to
    # int(0.96405229 * 1242) = int(1197.35) = 1197 (Python slices: the end excluded)
    gt = np.full((375, 1242), 10.0, np.float32)
    mask = kitti.field_mask(gt)
    assert mask.dtype == bool and mask.sum() == (371 - 153) * (1197 - 44)
    assert mask[153, 44] and mask[370, 1196]
    assert not (mask[152, 500] or mask[371, 500] or mask[200, 43] or mask[200, 1197])
    # the depth range: 1e-3 < gt < 80, both ends excluded
    for value, scored in ((0, False), (1e-3, False), (1.1e-3, True), (79.99, True), (80, False)):
        gt[200, 500] = value
        assert kitti.field_mask(gt)[200, 500] == scored, value
    assert kitti.FIELD_CLAMP == (1e-3, 80)
    assert kitti.field_mask(gt, max_depth=50)[200, 500] == False   # noqa: E712 (a numpy bool)


# ----------------------------------------------------------------------------------------------
# The cache

@pytest.mark.slow
def test_conversion_writes_nyu_raws_layout_with_the_frame_size_and_reads_back(tree, tmp_path):
    frames = kitti.KittiFrames(tree.root, tree.entries[:3], 'three frames')
    out = nyu_raw.convert(frames, str(tmp_path / 'cache'), workers=1, progress=False)
    assert sorted(os.listdir(out)) == ['depths.npy', 'images.npy', 'raw_cache.json']
    with open(os.path.join(out, 'raw_cache.json')) as f:
        meta = json.load(f)
    assert meta == {'source': 'three frames', 'scenes': frames.scenes, 'frame_hw': [184, 612],
                    'depth_file': 'depths.npy', 'depth_units_per_m': 256}
    images = np.load(os.path.join(out, 'images.npy'), mmap_mode='r')
    depths = np.load(os.path.join(out, 'depths.npy'), mmap_mode='r')
    assert images.shape == (3, 184, 612, 3) and depths.shape == (3, 184, 612)
    assert depths.dtype == np.uint16
    for i in range(3):
        rgb, depth = frames[i]
        assert (images[i] == rgb.permute(1, 2, 0).numpy()).all()
        np.testing.assert_allclose(depths[i] / 256, depth.float().numpy(), atol=1 / 512)
    assert not os.path.exists(out + '.partial')
    cached = nyu_raw.CachedFrames(out)   # what train.py --dataset kitti reads
    assert cached.frame_hw == (184, 612) and cached.scenes == frames.scenes
    rgb, depth = cached[2]
    assert torch.equal(rgb, frames[2][0])
    np.testing.assert_allclose(depth.float().numpy(), frames[2][1].float().numpy(), atol=0.07)


def test_a_frame_that_fails_during_conversion_is_one_line(tree, tmp_path):
    # the error is raised in a DataLoader worker, which wraps it in its traceback
    missing = ('2011_09_26/2011_09_26_drive_0002_sync', 99, 'l')
    frames = kitti.KittiFrames(tree.root, [tree.entries[0], missing], 'one frame missing')
    with pytest.raises(cli.DataError) as e:
        nyu_raw.convert(frames, str(tmp_path / 'cache'), workers=1, progress=False)
    assert one_line(e).startswith(kitti.image_path(tree.root, missing) + ': not found')
    assert not os.listdir(tmp_path)                  # nothing half-written left


@pytest.mark.parametrize('option, value, refused', [
    ('--workers', 'two', "argument --workers: 'two' is not a whole number"),
    ('--kitti-list', 'mine', "argument --kitti-list: invalid choice: 'mine'"),
    ('--out', '{raw}', '{raw}: is a folder, but not a cache'), *CONVERTER_REFUSALS])
def test_bad_conversion_options_are_one_line_before_any_work(tree, tmp_path, option, value, refused):
    file = tmp_path / 'a_file'
    file.write_text('mine')
    # --data: the test tree holds no training drive, which would be the next error
    argv = {'--data': tree.root, '--out': str(tmp_path / 'cache'), '--workers': '0'}
    argv[option] = value.format(file=file, raw=tree.root)
    assert refusal(kitti.main, argv).startswith(refused.format(file=file, raw=tree.root))
    assert os.listdir(tmp_path) == ['a_file']


# ----------------------------------------------------------------------------------------------
# The paper's training list (Sec. 4.2): moving frames, at most PER_DRIVE a drive, both cameras,
# the drives evened by the training order

DRIVE_A = '2011_09_26/2011_09_26_drive_0061_sync'   # residential, on the Eigen training list
DRIVE_B = '2011_09_30/2011_09_30_drive_0020_sync'   # residential, on the Eigen training list
CAMPUS = '2011_09_28/2011_09_28_drive_0016_sync'    # a campus drive: not a category Sec. 4.2 uses
# Drive A: frames 0-6, the car standing at frame 2 and creeping at 0.3 m/s at frame 3 (below our
# 0.5 m/s), driving at 8 m/s (kitti_tree.DRIVING_SPEED) otherwise; drive B: frames 0-1, driving.
# Also on disk: a frame of a test drive and one of the campus drive, which the list must leave out.
PAPER_TREE = ([(DRIVE_A, i, 'l') for i in range(7)] + [(DRIVE_B, i, 'l') for i in range(2)]
              + [kitti_tree.ENTRIES[0], (CAMPUS, 0, 'l')])
STATIONARY = {(DRIVE_A, 2): 0.0, (DRIVE_A, 3): 0.3}


@pytest.fixture(scope='module')
def paper_tree(tmp_path_factory):
    calibs = {**kitti_tree.CALIBS, '2011_09_28': kitti_tree.CALIBS['2011_09_26']}
    return kitti_tree.write_tree(tmp_path_factory.mktemp('kitti') / 'raw', PAPER_TREE,
                                 calibs=calibs, speeds=STATIONARY)


def both_cameras(folder, frames):
    return [(folder, frame, camera) for frame in frames for camera in ('l', 'r')]


@pytest.mark.slow
def test_papers_list_drops_stationary_frames_caps_each_drive_and_takes_both_cameras(paper_tree):
    entries, counts = kitti.paper_entries(paper_tree.root)
    # drive A's 5 moving frames and B's 2, each as a left and a right image; no test or campus drive
    assert entries == both_cameras(DRIVE_A, [0, 1, 4, 5, 6]) + both_cameras(DRIVE_B, [0, 1])
    assert counts == ('2 drives, 9 frames, 2 stationary (speed < 0.5 m/s) dropped, at most 800 a '
                      'drive: 7 frames x 2 cameras')
    # at most 3 a drive: A's 5 moving frames spread evenly, the first and the last kept
    entries, counts = kitti.paper_entries(paper_tree.root, per_drive=3)
    assert entries == both_cameras(DRIVE_A, [0, 4, 6]) + both_cameras(DRIVE_B, [0, 1])
    assert counts.endswith('at most 3 a drive: 5 frames x 2 cameras')
    assert kitti.PER_DRIVE == 800 and len(kitti.training_drives()) == 33   # Sec. 4.2; 61 - 28


def test_papers_list_trains_evened_across_drives_to_the_40k_list(paper_tree, capsys):
    import data
    import train
    import util
    args = train.parse_args(['--dataset', 'kitti', '--data', paper_tree.root, '--workers', '0'])
    assert args.kitti_list == 'paper' and args.per_scene == 1429   # 40K / 28 scenes = 1428.6
    train_set, val, scenes = data.load_data(args, torch.device('cpu'))
    out = capsys.readouterr().out.splitlines()
    # one line: drives, frames before and after the stationary filter, the cap, the list length
    # (the validation share, 10% of 14 images, holds out one of the two drives)
    assert out == [f"{paper_tree.root} (paper's training list (Sec. 4.2): 2 drives, 9 frames, 2 "
                   f"stationary (speed < 0.5 m/s) dropped, at most 800 a drive: 7 frames x 2 "
                   f"cameras, Velodyne, camera depth): {len(train_set)} training frames of 1 "
                   f"drives, {len(val)} validation frames of 1 held-out drives; none of the test "
                   f"drives; evened to 1429 a drive: a list of 1429 a pass"]
    # the evening, over both drives: a pass draws every drive 1429 times, B's 4 images as often
    # as A's 10, each of them 357 or 358 times
    frames = kitti.open_kitti(paper_tree.root, 'paper')
    order = util.SampleOrder(len(frames), 0, frames.scenes, args.per_scene)
    drawn = np.bincount(order.indices(0, 2 * 1429), minlength=len(frames))
    by_drive = {drive: drawn[[s == drive for s in frames.scenes]] for drive in set(frames.scenes)}
    assert {d: int(n.sum()) for d, n in by_drive.items()} == {kitti.drive_name(DRIVE_A): 1429,
                                                              kitti.drive_name(DRIVE_B): 1429}
    assert set(by_drive[kitti.drive_name(DRIVE_B)]) <= {357, 358}


@pytest.mark.parametrize('argv, kitti_list, per_scene', [
    (['--dataset', 'kitti'], 'paper', 1429),
    (['--dataset', 'kitti', '--kitti-list', 'eigen'], 'eigen', 0),       # the field's: shuffled
    (['--dataset', 'kitti', '--kitti-list', 'eigen', '--per-scene', '700'], 'eigen', 700),
    (['--dataset', 'kitti', '--per-scene', '0'], 'paper', 0)])
def test_kitti_list_sets_the_evening(argv, kitti_list, per_scene):
    import train
    args = train.parse_args(argv)
    assert (args.kitti_list, args.per_scene) == (kitti_list, per_scene)


def test_kitti_list_without_kitti_and_bad_oxts_records_are_one_line(tmp_path, capsys):
    import train
    with pytest.raises(cli.UserError) as e:
        train.parse_args(['--kitti-list', 'paper'])
    assert one_line(e).startswith('--kitti-list: the KITTI training list; give it with --dataset kitti')
    with pytest.raises(cli.UserError) as e:
        train.parse_args(['--dataset', 'kitti', '--kitti-list', 'mine'])
    assert 'argument --kitti-list' in one_line(e)
    record = tmp_path / 'oxts.txt'
    for text in ('', '1 2 3\n', ' '.join(['0'] * 29 + ['x'])):
        record.write_text(text)
        with pytest.raises(cli.DataError) as e:
            kitti.read_speed(str(record))
        assert one_line(e).startswith(f'{record}: expected one line of 30 numbers')
    kitti_tree.write_oxts(str(record), 3.0)
    assert kitti.read_speed(str(record)) == pytest.approx(3.0)


def test_frames_without_oxts_records_are_counted_and_none_at_all_is_one_line(tmp_path):
    tree = kitti_tree.write_tree(tmp_path / 'raw', [(DRIVE_B, 0, 'l'), (DRIVE_B, 1, 'l')])
    os.remove(kitti.oxts_path(tree.root, DRIVE_B, 1))
    entries, counts = kitti.paper_entries(tree.root)
    assert entries == both_cameras(DRIVE_B, [0])
    assert counts == ('1 drives, 2 frames, 0 stationary (speed < 0.5 m/s) dropped, 1 without an OXTS '
                      'record left out, at most 800 a drive: 1 frames x 2 cameras')
    os.remove(kitti.oxts_path(tree.root, DRIVE_B, 0))
    with pytest.raises(cli.DataError) as e:
        kitti.paper_entries(tree.root)
    assert 'none of the 2 frames of 1 drives has an OXTS record' in one_line(e)
    assert one_line(e).endswith('or train on --kitti-list eigen')
    with pytest.raises(cli.DataError) as e:
        kitti.paper_entries(str(tmp_path))
    assert "none of the 33 training drives of the paper's list found" in one_line(e)
