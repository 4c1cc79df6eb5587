"""The two networks of Eigen, Puhrsch & Fergus (NIPS 2014), Fig. 1 and Sec. 3.1.

Sizes in comments are H x W (PyTorch order); the paper's figure writes W x H.

    input  3 x 228 x 304 RGB (a crop of the 240 x 320 half-resolution frame), values 0..255
    output 1 x 55 x 74 log depth (natural log of metres)

Three variants share this file, and everything that differs between them lives in `Variant`:
  * PAPER   -- the paper's text and Fig. 1 (the default).
  * RELEASE -- the authors' released inference code (models/depth.py + depth.conf):
               3x3/2 pools with LRN, input offsets, 64 fine1 filters whose channel 0 is
               replaced by the coarse map, 0.01 feature scaling, log depth divided by its std,
               weight decay.
  * ALEXNET -- coarse1-5 are torchvision's AlexNet `features` (64-192-384-256-256 channels), so
               that ImageNet weights anyone can download initialise them, as the paper's
               pretrained coarse1-5 (Sec. 3.1.1); on a 228x304 input they end in Fig. 1's
               256 x 6 x 8, so coarse6, coarse7 and the fine net are the paper's.
Where neither source settles a detail the choice is marked "(?)" and listed in docs/paper.md.
"""
import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from cli import DataError, UserError
from files import load_torch_file

TARGET_OFFSET = 5
TARGET_STRIDE = 4


