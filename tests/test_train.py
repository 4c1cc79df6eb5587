"""Two-stage training: optimizer groups, a short run that learns, saved weights, exact resume."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import cli
import train
import util
from helpers import ROOT, train_args
from loss import safe_log, scale_invariant_error
from net import PAPER, RELEASE, GlobalCoarseNet, LocalFineNet

# Sec. 3.3, written out here rather than imported, so an edit of net.py cannot pass unnoticed.
PAPER_RATES = {'coarse1': 0.001, 'coarse2': 0.001, 'coarse3': 0.001, 'coarse4': 0.001,
               'coarse5': 0.001, 'coarse6': 0.1, 'coarse7': 0.1,
               'fine1': 0.001, 'fine2': 0.01, 'fine3': 0.001}


@pytest.mark.parametrize('variant', [PAPER, RELEASE])
@pytest.mark.parametrize('make', [GlobalCoarseNet, LocalFineNet])
def test_optimizer_groups_cover_every_parameter_with_paper_rates(variant, make):
    net = make(variant)
    opt = train.make_optimizer(net, variant)
    in_groups = [p for g in opt.param_groups for p in g['params']]
    assert len(in_groups) == len({id(p) for p in in_groups})          # nothing twice
    assert {id(p) for p in in_groups} == {id(p) for p in net.parameters()}
    for g in opt.param_groups:
        assert g['lr'] == PAPER_RATES[g['layer']]
        assert g['momentum'] == 0.9
        names = {n for n, p in net.named_parameters() if any(p is q for q in g['params'])}
        assert names and all(n.split('.')[0] == g['layer'] for n in names)
    assert {g['layer'] for g in opt.param_groups} == {n for n in PAPER_RATES if n.startswith(
        'coarse' if make is GlobalCoarseNet else 'fine')}


def test_paper_weight_decay_is_zero():
    """[P] states none: the paper variant trains without weight decay, both nets."""
    for net in (GlobalCoarseNet(PAPER), LocalFineNet(PAPER)):
        assert all(g['weight_decay'] == 0.0 for g in train.make_optimizer(net, PAPER).param_groups)


@pytest.mark.slow
def test_fine_stage_runs_the_coarse_net_fixed(trained, synthetic, tmp_path, monkeypatch):
    """Sec. 3.3: while the fine net trains, the coarse net runs in eval mode (no dropout) and
    without gradients, every time it is called."""
    calls, real = [], GlobalCoarseNet.forward

    def forward(self, x):
        calls.append((self.training, torch.is_grad_enabled(), any(p.requires_grad for p in self.parameters())))
        return real(self, x)

    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(trained / 'coarse.pth', out / 'coarse.pth')
    monkeypatch.setattr(GlobalCoarseNet, 'forward', forward)
    assert train.main(train_args(synthetic, out, '--stage', 'fine', '--fine-samples', 8,
                                 '--batch-size', 4, '--val-fraction', 0)) == 0
    assert len(calls) >= 2 and set(calls) == {(False, False, False)}


@pytest.mark.slow
def test_release_fine_stage_runs_the_coarse_net_with_its_dropout(synthetic, tmp_path, monkeypatch):
    """[R] builds the fine net on `pred_drop`, the coarse output with dropout: the release variant's
    fixed coarse net runs in training mode (still without gradients) while the fine net trains."""
    calls, real = [], GlobalCoarseNet.forward

    def forward(self, x):
        calls.append((self.training, torch.is_grad_enabled(), any(p.requires_grad for p in self.parameters())))
        return real(self, x)

    torch.save(GlobalCoarseNet(RELEASE).state_dict(), tmp_path / 'coarse.pth')
    monkeypatch.setattr(GlobalCoarseNet, 'forward', forward)
    assert train.main(train_args(synthetic, tmp_path, '--variant', 'release', '--stage', 'fine',
                                 '--fine-samples', 8, '--batch-size', 4, '--val-fraction', 0)) == 0
    assert len(calls) >= 2 and set(calls) == {(True, False, False)}


def _crash_when_the_fine_stage_starts(monkeypatch):
    """train.main raises as the fine stage begins, after the coarse stage's last checkpoint."""
    real_run = train.train_stage

    def crash(stage, *args):
        if stage == 'fine':
            raise RuntimeError('crash between the stages')
        return real_run(stage, *args)
    monkeypatch.setattr(train, 'train_stage', crash)


