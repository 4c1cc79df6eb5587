"""Bad data, interrupted runs and hostile files: each case one test, named after it.

Bad input must give one line naming the file and what is wrong (cli.UserError, printed by
cli.run_cli), faults during training must leave the last complete checkpoint usable, and no file
may be loaded as a pickle that runs code."""
import errno
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import cli
import files
import runlog
import train
import util
from helpers import ROOT, nan_at_call, train_args, write_nyu_like

SCENES = ['kitchen_0001', 'kitchen_0001', 'office_0003', 'bedroom_0010', 'office_0003']


@pytest.fixture
def tiny(tmp_path):
    """A 5-frame file in NYU's layout with its 1-based v5 splits.mat."""
    mat, splits = tmp_path / 'labeled.mat', tmp_path / 'splits.mat'
    write_nyu_like(mat, 5, SCENES)
    scipy.io.savemat(splits, {'trainNdxs': np.array([[1.0], [2.0], [4.0]]),
                              'testNdxs': np.array([[3.0], [5.0]])})
    return mat, splits


def _refused(argv, *expected):
    """train.main(argv) must raise a UserError whose one-line message contains `expected`."""
    with pytest.raises(cli.UserError) as e:
        train.main(argv)
    message = str(e.value)
    assert '\n' not in message
    for text in expected:
        assert str(text) in message, message
    return message


def _hdf5(path, **datasets):
    with h5py.File(path, 'w', userblock_size=512) as f:
        for name, array in datasets.items():
            f.create_dataset(name, data=array)
    return path


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what is wrong

def test_dataset_path_missing(tmp_path, tiny):
    missing = tmp_path / 'nope.mat'
    _refused(train_args((missing, tiny[1]), tmp_path / 'out'), missing, 'not found', '--demo')


def test_directory_instead_of_file(tmp_path, tiny):
    folder = tmp_path / 'folder'
    folder.mkdir()
    _refused(train_args((folder, tiny[1]), tmp_path / 'out'), folder,
             'is a folder without rgb_*', 'the labeled .mat')
    _refused(train_args((folder, tiny[1]), tmp_path / 'out', '--data-format', 'labeled'), folder,
             'is a directory')


def test_out_that_is_a_file_and_a_device_that_is_not_here(tmp_path, tiny):
    """Refused in one line before any work (evaluate.py once ran the whole evaluation first),
    by the three scripts alike."""
    import evaluate
    import predict
    taken = tmp_path / 'results'
    taken.write_text('a file where the outputs would go')
    mat, splits = tiny
    eval_argv = ['--data', mat, '--splits', splits, '--model', tmp_path / 'no_model', '--device', 'cpu']
    predict_argv = ['--model', tmp_path / 'no_model', '--device', 'cpu', mat]
    for script, argv in ((train, train_args(tiny, taken)), (evaluate, [*eval_argv, '--out', taken]),
                         (predict, [*predict_argv, '--out', taken])):
        with pytest.raises(cli.DataError, match=f'{taken}: is a file; --out names a folder'):
            script.main(list(map(str, argv)))
    for script, argv in ((evaluate, eval_argv), (predict, predict_argv)):
        with pytest.raises(cli.UserError, match='--device gpu0: not a device'):
            script.main([*map(str, argv), '--device', 'gpu0'])
        if not torch.cuda.is_available():   # CI and our machines: no GPU
            with pytest.raises(cli.UserError, match='--device cuda: CUDA is not available here'):
                script.main([*map(str, argv), '--device', 'cuda'])


def test_matlab_v5_file_instead_of_v73(tmp_path, tiny):
    v5 = tmp_path / 'v5.mat'
    scipy.io.savemat(v5, {'images': np.zeros((2, 2)), 'depths': np.zeros((2, 2))})
    _refused(train_args((v5, tiny[1]), tmp_path / 'out'), v5, 'v7.3')


def test_random_bytes_instead_of_v73(tmp_path, tiny):
    junk = tmp_path / 'junk.mat'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(train_args((junk, tiny[1]), tmp_path / 'out'), junk, 'not an HDF5')


@pytest.mark.parametrize('missing', ['images', 'depths'])
def test_hdf5_missing_images_or_depths(tmp_path, tiny, missing):
    arrays = {'images': np.zeros((2, 3, 640, 480), np.uint8),
              'depths': np.ones((2, 640, 480), np.float32)}
    del arrays[missing]
    path = _hdf5(tmp_path / 'partial.mat', **arrays)
    _refused(train_args((path, tiny[1]), tmp_path / 'out'), path, f"no '{missing}'")