@dataclass(frozen=True)
class Geometry:
    """One dataset's sizes (Fig. 1 has a column for each), H x W: the training frame (the
    recording downsampled by half, Sec. 4), the network input cropped from it, the output grid of
    coarse7 and fine3, and the rows of the input the fine net sees.

    The output grid samples the input crop with stride 4: output cell (i, j) sits on crop pixel
    (fine_top + 5 + 4i, 5 + 4j), the centre of fine1's 9x9/2 conv followed by a 2x2 pool (and, for
    NYU, of coarse1's 11x11/4 receptive field). [R] takes its targets at exactly these pixels
    (y[1::4] of the crop minus its 4-pixel border), so targets and predictions share one grid."""
    name: str
    frame_hw: tuple
    input_hw: tuple
    output_hw: tuple
    fine_top: int = 0          # the fine net sees input rows fine_top.. (KITTI: the bottom crop)
    coarse2_pool: int = 2      # 'paper' variant: coarse2's max pool, k x k stride 2 (see KITTI)
    scale: tuple = (1.0, 1.5)  # augmentation (Sec. 3.4 / 4.2): zoom range, rotation in degrees
    angle: float = 5.0

    @property
    def target_origin(self):
        """(row, column) of output cell (0, 0) in the input crop."""
        return self.fine_top + TARGET_OFFSET, TARGET_OFFSET

    @property
    def crop_corner(self):
        """(row, column) of the test-time centre crop in the frame (Sec. 3.3)."""
        return ((self.frame_hw[0] - self.input_hw[0]) // 2, (self.frame_hw[1] - self.input_hw[1]) // 2)

    @property
    def output_region(self):
        """(top, bottom, left, right) of the frame covered by the output grid at the centre crop,
        one 4x4 block per cell: NYU rows 10..230, columns 12..308 of 240x320 (the release's
        get_predicted_depth_region gives (10, 238, 12, 316), 8 pixels more at the bottom, right)."""
        (cy, cx), (ty, tx), (oh, ow) = self.crop_corner, self.target_origin, self.output_hw
        top, left = cy + ty - 1, cx + tx - 1
        return top, top + TARGET_STRIDE * oh, left, left + TARGET_STRIDE * ow


# NYU Depth v2 (Fig. 1, NYU column): 640x480 frames halved, 304x228 crops, 74x55 output.
NYU = Geometry('nyu', frame_hw=(240, 320), input_hw=(228, 304), output_hw=(55, 74))
# KITTI (Fig. 1, KITTI column; Sec. 4.2): frames halved "from about 1224x368" to 612x184, 576x172
# crops, a 142x27 output on the bottom of the crop, where the LIDAR has depth. The fine net sees
# the bottom 116 rows: fine1's 9x9/2 conv and 2x2 pool make them 27 rows, (116 - 9) // 2 + 1 = 54,
# // 2 = 27 (and 576 columns 142). (?) coarse2's pool is 3x3 stride 2: Fig. 1's coarse2 is 35x9,
# which a 2x2 pool of coarse1's 71x20 (10 rows) cannot give. Augmentation (Sec. 4.2): scale in
# [1, 1.2], no rotation.
KITTI = Geometry('kitti', frame_hw=(184, 612), input_hw=(172, 576), output_hw=(27, 142),
                 fine_top=172 - 116, coarse2_pool=3, scale=(1.0, 1.2), angle=0.0)
GEOMETRIES = {g.name: g for g in (NYU, KITTI)}
# NYU's sizes by their old names (the NYU code paths and the tests use them)
INPUT_HW, OUTPUT_HW, FRAME_HW = NYU.input_hw, NYU.output_hw, NYU.frame_hw


@dataclass(frozen=True)
class Variant:
    """Every number that differs between the paper and the authors' release. One source of truth:
    train.py reads learning rates and weight decay from here, never from its own constants."""
    name: str
    pool: str                       # 'paper': 2x2 pools of Fig. 1; 'release': 3x3 stride-2 pools
    lrn: bool                       # local response norm after coarse1 and coarse2 ([R])
    fine1_filters: int              # 63 + coarse map = 64 ([P]); 64 with channel 0 replaced ([R])
    feature_scale: float            # factor on coarse5 features before coarse6 ([R]: 0.01)
    coarse_mean: float              # subtracted from 0..255 RGB before coarse1
    coarse_std: float               # divides it afterwards (1: coarse1-5 in the authors' units)
    fine_mean: float                # subtracted from 0..255 RGB before fine1
    fine_std: float
    log_depth_std: float            # net output x this = log depth ([R]: targets are logd / 0.457)
    dropout: float                  # on coarse6 ([P]: rate not given; [R]: 0.5)
    lr: dict = field(default_factory=dict)            # per layer, Sec. 3.3
    weight_decay: dict = field(default_factory=dict)  # per layer
    coarse_convs: str = 'eigen'     # coarse1-5: 'eigen' (Fig. 1, [R]) or torchvision's 'alexnet'
    # the fine stage's fixed coarse net keeps its dropout on while the fine net trains ([R]: the
    # fine net is built on `pred_drop`, the coarse output with dropout); [P] does not say
    fine_sees_coarse_dropout: bool = False


# Sec. 3.3: "coarse convolutional layers 1-5: 0.001, coarse full layers 6 and 7: 0.1, fine layers
# 1 and 3: 0.001, fine layer 2: 0.01".
PAPER_LR = {**{f'coarse{i}': 0.001 for i in range(1, 6)}, 'coarse6': 0.1, 'coarse7': 0.1,
            'fine1': 0.001, 'fine2': 0.01, 'fine3': 0.001}
# [R] depth.conf: weight_decay_w 0.0005 for the ImageNet convs, 0.0001 for everything else.
RELEASE_WD = {**{f'coarse{i}': 5e-4 for i in range(1, 6)},
              **{k: 1e-4 for k in ('coarse6', 'coarse7', 'fine1', 'fine2', 'fine3')}}
# [R] define_meta: statistics of the training images and log depths.
IMAGES_MEAN, IMAGES_STD = 109.31410628, 76.18328376
LOGDEPTHS_MEAN, LOGDEPTHS_STD = 0.82473954, 0.45723134

PAPER = Variant(
    name='paper', pool='paper', lrn=False, fine1_filters=63,
    # (?) [P] gives no input normalisation. Its learning rates were tuned for the authors'
    # parametrisation ([R]), so both nets work in it: coarse1 sees 0..255 pixel values less the
    # images' mean (the release: x - 128), coarse5's features are x 0.01 before coarse6, fine1
    # sees (x - mean) / std, and the targets are log depth / its std (train.train_step). Then
    # every tensor's gradient, momentum and weight decay are the authors', and one SGD step at
    # the paper's rate moves the net as it moved theirs (tests/test_authors_step.py;
    # docs/learning_rates.md). Not the input / its std with features x 0.762: the same net, and the same
    # steps on the weights, but each coarse1-5 bias, 76.18 times smaller against its activations
    # with a 76.18 times larger gradient, would move the output 76.18^2 = 5,804 times as far per
    # step. Nor rates per tensor (bias rates / 5,804): the rates would no longer be the paper's.
    feature_scale=0.01, coarse_mean=IMAGES_MEAN, coarse_std=1.0,
    fine_mean=IMAGES_MEAN, fine_std=IMAGES_STD, log_depth_std=LOGDEPTHS_STD, dropout=0.5,
    lr=PAPER_LR,
    weight_decay={k: 0.0 for k in PAPER_LR})   # (?) not stated in [P]

RELEASE = Variant(
    name='release', pool='release', lrn=True, fine1_filters=64, feature_scale=0.01,
    coarse_mean=128.0, coarse_std=1.0, fine_mean=IMAGES_MEAN, fine_std=IMAGES_STD,
    log_depth_std=LOGDEPTHS_STD, dropout=0.5, lr=PAPER_LR, weight_decay=RELEASE_WD,
    # 3x3/2 pools with Caffe/cuda-convnet ceil rounding: the only rounding that gives [R]'s fine
    # branch its 55x74 output; it makes coarse5 6x9 (not Fig. 1's 6x8).
    fine_sees_coarse_dropout=True)

# torchvision's ImageNet weights expect RGB / 255 normalised with these (its AlexNet_Weights
# transforms); in our 0..255 units:
IMAGENET_MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))
IMAGENET_UNIT = sum(IMAGENET_STD) / 3   # 57.6