def test_release_weight_decay_acts_on_the_weights_alone():
    """[R] depth.conf: weight_decay_w 5e-4 on coarse1-5, 1e-4 on the other layers; no decay of
    the biases. One group per tensor, so that a layer's weights and bias can differ."""
    for net in (GlobalCoarseNet(RELEASE), LocalFineNet(RELEASE)):
        opt = train.make_optimizer(net, RELEASE)
        decay = {g['tensor']: g['weight_decay'] for g in opt.param_groups}
        named = dict(net.named_parameters())
        assert set(decay) == set(named) and len(decay) == len(opt.param_groups)
        assert all(len(g['params']) == 1 and g['params'][0] is named[g['tensor']] for g in opt.param_groups)
        for name, value in decay.items():
            layer = name.split('.')[0]
            wanted = 0.0 if name.endswith('bias') else 5e-4 if layer in {f'coarse{i}' for i in range(1, 6)} else 1e-4
            assert value == wanted, name


def test_guard_refuses_a_parameter_without_a_rate():
    net = LocalFineNet(PAPER)
    net.extra_scale = torch.nn.Parameter(torch.ones(1))   # a parameter outside the paper's layers
    with pytest.raises(RuntimeError, match='extra_scale'):
        train.make_optimizer(net, PAPER)


# ----------------------------------------------------------------------------------------------

def _test_frames(synthetic):
    arrays = util.read_nyu_labeled(synthetic[0], progress=False)
    _, test_idx = util.read_splits(synthetic[1], len(arrays['images']))
    return util.Frames(arrays['images'][test_idx], arrays['depths'][test_idx])


@pytest.mark.slow
def test_short_training_beats_constant_prediction(synthetic, trained):
    """Held-out (test split) scale-invariant error of the coarse net after 640 samples vs. a
    constant prediction (every constant scores the same: the per-image spread of log depth)."""
    coarse = GlobalCoarseNet(PAPER)
    coarse.load_state_dict(torch.load(trained / 'coarse.pth', weights_only=True))
    coarse.eval()
    frames = _test_frames(synthetic)
    img, depth, mask = frames.get(range(len(frames)))
    x, y, m = util.center_crop(img, depth, mask)
    target = safe_log(y, m)
    with torch.no_grad():
        err_net = math.sqrt(float(scale_invariant_error(coarse(x), target, m)))
    err_const = math.sqrt(float(scale_invariant_error(torch.zeros_like(target), target, m)))
    print(f'held-out sc-inv error: coarse net {err_net:.4f}, constant {err_const:.4f}')
    assert err_net < 0.85 * err_const


