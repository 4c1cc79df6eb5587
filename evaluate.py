"""Evaluate trained nets on the test split and print them next to the paper's Table 1 (NYU) or
Table 2 (KITTI).

    python evaluate.py                 # model/ on the 654 NYU test images in nyu/
    python evaluate.py --demo          # model/ on the synthetic demo's test scenes
    python evaluate.py --data nyu/bts/official_splits/test     # or DenseDepth's nyu_test.zip
    python evaluate.py --model model_kitti --data kitti        # KITTI weights: the Eigen test split

The dataset is the one the weights were trained on (read off their shapes). Two protocols each
(PROTOCOL_TEXT below, printed by --help), both by default, each named in the output with the
ground truth it used. NYU: the paper's on filled depth, the later works' crop protocol on raw depth,
as their sources did (--gt to choose); the test set may be the labeled .mat, BTS's official test
folder or DenseDepth's test arrays (nyu_test.py); a protocol whose ground truth the set lacks is
refused; a "Mean" row (Sec. 4.3: the mean depth image of the training set, per pixel) is computed
from the labeled file's 795 training images, to check the paper's own Mean row. KITTI: the 697
frames of the Eigen test list in raw KITTI (kitti.py), the paper's protocol on the LIDAR's camera
depth and the field's (Garg crop, 80 m) on its Velodyne depth, or KITTI's annotated depth (--gt
annotated --kitti-annotated DIR).
Writes OUT/eval.json and OUT/eval_examples.png (best / median / worst test images).
"""
import argparse
import datetime
import json
import os

import torch

import cli
import files
import kitti
import nyu_test
import runtime
import util
from metrics import HEADINGS, NAMES, Metrics
from net import NYU, STAGE_NAMES, load_pretrained

# Table 1 of the paper, NYU Depth v2 test set, as printed (strings, so the rows print verbatim).
PAPER_TABLE1 = {
    'Mean': ['0.418', '0.711', '0.874', '0.408', '0.581', '1.244', '0.430', '0.304'],
    'Make3D': ['0.447', '0.745', '0.897', '0.349', '0.492', '1.214', '0.409', '0.325'],
    'Ladicky et al.': ['0.542', '0.829', '0.940', '-', '-', '-', '-', '-'],
    'Karsch et al.': ['-', '-', '-', '0.350', '-', '1.2', '-', '-'],
    STAGE_NAMES['coarse']: ['0.618', '0.891', '0.969', '0.228', '0.223', '0.871', '0.283', '0.221'],
    STAGE_NAMES['fine']: ['0.611', '0.887', '0.971', '0.215', '0.212', '0.907', '0.285', '0.219'],
}
# Table 2 of the paper, KITTI (its 28 test scenes, its protocol), as printed.
PAPER_TABLE2 = {
    'Mean': ['0.556', '0.752', '0.870', '0.412', '5.712', '9.635', '0.444', '0.359'],
    'Make3D': ['0.601', '0.820', '0.926', '0.280', '3.012', '8.734', '0.361', '0.327'],
    STAGE_NAMES['coarse']: ['0.679', '0.897', '0.967', '0.194', '1.531', '7.216', '0.273', '0.248'],
    STAGE_NAMES['fine']: ['0.692', '0.899', '0.967', '0.190', '1.515', '7.156', '0.270', '0.246'],
}
PAPER_TABLES = {'nyu': ('Table 1 (its protocol, filled depth)', PAPER_TABLE1),
                'kitti': ('Table 2 (its protocol: projected LIDAR, the network region, no cap)',
                          PAPER_TABLE2)}