ALEXNET = replace(
    PAPER, name='alexnet', coarse_convs='alexnet',
    # The authors' units as in PAPER, so that the paper's rates act as they did on the authors'
    # ImageNet convs, which saw 0..255 pixel values: coarse1 sees torchvision's normalised input
    # x 57.6 (each channel less ImageNet's mean, x 57.6 / its std: 0..255 units within 1.4%, with
    # the channel balance torchvision's weights were trained on), so the maps of coarse1-5 are
    # torchvision's x 57.6, its ImageNet biases are loaded x 57.6 (load_imagenet_convs: the same
    # net), and the features are x 0.01. In torchvision's units a step at the paper's rate would
    # move each coarse1-5 bias's output 57.6^2 = 3,321 times as far (lr_study.py --rates).
    feature_scale=0.01, coarse_mean=IMAGENET_MEAN,
    coarse_std=tuple(s / IMAGENET_UNIT for s in IMAGENET_STD))

VARIANTS = {v.name: v for v in (PAPER, RELEASE, ALEXNET)}

# A coarse net's weights file holds this (a constant 1): its coarse1-5 work in the authors' units.
AUTHORS_UNITS = 'authors_units'
# Files without it were written while coarse1-5 worked in units of the input's std: one unit of
# their activations was this many of the authors' (the release's were the authors' already).
STD_UNITS = {'paper': IMAGES_STD, 'alexnet': IMAGENET_UNIT, 'release': 1.0}


def get_variant(name):
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _pool(variant):
    if variant.pool == 'release':
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)
    return nn.MaxPool2d(2, stride=2)


def _lrn():
    # (?) [R] calls cuda-convnet's cmrnorm with its defaults; AlexNet's constants are used here.
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)


