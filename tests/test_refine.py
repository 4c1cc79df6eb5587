"""--refine 2 (the seed's idea; not in the paper): a third stage trains a second fine net
on the first one's output, the coarse and first fine nets fixed; evaluate.py and predict.py use it."""
import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import predict
import train
from helpers import train_args
from net import PAPER, Chain, GlobalCoarseNet, LocalFineNet, load_pretrained

pytestmark = pytest.mark.slow   # three-stage training runs

SCHEDULE = ['--coarse-samples', 16, '--fine-samples', 24, '--batch-size', 8, '--val-every', 8,
            '--val-fraction', 0.15, '--refine', 2]


def _weights(folder, name):
    return torch.load(folder / f'{name}.pth', weights_only=True)


def test_the_third_stage_trains_the_second_fine_net_alone_and_resumes_exactly(synthetic, nyu_like, tmp_path):
    straight, chunked = tmp_path / 'straight', tmp_path / 'chunked'
    assert train.main(train_args(synthetic, straight, *SCHEDULE)) == 0
    ckpt = torch.load(straight / 'checkpoint.pth', weights_only=True)
    assert ckpt['stage'] == 'refine' and ckpt['done']
    for name in ('coarse', 'fine'):   # what the earlier stages wrote is what the third one ran on
        assert ckpt[name] == {'file': f'{name}.pth', 'sha256': checkpoint.weights_hash(_weights(straight, name))}
    refine = _weights(straight, 'refine')
    start = LocalFineNet(PAPER).state_dict()['fine3.weight']   # pass-through start, no random part
    assert not torch.equal(refine['fine3.weight'], start)
    # stopped in the third stage (2 coarse + 3 fine + 1 refine steps), resumed: the same weights
    assert train.main(train_args(synthetic, chunked, *SCHEDULE, '--max-steps', 6)) == 0
    assert torch.load(chunked / 'checkpoint.pth', weights_only=True)['stage'] == 'refine'
    assert train.main(train_args(synthetic, chunked, *SCHEDULE, '--resume')) == 0
    assert all(torch.equal(_weights(chunked, 'refine')[k], refine[k]) for k in refine)

    # evaluate.py adds the row; load_pretrained and predict.py use the second fine net
    results = evaluate.evaluate(evaluate.parse_args(
        ['--data', str(nyu_like[0]), '--splits', str(nyu_like[1]), '--model', str(straight),
         '--out', str(tmp_path / 'eval'), '--device', 'cpu', '--protocol', 'paper']))
    assert list(results['paper'])[-2:] == ['Coarse + Fine', 'Coarse + Fine + Fine']
    loaded = load_pretrained(straight)
    assert list(loaded) == ['coarse', 'fine', 'refine']
    rgb = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    nets = {name: net.eval() for name, net in (('coarse', GlobalCoarseNet(PAPER)), ('fine', LocalFineNet(PAPER)),
                                               ('refine', LocalFineNet(PAPER)))}
    for name, net in nets.items():
        net.load_state_dict(_weights(straight, name))
    by_hand = predict.predict_depth(Chain(nets), rgb)
    two_nets = predict.predict_depth(Chain(nets, last='fine'), rgb)
    assert np.array_equal(predict.predict_depth(loaded, rgb), by_hand)
    assert not np.array_equal(by_hand, two_nets)
