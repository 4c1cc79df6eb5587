import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def shared():
    """../shared beside the checkout (reference material, real NYU samples); users' clones do not
    have it, so tests that need it skip with the reason."""
    if not os.path.isdir(os.path.join(SHARED, 'nyu-samples')):
        pytest.skip(f'{SHARED}/nyu-samples not present (only on the project machines)')
    return SHARED