@pytest.mark.parametrize('name, array, expected', [
    ('images', np.zeros((2, 3, 320, 240), np.uint8), "'images' is (2, 3, 320, 240) uint8"),
    ('images', np.zeros((2, 3, 640, 480), np.float32), "'images' is (2, 3, 640, 480) float32"),
    ('images', np.zeros((2, 640, 480, 3), np.uint8), "(N, 3, 640, 480) uint8"),
    ('depths', np.ones((2, 480, 640), np.float32), "'depths' is (2, 480, 640) float32"),
    ('depths', np.ones((2, 640, 480), np.uint16), "'depths' is (2, 640, 480) uint16"),
])
def test_shapes_or_dtypes_not_nyus(tmp_path, tiny, name, array, expected):
    arrays = {'images': np.zeros((2, 3, 640, 480), np.uint8),
              'depths': np.ones((2, 640, 480), np.float32), name: array}
    path = _hdf5(tmp_path / 'odd.mat', **arrays)
    _refused(train_args((path, tiny[1]), tmp_path / 'out'), path, expected)


def test_splits_missing(tmp_path, tiny):
    missing = tmp_path / 'splits_nope.mat'
    _refused(train_args((tiny[0], missing), tmp_path / 'out'), missing, 'not found', 'splits.mat')


def test_splits_out_of_range(tmp_path, tiny):
    bad = tmp_path / 'splits_range.mat'
    scipy.io.savemat(bad, {'trainNdxs': np.array([[1.0], [2.0], [9.0]]), 'testNdxs': np.array([[3.0]])})
    _refused(train_args((tiny[0], bad), tmp_path / 'out'), bad, "'trainNdxs' holds 1..9", '1..5')


def test_splits_zero_based(tmp_path, tiny):
    bad = tmp_path / 'splits_0.mat'
    scipy.io.savemat(bad, {'trainNdxs': np.array([[0.0], [1.0], [3.0]]), 'testNdxs': np.array([[2.0], [4.0]])})
    _refused(train_args((tiny[0], bad), tmp_path / 'out'), bad, '0-based', '1-based')


@pytest.mark.slow
def test_depth_nan_inf_negative_zero_masked_counted_and_reported_once(tmp_path, tiny, capsys):
    mat, splits = tiny
    # stored (N, 640, 480), i.e. [frame, x, y]: a 10x10 block of each bad value in frames 0, 1, 3
    with h5py.File(mat, 'r+') as f:
        raw = f['rawDepths']
        for frame, value in ((0, np.nan), (1, np.inf), (3, -2.0)):
            block = raw[frame]
            block[200:210, 100:110] = value
            raw[frame] = block
    data = util.read_nyu_labeled(mat, progress=False)
    counts = data['invalid']['raw_depths']
    assert (counts['nan'], counts['inf'], counts['negative']) == (100, 100, 100)
    assert counts['frames_with_nonfinite'] == 3
    assert counts['zero'] == 5 * 40 * 80            # the pattern's hole in every frame
    assert data['invalid']['depths']['zero'] == 0
    for frame in (0, 1, 3):                         # 2x2 averaged: rows 50..54, cols 100..104
        block = torch.from_numpy(data['raw_depths'][frame].astype(np.float32))
        assert (block[50:55, 100:105] == 0).all()
        assert not util.valid_depth_mask(block)[50:55, 100:105].any()
    capsys.readouterr()
    assert train.main(train_args(tiny, tmp_path / 'out', '--train-depth', 'raw', '--coarse-samples', 4,
                                 '--batch-size', 2, '--stage', 'coarse', '--val-fraction', 0)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if 'NaN' in line]
    assert len(lines) == 1, lines
    assert '100 NaN, 100 inf, 100 negative in 3 frames' in lines[0] and 'masked' in lines[0]
    history = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)['history']
    assert np.isfinite(history[-1]['train_loss'])


