import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that runs train.main in this process with --threads N changes torch's thread count
    for the whole process; put it back, so the next tests do not run on one core."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def shared():
    """../shared beside the checkout (reference material, real NYU samples); users' clones do not
    have it, so tests that need it skip with the reason."""
    if not os.path.isdir(os.path.join(SHARED, 'nyu-samples')):
        if os.environ.get('REQUIRE_SHARED') == '1':   # .ci/run where ../shared exists
            pytest.fail(f'{SHARED}/nyu-samples not present, and REQUIRE_SHARED=1')
        pytest.skip(f'{SHARED}/nyu-samples not present (only on the project machines)')
    return SHARED


def train_args(data, out, *extra):
    """train.py arguments for a run on the (mat, splits) pair `data`, CPU, output to `out`."""
    mat, splits = data
    return ['--data', str(mat), '--splits', str(splits), '--out', str(out), '--device', 'cpu',
            '--train-depth', 'filled', *map(str, extra)]


@pytest.fixture(scope='session')
def synthetic(tmp_path_factory):
    """A small synthetic data set in NYU's labeled layout: 14 rooms x 3 views."""
    import synthetic
    folder = tmp_path_factory.mktemp('synthetic')
    return synthetic.make_synthetic_nyu(folder, num_scenes=14, frames_per_scene=3, seed=1, progress=False)


@pytest.fixture(scope='session')
def trained(synthetic, tmp_path_factory):
    """Both nets trained briefly on `synthetic` (coarse 640 samples, fine 96), in a model folder.
    Batch 8: 80 steps, held-out error 0.70 of a constant prediction's (batch 16, 40 steps: 0.82)."""
    import train
    out = tmp_path_factory.mktemp('model')
    rc = train.main(train_args(synthetic, out, '--coarse-samples', 640, '--fine-samples', 96,
                               '--batch-size', 8, '--val-fraction', 0.15, '--val-every', 320))
    assert rc == 0
    return out