PAPER_COLUMNS = ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'si_log')
PROTOCOL_TEXT = {
    'nyu': {
        'paper': 'Sec. 4.3: the 55x74 prediction upsampled by nearest neighbour to the 640x480 frame, '
                 'on the region the network covers (rows 20..460, columns 24..616: 84.8% of the '
                 'frame; the paper compared on its intersection with Make3D\'s region, 86% of it, '
                 'which no source we have pins down, so the paper\'s figures cover a slightly '
                 'smaller region than ours); every valid ground-truth pixel (> 0) of the test set '
                 'pooled; no depth cap; sc-inv per image.',
        'crop': 'later work (BTS, AdaBins, ZoeDepth): the prediction upsampled bilinearly to 640x480 '
                '(border cells repeated outside the covered region); rows 45:471, columns 41:601 '
                '(0-based slices); valid where 1e-3 < gt < 10; prediction clamped to [1e-3, 10]; '
                'metrics per image, then averaged.'},
    'kitti': {
        'paper': 'Sec. 4.2 / 4.3: the 27x142 prediction upsampled by nearest neighbour to the full '
                 'frame, on the region the network covers (the lower middle: rows 36%..95%, '
                 'columns 3.6%..96.4% of the frame); every projected LIDAR pixel (> 0) of the test '
                 'frames pooled; no depth cap; sc-inv per image.',
        'field': "the field's on the Eigen split (monodepth2's evaluate_depth.py, BTS, AdaBins): the "
                 'prediction upsampled bilinearly to the ground truth\'s full size (border cells '
                 'repeated outside the covered region), clamped to [1e-3, 80]; the Garg crop (rows '
                 '40.8%..99.2%, columns 3.6%..96.4%); valid where 1e-3 < gt < 80; metrics per '
                 'image, then averaged; no median scaling (the net predicts metres).'},
}
DEFAULT_GT = {'nyu': {'paper': 'filled', 'crop': 'raw'},   # Sec. 4.3: filled depths; BTS: rawDepths
              'kitti': {'paper': 'camera', 'field': 'velodyne'}}   # the LIDAR's depth; monodepth2's
GROUND_TRUTH = {'nyu': nyu_test.GROUND_TRUTH, 'kitti': kitti.GROUND_TRUTH}
PER_IMAGE = ('crop', 'field')        # protocols that average per-image metrics
CROP = (45, 471, 41, 601)            # rows, columns of the 480x640 frame, 0-based slices
CROP_RANGE = (1e-3, 10.0)
SPLITS = os.path.join('nyu', 'splits.mat')


def parse_args(argv=None):
    epilog = '\n'.join(f'protocols, {d}:\n' + '\n'.join(f'  {k}: {v}' for k, v in texts.items())
                       for d, texts in PROTOCOL_TEXT.items())
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog)
    p.add_argument('--data',
                   help="the test set: NYU Depth v2's labeled .mat (with --splits), BTS's official "
                        "test folder, DenseDepth's nyu_test.zip or its folder, or nyu_data.zip's "
                        "test pairs (nyu_test.py) (default: nyu/nyu_depth_v2_labeled.mat); KITTI "
                        "weights: the raw KITTI folder (default: kitti)")
    p.add_argument('--splits', default=SPLITS,
                   help='official split, with the labeled .mat (default: %(default)s)')
    p.add_argument('--gt', choices=sorted({k for kinds in GROUND_TRUTH.values() for k in kinds}),
                   help="ground truth for every protocol: NYU 'filled' or 'raw', KITTI 'camera', "
                        "'velodyne' or 'annotated' (default: each protocol's own: NYU paper filled, "
                        "crop raw; KITTI paper camera, field velodyne)")
    p.add_argument('--kitti-annotated', metavar='DIR',
                   help="KITTI's data_depth_annotated folder (train/, val/), for --gt annotated")
    p.add_argument('--demo', action='store_true', help="the synthetic demo data of train.py --demo")
    p.add_argument('--model', default='model', help='folder with coarse.pth [and fine.pth] (default: %(default)s)')
    p.add_argument('--out', default=None, help='where eval.json and the figure go (default: --model)')
    p.add_argument('--protocol', choices=['both', 'paper', 'crop', 'field'], default='both',
                   help="'crop' is NYU's, 'field' KITTI's (default: %(default)s)")
    p.add_argument('--batch-size', type=cli.whole(1), default=16, help='(default: %(default)s)')
    p.add_argument('--workers', type=cli.whole(0), default=min(4, os.cpu_count() or 1),
                   help='KITTI: processes decoding the test images (default: %(default)s)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    a = p.parse_args(argv)
    a.out = a.model if a.out is None else a.out   # an empty --out is refused, not taken as --model
    if a.demo:
        import data
        data.refuse_data_with_demo(p, a, SPLITS)
        a.data, a.splits = data.demo_paths()
    return a


def _row(values):
    return [f'{values[k]:.3f}' for k in NAMES]


def format_table(results, protocol, gt, num_images, dataset='nyu'):
    """The paper's rows verbatim, then ours, one column per metric (log10: ours only)."""
    cols = [HEADINGS[k] for k in NAMES]
    caption, table = PAPER_TABLES[dataset]
    if dataset == 'kitti' and protocol == 'field':   # Table 2 is on the paper's protocol only
        caption, table = ('none: Table 2 is on the paper\'s protocol; the field\'s "Eigen et al." '
                          'figures (AdaBins Table 3) come from other code', {})
    rows = [(f'[paper] {name}', vals + ['-']) for name, vals in table.items()]
    rows += [(f'[ours]  {name}', _row(vals)) for name, vals in results.items()]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f'protocol: {protocol}; ground truth: {GROUND_TRUTH[dataset][gt]}; {num_images} test '
             f'images. Paper rows: {caption}',
             ''.ljust(width) + ' '.join(c.rjust(9) for c in cols)]
    lines += [name.ljust(width) + ' '.join(v.rjust(9) for v in vals) for name, vals in rows]
    return '\n'.join(lines)