class GlobalCoarseNet(nn.Module):
    """Coarse-scale network (Sec. 3.1.1): a global view of the scene, ending in a fully connected
    layer whose outputs are the log-depth map (NYU: 4070 = 55 x 74; KITTI: 3834 = 27 x 142).
    Sizes in the comments are NYU's; KITTI's (Fig. 1) are in tests/test_kitti_geometry.py."""
    OUTPUT_INIT_STD = 0.001   # coarse7's initial weights ([R]'s scale, _init)

    def __init__(self, variant=PAPER, geometry=NYU):
        super().__init__()
        self.variant, self.geometry = variant, geometry
        v = variant
        _normalisation(self, 'coarse', v.coarse_mean, v.coarse_std)
        if v.coarse_convs == 'alexnet':
            _alexnet_convs(self)
        else:
            norm = [_lrn()] if v.lrn else []
            pool2 = _pool(v) if v.pool == 'release' else nn.MaxPool2d(geometry.coarse2_pool, stride=2)
            # coarse1: 11x11/4 conv, valid: 228x304 -> 55x74, pool -> 27x37 x 96
            self.coarse1 = nn.Sequential(nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), _pool(v), *norm)
            # coarse2: 5x5 conv, same padding, pool -> 13x18 x 256
            self.coarse2 = nn.Sequential(nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(inplace=True), pool2, *norm)
            # coarse3, coarse4: 3x3 conv, same padding -> 13x18 x 384
            self.coarse3 = nn.Sequential(nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True))
            self.coarse4 = nn.Sequential(nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True))
            # coarse5: 3x3 conv -> 13x18 x 256. Fig. 1 draws no pool yet the map shrinks to 6x8 (8x6
            # in W x H): (?) a 3x3/2 pool, as [R] has, is the only symmetric pool giving exactly 6x8.
            pool5 = _pool(v) if v.pool == 'release' else nn.MaxPool2d(3, stride=2)
            self.coarse5 = nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), pool5)
        # Saved with the weights: coarse1-5 work in the authors' units (PAPER). Files written
        # before, in units of the input's std, lack it; load_weights converts them.
        self.register_buffer(AUTHORS_UNITS, torch.ones(1))
        h5, w5 = conv_output_hw(
            [self.coarse1, self.coarse2, self.coarse3, self.coarse4, self.coarse5], geometry.input_hw)
        # coarse6: fully connected, ReLU, dropout -> 4096
        self.coarse6 = nn.Sequential(nn.Flatten(), nn.Linear(256 * h5 * w5, 4096), nn.ReLU(inplace=True),
                              nn.Dropout(v.dropout))
        # coarse7: fully connected, linear -> 4070 = 55 x 74
        self.coarse7 = nn.Linear(4096, geometry.output_hw[0] * geometry.output_hw[1])
        _init(self, v)

    def forward(self, image):
        """image: (B, 3, 228, 304) RGB 0..255 -> (B, 1, 55, 74) log depth."""
        v = self.variant
        x = (image - self.coarse_mean) / self.coarse_std   # [R]: image - 128
        x = self.coarse5(self.coarse4(self.coarse3(self.coarse2(self.coarse1(x)))))
        x = self.coarse7(self.coarse6(x * v.feature_scale))
        return x.view(-1, 1, *self.geometry.output_hw) * v.log_depth_std


def conv_output_hw(layers, hw):
    """The (H, W) that the convolutions and max pools of `layers` (in order) make of an (H, W)
    input, by their arithmetic (floor, or ceil with ceil_mode): coarse6's input size."""
    h, w = hw
    for m in (m for layer in layers for m in layer.modules()):
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            pair = lambda a: a if isinstance(a, tuple) else (a, a)
            (kh, kw), (sh, sw), (ph, pw) = pair(m.kernel_size), pair(m.stride), pair(m.padding)
            rounding = math.ceil if getattr(m, 'ceil_mode', False) else math.floor
            h = rounding((h + 2 * ph - kh) / sh) + 1
            w = rounding((w + 2 * pw - kw) / sw) + 1
    return h, w


class LocalFineNet(nn.Module):
    """Fine-scale network (Sec. 3.1.2): local refinement of the coarse prediction. Its input is the
    image and the coarse net's output, which enters as one feature map after fine1. On KITTI it
    sees the bottom rows of the crop (Geometry.fine_top), the region the output covers."""
    OUTPUT_INIT_STD = 0.01   # fine3's initial weights ([R]'s scale, _init)

    def __init__(self, variant=PAPER, pass_through=True, geometry=NYU):
        """pass_through: start as the identity on the coarse map (_pass_coarse_through); False: the
        random start of every other layer (train.py --fine-init random)."""
        super().__init__()
        self.variant, self.geometry = variant, geometry
        v = variant
        _normalisation(self, 'fine', v.fine_mean, v.fine_std)
        # fine1: 9x9/2 conv, valid: 228x304 -> 110x148, pool -> 55x74 x 63 (64 in [R])
        self.fine1 = nn.Sequential(nn.Conv2d(3, v.fine1_filters, 9, stride=2), nn.ReLU(inplace=True), _pool(v))
        # fine2: 5x5 conv, zero padded, on [coarse map, fine1 maps] (64 channels) -> 55x74 x 64
        self.fine2 = nn.Sequential(nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(inplace=True))
        # fine3: 5x5 conv, zero padded, linear -> 55x74 x 1
        self.fine3 = nn.Conv2d(64, 1, 5, padding=2)
        _init(self, v)
        if pass_through:
            _pass_coarse_through(self, v)

    def forward(self, image, coarse_log_depth):
        """image: (B, 3, 228, 304) RGB 0..255; coarse_log_depth: (B, 1, 55, 74) -> (B, 1, 55, 74)."""
        v = self.variant
        image = image[:, :, self.geometry.fine_top:]
        x = self.fine1((image - self.fine_mean) / self.fine_std)
        coarse = coarse_log_depth / v.log_depth_std
        if v.fine1_filters == 64:   # [R]: the coarse map replaces channel 0 of fine1's output
            x = x[:, 1:]
        x = torch.cat([coarse, x], dim=1)
        return self.fine3(self.fine2(x)) * v.log_depth_std