@pytest.mark.slow
def test_outputs_written(trained):
    for name in ('coarse.pth', 'fine.pth', 'checkpoint.pth', 'loss_coarse.png', 'loss_fine.png',
                 'predictions.png'):
        assert (trained / name).stat().st_size > 0, name
    with open(trained / 'loss_coarse.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    ckpt = torch.load(trained / 'checkpoint.pth', weights_only=True)
    assert ckpt['done'] and ckpt['stage'] == 'fine'
    assert any(row['val_loss'] is not None for row in ckpt['history'])


@pytest.mark.slow
def test_fine_stage_leaves_coarse_net_unchanged(trained):
    saved = torch.load(trained / 'coarse.pth', weights_only=True)
    after_fine = torch.load(trained / 'checkpoint.pth', weights_only=True)['coarse']
    # the fine stage's checkpoint refers to coarse.pth by the hash of the weights it ran on
    assert after_fine == {'file': 'coarse.pth', 'sha256': checkpoint.weights_hash(saved)}


@pytest.mark.slow
def test_weights_load_in_a_new_process(trained, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 228, 304) * 255
    torch.save(x, tmp_path / 'x.pt')
    coarse, fine = GlobalCoarseNet(PAPER).eval(), LocalFineNet(PAPER).eval()
    coarse.load_state_dict(torch.load(trained / 'coarse.pth', weights_only=True))
    fine.load_state_dict(torch.load(trained / 'fine.pth', weights_only=True))
    assert not any(k.startswith('module.') for k in coarse.state_dict())
    with torch.no_grad():
        expected = fine(x, coarse(x))
    code = f'''
import torch
from net import GlobalCoarseNet, LocalFineNet
c, f = GlobalCoarseNet().eval(), LocalFineNet().eval()
c.load_state_dict(torch.load(r"{trained / 'coarse.pth'}", weights_only=True))
f.load_state_dict(torch.load(r"{trained / 'fine.pth'}", weights_only=True))
x = torch.load(r"{tmp_path / 'x.pt'}", weights_only=True)
with torch.no_grad():
    torch.save(f(x, c(x)), r"{tmp_path / 'y.pt'}")
'''
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
    assert torch.equal(torch.load(tmp_path / 'y.pt', weights_only=True), expected)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(synthetic, tmp_path, monkeypatch):
    schedule = ['--coarse-samples', 24, '--fine-samples', 16, '--batch-size', 4,
                '--val-fraction', 0.15, '--seed', 5]
    assert train.main(train_args(synthetic, tmp_path / 'straight', *schedule)) == 0
    chunked = tmp_path / 'chunked'
    assert train.main(train_args(synthetic, chunked, *schedule, '--max-steps', 4)) == 0
    assert not (chunked / 'coarse.pth').exists()
    # an unfinished run is never overwritten by a fresh start
    with pytest.raises(cli.DataError, match='--resume'):
        train.main(train_args(synthetic, chunked, *schedule))
    # a crash between the stages: the coarse stage's last checkpoint (no momentum: the stage is
    # over) is what the next resume starts from
    _crash_when_the_fine_stage_starts(monkeypatch)
    with pytest.raises(RuntimeError, match='between the stages'):
        train.main(train_args(synthetic, chunked, *schedule, '--resume'))
    monkeypatch.undo()
    ckpt = torch.load(chunked / 'checkpoint.pth', weights_only=True)
    assert (ckpt['stage'], ckpt['step'], ckpt['done'], ckpt['optimizer']) == ('coarse', 6, False, None)
    assert (chunked / 'coarse.pth').exists() and not (chunked / 'fine.pth').exists()
    assert train.main(train_args(synthetic, chunked, *schedule, '--resume', '--max-steps', 2)) == 0
    assert torch.load(chunked / 'checkpoint.pth', weights_only=True)['stage'] == 'fine'
    assert train.main(train_args(synthetic, chunked, *schedule, '--resume')) == 0
    for name in ('coarse.pth', 'fine.pth'):
        a = torch.load(tmp_path / 'straight' / name, weights_only=True)
        b = torch.load(chunked / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------------------------

def _train_command(*args):
    """train.py as a command: its exit status, its output and its stderr."""
    return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--help'])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    for option in ('--data', '--demo', '--variant', '--coarse-samples', '--resume', '--train-depth'):
        assert option in printed


@pytest.mark.slow
def test_missing_dataset_gives_a_short_message(tmp_path):
    r = _train_command('--data', str(tmp_path / 'nope.mat'), '--out', str(tmp_path / 'out'))
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr
    assert 'not found' in r.stderr and '--demo' in r.stderr and 'nyu_depth_v2_labeled.mat' in r.stderr


@pytest.mark.slow
def test_a_checkpoint_of_the_train_py_before_the_restructuring_resumes(synthetic, tmp_path, monkeypatch):
    """A run stopped by the train.py of commit 5b7468a (taken from the repository's history; its
    checkpoint format 5, one optimizer group per layer) and resumed by this one ends with the
    weights of an uninterrupted run of this one, bit for bit. The release variant: its coarse1-5
    were in the authors' units then too, so its steps are this train.py's (the paper variant's are
    refused: the next test), once both leave out weight decay, which that train.py applied to the
    biases too."""
    old = tmp_path / 'old'
    old.mkdir()
    archive = subprocess.run(['git', 'archive', '5b7468a'], cwd=ROOT, capture_output=True)
    if archive.returncode:
        pytest.skip(f'commit 5b7468a not in this checkout: {archive.stderr.decode().strip()[:200]}')
    subprocess.run(['tar', '-x', '-C', str(old)], input=archive.stdout, check=True)
    source = (old / 'net.py').read_text()
    assert source.count('weight_decay=RELEASE_WD') == 1
    (old / 'net.py').write_text(source.replace('weight_decay=RELEASE_WD', 'weight_decay=dict.fromkeys(RELEASE_WD, 0.0)'))
    for layer in RELEASE.weight_decay:
        monkeypatch.setitem(RELEASE.weight_decay, layer, 0.0)
    schedule = ['--coarse-samples', 48, '--fine-samples', 16, '--batch-size', 8,
                '--val-every', 24, '--val-fraction', 0.15, '--variant', 'release']
    r = subprocess.run([sys.executable, 'train.py', *map(str, train_args(synthetic, tmp_path / 'chunked',
                        *schedule, '--max-steps', 4))], cwd=old, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert train.main(train_args(synthetic, tmp_path / 'chunked', *schedule, '--resume')) == 0
    assert train.main(train_args(synthetic, tmp_path / 'straight', *schedule)) == 0
    for name in ('coarse.pth', 'fine.pth'):
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ('chunked', 'straight'))
        assert all(torch.equal(a[k], b[k]) for k in a), name


# a short two-stage schedule for the tests that stop a run, change what it left and resume it
STOPPABLE = ['--coarse-samples', 16, '--fine-samples', 16, '--batch-size', 8, '--val-fraction', 0]


@pytest.fixture(scope='module')
def stopped_in_fine(synthetic, tmp_path_factory):
    """The output folder of a STOPPABLE run stopped after 3 steps (coarse 2, fine 1); each test
    changes a copy of it."""
    out = tmp_path_factory.mktemp('stopped_in_fine')
    assert train.main(train_args(synthetic, out, *STOPPABLE, '--max-steps', 3)) == 0
    return out


@pytest.mark.slow
def test_an_older_checkpoint_in_std_units_is_refused_mid_coarse_and_converted_after(synthetic, tmp_path,
                                                                                    stopped_in_fine):
    """Checkpoints of formats 5 and 6 of the paper variant hold coarse1-5 in units of the input's
    std (biases 76.18x smaller, each bias step 5,804x the authors'): an unfinished coarse stage is
    refused in one line; in the fine stage the fixed coarse net is converted, the same net."""
    schedule = STOPPABLE
    out = tmp_path / 'run'
    shutil.copytree(stopped_in_fine, out)   # stopped at fine step 1
    coarse = torch.load(out / 'coarse.pth', weights_only=True)
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    old = {k: v / 76.18328376 if k.split('.')[0] in {f'coarse{i}' for i in range(1, 6)}
           and k.endswith('.bias') else v for k, v in coarse.items() if k != 'authors_units'}
    ckpt.update(format=6, coarse=old)   # the fine stage's coarse net, inline, as format 6 had it
    torch.save(ckpt, out / 'checkpoint.pth')
    nets = {'coarse': GlobalCoarseNet(), 'fine': LocalFineNet()}
    checkpoint.load_nets(ckpt, nets, out)
    assert all(torch.allclose(nets['coarse'].state_dict()[k], v, rtol=1e-6) for k, v in coarse.items())
    ckpt.update(stage='coarse', step=1, coarse=old, optimizer={'state': {}, 'param_groups': []})
    torch.save(ckpt, out / 'checkpoint.pth')
    with pytest.raises(cli.DataError, match=r"unfinished coarse stage .* 5,804 times the authors'"):
        train.main(train_args(synthetic, out, *schedule, '--resume'))


@pytest.mark.slow
def test_a_fine_stage_checkpoint_refers_to_coarse_pth_and_refuses_another(synthetic, tmp_path,
                                                                          stopped_in_fine):
    """The fine stage's checkpoint keeps coarse.pth's name and weights hash instead of a
    283 MB copy; resuming with coarse.pth changed or missing is refused with one line."""
    schedule = STOPPABLE
    out = tmp_path / 'run'
    shutil.copytree(stopped_in_fine, out)   # stopped at fine step 1
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['stage'] == 'fine' and set(ckpt['coarse']) == {'file', 'sha256'}
    coarse = torch.load(out / 'coarse.pth', weights_only=True)
    changed = {k: v.clone() for k, v in coarse.items()}
    changed['coarse7.bias'][0] += 1e-3
    torch.save(changed, out / 'coarse.pth')
    with pytest.raises(cli.DataError, match='coarse.pth: not the coarse net the checkpoint.s fine stage'):
        train.main(train_args(synthetic, out, *schedule, '--resume'))
    os.remove(out / 'coarse.pth')
    with pytest.raises(cli.DataError, match='coarse.pth: missing'):
        train.main(train_args(synthetic, out, *schedule, '--resume'))
    torch.save(coarse, out / 'coarse.pth')
    assert train.main(train_args(synthetic, out, *schedule, '--resume')) == 0


@pytest.mark.slow
def test_a_finished_stage_resumed_as_the_last_one_ends_the_run(synthetic, tmp_path, monkeypatch):
    """A run killed right after its coarse stage ended, resumed with --stage coarse: the coarse
    stage is the run's last now, so the checkpoint says done (--resume auto then does nothing)."""
    schedule = STOPPABLE
    _crash_when_the_fine_stage_starts(monkeypatch)
    with pytest.raises(RuntimeError, match='between the stages'):
        train.main(train_args(synthetic, tmp_path, *schedule))
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert (ckpt['stage'], ckpt['step'], ckpt['done']) == ('coarse', 2, False)
    assert train.main(train_args(synthetic, tmp_path, *schedule, '--resume', '--stage', 'coarse')) == 0
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['done']
