"""Fixtures that several test modules share; plain helper functions are in helpers.py."""
import os

import pytest
import torch

import kitti_tree
from helpers import SHARED, train_args, write_nyu_like

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
    """The reference material beside the checkout (real NYU samples); users' clones do not have
    it, so tests that need it skip with the reason, unless REQUIRE_SHARED=1 (.ci/run sets it
    where the material is present) makes its absence a failure."""
    if not os.path.isdir(os.path.join(SHARED, 'nyu-samples')):
        if os.environ.get('REQUIRE_SHARED') == '1':
            pytest.fail(f'{SHARED}/nyu-samples not present, and REQUIRE_SHARED=1')
        pytest.skip(f'{SHARED}/nyu-samples not present (only on the project machines)')
    return SHARED


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


@pytest.fixture(scope='session')
def nyu_like(tmp_path_factory):
    """Six frames in NYU's labeled layout (helpers.write_nyu_like) and a splits.mat holding three
    of them for testing: a test set far smaller than `synthetic`'s, for tests that evaluate."""
    import numpy as np
    import scipy.io
    folder = tmp_path_factory.mktemp('nyu_like')
    mat, splits = folder / 'nyu_depth_v2_labeled.mat', folder / 'splits.mat'
    write_nyu_like(mat, 6)
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [3.0], [4.0]]),
                              'testNdxs': np.array([[2.0], [5.0], [6.0]])})
    return mat, splits


@pytest.fixture(scope='module')
def tree(request, tmp_path_factory):
    """A tiny raw-KITTI tree (tests/kitti_tree.py) for one test module: the five Eigen test frames
    of kitti_tree.ENTRIES, the last without annotated depth, after the module's KITTI_TRAIN_FRAMES
    (training-list frames, for the modules that train; none by default). Per module, as a module
    may write into it (a cache)."""
    base = tmp_path_factory.mktemp('kitti')
    entries = list(getattr(request.module, 'KITTI_TRAIN_FRAMES', ())) + kitti_tree.ENTRIES
    return kitti_tree.write_tree(base / 'raw', entries, ann_root=base / 'annotated',
                                 unannotated=[kitti_tree.ENTRIES[-1][:2]])