def _normalisation(net, prefix, mean, std):
    """The input normalisation as (1, 3, 1, 1) buffers (one number, or one per RGB channel), not
    saved with the weights: it is the variant's, not learned."""
    for name, value in (('mean', mean), ('std', std)):
        t = torch.tensor(value, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1).clone()
        net.register_buffer(f'{prefix}_{name}', t, persistent=False)


# torchvision's AlexNet `features` index of each conv -> our layer, for its ImageNet weights
COARSE_CONVS = tuple(f'coarse{i}' for i in range(1, 6))   # the ImageNet-pretrained layers (Sec. 3.1.1)
ALEXNET_CONVS = {0: 'coarse1', 3: 'coarse2', 6: 'coarse3', 8: 'coarse4', 10: 'coarse5'}


def _alexnet_convs(net):
    """coarse1-5 laid out as torchvision's AlexNet `features` (conv 11x11/4 pad 2, 3x3/2 pools
    after conv 1, 2 and 5): 228x304 -> 56x75 -> 27x37 -> 13x18 -> 6x8, Fig. 1's sizes from
    coarse2 on, with 64-192-384-256-256 channels instead of 96-256-384-384-256."""
    relu = lambda: nn.ReLU(inplace=True)
    net.coarse1 = nn.Sequential(nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, 2))
    net.coarse2 = nn.Sequential(nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2))
    net.coarse3 = nn.Sequential(nn.Conv2d(192, 384, 3, padding=1), relu())
    net.coarse4 = nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), relu())
    net.coarse5 = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), relu(), nn.MaxPool2d(3, 2))


def _last_line(error):
    """The telling line of a load_state_dict error (its last), or the error's type if it says
    nothing: for one-line refusals."""
    text = str(error).strip()
    return text.splitlines()[-1].strip() if text else type(error).__name__


def imagenet_weights():
    """(URL, path in the torch hub cache) of torchvision's IMAGENET1K_V1 AlexNet weights; the
    cache is $TORCH_HOME/hub/checkpoints (~/.cache/torch by default)."""
    from torchvision.models import AlexNet_Weights
    url = AlexNet_Weights.IMAGENET1K_V1.url
    return url, os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))


def load_imagenet_convs(net):
    """coarse1-5 of an alexnet-variant net from torchvision's ImageNet weights: the cached file,
    or downloaded once into the cache. Neither possible: one line naming the URL and the path
    where the file can be put by hand (a UserError); nothing is written then."""
    import urllib.error
    import urllib.request
    url, path = imagenet_weights()
    if not os.path.isfile(path):
        try:   # reach the server before creating any folder, so a failure leaves nothing behind
            urllib.request.urlopen(url, timeout=30).close()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            reason = getattr(e, 'reason', None) or e
            raise UserError(f'the ImageNet weights of --variant alexnet could not be downloaded '
                            f'({reason}); download {url} and put it at {path} (the torch hub cache, '
                            f'TORCH_HOME), or train from random weights with --no-pretrained') from None
    state = load_torch_file(path, "torchvision's AlexNet IMAGENET1K_V1 weights")
    # coarse1 sees torchvision's normalised input x unit (ImageNet's std over the variant's: 57.6
    # for ALEXNET, the authors' units; 1 for an input divided by ImageNet's std), so the maps of
    # coarse1-5 are torchvision's x unit: the biases x unit, the weights as they are
    std = net.variant.coarse_std
    unit = sum(IMAGENET_STD) / (sum(std) if isinstance(std, tuple) else 3 * std)
    mapped = {f'{ALEXNET_CONVS[int(k.split(".")[1])]}.0.{k.split(".")[2]}':
              v * unit if k.endswith('bias') else v
              for k, v in state.items() if k.startswith('features.') and isinstance(v, torch.Tensor)}
    try:
        net.load_state_dict(mapped, strict=False)
    except RuntimeError as e:
        raise DataError(f'{path}: not the AlexNet weights torchvision has '
                        f'({_last_line(e)})') from None
    if len(mapped) != 10:
        raise DataError(f'{path}: has {len(mapped)} of the 10 conv tensors of AlexNet `features`')
    return path