def check_options(args, dataset):
    """--protocol and --gt against the dataset of the weights, before any test image is read."""
    own = PROTOCOL_TEXT[dataset]
    if args.protocol not in ('both', *own):
        raise cli.UserError(f"--protocol {args.protocol} is not one of the {dataset} weights' "
                            f"protocols ({', '.join(own)})")
    if args.kitti_annotated and dataset != 'kitti':
        raise cli.UserError(f'--kitti-annotated: KITTI\'s annotated depth, and these are {dataset} '
                            f'weights')
    if args.gt is not None and args.gt not in GROUND_TRUTH[dataset]:
        raise cli.UserError(f"--gt {args.gt} is not a {dataset} ground truth ({', '.join(GROUND_TRUTH[dataset])})")


def choose_protocols(args, test, dataset):
    """{protocol: ground truth kind} for the protocols asked for and the ground truth the set has.
    One protocol asked for without its ground truth: refused; of both, the other one runs."""
    own = PROTOCOL_TEXT[dataset]
    asked = tuple(own) if args.protocol == 'both' else (args.protocol,)
    gt = {p: args.gt or DEFAULT_GT[dataset][p] for p in asked}
    usable = {p: k for p, k in gt.items() if k in test.ground_truth}
    for p in asked:
        if p not in usable:
            have = ' or '.join(f'--gt {k}' for k in test.ground_truth)
            message = (f'{args.data}: the {p} protocol needs {gt[p]} ground truth, and this test '
                       f'set carries {" and ".join(test.ground_truth)} depth only; use {have}')
            if gt[p] == 'annotated':
                message += ", or give KITTI's annotated depth with --kitti-annotated DIR"
            if not usable:
                raise cli.DataError(message)
            print(f'note: {message}; only the {", ".join(usable)} protocol is computed')
    return usable


def open_test_set(args, dataset):
    """The test set of the weights' dataset (--data, or its default)."""
    if dataset == 'kitti':
        if args.demo:
            raise cli.UserError('--demo is the synthetic NYU demo; these weights are KITTI\'s')
        args.data = args.data or kitti.ROOT
        return kitti.open_test_set(args.data, args.kitti_annotated, args.workers)
    args.data = args.data or os.path.join('nyu', 'nyu_depth_v2_labeled.mat')
    return nyu_test.open_test_set(args.data, args.splits)


def mean_depth_map(frames, batch=64):
    """Each output cell's mean valid training depth (centre crop): the "Mean" baseline."""
    total = torch.zeros(1, 1, *NYU.output_hw, dtype=torch.float64)
    count = torch.zeros_like(total)
    for start in range(0, len(frames), batch):
        img, depth, mask = frames.get(list(range(start, min(start + batch, len(frames)))), mask_min_max=False)
        _, y, m = util.center_crop(img, depth, mask)
        total += torch.where(m, y, 0).double().sum(0, keepdim=True)
        count += m.double().sum(0, keepdim=True)
    overall = float(total.sum() / count.sum().clamp(min=1))
    return torch.where(count > 0, total / count.clamp(min=1), overall).float()


