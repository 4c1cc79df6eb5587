"""demo.ipynb runs headless against trained weights, so it cannot rot."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(model, monkeypatch):
    """demo.ipynb executed headless on the weights in `model`; the text it printed."""
    monkeypatch.setenv('DEPTH_MODEL', str(model))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(os.path.join(ROOT, 'demo.ipynb'), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name='python3',
                   resources={'metadata': {'path': ROOT}}).execute()
    return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


def test_demo_notebook_runs(trained, monkeypatch):
    outputs = run_notebook(trained, monkeypatch)
    assert "variant 'paper': coarse + fine" in outputs
    assert "'si_log'" in outputs
