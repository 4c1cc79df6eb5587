"""The run machinery of train.py: devices and precision, several GPUs and processes, stopping on
signals, the non-finite guard, and the random streams of dropout.

Nothing here is the paper's method; train.py calls it so that the method reads top-down there.
"""
import argparse
import atexit
import functools
import math
import multiprocessing
import os
import signal
import sys

import numpy as np
import torch
import torch.nn as nn

import cli

MOMENTUM = 0.9   # Sec. 3.3 (also train.py's: fused_sgd_works probes the same SGD)


def add_running_options(p):
    """The 'running' options of train.py: where and how fast a run goes, not what it computes."""
    o = p.add_argument_group('running')
    o.add_argument('--out', default='model', help='output folder (default: %(default)s)')
    o.add_argument('--resume', nargs='?', const='yes', choices=['yes', 'auto'],
                   help='continue from OUT/checkpoint.pth; `--resume auto`: continue it if it is '
                        'there, else start afresh (one command line a scheduler can rerun)')
    o.add_argument('--overwrite', action='store_true',
                   help='a fresh run into an --out that holds the weights of the stages it trains '
                        '(or of later ones) or an unfinished checkpoint is refused; with --overwrite '
                        'those files, with their histories and plots, are moved into '
                        'OUT/replaced-<date-time>/ (never deleted)')
    o.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help="'cuda': every visible GPU (nn.DataParallel when there are several; "
                        "torchrun is the faster way, docs/gpus.md); 'cuda:N': GPU N alone; 'cpu' "
                        '(default: %(default)s)')
    o.add_argument('--val-every', type=cli.whole(1), default=None,
                   help='validate every N samples (default: 50 times per stage)')
    o.add_argument('--path', choices=['fast', 'plain'], default='fast',
                   help="'fast': frames held on the device, the paper's augmentations drawn per "
                        "sample but applied as one batched grid; 'plain': the usual DataLoader with "
                        "per-sample augmentation in worker processes. Both compute the same "
                        "(tested) (default: %(default)s)")
    o.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for the nets (the loss stays fp32). A deviation for speed: '
                        'default on with --path fast on CUDA, off otherwise. --no-amp: the '
                        "paper's fp32, without TF32")
    o.add_argument('--compile', action='store_true', help='torch.compile the trained net')
    o.add_argument('--save-minutes', type=cli.real(above=0), default=10.0,
                   help='write the checkpoint every N minutes of training, and always at the end '
                        'of a stage and on a stop (default: %(default)s)')
    o.add_argument('--save-every', type=cli.whole(0), default=0,
                   help='also write it every N steps (default: %(default)s = only by time)')
    o.add_argument('--log-every', type=cli.whole(1), default=None,
                   help='read the loss on the host every N steps (progress, NaN check); in between '
                        'a GPU step never waits for the CPU (default: 50 on CUDA, 1 on the CPU)')
    o.add_argument('--deterministic', action='store_true',
                   help='the same bits on every GPU run (cuDNN autotuning off, deterministic '
                        'kernels; slower). The CPU is deterministic anyway')
    o.add_argument('--max-steps', type=cli.whole(1), default=None,
                   help='stop this invocation after N steps with a checkpoint (for time-limited '
                        'cluster jobs; continue with --resume)')
    o.add_argument('--skip-nonfinite', action='store_true',
                   help='skip a batch whose loss is NaN or inf and count it, instead of stopping '
                        'the run with the step number (the default)')
    o.add_argument('--print-every', type=cli.real(low=0), default=60.0, metavar='SECONDS',
                   help='where the output is a file or a pipe, not a terminal: a plain progress '
                        'line every N seconds instead of the bar (default: %(default)s)')
    o.add_argument('--threads', type=cli.whole(1), default=None, help='CPU threads for torch')
    o.add_argument('--debug', action='store_true', help='show the traceback of an error')


_FUSED_SGD = {}


