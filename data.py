"""The data of train.py: which set it trains on (the labeled .mat, raw frames, the synthetic
demo), the validation frames held out of it, and the training batches: each step's frames and
augmentation draws (util.SampleOrder), drawn a block at a time and augmented on the device.
"""
import os

import numpy as np
import torch

import cli
import kitti
import nyu_raw
import synthetic
import util
from net import KITTI

DATASETS = ('nyu', 'kitti')
LABELED = os.path.join('nyu', 'nyu_depth_v2_labeled.mat')
SPLITS = os.path.join('nyu', 'splits.mat')
# The demo: synthetic rooms in NYU's labeled layout (train.py holds its short schedule)
DEMO_FOLDER = os.path.join('nyu', 'synthetic')
DEMO_SCENES, DEMO_VIEWS = 30, 6
RAW_VAL_FRAMES = 300   # validation frames decoded into memory from held-out raw scenes


def add_data_options(p, demo_help):
    """train.py's data options (the training set, its validation share, scene balancing)."""
    d = p.add_argument_group('data')
    d.add_argument('--dataset', choices=DATASETS, default='nyu',
                   help="'nyu': NYU Depth v2 (Sec. 4.1); 'kitti': raw KITTI, tested on the Eigen "
                        'split (Sec. 4.2: 576x172 crops, LIDAR depth, its own schedule; docs/kitti.md) '
                        '(default: %(default)s)')
    d.add_argument('--data',
                   help=f'training set: the NYU Depth v2 labeled .mat (MATLAB v7.3), or raw frames '
                        f"(docs/data.md): a BTS list .txt, DenseDepth's nyu_data.zip, a folder of "
                        f'rgb_*/depth_* pairs or a folder converted by nyu_raw.py or nyu_dumps.py (default: '
                        f'{LABELED}); --dataset kitti: the raw KITTI folder, or the cache kitti.py '
                        f'converted it into (default: {kitti.ROOT})')
    d.add_argument('--data-format', choices=('auto', 'labeled') + nyu_raw.FORMATS, default='auto',
                   help='(default: %(default)s: by the name of --data)')
    d.add_argument('--data-root', help="BTS: the folder the list's paths are relative to "
                                       "(default: the list file's folder)")
    d.add_argument('--depth-scale', type=cli.real(above=0),
                   help='a plain folder: metres per depth PNG unit (0.001 for millimetres)')
    d.add_argument('--labeled', default=LABELED,
                   help='with raw frames: the labeled .mat whose test scenes (with --splits) are '
                        'refused in training (default: %(default)s)')
    d.add_argument('--splits', default=SPLITS,
                   help="NYU's official train/test split (default: %(default)s)")
    d.add_argument('--per-scene', type=cli.whole(0), default=None,
                   help=f'draw N frames of every scene per pass (Sec. 4.1: the distribution '
                        f'evened to {nyu_raw.PER_SCENE} per scene); 0 = every frame once per pass '
                        f'(default: {nyu_raw.PER_SCENE} for raw frames, 0 for the labeled set; '
                        f'KITTI: {kitti.PER_SCENE} with --kitti-list paper, 0 with eigen)')
    d.add_argument('--kitti-list', choices=tuple(kitti.LIST_NAMES),
                   help="--dataset kitti's training frames: 'paper' = Sec. 4.2's list (frames where "
                        f'the car moves, at most {kitti.PER_DRIVE} a drive, left and right images, '
                        f'each drive evened to {kitti.PER_SCENE} images a pass: the paper\'s '
                        f'{kitti.PAPER_LIST_LENGTH // 1000}K over its 28 drives); '
                        "'eigen' = the field's Eigen training list (monodepth2's, 22,600 frames x "
                        "2), shuffled (default: paper)")
    d.add_argument('--workers', type=cli.whole(0), default=min(8, os.cpu_count() or 1),
                   help='DataLoader processes: decoding raw frames, and augmenting with '
                        '--path plain (default: %(default)s)')
    d.add_argument('--demo', action='store_true',
                   help=f'train on synthetic rooms written in NYU format to {DEMO_FOLDER}/ (made on '
                        f'first use) {demo_help}')
    d.add_argument('--train-depth', choices=['raw', 'filled'], default='raw',
                   help="training targets: 'raw' Kinect depth with holes masked, as the paper "
                        "(Sec. 4.1: missing values not filled), or the labeled set's inpainted "
                        "'filled' depths (default: %(default)s). Validation always uses filled.")
    d.add_argument('--val-fraction', type=cli.real(low=0), default=0.1,
                   help='share of the training images (whole scenes) held out for validation; '
                        "the test split is never used here. 0: no validation, every training "
                        "scene trains, as the paper's final models (its validation set was "
                        '"folded back into the training set for our final evaluations") '
                        '(default: %(default)s)')

