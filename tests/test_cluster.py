"""Runs on a cluster: plain progress lines in a log file, the history CSV, one command
line a scheduler can rerun (--resume auto), SIGUSR1 (tests/test_reliability.py sends it with
SIGINT and SIGTERM)."""
import re
import subprocess
import sys

import pytest
import torch

import runlog
import train
import util
from helpers import ROOT, train_args

pytestmark = pytest.mark.slow   # every test here trains

SCHEDULE = ['--coarse-samples', 24, '--batch-size', 4, '--stage', 'coarse', '--val-every', 8,
            '--val-fraction', 0.15, '--seed', 2]   # 6 steps, a history row every 2
LINE = re.compile(r'^coarse step (\d+)/6 \((\d+) samples\): loss (\d+\.\d+), samples_s=(\d+\.\d), '
                  r'ETA \d+:\d\d:\d\d$')


def _logged_run(synthetic, out, *extra):
    """train.py with stdout and stderr into one file, as a batch job's log: its text."""
    log = out.parent / f'{out.name}.log'
    with open(log, 'w') as f:
        r = subprocess.run([sys.executable, 'train.py', *map(str, train_args(synthetic, out, *extra))],
                           cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def test_a_log_file_gets_plain_progress_lines_at_the_cadence_asked(synthetic, tmp_path, capsys):
    text = _logged_run(synthetic, tmp_path / 'every', *SCHEDULE, '--log-every', 3, '--print-every', 0)
    assert '\r' not in text                      # no progress bar (nor the .mat reader's)
    steps = [int(m.group(1)) for m in map(LINE.match, text.splitlines()) if m]
    assert steps == [2, 3, 4, 6]                 # every logging point: --log-every 3, rows every 2
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            assert int(m.group(2)) == 4 * int(m.group(1)) and float(m.group(4)) > 0
    assert sum('val loss' in line for line in text.splitlines()) == 3
    # the default cadence, once a minute: the first logging point and the end of the stage
    # (in this process: pytest's captured output is no terminal either)
    assert train.main(train_args(synthetic, tmp_path / 'default', *SCHEDULE, '--log-every', 3)) == 0
    text = capsys.readouterr().out
    assert [int(m.group(1)) for m in map(LINE.match, text.splitlines()) if m] == [2, 6]


def _rows(path):
    return [{k: r[k] for k in ('step', 'samples', 'train_loss', 'val_loss', 'val_si_log', 'val_rmse')}
            for r in runlog.read_history(path)]


@pytest.fixture(scope='module')
def straight(synthetic, tmp_path_factory):
    """An uninterrupted run of SCHEDULE: what the interrupted ones below must end as."""
    out = tmp_path_factory.mktemp('straight')
    assert train.main(train_args(synthetic, out, *SCHEDULE)) == 0
    return out


def test_history_csv_after_a_run_and_after_an_interrupted_one(synthetic, straight, tmp_path, monkeypatch):
    csv = straight / 'history_coarse.csv'
    header = csv.read_text().splitlines()[0].split(',')
    assert header == ['step', 'samples', 'train_loss', 'val_loss', 'val_d1', 'val_d2', 'val_d3',
                      'val_abs_rel', 'val_sq_rel', 'val_rmse', 'val_rmse_log', 'val_si_log',
                      'val_log10', 'samples_per_s', 'elapsed_s', 'wall_time']
    rows = runlog.read_history(csv)
    assert [(r['step'], r['samples']) for r in rows] == [(2, 8), (4, 16), (6, 24)]
    assert all(r['val_rmse'] > 0 and r['samples_per_s'] > 0 for r in rows)
    assert rows[0]['elapsed_s'] < rows[1]['elapsed_s'] < rows[2]['elapsed_s']
    saved = torch.load(straight / 'checkpoint.pth', weights_only=True)['history']
    assert _rows(csv) == [{k: r[k] for k in _rows(csv)[0]} for r in saved]
    assert (straight / 'loss_coarse.png').stat().st_size > 0

    # stopped at step 3 (between rows), with a row written after the checkpoint, as when a job is
    # killed between a row and the next checkpoint; resumed: the rows of the uninterrupted run
    chunked = tmp_path / 'chunked'
    assert train.main(train_args(synthetic, chunked, *SCHEDULE, '--max-steps', 3)) == 0
    csv = chunked / 'history_coarse.csv'
    runlog.append_history(csv, {'step': 4, 'samples': 16, 'train_loss': 9.0})
    plotted, real_plot = [], util.plot_losses
    monkeypatch.setattr(util, 'plot_losses', lambda rows, *a: plotted.append(rows) or real_plot(rows, *a))
    assert train.main(train_args(synthetic, chunked, *SCHEDULE, '--resume')) == 0
    assert _rows(csv) == _rows(straight / 'history_coarse.csv')
    assert plotted[-1] == runlog.read_history(csv)   # the plot is drawn from the file


def test_resume_auto_starts_afresh_then_continues(synthetic, straight, tmp_path, capsys):
    auto = tmp_path / 'auto'
    assert train.main(train_args(synthetic, auto, *SCHEDULE, '--resume', 'auto', '--max-steps', 4)) == 0
    assert f'--resume auto: no checkpoint of this run in {auto}, starting afresh' in capsys.readouterr().out
    assert torch.load(auto / 'checkpoint.pth', weights_only=True)['step'] == 4
    assert train.main(train_args(synthetic, auto, *SCHEDULE, '--resume', 'auto')) == 0
    assert f"--resume auto: continuing {auto / 'checkpoint.pth'}" in capsys.readouterr().out
    a, b = (torch.load(d / 'coarse.pth', weights_only=True) for d in (straight, auto))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a requeued job whose run has finished does nothing, successfully
    assert train.main(train_args(synthetic, auto, *SCHEDULE, '--resume', 'auto')) == 0
    assert 'that run has finished' in capsys.readouterr().out
