"""demo.ipynb runs headless against trained weights, so it cannot rot."""
import pytest

from helpers import run_notebook

pytestmark = pytest.mark.slow   # on the trained nets of conftest's `trained`


def test_demo_notebook_runs(trained, monkeypatch):
    outputs = run_notebook(trained, monkeypatch)
    assert "variant 'paper': coarse + fine" in outputs
    assert "'si_log'" in outputs