def check_data_options(p, a):
    if a.demo:
        refuse_data_with_demo(p, a, SPLITS)
    if a.dataset == 'kitti':
        nyu_only = [o for o, given in (('--demo', a.demo), ('--train-depth filled', a.train_depth == 'filled'),
                                       ('--data-format', a.data_format != 'auto')) if given]
        if nyu_only:
            p.error(f'{", ".join(nyu_only)}: NYU\'s, not KITTI\'s (docs/kitti.md)')
        a.data = a.data or kitti.ROOT
        a.data_format = 'kitti'
        a.kitti_list = a.kitti_list or 'paper'
        if a.per_scene is None:   # Sec. 4.2: the 40K list "after evening the scene distribution"
            a.per_scene = kitti.PER_SCENE if a.kitti_list == 'paper' else 0
    else:
        if a.kitti_list:
            p.error('--kitti-list: the KITTI training list; give it with --dataset kitti')
        a.data = a.data or LABELED
        if a.data_format == 'auto':
            a.data_format = 'labeled' if a.demo else nyu_raw.detect_format(a.data)
        if a.per_scene is None:
            a.per_scene = 0 if a.data_format == 'labeled' else nyu_raw.PER_SCENE
    if not a.val_fraction < 1:
        p.error(f'argument --val-fraction: {a.val_fraction:g} must be below 1 (a share of the '
                f'training images)')


def refuse_data_with_demo(p, a, default_splits):
    """--demo brings its own data: a --data or --splits beside it is refused, not ignored."""
    given = [option for option, is_given in (('--data', a.data is not None),
                                             ('--splits', a.splits != default_splits)) if is_given]
    if given:
        p.error(f'{" and ".join(given)}: --demo uses its synthetic rooms ({DEMO_FOLDER}/); give '
                f'either --demo or {" and ".join(given)}')


def demo_paths():
    """The synthetic demo's .mat and splits.mat, rendered on first use, and again when they do not
    read (cut short: a copy, a full disk; the checks take milliseconds: the frames are not read)."""
    data, splits = (os.path.join(DEMO_FOLDER, 'synthetic_labeled.mat'),
                    os.path.join(DEMO_FOLDER, 'synthetic_splits.mat'))
    if not (os.path.isfile(data) and os.path.isfile(splits)):
        print(f'making the synthetic demo data in {DEMO_FOLDER}/ (once)')
    else:
        try:
            util.read_splits(splits, len(util.read_scene_names(data)))
            return data, splits
        except cli.DataError as e:   # "<file>: <what is wrong>; <what to do>": the first two
            print(f'note: {str(e).split(";")[0]}; making the synthetic demo data again')
    synthetic.make_synthetic_nyu(DEMO_FOLDER, DEMO_SCENES, DEMO_VIEWS, seed=0)
    return data, splits


def load_data(args, device):
    """(training set, validation Frames, scene of each training frame); with --path fast the
    in-memory training frames are moved to `device` (uint8 on the GPU: 0.4 MB a frame, 0.3 GB for
    the labeled set)."""
    train, val, scenes = _load(args, device)
    if not len(val):
        print('no validation: every training scene trains (--val-fraction 0), as the paper\'s final '
              'models; the history has no validation columns filled' if args.val_fraction == 0 else
              f'no validation: no scene could be held out for --val-fraction {args.val_fraction:g} '
              f'(one training scene?); the history has no validation columns filled')
    if args.path == 'fast' and isinstance(train, util.Frames):
        train.to(device)
    return train, val, scenes


def _load(args, device):
    """(training set, validation Frames, scene of each training frame). The labeled set is held in
    memory; a converted raw-frame cache is loaded onto `device` for --path fast (when it fits);
    other raw frames stay on disk and are decoded as drawn (DataLoader workers)."""
    if args.demo:
        args.data, args.splits = demo_paths()
    if args.dataset == 'kitti':
        return load_kitti(args, device)
    if args.data_format == 'labeled':
        return load_labeled(args)
    frames = nyu_raw.open_raw(args.data, args.data_format, args.data_root, args.depth_scale)
    if isinstance(frames, nyu_raw.CachedFrames):
        check_frame_size(frames, util.FRAME_HW, 'a KITTI cache trains with --dataset kitti')
    nyu_raw.refuse_test_scenes(frames, nyu_raw.test_scenes(args.labeled, args.splits))
    train, val, scenes, _ = _hold_out_scenes(frames, args, device)
    print(f'{frames.description}: {len(train)} training frames of {len(set(scenes))} scenes, '
          f'{len(val)} validation frames of held-out scenes; none of the test split\'s scenes')
    return train, val, scenes