def fused_sgd_works(device):
    """Whether this torch has a fused SGD kernel for the device (CUDA and, in recent releases,
    the CPU): tried once on a one-element parameter."""
    if device.type not in _FUSED_SGD:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros(1, device=device)
        try:
            torch.optim.SGD([p], lr=0.1, momentum=MOMENTUM, fused=True).step()
            _FUSED_SGD[device.type] = True
        except (RuntimeError, TypeError, ValueError):
            _FUSED_SGD[device.type] = False
    return _FUSED_SGD[device.type]


class NonFiniteGuard:
    """A NaN or inf loss must never reach the weights, and the GPU must not wait for the host to
    find out. The step's (global) loss is checked on the device and handed to fused SGD as its
    `found_inf` flag, which makes the kernel leave weights and momentum untouched: no host read.
    Stopping mode (the default): the flag stays set for the rest of the block, so the weights are
    exactly those before the bad step when the next logging point reads the losses and stops the
    run naming that step. --skip-nonfinite: only the bad step is skipped (and counted there).
    Without fused SGD (an old torch or an exotic device), the loss is read on the host per step."""

    def __init__(self, optimizer, device, skip):
        self.skip = skip
        self.on_device = optimizer.defaults.get('fused') is True
        self.found = torch.zeros((), device=device)
        self.halted = False   # host fallback, stopping mode: a bad step was seen
        if self.on_device:
            optimizer.found_inf = self.found   # read by SGD.step, as GradScaler does

    def allows_step(self, loss_value):
        """Called before optimizer.step() with the step's loss (a device scalar); False: do not
        call it (host fallback only)."""
        if not self.on_device:
            ok = math.isfinite(float(loss_value)) and (self.skip or not self.halted)
            self.halted = self.halted or not ok
            return ok
        bad = (~torch.isfinite(loss_value)).to(self.found.dtype)
        if self.skip:
            self.found.copy_(bad)
        else:
            torch.maximum(self.found, bad, out=self.found)
        return True


class Autocast(nn.Module):
    """Runs `module` in autocast with an explicit dtype, inside the module's own forward.

    nn.DataParallel runs each replica in a thread of its own and re-enters autocast there as
    torch.autocast(device_type, enabled=...), without the dtype (torch/nn/parallel/
    parallel_apply.py); the autocast dtype is thread-local, so the replicas would compute in
    CUDA's default float16, without a GradScaler, where gradients of about 3e-7 (coarse6) are
    subnormal. Entering autocast here, in the replicated forward, gives every replica bf16."""

    def __init__(self, module, device_type, dtype=torch.bfloat16, enabled=True):
        super().__init__()
        self.module, self.device_type, self.dtype, self.enabled = module, device_type, dtype, enabled

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            return self.module(*args)


def all_finite(net):
    return bool(torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all())



class StopControl:
    """When this invocation should stop early: on SIGINT / SIGTERM / SIGUSR1 (finish the step,
    write the checkpoint, exit with 128 + the signal's number) or after --max-steps steps. A context manager, so the previous
    signal handlers come back afterwards (main() is also called from tests)."""

    # SIGUSR1: what SLURM sends ahead of a job's time limit with --signal (docs/gpus.md)
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, max_steps=None):
        self.max_steps, self.steps, self.signum = max_steps, 0, None

    def step_done(self):
        """Count a step; True once --max-steps steps are done (the same count in every process)."""
        self.steps += 1
        return self.max_steps is not None and self.steps >= self.max_steps

    @property
    def signalled(self):
        return self.signum is not None

    def reason(self):
        return signal.Signals(self.signum).name if self.signum else f'--max-steps {self.max_steps}'

    @staticmethod
    def ignore_signals(_worker_id=None):
        """In decoding workers (worker_init_fn): Ctrl-C reaches the whole process group, but only
        the main process decides to stop (after the step, with a checkpoint); it ends the workers."""
        for s in StopControl.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    @staticmethod
    @functools.cache   # registered once
    def end_workers_at_exit():
        """At the program's end, multiprocessing ends the workers a DataLoader left alive (after
        an error, until its iterator is collected) with SIGTERM, which ignore_signals' workers
        ignore, and then waits for them: forever. This ends them first, with SIGKILL (atexit
        runs the last registered first): they only decode frames, nothing is lost."""
        def kill_workers():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # not the DataLoader's "worker killed"
            for p in multiprocessing.active_children():
                if p.daemon:   # DataLoader workers are daemonic
                    p.kill()
        atexit.register(kill_workers)

    def __enter__(self):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:   # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signum = signum
        print(f'\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint',
              file=sys.stderr, flush=True)


