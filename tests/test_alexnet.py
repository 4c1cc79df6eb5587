"""--variant alexnet: coarse1-5 are torchvision's AlexNet `features`, initialised from
its IMAGENET1K_V1 weights in the torch hub cache (a temporary TORCH_HOME holding random AlexNet
weights under that file's name: no test touches the network), and the whole pipeline on it."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import evaluate
import net
import predict
import train
from helpers import ROOT, run_notebook, train_args
from net import ALEXNET, ALEXNET_CONVS, IMAGENET_STD, IMAGENET_UNIT, GlobalCoarseNet


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / 'torch_home'
    monkeypatch.setenv('TORCH_HOME', str(home))
    url, path = net.imagenet_weights()
    assert path == str(home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth')
    torch.manual_seed(123)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    os.makedirs(os.path.dirname(path))
    torch.save(alexnet.state_dict(), path)
    return alexnet


# the variant, and how many of torchvision's normalised units one unit of its coarse input is:
# the authors' units (0..255, ALEXNET), or torchvision's own (lr_study.py's std-units runs)
@pytest.mark.parametrize('variant, unit', [
    (ALEXNET, 255 * (0.229 + 0.224 + 0.225) / 3),
    (dataclasses.replace(ALEXNET, coarse_std=IMAGENET_STD), 1.0)], ids=['authors', 'torchvision'])
def test_coarse1_to_5_are_torchvisions_features_with_the_cached_weights(torch_home, variant, unit):
    """The same net as torchvision's in the variant's units: in the authors' its input and maps x
    57.6 (the mean of ImageNet's per-channel std in 0..255 units), so the biases x 57.6, the
    weights as they are; in torchvision's units the biases as they are."""
    assert IMAGENET_UNIT == pytest.approx(255 * (0.229 + 0.224 + 0.225) / 3)
    coarse = GlobalCoarseNet(variant).eval()
    net.load_imagenet_convs(coarse)
    for index, layer in ALEXNET_CONVS.items():
        conv = getattr(coarse, layer)[0]
        assert torch.equal(conv.weight, torch_home.features[index].weight), layer
        torch.testing.assert_close(conv.bias, torch_home.features[index].bias * unit), layer
    # the same image through torchvision's features, normalised as its weights' transforms say
    transform = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    mean, std = torch.tensor(transform.mean).view(1, 3, 1, 1), torch.tensor(transform.std).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 228, 304) * 255
    with torch.no_grad():
        ours = (x - coarse.coarse_mean) / coarse.coarse_std
        for layer in ('coarse1', 'coarse2', 'coarse3', 'coarse4', 'coarse5'):
            ours = getattr(coarse, layer)(ours)
        theirs = torch_home.features((x / 255 - mean) / std)
    assert ours.shape == theirs.shape == (2, 256, 6, 8)       # Fig. 1's coarse5 output
    torch.testing.assert_close(ours, theirs * unit, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_without_network_or_cached_file_one_line_and_nothing_written(synthetic, tmp_path):
    out, home = tmp_path / 'out', tmp_path / 'empty_torch_home'
    closed = 'http://127.0.0.1:9'   # a closed local port: no request leaves this machine
    env = {**os.environ, 'TORCH_HOME': str(home), 'http_proxy': closed, 'https_proxy': closed,
           'HTTP_PROXY': closed, 'HTTPS_PROXY': closed, 'no_proxy': '', 'NO_PROXY': ''}
    r = subprocess.run([sys.executable, 'train.py', *map(str, train_args(synthetic, out, '--variant', 'alexnet'))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    message = r.stderr.strip()
    assert message.count('\n') == 0 and message.startswith('error: the ImageNet weights of --variant alexnet')
    assert 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth' in message
    assert str(home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth') in message
    assert not out.exists() and not home.exists()


@pytest.mark.slow
def test_trains_resumes_evaluates_predicts_and_loads(torch_home, synthetic, nyu_like, tmp_path, monkeypatch):
    schedule = ['--variant', 'alexnet', '--coarse-samples', 16, '--fine-samples', 8, '--batch-size', 4,
                '--val-fraction', 0.15, '--val-every', 8]
    straight, chunked = tmp_path / 'straight', tmp_path / 'chunked'
    assert train.main(train_args(synthetic, straight, *schedule)) == 0
    assert train.main(train_args(synthetic, chunked, *schedule, '--max-steps', 2)) == 0
    started = torch.load(chunked / 'checkpoint.pth', weights_only=True)['coarse']['coarse1.0.weight']
    moved = float((started - torch_home.features[0].weight.detach()).abs().max())
    assert 0 < moved < 1e-2                     # two steps from the ImageNet weights, not random ones
    assert train.main(train_args(synthetic, chunked, *schedule, '--resume')) == 0
    for name in ('coarse.pth', 'fine.pth'):
        a, b = (torch.load(d / name, weights_only=True) for d in (straight, chunked))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    coarse, fine = net.load_pretrained(chunked).values()
    assert coarse.variant is ALEXNET and fine.variant is ALEXNET
    assert evaluate.main(['--data', str(nyu_like[0]), '--splits', str(nyu_like[1]), '--model',
                          str(chunked), '--device', 'cpu']) == 0
    Image.fromarray((np.random.default_rng(1).random((120, 160, 3)) * 255).astype(np.uint8)).save(tmp_path / 'x.png')
    assert predict.main([str(tmp_path / 'x.png'), '--model', str(chunked), '--device', 'cpu']) == 0
    assert np.load(tmp_path / 'x_depth.npy').shape == (120, 160)
    assert "variant 'alexnet': coarse + fine" in run_notebook(chunked, monkeypatch)