def _init(net, variant):
    """(?) Init is not stated in [P]. Hidden layers: He (Kaiming) normal, zero bias, so a random-
    init net trains without ImageNet weights. Linear output layers: small weights as in [R]
    (0.01-scale); their biases start at [R]'s mean log depth so the first predictions are a
    plausible room-scale constant instead of 1 m."""
    last = getattr(net, layer_names(net)[-1])   # the output layer: coarse7, fine3
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m is last:
                nn.init.normal_(m.weight, std=net.OUTPUT_INIT_STD)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            nn.init.zeros_(m.bias)
    nn.init.constant_(last.bias, LOGDEPTHS_MEAN / variant.log_depth_std)


@torch.no_grad()
def _pass_coarse_through(fine, variant):
    """(?) Init is not stated in [P]; Sec. 3.1.2 has the fine net "edit" the coarse prediction it
    receives. So it starts as the identity on that prediction and learns the edits: fine2's filters
    0 and 1 take +a and -a times the coarse map (channel 0 of fine2's input) at their centre tap
    and nothing else, fine3 adds them back at +1/a and -1/a (relu(a c) - relu(-a c) = a c, also
    where log depth is negative), its other weights and bias start at 0. The other fine2 filters
    keep their random start; fine3's zero weights on them get gradients from the first step.
    a = (lr_fine2 / lr_fine3) ** (1/4): a step moves the pass-through's output by lr2 / a^2 +
    lr3 * a^2 per unit of gradient, the least there (a = 1 diverged in the demo at the paper's
    rates). Measured on the demo (docs/results.md): Coarse + Fine then beats Coarse."""
    a = (variant.lr['fine2'] / variant.lr['fine3']) ** 0.25
    conv2, conv3 = fine.fine2[0], fine.fine3
    conv3.weight.zero_()
    conv3.bias.zero_()
    for channel, sign in ((0, 1.0), (1, -1.0)):
        conv2.weight[channel].zero_()
        conv2.bias[channel] = 0.0
        conv2.weight[channel, 0, 2, 2] = sign * a
        conv3.weight[0, channel, 2, 2] = sign / a


# The stages in the order their nets run: the coarse net sees the image alone, each later net the
# image and the prediction of the net before it, which it refines (Sec. 3.1.2). 'refine' (train.py
# --refine 2) is not the paper's: a second fine net on the first one's output, in the direction of
# Eigen & Fergus 2015's third scale.
STAGES = ('coarse', 'fine', 'refine')
# Each stage's prediction as the tables, figures and summaries name it: the nets that made it.
STAGE_NAMES = {'coarse': 'Coarse', 'fine': 'Coarse + Fine', 'refine': 'Coarse + Fine + Fine'}


# Each stage's net: train.py builds it, load_pretrained loads its weights into it. A new fine net
# is a class called as LocalFineNet is, (variant, pass_through=, geometry=), whose forward takes
# (images, log depth before it), here in place of LocalFineNet; the rates of its layers (named
# children with parameters) go into PAPER_LR and RELEASE_WD, as fine1-3's.
STAGE_NETS = {'coarse': GlobalCoarseNet, 'fine': LocalFineNet, 'refine': LocalFineNet}


