"""Error metrics of Sec. 4.3 / Table 1, in one place for train.py (validation) and evaluate.py.

Over the evaluated pixels T, with y the prediction and y* the ground truth in metres:
  threshold     fraction of pixels with max(y / y*, y* / y) < 1.25, 1.25^2, 1.25^3
  abs rel       mean |y - y*| / y*           sqr rel   mean (y - y*)^2 / y*
  RMSE          sqrt(mean (y - y*)^2)        RMSE log  sqrt(mean (log y - log y*)^2)
  sc-inv        sqrt(Eq. 1), the scale-invariant error (per image, see below)
  log10         mean |log10 y - log10 y*|
The functions take keyword arguments only (pred=..., gt=...): swapping prediction and ground
truth, a known bug of other evaluations, changes abs rel and sqr rel and cannot happen silently.
"""
import math

import torch

from cli import DataError
from loss import scale_invariant_error

NAMES = ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'si_log', 'log10')
# Table 1's column order and headings
HEADINGS = {'d1': 'd<1.25', 'd2': 'd<1.25^2', 'd3': 'd<1.25^3', 'abs_rel': 'abs rel',
            'sq_rel': 'sqr rel', 'rmse': 'RMSE', 'rmse_log': 'RMSE log', 'si_log': 'sc-inv',
            'log10': 'log10'}


def _sums(pred, gt, mask):
    """Per-image sums over the valid pixels of every pixel-mean term, and the pixel count.
    pred, gt: (B, ...) depths in metres, mask: (B, ...) bool. Returns dict of (B,) float64."""
    b = pred.shape[0]
    pred = pred.reshape(b, -1).double()
    gt = gt.reshape(b, -1).double()
    mask = mask.reshape(b, -1)
    one = torch.ones_like(gt)
    p = torch.where(mask, pred, one)   # masked pixels never reach a log or a division
    g = torch.where(mask, gt, one)
    ratio = torch.maximum(p / g, g / p)
    dlog = torch.log(p) - torch.log(g)
    terms = {
        'd1': (ratio < 1.25).double(), 'd2': (ratio < 1.25 ** 2).double(),
        'd3': (ratio < 1.25 ** 3).double(), 'abs_rel': (p - g).abs() / g,
        'sq_rel': (p - g) ** 2 / g, 'se': (p - g) ** 2, 'se_log': dlog ** 2,
        'log10': (torch.log10(p) - torch.log10(g)).abs(),
    }
    out = {k: torch.where(mask, v, 0.0).sum(dim=1) for k, v in terms.items()}
    out['n'] = mask.sum(dim=1).double()
    # Eq. 1 of each image (lambda = 1): its pixel-mean and mean-squared log difference
    out['si'] = scale_invariant_error(dlog[:, None], torch.zeros_like(dlog[:, None]),
                                      mask[:, None], per_image=True)
    return out


# _sums' per-image entries
SUMS = ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'se', 'se_log', 'log10', 'n', 'si')


class Metrics:
    """Accumulates the metrics over batches of images.

    per_image=False (the paper's protocol, Sec. 4.3 (?)): every pixel of the test set counts once,
    i.e. means over the pooled pixels T. per_image=True (BTS, AdaBins, ZoeDepth): each image's
    metrics first, then their mean over images. sc-inv is always per image (Eq. 1 is defined on
    one image): the square root of its image mean (pooled) or the mean of its roots (per image).
    """

    def __init__(self, per_image=False):
        self.per_image = per_image
        self.totals = {k: 0.0 for k in NAMES}
        self.pixels = 0.0
        self.images = 0
        self.per_image_values = []   # per-image dicts, for picking best / median / worst images

    def add(self, *, pred, gt, mask):
        """pred, gt: (B, ...) depths in metres (pred > 0); mask: (B, ...) bool of evaluated pixels.
        Images without a single valid pixel are skipped."""
        s = _sums(pred, gt, mask)
        # every per-image sum in one read to the host (a GPU waits once per batch, not per value)
        table = torch.stack([s[k] for k in SUMS]).tolist()
        for column in zip(*table):
            v = dict(zip(SUMS, column))
            n = v['n']
            if n == 0:
                continue
            one = {k: v[k] / n for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'log10')}
            one['rmse'] = math.sqrt(v['se'] / n)
            one['rmse_log'] = math.sqrt(v['se_log'] / n)
            one['si_log'] = math.sqrt(max(v['si'], 0.0))
            self.per_image_values.append(one)
            self.images += 1
            if self.per_image:
                for k in NAMES:
                    self.totals[k] += one[k]
            else:
                for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'log10'):
                    self.totals[k] += v[k]
                self.totals['rmse'] += v['se']
                self.totals['rmse_log'] += v['se_log']
                self.totals['si_log'] += v['si']
                self.pixels += n
        return self

    def result(self):
        if not self.images:   # every depth pixel missing: the data, not the nets
            raise DataError('none of these images has a valid ground-truth depth pixel to score')
        if self.per_image:
            return {k: self.totals[k] / self.images for k in NAMES}
        out = {k: self.totals[k] / self.pixels for k in ('d1', 'd2', 'd3', 'abs_rel', 'sq_rel', 'log10')}
        out['rmse'] = math.sqrt(self.totals['rmse'] / self.pixels)
        out['rmse_log'] = math.sqrt(self.totals['rmse_log'] / self.pixels)
        out['si_log'] = math.sqrt(max(self.totals['si_log'] / self.images, 0.0))
        return out


def compute_metrics(*, pred, gt, mask=None, per_image=False):
    """All metrics of one batch. pred, gt: (B, ...) metres; mask defaults to gt > 0."""
    if mask is None:
        mask = torch.isfinite(gt) & (gt > 0)
    return Metrics(per_image).add(pred=pred, gt=gt, mask=mask).result()