def _hold_out_scenes(frames, args, device):
    """(training set, validation Frames, scene of each training frame, held-out scenes) of a
    raw-frame set: whole scenes (drives) held out (--val-fraction), RAW_VAL_FRAMES of their frames
    in memory; the training frames held on the GPU for --path fast when they are a cache (no
    decoding, no workers), else decoded as drawn."""
    train_idx, val_idx = util.split_train_val(np.arange(len(frames)), frames.scenes,
                                              args.val_fraction, args.seed)
    val = util.Frames.from_dataset(frames, util.spread(val_idx, RAW_VAL_FRAMES), min(args.workers, 4),
                                   frames.frame_hw)
    if args.path == 'fast' and isinstance(frames, nyu_raw.CachedFrames):
        train = frames.to_frames(train_idx, device)
    else:
        train = torch.utils.data.Subset(frames, list(map(int, train_idx)))
    return train, val, [frames.scenes[i] for i in train_idx], {frames.scenes[i] for i in val_idx}


def load_kitti(args, device):
    """KITTI, Sec. 4.2: the training frames of --kitti-list (the paper's list, or the field's
    Eigen training list; left and right images as separate shots), a frame of a test drive
    refused; the paper's list is evened across drives by the training order (--per-scene).
    Validation: whole training drives held out (--val-fraction), RAW_VAL_FRAMES of their frames in
    memory. Not the Eigen validation list: its 1,776 frames lie one frame (0.1 s) from a training
    frame, so they score like training frames. --data: the raw KITTI folder, or a cache from
    `python kitti.py` (converted from the same --kitti-list)."""
    if nyu_raw.is_cache(args.data):
        frames = nyu_raw.CachedFrames(args.data)
        check_frame_size(frames, KITTI.frame_hw, 'train.py --dataset kitti takes a cache of KITTI '
                                                 'frames (python kitti.py)')
        kitti.check_cache_list(frames, args.kitti_list)
    else:
        frames = kitti.open_training_list(args.data, args.kitti_list)
    nyu_raw.refuse_test_scenes(frames, kitti.test_drives())
    train, val, scenes, held_out = _hold_out_scenes(frames, args, device)
    drives = len(set(scenes))
    evened = (f'; evened to {args.per_scene} a drive: a list of {args.per_scene * drives} a pass'
              if args.per_scene else '; shuffled')
    print(f'{frames.description}: {len(train)} training frames of {drives} drives, '
          f'{len(val)} validation frames of {len(held_out)} held-out drives; none of the test '
          f'drives{evened}')
    return train, val, scenes


def check_frame_size(frames, frame_hw, what):
    """A converted cache of another dataset's frames (NYU's 320x240, KITTI's 612x184): one line."""
    if tuple(frames.frame_hw) != tuple(frame_hw):
        h, w = frames.frame_hw
        raise cli.DataError(f'{frames.folder}: holds {w}x{h} frames; {what}')


def load_labeled(args):
    arrays = util.read_nyu_labeled(args.data)
    train_idx, test_idx = util.read_splits(args.splits, len(arrays['images']), test_may_be_empty=True)
    train_idx, val_idx = util.split_train_val(train_idx, arrays['scenes'], args.val_fraction, args.seed)
    depth_key = 'raw_depths' if args.train_depth == 'raw' else 'depths'
    train = util.Frames(arrays['images'][train_idx], arrays[depth_key][train_idx])
    val = util.Frames(arrays['images'][val_idx], arrays['depths'][val_idx])
    print(f'{args.data}: {len(train)} training, {len(val)} validation frames '
          f'({len(test_idx)} test frames left for evaluate.py); depth: '
          f"{util.describe_invalid(arrays['invalid'])}")
    scenes = [arrays['scenes'][i] for i in train_idx] if arrays['scenes'] else None
    if args.per_scene and scenes is None:
        raise cli.DataError(f'{args.data}: has no scene names, so --per-scene cannot balance')
    return train, val, scenes