def evaluate(args):
    if args.data is not None:   # a wrong path is the first thing to hear about
        files.check_exists(args.data, 'the test set (--data)')
    files.check_out_folder(args.out)
    device = runtime.resolve_device(args.device)[0]
    nets = load_pretrained(args.model, device)   # coarse, fine if trained, ...: a row each
    geometry = nets.geometry
    dataset = geometry.name   # what the weights were trained on
    check_options(args, dataset)
    test = open_test_set(args, dataset)
    protocols = choose_protocols(args, test, dataset)
    means = {}
    if test.train is not None:   # the paper's Mean baseline: the training set's mean depth image
        means['Mean'] = mean_depth_map(test.train).to(device)
    elif dataset == 'nyu':
        print(f'note: no Mean row: it needs the labeled file\'s training images, not in {args.data}')
    methods = [*means, *(STAGE_NAMES[stage] for stage in nets)]
    found = {p: {m: Metrics(per_image=p in PER_IMAGE) for m in methods} for p in protocols}
    examples = []   # (per-image RMSE of the best net, first protocol; position) for the figure
    kinds = sorted(set(protocols.values()))
    gt_frames = {k: test.depths(k, range(len(test))) for k in kinds}
    first = next(iter(protocols))
    with torch.no_grad():
        for start in cli.progress(range(0, len(test), args.batch_size), desc='evaluating', unit='batch'):
            idx = list(range(start, min(start + args.batch_size, len(test))))
            img, _, _ = test.frames.get(idx)
            x = util.crop_input(img.to(device), geometry)
            preds = {m: mean.expand(len(idx), -1, -1, -1) for m, mean in means.items()}
            preds.update({STAGE_NAMES[stage]: log_depth.exp()
                          for stage, log_depth in nets.predictions(x).items()})
            for k, i in enumerate(idx):   # one image at a time: KITTI's frames differ in size
                gts = {kind: torch.from_numpy(next(gt_frames[kind]))[None, None].to(device) for kind in kinds}
                for protocol, kind in protocols.items():
                    valid = torch.isfinite(gts[kind]) & (gts[kind] > 0)
                    for method, pred in preds.items():
                        p, g, m = protocol_pixels(protocol, pred[k:k + 1], gts[kind], valid, geometry)
                        found[protocol][method].add(pred=p, gt=g, mask=m)
                        if protocol == first and method == methods[-1] and m.any():
                            # the last net's own RMSE on each image, for the figure
                            examples.append((Metrics().add(pred=p, gt=g, mask=m).result()['rmse'], i))
    results = {p: {m: found[p][m].result() for m in methods} for p in protocols}
    scored = {p: found[p][methods[0]].images for p in protocols}   # images with a pixel to score
    for p, kind in protocols.items():
        print(format_table(results[p], p, kind, scored[p], dataset))
        print()
    os.makedirs(args.out, exist_ok=True)
    caption, table = PAPER_TABLES[dataset]
    report = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
              'dataset': dataset, 'data': os.path.abspath(args.data), 'test_set': test.description,
              'test_images': len(test), 'scored_images': scored, 'model': os.path.abspath(args.model),
              'variant': nets.variant.name,
              'protocols': {p: PROTOCOL_TEXT[dataset][p] for p in protocols},
              'ground_truth': {p: f'{k}: {GROUND_TRUTH[dataset][k]}' for p, k in protocols.items()},
              'results': results,
              f'paper_table{1 if dataset == "nyu" else 2}': {m: dict(zip(PAPER_COLUMNS, v))
                                                             for m, v in table.items()}}
    path = os.path.join(args.out, 'eval.json')
    files.atomic_write(path, lambda tmp: open(tmp, 'w').write(json.dumps(report, indent=2)))
    examples.sort()
    picks = [examples[0][1], examples[len(examples) // 2][1], examples[-1][1]]
    figure = os.path.join(args.out, 'eval_examples.png')
    util.plot_examples(nets, test.frames, picks, list(test.depths(protocols[first], picks)),
                       ['best', 'median', 'worst'], device, figure)
    print(f'written: {path}, {figure}')
    return results


def protocol_pixels(protocol, pred, gt, valid, geometry=NYU):
    """pred (B, 1, 55, 74) (KITTI 27x142), gt and valid (B, 1, H, W) at the ground truth's full
    size -> what the protocol compares."""
    hw = gt.shape[-2:]
    if protocol == 'paper':
        up = util.upsample_depth(pred, hw, mode='nearest', outside='nan', geometry=geometry)
        return torch.nan_to_num(up, nan=1.0), gt, valid & torch.isfinite(up)
    low, high = kitti.FIELD_CLAMP if protocol == 'field' else CROP_RANGE
    up = util.upsample_depth(pred, hw, mode='bilinear', outside='edge', geometry=geometry).clamp(low, high)
    r0, r1, c0, c1 = kitti.garg_crop(*hw) if protocol == 'field' else CROP
    region = torch.zeros_like(valid)
    region[..., r0:r1, c0:c1] = True
    return up, gt, valid & region & (gt > low) & (gt < high)


def main(argv=None):
    args = parse_args(argv)
    evaluate(args)
    return 0


if __name__ == '__main__':
    cli.run_cli(main)