def new_net(stage, variant=PAPER, geometry=NYU, fine_init='pass'):
    """A new net for `stage` (STAGE_NETS). fine_init: 'pass' starts a refining net as the
    identity on the map it is given, 'random' as every other layer (train.py --fine-init)."""
    if stage == 'coarse':
        return STAGE_NETS[stage](variant, geometry)
    return STAGE_NETS[stage](variant, pass_through=fine_init == 'pass', geometry=geometry)


def run_net(net, images, before):
    """One net of the chain: the coarse net on the images (before is None), a refining net on the
    images and the log depth `before` it that it refines."""
    return net(images) if before is None else net(images, before)


class Chain(nn.ModuleDict):
    """The coarse net and the nets that refine its prediction after it, in the order of STAGES:
    chain.predictions(images) is every stage's log depth by stage, chain(images) the last one's.
    A ModuleDict: chain['fine'], 'refine' in chain, chain.eval(), chain.to(device) as for one net.

    Chain(nets) takes the stages of a dict of nets from the coarse one on; last='fine' stops there."""

    def __init__(self, nets, last=None):
        stages = [s for s in STAGES if s in nets and nets[s] is not None]
        stages = stages[:stages.index(last) + 1] if last is not None else stages
        if stages != list(STAGES[:len(stages)]) or not stages:   # a gap would skip a refinement
            raise ValueError(f'a chain runs {", ".join(STAGES)} in this order from the first; '
                             f'got {sorted(nets)}')
        super().__init__({s: nets[s] for s in stages})

    @property
    def geometry(self):
        return self['coarse'].geometry

    @property
    def variant(self):
        return self['coarse'].variant

    def predictions(self, images):
        """{stage: (B, 1, H, W) log depth} of every net, in order."""
        found, before = {}, None
        for stage, net in self.items():
            before = found[stage] = run_net(net, images, before)
        return found

    def forward(self, images):
        """The last net's log depth: what the chain predicts."""
        return list(self.predictions(images).values())[-1]


def layer_names(net):
    """The paper's layer names that own parameters, in order: coarse1..coarse7 or fine1..fine3."""
    return [n for n, m in net.named_children() if any(True for _ in m.parameters())]


def load_pretrained_conv(net, path):
    """Load user-supplied ImageNet weights for coarse1..coarse5 ([P]: "pretrained on the ImageNet
    classification task"). `path` holds a state_dict with keys coarseK.0.weight / coarseK.0.bias."""
    state = load_torch_file(path, 'a state_dict with coarse1..coarse5 weights')
    if not isinstance(state, dict):
        raise DataError(f'{path}: holds a {type(state).__name__}, not a state_dict (a dict of '
                        f'named tensors such as coarse1.0.weight)')
    wanted = {k: v for k, v in state.items() if isinstance(k, str) and
              k.split('.')[0] in COARSE_CONVS}
    if not wanted:
        raise DataError(f"{path}: no coarse1..coarse5 weights in this file")
    try:
        missing = net.load_state_dict(wanted, strict=False)
    except RuntimeError as e:
        raise DataError(f'{path}: {_last_line(e)}') from None
    return sorted(wanted), missing


def load_weights(net, path, what, state=None):
    """Load a state_dict file into `net` (or `state`, already read from `path`), refusing (one
    line) weights of another layer layout. A coarse net written in units of the input's std is
    converted (from_std_units)."""
    state = load_torch_file(path, what) if state is None else state
    unit = None
    if isinstance(net, GlobalCoarseNet) and isinstance(state, dict) and AUTHORS_UNITS not in state \
            and net.variant.name in STD_UNITS:   # another layout is refused below, as ever
        unit = STD_UNITS[net.variant.name]
        state = from_std_units(state, unit)
    try:
        net.load_state_dict(state)
        if unit not in (None, 1.0):
            print(f"{path}: written while coarse1-5 worked in units of the input's std; its "
                  f"coarse1-5 biases converted to the authors' units (x {unit:.2f}): the same net")
    except (RuntimeError, TypeError, AttributeError) as e:
        found = variant_of(state) if isinstance(net, GlobalCoarseNet) else None
        if found is not None:   # a coarse net of another variant or dataset: say which
            raise DataError(f'{path}: holds a coarse net of the {found[0].name} variant for '
                            f'{found[1].name.upper()}; this run builds the {net.variant.name} '
                            f'variant for {net.geometry.name.upper()} (--variant, --dataset)') from None
        raise DataError(f'{path}: does not fit the {net.variant.name} variant\'s '
                        f'{type(net).__name__} ({_last_line(e)})') from None
    return net