def training_batches(train, order, first_step, total_steps, batch, args, device, shard=(0, 1)):
    """The augmented (input, target depth, target mask) of steps first_step.. on `device`.

    fast: frames drawn as uint8 (in-memory frames indexed where they live, on the GPU when they
    were moved there; raw frames decoded ahead by DataLoader workers), then every sample's own
    augmentation applied in one batched grid_sample on the device. Frame indices and draws come
    in blocks of args.log_every steps, one upload per block (draw_block), so the steps between
    logging points never wait for the host.
    plain: a DataLoader whose workers augment one sample at a time on the CPU (what most
    reproductions do); the same draws, so the same batches.
    shard (rank, world): this process's share of every global batch under torchrun."""
    if args.path == 'plain':
        keys = StepIndices(order, first_step, total_steps, batch, shard, with_keys=True)
        loader = _loader(util.PerSampleAugmented(train, order, batch), keys, args.workers, device)
        for x, y, m in loader:
            yield tuple(t.to(device, non_blocking=True) for t in (x, y, m))
        return
    block = getattr(args, 'log_every', None) or 1
    draws = step_draws(order, first_step, total_steps, batch, block, device, shard)
    if isinstance(train, util.Frames):
        frames = ((train.images[idx], train.depths[idx], params) for idx, params in draws)
    else:
        loader = _loader(train, StepIndices(order, first_step, total_steps, batch, shard),
                         args.workers, device)
        frames = ((images_u8.to(device, non_blocking=True), depths.to(device, non_blocking=True),
                   params) for (images_u8, depths), (_, params) in zip(loader, draws))
    for images_u8, depths, params in frames:
        img, depth, mask = util.as_float_batch(images_u8, depths)
        yield util.augment(img, depth, mask, params, order.geometry)


def _loader(dataset, batch_sampler, workers, device):
    """A DataLoader over the steps' indices, decoding or augmenting in `workers` processes that
    leave stopping to the main process; their seeds are not drawn from the RNG of dropout. A frame
    that does not decode stops training with its one line (util.FrameLoader)."""
    return util.FrameLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers,
        pin_memory=device.type == 'cuda', prefetch_factor=4 if workers else None,
        generator=torch.Generator())


def draw_block(order, steps, batch, shard=(0, 1)):
    """The frame indices and augmentation draws of `steps` (a range), this process's share of each
    global batch, as one (steps, share, 1 + AugParams.PACKED) float32 tensor: column 0 the frame,
    then AugParams.pack(). Exactly order.indices() and order.aug_params() of each step (frame
    numbers are exact in float32 up to 16.7M)."""
    rank, world = shard
    rows = []
    for step in steps:
        frames = torch.tensor(order.indices(step, batch)[rank::world], dtype=torch.float32)
        params = order.aug_params(step, batch).take(slice(rank, None, world)).pack()
        rows.append(torch.cat([frames[:, None], params], dim=1))
    return torch.stack(rows)


def step_draws(order, first_step, total_steps, batch, block, device, shard=(0, 1)):
    """(frame indices, AugParams) of each step on `device`, drawn a block of steps at a time (the
    blocks end at multiples of `block`, where the training loop reads its losses) and uploaded in
    one asynchronous copy from pinned memory. The next block is drawn before the last step of the
    current one is handed out: while the GPU still has that block's steps queued, not after the
    logging point's read has drained its queue."""
    def upload(start):
        end = min(total_steps, (start // block + 1) * block)
        packed = draw_block(order, range(start, end), batch, shard)
        if device.type == 'cuda':
            packed = packed.pin_memory()
        return end, packed.to(device, non_blocking=True)

    if first_step >= total_steps:
        return
    end, packed = upload(first_step)
    while True:
        for i, rows in enumerate(packed):
            if i == len(packed) - 1 and end < total_steps:
                following = upload(end)
            yield rows[:, 0].long(), util.AugParams.unpack(rows[:, 1:])
        if end >= total_steps:
            return
        end, packed = following


class StepIndices:
    """The DataLoader's batch sampler: the frame indices of each remaining step."""

    def __init__(self, order, first_step, total_steps, batch, shard=(0, 1), with_keys=False):
        self.order, self.first, self.total, self.batch = order, first_step, total_steps, batch
        self.rank, self.world = shard
        self.with_keys = with_keys   # (step, position in the batch, frame) for per-sample work

    def __len__(self):
        return self.total - self.first

    def __iter__(self):
        for step in range(self.first, self.total):
            idx = self.order.indices(step, self.batch)
            mine = [(step, j, i) for j, i in enumerate(idx) if j % self.world == self.rank]
            yield mine if self.with_keys else [i for _, _, i in mine]
