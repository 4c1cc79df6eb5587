"""The scale-invariant loss of Sec. 3.2 (Eq. 4), in log space, over valid pixels only.

For one image with n valid pixels and d_i = log y_i - log y*_i:

    L(y, y*) = (1/n) sum_i d_i^2  -  (lambda / n^2) (sum_i d_i)^2

lambda = 0.5 is the training loss; lambda = 1 is Eq. 1, the scale-invariant error (Table 1 reports
its square root); lambda = 0 is the plain mean squared log error. The printed Eq. 2 is twice Eq. 1
(an erratum): Eq. 3/4 are what is implemented.
"""
import torch

TRAIN_LAMBDA = 0.5


def valid_depth_mask(depth, mask_min_max=True):
    """Pixels whose depth can be used as a target: finite and > 0 (0 = missing in NYU).

    With mask_min_max, also drop the pixels equal to the minimum or maximum valid depth of their
    own image, as the paper does for NYU (Sec. 4.1: windows, open doors and specular surfaces
    read as the sensor's limits). depth: (..., H, W); the min/max are taken per image over H, W.
    """
    depth = torch.as_tensor(depth)
    valid = torch.isfinite(depth) & (depth > 0)
    if mask_min_max:
        # python scalars, not device tensors: building a CUDA scalar from the host would make the
        # GPU wait for the CPU at every training step
        lo = depth.masked_fill(~valid, float('inf')).amin(dim=(-2, -1), keepdim=True)
        hi = depth.masked_fill(~valid, float('-inf')).amax(dim=(-2, -1), keepdim=True)
        valid &= (depth != lo) & (depth != hi)
    return valid


def safe_log(depth, mask):
    """log(depth) where mask is set and 0 elsewhere, without ever evaluating log(0) or log(<0)."""
    return torch.where(mask, torch.log(torch.where(mask, depth, torch.ones_like(depth))),
                       torch.zeros_like(depth))


def scale_invariant_loss(pred_log_depth, target_log_depth, mask, lam=TRAIN_LAMBDA, per_image=False):
    """Eq. 4 averaged over the images of the batch that have at least one valid pixel.

    pred_log_depth, target_log_depth: (B, ...) log depths (natural log of metres);
    mask: (B, ...) bool, True where the target is valid. Invalid target values are ignored even if
    they are NaN or inf. Returns a scalar; 0 (with a gradient path) if no pixel is valid.
    per_image=True returns the (B,) values instead (0 for an image without valid pixels).
    """
    mask = mask.to(torch.bool)
    b = pred_log_depth.shape[0]
    d = torch.where(mask, pred_log_depth - torch.where(mask, target_log_depth, 0.0), 0.0)
    d = d.reshape(b, -1)
    n = mask.reshape(b, -1).sum(dim=1).to(d.dtype)
    has_pixels = n > 0
    n_safe = n.clamp(min=1)
    values = (d * d).sum(dim=1) / n_safe - lam * d.sum(dim=1) ** 2 / n_safe ** 2
    values = torch.where(has_pixels, values, 0.0)
    if per_image:
        return values
    return values.sum() / has_pixels.sum().clamp(min=1)


def scale_invariant_error(pred_log_depth, target_log_depth, mask, per_image=False):
    """Eq. 1 (lambda = 1): the loss that ignores a global scale of the prediction. Table 1's
    "RMSE (log, scale-invariant)" is its square root."""
    return scale_invariant_loss(pred_log_depth, target_log_depth, mask, lam=1.0, per_image=per_image)