@pytest.mark.slow
def test_cli_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / 'nope.mat'
    for script in ('train.py', 'evaluate.py'):
        r = subprocess.run([sys.executable, script, '--data', str(missing), '--out', str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and 'Traceback' not in r.stderr
        assert r.stderr.strip().count('\n') == 0 and r.stderr.startswith(f'error: {missing}: not found')
    r = subprocess.run([sys.executable, 'train.py', '--data', str(missing), '--debug'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'Traceback' in r.stderr and 'DataError' in r.stderr


def _raw_folder_with_unreadable_images(tmp_path):
    """Raw frames (a folder of rgb_K.png / depth_K.png pairs, 640x480) whose colour PNGs are
    not images: decoding them fails in a DataLoader worker while training."""
    for k, scene in enumerate(['lab_a', 'lab_b']):
        (tmp_path / 'raw' / scene).mkdir(parents=True)
        (tmp_path / 'raw' / scene / f'rgb_{k}.png').write_bytes(b'not a png')
        Image.fromarray(np.zeros((480, 640), np.uint16)).save(tmp_path / 'raw' / scene / f'depth_{k}.png')
    return tmp_path / 'raw'


@pytest.mark.slow
def test_a_frame_that_does_not_decode_stops_training_in_one_line(tmp_path, tiny):
    """The error of a decoding worker is one line, and the program ends, rather than showing the
    worker's traceback and then waiting at exit for its workers."""
    raw = _raw_folder_with_unreadable_images(tmp_path)
    argv = ['--data', raw, '--depth-scale', 0.001, '--labeled', tiny[0], '--splits', tiny[1],
            '--device', 'cpu', '--workers', 1, '--val-fraction', 0, '--coarse-samples', 4,
            '--batch-size', 2, '--stage', 'coarse']
    r = subprocess.run([sys.executable, 'train.py', *map(str, argv), '--out', str(tmp_path / 'fast')],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0, r.stderr
    assert re.match(r'error: .*rgb_\d\.png: not a readable image', r.stderr)
    with pytest.raises(cli.DataError, match=r'rgb_\d\.png: not a readable image') as e:   # augmenting
        train.main([*map(str, argv), '--out', str(tmp_path / 'plain'), '--path', 'plain'])   # workers
    assert '\n' not in str(e.value)   # not the worker's traceback


BUGGY_WORKER = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
import data, util

class Buggy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise RuntimeError('a bug in decoding')

for batch in data._loader(Buggy(), data.StepIndices(util.SampleOrder(4, 0), 0, 2, 2), 1, torch.device('cpu')):
    pass
'''


@pytest.mark.slow
def test_an_unexpected_error_in_a_worker_still_ends_the_program():
    """Not a DataError (a bug): its traceback is shown, and the workers, which ignore SIGTERM, are
    still ended at exit (runtime.StopControl.end_workers_at_exit) instead of waited for forever."""
    try:
        r = subprocess.run([sys.executable, '-c', BUGGY_WORKER, ROOT], capture_output=True, text=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail('the program did not end after the worker\'s error')
    assert r.returncode == 1 and 'RuntimeError: a bug in decoding' in r.stderr
    assert 'killed by signal' not in r.stderr   # the DataLoader's SIGCHLD alarm left out


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not belong to the run

SHORT = ['--coarse-samples', 8, '--fine-samples', 16, '--batch-size', 4, '--val-fraction', 0]
EVERY_STEP = ['--save-every', 1]   # a checkpoint after every step, where a test stops after one


@pytest.mark.slow
def test_checkpoint_of_another_variant(tmp_path, tiny):
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--variant', 'release', '--max-steps', 1)) == 0
    _refused(train_args(tiny, out, *SHORT, '--resume'), out / 'checkpoint.pth',
             "'release' variant", '--variant release')


@pytest.mark.slow
def test_checkpoint_of_another_stage(tmp_path, tiny):
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--max-steps', 3)) == 0   # coarse 2 + fine 1
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['stage'] == 'fine'
    _refused(train_args(tiny, out, *SHORT, '--resume', '--stage', 'coarse'),
             out / 'checkpoint.pth', 'holds the fine stage (step 1)')
    early = tmp_path / 'early'
    assert train.main(train_args(tiny, early, *SHORT, '--max-steps', 1)) == 0
    _refused(train_args(tiny, early, *SHORT, '--resume', '--stage', 'fine'),
             early / 'checkpoint.pth', 'unfinished coarse stage (step 1)')


@pytest.mark.slow
def test_checkpoint_of_another_schedule(tmp_path, tiny):
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--max-steps', 1)) == 0
    changed = [a if a != 4 else 2 for a in SHORT]   # --batch-size 2
    _refused(train_args(tiny, out, *changed, '--resume'), '--batch-size 4', 'asks for 2')


@pytest.mark.slow
def test_truncated_checkpoint(tmp_path, tiny):
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--max-steps', 1)) == 0
    path = out / 'checkpoint.pth'
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    _refused(train_args(tiny, out, *SHORT, '--resume'), path, 'truncated')
    # a fresh run into that folder also reads it (to refuse overwriting): same message
    _refused(train_args(tiny, out, *SHORT), path, 'truncated')


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_fresh_run_never_overwrites_a_previous_one(tmp_path, tiny, capsys):
    """A finished run's weights are refused by a fresh run of any stage that would replace them
    (nothing changes); --overwrite moves them aside with their histories and figures, and links
    the earlier stage's weights there, so the old run stays whole."""
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT)) == 0
    before = _files(out)
    assert {'coarse.pth', 'fine.pth', 'checkpoint.pth', 'history_fine.csv'} <= before.keys()
    for stage in ('both', 'coarse', 'fine'):
        message = _refused(train_args(tiny, out, *SHORT, '--stage', stage), out,
                           'holds a previous run', 'fine.pth', '--overwrite', 'nothing was changed')
        assert '--resume' not in message   # a finished run has nothing to resume
    # --overwrite moves nothing before the new run's data has been read
    _refused(train_args((tmp_path / 'missing.mat', tiny[1]), out, *SHORT, '--overwrite'), 'not found')
    assert _files(out) == before and not list(out.glob('replaced-*'))
    capsys.readouterr()
    assert train.main(train_args(tiny, out, *SHORT, '--stage', 'fine', '--overwrite')) == 0
    aside, = out.glob('replaced-*')
    assert f'into {aside}' in capsys.readouterr().out
    # the fine stage's files and the run's figures moved; coarse.pth, its input, stays and is linked
    assert _files(aside) == {k: v for k, v in before.items() if 'coarse' not in k or k == 'coarse.pth'}
    assert _files(out).keys() == before.keys() and _files(out)['coarse.pth'] == before['coarse.pth']


@pytest.mark.slow
def test_resume_auto_after_a_finished_earlier_stage_trains_the_next_one(tmp_path, tiny, capsys):
    """--stage coarse, then --stage fine with --resume auto (a requeued job's command line): the
    finished coarse checkpoint is not the fine run's, so the fine stage starts; plain --resume is
    refused in one line rather than ending at once with nothing trained."""
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--stage', 'coarse')) == 0
    _refused(train_args(tiny, out, *SHORT, '--stage', 'fine', '--resume'),
             'holds the finished coarse stage', 'without --resume')
    capsys.readouterr()
    assert train.main(train_args(tiny, out, *SHORT, '--stage', 'fine', '--resume', 'auto')) == 0
    assert 'no checkpoint of this run' in capsys.readouterr().out and (out / 'fine.pth').exists()


@pytest.mark.slow
def test_a_fresh_run_over_an_unfinished_one_is_refused_or_moves_it_aside(tmp_path, tiny):
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--max-steps', 1)) == 0
    checkpoint = (out / 'checkpoint.pth').read_bytes()
    _refused(train_args(tiny, out, *SHORT), 'checkpoint.pth (unfinished)', '--resume')
    assert train.main(train_args(tiny, out, *SHORT, '--overwrite', '--max-steps', 1)) == 0
    aside, = out.glob('replaced-*')
    assert (aside / 'checkpoint.pth').read_bytes() == checkpoint


@pytest.mark.slow
def test_the_validation_scenes_folded_back_train_and_the_run_says_so(tmp_path, tiny, capsys):
    """--val-fraction 0, the paper's final models: every training frame trains (3 of the tiny
    set's 5; 2 are test frames), one line says there is no validation, the history has none."""
    out = tmp_path / 'out'
    assert train.main(train_args(tiny, out, *SHORT, '--stage', 'coarse')) == 0
    printed = capsys.readouterr().out
    assert '3 training, 0 validation frames' in printed
    assert printed.count('no validation: every training scene trains (--val-fraction 0)') == 1
    rows = runlog.read_history(out / 'history_coarse.csv')
    assert rows and all(r['val_loss'] is None and r['train_loss'] is not None for r in rows)


def test_pretrained_conv_that_is_not_a_state_dict(tmp_path, tiny):
    path = tmp_path / 'convs.pth'
    torch.save(torch.zeros(3), path)
    _refused(train_args(tiny, tmp_path / 'out', *SHORT, '--pretrained-conv', path), path,
             'holds a Tensor, not a state_dict')


@pytest.mark.slow
def test_resume_on_other_data_is_refused(tmp_path, tiny, capsys):
    out, copy = tmp_path / 'out', tmp_path / 'copy.mat'
    assert train.main(train_args(tiny, out, *SHORT, '--max-steps', 1)) == 0
    copy.write_bytes(tiny[0].read_bytes())
    _refused(train_args((copy, tiny[1]), out, *SHORT, '--resume'), '--data', str(tiny[0]),
             f'asks for {copy}')
    # the same file name elsewhere (a cluster job's scratch copy) is the same data: a note
    scratch = tmp_path / 'scratch' / tiny[0].name
    scratch.parent.mkdir()
    scratch.write_bytes(tiny[0].read_bytes())
    capsys.readouterr()
    assert train.main(train_args((scratch, tiny[1]), out, *SHORT, '--resume', '--max-steps', 1)) == 0
    assert f'started on {tiny[0]}; continuing on {scratch}' in capsys.readouterr().out


@pytest.mark.parametrize('option, value', [
    ('--coarse-epochs', 'nan'), ('--fine-epochs', 'inf'), ('--coarse-samples', '0'),
    ('--batch-size', '-2'), ('--lr-scale', 'nan'), ('--lr-scale', 'inf'), ('--lr-scale', '0'),
    ('--lam', 'nan'), ('--lam', '-1'), ('--lam', '1.5'), ('--seed', '-1'), ('--seed', '1.5'),
    ('--threads', '-1'), ('--threads', '0'), ('--val-every', '0'), ('--save-minutes', 'nan'),
    ('--save-every', '-1'), ('--log-every', '0'), ('--max-steps', '0'), ('--print-every', '-1'),
    ('--variant', 'nope'), ('--no-such-option', None)])
def test_a_bad_number_or_option_is_one_line_before_any_work(tmp_path, tiny, option, value):
    """Checked where parsed: finite and in range (a nan rate or lambda would train and fail far
    from its cause, --max-steps 0 ran a step); the message names the option, nothing is written."""
    out = tmp_path / 'out'
    _refused(train_args(tiny, out, option, *([value] if value is not None else [])), option, '--help')
    assert not out.exists()


def test_an_unwritable_history_stops_in_one_line_with_the_right_advice(tmp_path, tiny, monkeypatch):
    """A full disk (or a read-only --out) when the history is first written: one line; with no
    checkpoint of the run yet, the advice is a new start, not --resume."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(runlog, 'write_history', full)
    message = _refused(train_args(tiny, tmp_path / 'out', *SHORT), 'history_coarse.csv',
                       'No space left on device', 'start the run again')
    assert '--resume' not in message


@pytest.mark.slow
def test_truncated_or_mismatched_weights_for_evaluation(tmp_path, tiny):
    import net
    model = tmp_path / 'model'
    model.mkdir()
    torch.save(net.GlobalCoarseNet(net.PAPER).state_dict(), model / 'coarse.pth')
    torch.save(net.LocalFineNet(net.RELEASE).state_dict(), model / 'fine.pth')
    with pytest.raises(cli.DataError, match="fine.pth: does not fit the paper variant's LocalFineNet"):
        net.load_pretrained(model)
    data = (model / 'coarse.pth').read_bytes()
    (model / 'coarse.pth').write_bytes(data[:len(data) // 3])
    with pytest.raises(cli.DataError, match='coarse.pth: truncated'):
        net.load_pretrained(model)


# ---------------------------------------------------------------------------------------------
# Faults during training

# torch.save on a full disk raises a RuntimeError of its zip writer, an OSError elsewhere
TORCH_SAVE_ENOSPC = RuntimeError('[enforce fail at inline_container.cc:858] . PytorchStreamWriter '
                                 'failed writing file data/3: file write failed')


@pytest.mark.slow
@pytest.mark.parametrize('error, reason', [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 'No space left on device'),
    (TORCH_SAVE_ENOSPC, 'file write failed')])
def test_disk_full_during_save(tmp_path, tiny, monkeypatch, error, reason):
    out = tmp_path / 'out'
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:            # the second checkpoint: half written, then the disk is full
            with open(f, 'wb') as handle:
                handle.write(b'PK\x03\x04 half a checkpoint')
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save_then_fill_the_disk)
    _refused(train_args(tiny, out, *SHORT, *EVERY_STEP), out / 'checkpoint.pth', reason,
             'at coarse step 2', 'coarse step 1) is intact', 'continue with --resume')
    monkeypatch.undo()
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['step'] == 1
    assert not glob.glob(str(out / '*.tmp*'))
    assert train.main(train_args(tiny, out, *SHORT, '--resume')) == 0


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_number(tmp_path, tiny, monkeypatch):
    out = tmp_path / 'out'
    nan_at_call(monkeypatch, {2})
    _refused(train_args(tiny, out, *SHORT, *EVERY_STEP), 'coarse step 2: the loss is nan', 'coarse step 1) is intact',
             '--skip-nonfinite')
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['step'] == 1 and all(torch.isfinite(v).all() for v in ckpt['coarse'].values())
    monkeypatch.undo()
    assert train.main(train_args(tiny, out, *SHORT, '--resume')) == 0
    # at the first step there is no checkpoint to resume from: the advice says so
    nan_at_call(monkeypatch, {1})
    message = _refused(train_args(tiny, tmp_path / 'new', *SHORT), 'coarse step 1: the loss is nan',
                       'Start the run again', '--skip-nonfinite')
    assert '--resume' not in message


@pytest.mark.slow
def test_nonfinite_loss_skipped_and_counted_with_the_option(tmp_path, tiny, monkeypatch, capsys):
    out = tmp_path / 'out'
    nan_at_call(monkeypatch, {2})
    assert train.main(train_args(tiny, out, *SHORT, '--skip-nonfinite')) == 0
    assert '(1 batches with a non-finite loss skipped)' in capsys.readouterr().out
    assert (out / 'coarse.pth').exists() and (out / 'fine.pth').exists()


# Real subprocesses and real signals. The run is long; each test stops it long before the end. Its
# output is a pipe, so train.py prints plain progress lines (one per step: --print-every 0).
LONG = ['--coarse-samples', 100000, '--batch-size', 2, '--val-fraction', 0, '--threads', 1,
        '--print-every', 0]


def _start(tiny, out, *extra):
    return subprocess.Popen([sys.executable, 'train.py', *map(str, train_args(tiny, out, *LONG, *extra))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, timeout=120):
    end = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f'train.py ended early:\n{process.stderr.read()}')
        if time.time() > end:
            process.kill()
            raise AssertionError('timed out')
        time.sleep(0.005)


def _resume_one_step(tiny, out, extra):
    """Resume the stopped run for one step, in this process (the signal needed a real process; the
    resume is the same code either way, without a second start of Python and torch)."""
    before = torch.load(out / 'checkpoint.pth', weights_only=True)['step']
    # (LONG's --threads 1 is undone after the test: conftest._keep_torch_threads)
    assert train.main(train_args(tiny, out, *LONG, *extra, '--resume', '--max-steps', 1)) == 0
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['step'] == before + 1
    assert not glob.glob(str(out / '*.tmp*'))


def _running(p):
    """A condition for _wait_for: a progress line on stdout shows the loop is running (signals
    are handled from there on). Reads without blocking, so the wait's timeout holds."""
    os.set_blocking(p.stdout.fileno(), False)
    seen = []

    def running():
        try:
            seen.append(os.read(p.stdout.fileno(), 65536).decode(errors='replace'))
        except BlockingIOError:
            pass
        return re.search(r'step [1-9]\d*/50000', ''.join(seen)) is not None
    return running


@pytest.mark.slow
@pytest.mark.parametrize('signum, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                            (signal.SIGUSR1, 138)])
def test_sigint_sigterm_and_sigusr1_save_and_resume(tmp_path, tiny, signum, status):
    """SIGUSR1 is what SLURM sends before a job's time limit (--signal): the same as SIGTERM."""
    out = tmp_path / 'out'
    save_every = ['--save-every', 1000]
    p = _start(tiny, out, *save_every)
    _wait_for(_running(p), p)
    p.send_signal(signum)
    os.set_blocking(p.stdout.fileno(), True)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == status, stderr
    assert 'Traceback' not in stderr and 'continue with --resume' in stdout
    assert f'stopped ({signal.Signals(signum).name})' in stdout
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['stage'] == 'coarse' and ckpt['step'] >= 1 and not ckpt['done']
    _resume_one_step(tiny, out, save_every)


@pytest.mark.slow
@pytest.mark.parametrize('moment', ['during_checkpoint_write', 'between_saves'])
def test_sigkill_keeps_the_last_complete_checkpoint(tmp_path, tiny, moment):
    out = tmp_path / 'out'
    save_every = 1 if moment == 'during_checkpoint_write' else 3
    p = _start(tiny, out, '--save-every', save_every)
    _wait_for(lambda: (out / 'checkpoint.pth').exists(), p)
    if moment == 'during_checkpoint_write':
        _wait_for(lambda: glob.glob(str(out / 'checkpoint.pth.tmp*')), p)
    else:
        time.sleep(random.Random(moment).uniform(0.0, 2.0))   # seeded: the same moment every run
    p.kill()                                  # SIGKILL: no handler, no cleanup
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    if moment == 'during_checkpoint_write':
        assert glob.glob(str(out / 'checkpoint.pth.tmp*')), 'the kill did not land in a write'
    ckpt = files.load_torch_file(out / 'checkpoint.pth', 'checkpoint')   # complete and readable
    assert ckpt['step'] >= 1 and ckpt['step'] % save_every == 0
    _resume_one_step(tiny, out, ['--save-every', save_every])


# ---------------------------------------------------------------------------------------------
# Security

class _Hostile:
    """Unpickling this creates a file: what a malicious 'checkpoint' could do with any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_hostile_pickle_is_refused_everywhere(tmp_path, tiny):
    import net
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'format': 1, 'coarse6.1.weight': _Hostile(str(marker))}, evil)
    torch.load(evil, weights_only=False).get('coarse6.1.weight').close()  # the file is real...
    assert marker.exists()
    marker.unlink()
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes(evil.read_bytes())
    _refused(train_args(tiny, out, *SHORT, '--resume'), 'checkpoint.pth: refused')
    _refused(train_args(tiny, out, *SHORT), 'checkpoint.pth: refused')
    _refused(train_args(tiny, tmp_path / 'other', *SHORT, '--pretrained-conv', evil), 'evil.pth: refused')
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'coarse.pth').write_bytes(evil.read_bytes())
    with pytest.raises(cli.DataError, match='coarse.pth: refused'):
        net.load_pretrained(model)
    assert not marker.exists()                # ...and nothing of it ran


AUDIT = r'''
import json, os, sys
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot   # builds matplotlib's own font cache on first use: the library's, not ours
import torch               # one optimizer step: torch's lazy imports make its own cache folders
w = torch.nn.Parameter(torch.ones(2))
torch.optim.SGD([w], lr=0.1, momentum=0.9).step()
writes = set()
FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)) and (args[2] or 0) & FLAGS:
        writes.add(os.path.abspath(os.fsdecode(args[0])))
    elif event in ('os.rename', 'os.replace'):
        writes.add(os.path.abspath(os.fsdecode(args[1])))
    elif event in ('os.remove', 'os.mkdir', 'os.rmdir', 'shutil.rmtree'):
        writes.add(os.path.abspath(os.fsdecode(args[0])))
sys.addaudithook(hook)
import train, evaluate
assert train.main(json.loads(sys.argv[1])) == 0
assert evaluate.main(json.loads(sys.argv[2])) == 0
sys.stdout.write('\nWRITES ' + json.dumps(sorted(writes)))
'''


@pytest.mark.slow
def test_writes_stay_in_the_output_folder_and_the_dataset_cache(tmp_path, tiny):
    out = tmp_path / 'out'
    work = tmp_path / 'cwd'
    work.mkdir()
    train_argv = [str(a) for a in train_args(tiny, out, *SHORT, '--val-fraction', 0.3)]
    eval_argv = ['--data', str(tiny[0]), '--splits', str(tiny[1]), '--model', str(out),
                 '--device', 'cpu']
    r = subprocess.run([sys.executable, '-c', AUDIT, json.dumps(train_argv), json.dumps(eval_argv)],
                       cwd=work, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr
    writes = json.loads(r.stdout.split('\nWRITES ')[-1])
    cache = util.cache_path_for(tiny[0])
    # os.devnull: subprocess opens it when a library probes for a shared library; not a file
    allowed = lambda p: (p.startswith(str(out) + os.sep) or p == str(out) or p.startswith(cache)
                         or p == os.devnull)
    assert writes and all(allowed(p) for p in writes), [p for p in writes if not allowed(p)]
    assert any(p.endswith('coarse.pth') for p in writes) and cache in writes
    assert not os.listdir(work)
