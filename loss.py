"""The scale-invariant loss of Sec. 3.2 (Eq. 4), in log space, over valid pixels only.

For one image with n valid pixels and d_i = log y_i - log y*_i:

    L(y, y*) = (1/n) sum_i d_i^2  -  (lambda / n^2) (sum_i d_i)^2

lambda = 0.5 is the training loss; lambda = 1 is Eq. 1, the scale-invariant error (Table 1 reports
its square root); lambda = 0 is the plain mean squared log error. The printed Eq. 2 is twice Eq. 1
(an erratum): Eq. 3/4 are what is implemented.

LOSSES names the training losses that train.py --loss chooses from, each a function
(pred_log_depth, target_log_depth, mask, lam) -> a scalar; 'eq4', the paper's, is the default.
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
    values, n = _eq4_per_image(_log_error(pred_log_depth, target_log_depth, mask), mask, lam)
    return values if per_image else _mean_over_images(values, n)


def _log_error(pred_log_depth, target_log_depth, mask):
    """d = log y - log y* on the valid pixels, 0 elsewhere (where an invalid target, NaN or inf,
    never reaches a value or a gradient)."""
    return torch.where(mask, pred_log_depth - torch.where(mask, target_log_depth, 0.0), 0.0)


def _eq4_per_image(d, mask, lam):
    """Eq. 4 of each image of the batch (0 without valid pixels), and its valid pixels n."""
    b = d.shape[0]
    d = d.reshape(b, -1)
    n = mask.reshape(b, -1).sum(dim=1).to(d.dtype)
    n_safe = n.clamp(min=1)
    values = (d * d).sum(dim=1) / n_safe - lam * d.sum(dim=1) ** 2 / n_safe ** 2
    return torch.where(n > 0, values, 0.0), n


def _mean_over_images(values, n):
    """The mean of per-image values over the images that have valid pixels."""
    return values.sum() / (n > 0).sum().clamp(min=1)


def scale_invariant_error(pred_log_depth, target_log_depth, mask, per_image=False):
    """Eq. 1 (lambda = 1): the loss that ignores a global scale of the prediction. Table 1's
    "RMSE (log, scale-invariant)" is its square root."""
    return scale_invariant_loss(pred_log_depth, target_log_depth, mask, lam=1.0, per_image=per_image)


def gradient_matching_loss(pred_log_depth, target_log_depth, mask, lam=TRAIN_LAMBDA):
    """Eigen & Fergus 2015's depth loss ("Predicting Depth, Surface Normals and Semantic Labels
    with a Common Multi-Scale Convolutional Architecture", ICCV 2015, Sec. 3.2): Eq. 4 plus a
    first-order matching term on the horizontal and vertical image gradients of d,

        L = (1/n) sum_i d_i^2 - (lambda / n^2) (sum_i d_i)^2 + (1/n) sum_i [(dx d_i)^2 + (dy d_i)^2]

    with lambda = 0.5 there. dx, dy are the differences of d between horizontal and vertical
    neighbours, counted where both pixels are valid; n is the image's valid pixels. Averaged over
    the images with at least one valid pixel, as Eq. 4 is."""
    mask = mask.to(torch.bool)
    d = _log_error(pred_log_depth, target_log_depth, mask)
    both_x = mask[..., :, 1:] & mask[..., :, :-1]
    both_y = mask[..., 1:, :] & mask[..., :-1, :]
    dx = torch.where(both_x, d[..., :, 1:] - d[..., :, :-1], 0.0)
    dy = torch.where(both_y, d[..., 1:, :] - d[..., :-1, :], 0.0)
    values, n = _eq4_per_image(d, mask, lam)
    b = d.shape[0]
    gradients = ((dx * dx).reshape(b, -1).sum(dim=1) + (dy * dy).reshape(b, -1).sum(dim=1)) / n.clamp(min=1)
    return _mean_over_images(values + gradients, n)


# The training losses by name (train.py --loss). A new loss: a function with these arguments,
# and one line here.
LOSSES = {
    'eq4': scale_invariant_loss,                  # the paper's, Eq. 4 (the default)
    'eigen-fergus-2015': gradient_matching_loss,  # Eq. 4 + the gradients of d (ICCV 2015)
}
DEFAULT_LOSS = 'eq4'