def from_std_units(state, unit):
    """The weights of a coarse net whose coarse1-5 worked in units of the input's std (one unit =
    `unit` of the authors'), for the same net in the authors' units: each coarse1-5 bias x unit,
    everything else as it is. Exact: ReLU convs and max pools scale with their input, and the
    features' factor (then unit x 0.01, now 0.01) takes the rest."""
    state = {k: v * unit if isinstance(v, torch.Tensor) and k.endswith('.bias') and
             k.split('.')[0] in COARSE_CONVS else v for k, v in state.items()}
    state[AUTHORS_UNITS] = torch.ones(1)
    return state


def variant_of(coarse_state):
    """(variant, geometry) whose GlobalCoarseNet has exactly these tensor shapes, or None (the
    shapes are read off nets built on the meta device: no memory, no initialisation). The
    geometry tells NYU weights from KITTI's: coarse6 and coarse7 differ. Files with or without
    the authors' units mark alike (load_weights converts the latter)."""
    if not isinstance(coarse_state, dict):
        return None
    got = {k: tuple(v.shape) for k, v in coarse_state.items()
           if isinstance(v, torch.Tensor) and k != AUTHORS_UNITS}
    for v in VARIANTS.values():
        for g in GEOMETRIES.values():
            with torch.device('meta'):
                want = {k: tuple(t.shape) for k, t in GlobalCoarseNet(v, g).state_dict().items()
                        if k != AUTHORS_UNITS}
            if got == want:
                return v, g
    return None


def load_pretrained(folder='model', device='cpu'):
    """The trained nets from `folder` as a Chain in eval mode, in one line for a notebook:
    `nets = load_pretrained()`, then `nets(images)` or `nets.predictions(images)`. coarse.pth,
    then fine.pth if present, then refine.pth (train.py --refine 2) if fine.pth is there too. The
    variant and the dataset (NYU or KITTI: `nets.geometry`) are read off the weights' shapes
    (variant_of). Files are read with weights_only=True; a bad one raises DataError saying what is
    wrong."""
    def read(path, what):
        """A weights file, refused if a weight is NaN or inf (a diverged run's: its depth maps
        would be NaN)."""
        state = load_torch_file(path, what)
        if isinstance(state, dict):
            # the sum first, one fast pass: NaN and inf carry through it (so does an overflow,
            # which the exact look after it tells apart)
            bad = next((k for k, v in state.items() if isinstance(v, torch.Tensor)
                        and v.is_floating_point() and not v.sum().isfinite()
                        and not v.isfinite().all()), None)
            if bad is not None:
                raise DataError(f'{path}: {bad} holds NaN or inf (saved by a run that diverged?); '
                                f'use weights of a run that did not')
        return state

    path = os.path.join(folder, 'coarse.pth')
    if not os.path.lexists(path):
        raise DataError(f'{path}: no trained coarse net; run train.py (or train.py --demo) '
                             f'first, or point at the folder it wrote')
    states = {'coarse': read(path, 'coarse net weights written by train.py')}
    found = variant_of(states['coarse'])
    if found is None:
        raise DataError(f'{path}: weights of no coarse net here ({", ".join(VARIANTS)} variants, '
                        f'{" or ".join(GEOMETRIES)})')
    # every file is read before a net is built: a bad one is refused at once. A fine.pth or
    # refine.pth that is there but no file (a folder) is refused by read, not passed over: that
    # would give the coarse net's depth maps without a word
    what = {'coarse': 'coarse net weights', 'fine': 'fine net weights',
            'refine': 'second fine net weights'}
    for stage in STAGES[1:]:
        stage_path = os.path.join(folder, f'{stage}.pth')
        if not os.path.lexists(stage_path):
            break
        states[stage] = read(stage_path, what[stage])
    variant, geometry = found
    nets = {stage: load_weights(new_net(stage, variant, geometry), os.path.join(folder, f'{stage}.pth'),
                                what[stage], state)
            for stage, state in states.items()}
    return Chain(nets).to(device).eval()