class Distributed:
    """Several processes launched by torchrun (WORLD_SIZE > 1): one per GPU (NCCL), or CPU
    processes (gloo). Each computes its share of every global batch and DistributedDataParallel
    averages the gradients, so the step is that of one process on the whole batch; rank 0 alone
    validates and writes files. One process (plain `python train.py`): all of this is a no-op.
    Long because it holds every collective train.py makes, each a few lines."""

    def __init__(self):
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.device = None

    @property
    def active(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def start(self, device, gpus):
        """(device, GPUs) of this process: under torchrun, the GPU of its local rank alone."""
        if not self.active:
            return device, gpus
        self.check_restartable()
        if device.type == 'cuda':
            device, gpus = torch.device('cuda', self.local_rank), [self.local_rank]
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        self.device = device
        if not self.main:   # one line a run, not one a process; errors still reach stderr
            sys.stdout = open(os.devnull, 'w')
        return device, gpus

    @staticmethod
    def check_restartable():
        """Refuse (one line) a torchrun run that may restart its processes (--max-restarts N) on
        the store torchrun shares by default (TORCHELASTIC_USE_AGENT_STORE=True): that store
        outlives the processes, so a restarted group reads the killed group's addresses in it, and
        init_process_group fails, or hangs until its timeout (gloo: 30 minutes), instead of
        resuming. Measured with gloo and torch 2.14 (pytorch issues #135712, #167288).
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes torchrun's c10d rendezvous start a fresh
        store for every group; the static rendezvous always shares one."""
        restarts = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0'))
        if restarts and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
            raise cli.UserError(f'torchrun --max-restarts {restarts}: a restarted group would '
                                f'fail or hang in its rendezvous on the store torchrun shares by '
                                f'default; run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in '
                                f'its environment, and --standalone or --rdzv-backend c10d (docs/gpus.md, '
                                f'fault tolerance)')

    def wrap(self, net):
        if not self.active:
            return net
        ids = [self.device.index] if self.device.type == 'cuda' else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def mean_(self, value):
        """A device tensor averaged over the processes, in place. With NCCL the host does not wait
        for it (the reduction is queued on the GPU's stream)."""
        if self.active:
            torch.distributed.all_reduce(value)
            value /= self.world
        return value

    def agree(self, *flags):
        """Each flag True if it is True in any process (one small collective; a host read)."""
        if not self.active:
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(v > 0 for v in t.tolist())

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] in every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def together(self, fn, main_only=False):
        """fn() in every process (main_only: in rank 0 alone); a UserError it raises in any of
        them is raised in all (one collective), so that no process waits in the next collective
        for one that has stopped (until NCCL's 30-minute timeout). Returns fn's result."""
        result, error = None, None
        if self.main or not main_only:
            try:
                result = fn()
            except cli.UserError as e:
                error = e
        if self.active:
            failed = [m for m in self.gather(None if error is None else str(error)) if m]
            if failed and error is None:
                raise cli.UserError(failed[0])
        if error is not None:
            raise error
        return result

    def stop(self):
        if self.active:
            torch.distributed.destroy_process_group()


DIST = Distributed()


