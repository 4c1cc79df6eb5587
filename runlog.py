"""What train.py tells its user as it runs: the progress bar (or plain lines in a log file), the
losses read at the logging points, the history CSV with every validation and the loss plots drawn
from it, and the summary at the end.

StageLog is one stage's bookkeeping: its step, the device losses since the last logging point, the
running training loss, the history, and when the next checkpoint is due.
"""
import datetime
import math
import os
import sys
import time

import torch

import cli
import data
import nyu_raw
import util
from files import atomic_write
from loss import DEFAULT_LOSS
from metrics import NAMES as METRIC_NAMES
from net import STAGE_NAMES
from runtime import DIST, all_finite

# Loss plots cost about 0.5 s each: at most one a minute, and one at the end of every stage.
PLOT_EVERY_S = 60


class StageLog:
    """One stage's bookkeeping, from a checkpoint of it (`ckpt`) or from the start. Nothing here
    reads a device value except read_losses, once per logging point: between logging points a
    GPU step never waits for the host. Long because it holds one state (step, losses, history,
    clocks) behind a dozen small methods, none over 30 lines, that train.train_stage calls."""

    def __init__(self, stage, samples, args, gpus, ckpt=None, resumable=False):
        self.stage, self.samples, self.args, self.gpus = stage, samples, args, gpus
        # whether OUT/checkpoint.pth already continues this run (a resumed stage, or the end of an
        # earlier stage of it); else only once this stage has saved
        self.resumable = resumable or ckpt is not None
        self.total_steps = math.ceil(samples / args.batch_size)
        self.val_every = max(1, round((args.val_every or samples / 50) / args.batch_size))
        self.ckpt_path = os.path.join(args.out, 'checkpoint.pth')
        self.csv_path = os.path.join(args.out, f'history_{stage}.csv')
        self.columns = history_columns(args.loss)
        self.history = []   # one row (self.columns) per validation point
        self.step, self.skipped, self.saved_step = 0, 0, None
        # the training loss since the last history row (in the checkpoint: a resumed row is whole)
        self.run_loss, self.run_count = 0.0, 0
        if ckpt is not None:
            self.history, self.step = ckpt['history'], ckpt['step']
            self.skipped, self.saved_step = ckpt['skipped'], ckpt['step']
            self.run_loss, self.run_count = ckpt['running_loss']
        self.block_losses = []   # device scalars of the steps since the last logging point
        self.fixed_refs = None   # checkpoint.reference of the fixed nets, made at the first save

    def __enter__(self):
        """Start the clock and the progress: a terminal gets the bar, a log file (or a pipe) plain
        lines every --print-every s; the CSV holds the checkpoint's rows and none after them."""
        a = self.args
        self.bar = cli.progress(total=self.total_steps, initial=self.step, enabled=DIST.main,
                                desc=f'{self.stage} net', unit='step', dynamic_ncols=True)
        self.print_lines = DIST.main and not (sys.stdout.isatty() and sys.stderr.isatty())
        DIST.together(lambda: self._write(
            lambda: write_history(self.csv_path, self.history, self.columns), 'write'),
            main_only=True)   # a full disk stops every rank
        self.t_start = self.t_interval = self.t_read = time.perf_counter()
        self.elapsed_before = self.history[-1]['elapsed_s'] if self.history else 0.0
        self.samples_before = self.step * a.batch_size
        self.steps_here, self.last_save, self.last_plot = 0, time.monotonic(), time.monotonic()
        self.last_line = -math.inf
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def close(self, message):
        """The end of this invocation's part of the stage: the bar closed, then one line."""
        self.bar.close()
        if self.skipped:
            message += f' ({self.skipped} batches with a non-finite loss skipped)'
        print(message)

    def step_done(self, loss):
        """Count a step and keep its loss (a device scalar, not read here)."""
        self.block_losses.append(loss)
        self.step += 1
        self.steps_here += 1
        self.bar.update(1)

    def is_log_point(self):
        a, step = self.args, self.step
        return (step % a.log_every == 0 or self.validation_due() or step == self.total_steps
                or self.save_every_due())

    def validation_due(self):
        return self.step % self.val_every == 0 or self.step == self.total_steps

    def save_every_due(self):
        return bool(self.args.save_every and self.step % self.args.save_every == 0)

    def save_due(self):
        return time.monotonic() - self.last_save >= 60 * self.args.save_minutes

    def read_losses(self, net):
        """The host's turn: read the losses of the steps since the last logging point (one read),
        stop on a non-finite one (or count it with --skip-nonfinite), show the progress. Returns
        the mean training loss since the last history row."""
        stage, first = self.stage, self.step - len(self.block_losses) + 1
        losses = torch.stack(self.block_losses).tolist() if self.block_losses else []
        self.block_losses, self.t_read = [], time.perf_counter()
        bad = [(first + i, v) for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad and not (self.args.skip_nonfinite and all_finite(net)):
            raise cli.UserError(f'{stage} step {bad[0][0]}: the loss is {bad[0][1]}; training '
                                 f'stopped before it touched the weights, {self.kept()}. '
                                 f'{self.how_to_go_on("pass --skip-nonfinite to skip such batches")}')
        for s, v in bad:
            self.skipped += 1
            self.bar.write(f'{stage} step {s}: loss {v}, batch skipped ({self.skipped} so far)')
        for v in losses:   # one at a time: the same sums however the steps fall into blocks
            if math.isfinite(v):
                self.run_loss += v
                self.run_count += 1
        mean_loss = self.run_loss / self.run_count if self.run_count else float('nan')
        self.report(mean_loss)
        return mean_loss

    def report(self, mean_loss):
        """Progress: the bar's figures, or a plain line (stage, step/total, samples, loss, samples/s,
        ETA) at most every --print-every seconds and at the end of the stage."""
        a = self.args
        elapsed = time.perf_counter() - self.t_start
        rate = self.steps_here * a.batch_size / elapsed
        self.bar.set_postfix(loss=f'{mean_loss:.4f}', samples_s=f'{rate:.1f}')
        last = self.step == self.total_steps
        if self.print_lines and (last or time.monotonic() - self.last_line >= a.print_every):
            eta = (self.total_steps - self.step) * elapsed / self.steps_here
            print(f'{self.stage} step {self.step}/{self.total_steps} '
                  f'({self.step * a.batch_size} samples): loss {mean_loss:.4f}, '
                  f'samples_s={rate:.1f}, ETA {cli.clock(eta)}',
                  flush=True)
            self.last_line = time.monotonic()

    def add_row(self, mean_loss, scores):
        """A row of the history (the training loss since the last row, the validation `scores` of
        train.validate, speed), appended to OUT/history_<stage>.csv; the loss plot, at most once a
        minute and at the end of the stage."""
        samples, now = self.step * self.args.batch_size, self.t_read
        row = {'step': self.step, 'samples': samples, 'train_loss': mean_loss,
               'samples_per_s': (samples - self.samples_before) / (now - self.t_interval),
               'elapsed_s': self.elapsed_before + now - self.t_start,
               'wall_time': datetime.datetime.now().isoformat(timespec='seconds')}
        self.t_interval, self.samples_before = now, samples
        self.run_loss, self.run_count = 0.0, 0
        if scores:
            row.update({f'val_{k}': value for k, value in scores.items()})
            self.bar.write(f"{self.stage} {samples} samples: val loss {scores['loss']:.4f}, sc-inv "
                           f"{scores['si_log']:.3f}, RMSE {scores['rmse']:.3f} m, d<1.25 {scores['d1']:.3f}")
        DIST.together(lambda: self._write(lambda: append_history(self.csv_path, row, self.columns),
                                          f'add the row of {self.stage} step {self.step} to'),
                      main_only=True)   # a full disk stops every rank
        self.history.append(row)
        if time.monotonic() - self.last_plot >= PLOT_EVERY_S or self.step == self.total_steps:
            if DIST.main:   # drawn from the CSV: what a user can also plot themselves
                path = os.path.join(self.args.out, f'loss_{self.stage}.png')
                try:
                    util.plot_losses(read_history(self.csv_path), self.stage, path, self.args.loss)
                except (OSError, RuntimeError) as e:   # a plot is not worth stopping the run for
                    self.bar.write(f'{path}: not drawn ({e})')
            self.last_plot = time.monotonic()

    def _write(self, write, what):
        """write() the history; a full disk or an unwritable --out stops the run in one line."""
        try:
            write()
        except OSError as e:
            raise cli.UserError(f'{self.csv_path}: could not {what} the history ({e.strerror or e}); '
                                 f'{self.kept()}. {self.how_to_go_on(fix="free some space")}') from None

    def saved(self, step):
        self.saved_step, self.last_save = step, time.monotonic()

    def kept(self):
        if self.saved_step is None:
            return 'no checkpoint of this stage had been written yet'
        return f'the last checkpoint ({self.ckpt_path}, {self.stage} step {self.saved_step}) is intact'

    def how_to_go_on(self, other=None, fix=None):
        """The advice after a failure: continue with --resume where the checkpoint continues this
        run, else start it again (nothing to resume from); `other`: a second way, `fix`: first."""
        if self.resumable or self.saved_step is not None:
            advice = 'continue with --resume'
        elif os.path.isfile(os.path.join(self.args.out, f'{self.stage}.pth')):   # written, then
            advice = 'start the run again with --overwrite (no checkpoint to resume from)'   # failed
        else:
            advice = 'start the run again (no checkpoint to resume from)'
        advice = f'{fix}, then {advice}' if fix else advice
        advice = f'{advice}, or {other}' if other else advice
        return advice[0].upper() + advice[1:]


# The training history, one row per validation point: train.py appends to OUT/history_<stage>.csv
# as it goes (and rewrites it from the checkpoint on --resume); the loss plots are drawn from it.
# train_loss is the chosen training loss (train.py --loss), val_loss Eq. 4; with another loss than
# Eq. 4 a column val_loss_<name> after val_loss holds it (history_columns).
HISTORY_COLUMNS = ('step', 'samples', 'train_loss', 'val_loss', *(f'val_{k}' for k in METRIC_NAMES),
                   'samples_per_s', 'elapsed_s', 'wall_time')


def history_columns(loss=DEFAULT_LOSS):
    """The history's columns for a run trained with `loss` (a loss.LOSSES name)."""
    if loss == DEFAULT_LOSS:
        return HISTORY_COLUMNS
    at = HISTORY_COLUMNS.index('val_loss') + 1
    return HISTORY_COLUMNS[:at] + (f'val_loss_{loss}',) + HISTORY_COLUMNS[at:]


def _csv_line(values):
    return ','.join('' if v is None else v if isinstance(v, str) else repr(v) for v in values) + '\n'


def write_history(path, rows, columns=HISTORY_COLUMNS):
    """The CSV with its header and `rows` (dicts of `columns`), atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(','.join(columns) + '\n')
            for row in rows:
                f.write(_csv_line(row.get(k) for k in columns))
    atomic_write(path, write)


def append_history(path, row, columns=HISTORY_COLUMNS):
    with open(path, 'a') as f:
        f.write(_csv_line(row.get(k) for k in columns))


def read_history(path):
    """The rows of a history CSV as dicts: numbers as float (int for step and samples), a missing
    value (no validation set) as None, wall_time as its text."""
    import csv
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    kinds = {'step': int, 'samples': int, 'wall_time': str}
    return [{k: (kinds.get(k, float)(v) if v != '' else None) for k, v in row.items()} for row in rows]


def summary(args, stages):
    """The run's last lines: each stage's final validation figures side by side, where the files
    are, and the command that evaluates them on the test split."""
    lines, names = [], STAGE_NAMES
    shown = {'coarse', *stages} | ({'fine'} if 'refine' in stages else set())
    for stage, name in names.items():
        if stage not in shown:
            continue
        path = os.path.join(args.out, f'history_{stage}.csv')
        rows = [r for r in read_history(path) if r['val_loss'] is not None] \
            if os.path.isfile(path) else []
        if rows:
            r = rows[-1]
            lines.append(f"| {name:20s} | {r['samples']:9d} | {r['val_loss']:.4f} | {r['val_si_log']:.3f}"
                         f" | {r['val_rmse']:.3f} | {r['val_abs_rel']:.3f} | {r['val_d1']:.3f} |")
    out = args.out
    written = [f'{s}.pth' for s in names if s in shown] + [f'loss_{s}.png' for s in names if s in shown]
    files = ', '.join(p for p in (os.path.join(out, f) for f in written + ['predictions.png'])
                      if os.path.isfile(p))
    text = ['', 'Validation at the end of each stage (held-out scenes, centre crop; loss: Eq. 4 '
                'in (log m)^2):',
            '| net                  |   samples | loss   | sc-inv | RMSE m | abs rel | d<1.25 |'] + lines
    if not lines:
        text = ['', 'no validation figures (--val-fraction 0)']
    where = ' --demo' if args.demo else ''
    if args.dataset == 'kitti':   # the dataset is read off the weights; the test frames are raw
        where = ' --data <raw KITTI folder>' if nyu_raw.is_cache(args.data) else (
            f' --data {args.data}' if args.data != data.kitti.ROOT else '')
    elif not args.demo:
        labeled = args.data if args.data_format == 'labeled' else args.labeled
        where += f' --data {labeled}' if labeled != data.LABELED else ''
        where += f' --splits {args.splits}' if args.splits != data.SPLITS else ''
    text += [f'written: {files}', f'evaluate on the test split: python evaluate.py --model {out}{where}']
    return '\n'.join(text)