def resolve_device(name):
    """--device as (the device the nets live on, the GPUs a step runs on). 'cuda': every visible
    GPU, through nn.DataParallel when there are several (the user's request); 'cuda:N': GPU N
    alone; 'cpu'. Refused with one line if it does not exist here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise cli.UserError(f'--device {name}: not a device; use cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):   # meta, mps, xpu, ...: the nets never ran there
        raise cli.UserError(f'--device {name}: not a device these scripts run on; use cpu, cuda '
                            f'or cuda:N')
    if device.type != 'cuda':
        return device, []
    if not torch.cuda.is_available():
        raise cli.UserError(f'--device {name}: CUDA is not available here (torch.cuda.is_available() '
                             f'is False); use --device cpu')
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device('cuda', 0), list(range(count))
    if device.index >= count:
        raise cli.UserError(f'--device {name}: {count} GPU(s) visible here (cuda:0..cuda:{count - 1})')
    return device, [device.index]


def seed_streams(seed, rank, gpus, salt=0):
    """Seed the random streams of dropout: one of its own for every torchrun process and every
    GPU. torch.manual_seed alone gives every process, and every GPU of one process, the same
    stream, so the DataParallel replicas and the torchrun processes would all drop the same
    units for their shares of the batch."""
    def derive(*key):
        return int(np.random.SeedSequence([seed, rank, salt, *key]).generate_state(1)[0])
    torch.manual_seed(derive(0))
    for i in gpus:
        with torch.cuda.device(i):
            torch.cuda.manual_seed(derive(i + 1))


def rng_state(gpus):
    return {'cpu': torch.get_rng_state(), 'cuda': [torch.cuda.get_rng_state(i) for i in gpus]}


def set_rng_state(state, gpus):
    torch.set_rng_state(state['cpu'])
    for i, s in zip(gpus, state['cuda']):
        torch.cuda.set_rng_state(s, i)


def wrap_nets(net, coarse, device, gpus, amp, compile_net):
    """The nets as a step runs them: in autocast with its dtype (Autocast), over several GPUs
    (nn.DataParallel) or processes (DDP), compiled with --compile. The fixed nets that feed it
    (`coarse`: None in the coarse stage) likewise, without DDP (they have no gradients)."""
    kind = device.type
    net = Autocast(net, kind, enabled=amp)
    coarse = None if coarse is None else Autocast(coarse, kind, enabled=amp)
    if DIST.active:
        net = DIST.wrap(net)
    elif len(gpus) > 1:
        net = nn.DataParallel(net, device_ids=gpus)
        coarse = None if coarse is None else nn.DataParallel(coarse, device_ids=gpus)
    if compile_net:
        net = torch.compile(net)
    return net, coarse


def start(args):
    """(device, GPUs) of this process from --device and torchrun's environment, checked before any
    data is read; the logging interval and the precision for that device."""
    device, gpus = resolve_device(args.device)
    if DIST.active and device.type == 'cuda' and ':' in args.device:
        raise cli.UserError(f'--device {args.device} under torchrun: each process takes the GPU of '
                            f'its LOCAL_RANK (CUDA_VISIBLE_DEVICES chooses which); use --device cuda')
    device, gpus = DIST.start(device, gpus)
    if args.compile and len(gpus) > 1 and not DIST.active:
        raise cli.UserError(f'--compile does not work with nn.DataParallel ({len(gpus)} GPUs in one '
                             f'process): use torchrun for several GPUs (docs/gpus.md), or --device cuda:0')
    if DIST.active and args.batch_size % DIST.world:
        raise cli.UserError(f'--batch-size {args.batch_size} does not split evenly over '
                             f'{DIST.world} processes')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if args.log_every is None:
        args.log_every = 50 if device.type == 'cuda' else 1   # on the CPU a read costs nothing
    set_precision(args, device)
    return device, gpus


def set_precision(args, device):
    """bf16 autocast (--amp, default on for the fast path on CUDA); otherwise the paper's fp32,
    TF32 included: cuDNN would run fp32 convolutions in TF32 by default. --deterministic: the
    same bits on every run (cuDNN autotuning off, deterministic kernels), slower."""
    if args.amp is None:
        args.amp = args.path == 'fast' and device.type == 'cuda'
    torch.backends.cudnn.allow_tf32 = bool(args.amp)
    torch.backends.cudnn.benchmark = not args.deterministic   # fixed input sizes: autotune once
    torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')   # before cuBLAS starts
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
