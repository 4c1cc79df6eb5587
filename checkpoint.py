"""train.py's checkpoint: what --resume needs to continue a run exactly, written atomically, read
back with every refusal a user can meet (truncated, not ours, another variant, stage or schedule),
and older formats converted where that is safe; and what follows each training step (end_of_step:
the logging points, the checkpoints, the stops).
"""
import hashlib
import os
import shutil
import time

import torch

import cli
import files
from loss import DEFAULT_LOSS
from net import STAGES, STD_UNITS, load_weights
from runtime import DIST, all_finite, rng_state, seed_streams, set_rng_state

# What each format added: 3, every process's CPU and GPU random streams ('rng'); 4, the paper
# and alexnet variants' feature and target scaling; 5, the history's val_loss in Eq. 4's units, as
# train_loss (format 4's was divided by 0.457^2: converted on resume); 6, the fixed nets of a later
# stage (the coarse net in the fine stage) as references to their weights files, not copies; 7,
# coarse1-5 in the authors' units (net.AUTHORS_UNITS); 8, the optimizer's groups one per tensor
# (train.param_groups: biases are not decayed), not one per layer. Formats 5 and 6 are still read:
# their fixed coarse net is converted (net.from_std_units), an unfinished coarse stage of the paper
# or alexnet variant refused (its bias steps were not the authors'). Formats 5 to 7: the momentum
# of each tensor moves into its own group (per_tensor_groups).
CHECKPOINT_FORMAT = 8

# The nets of the stages in order (net.STAGES), each a key of the checkpoint (None where its stage
# has not begun)
NETS = STAGES
# What a checkpoint's config must share with the command line that resumes it.
RESUME_MUST_MATCH = ('dataset', 'data', 'kitti_list', 'batch_size', 'samples', 'loss', 'lam', 'seed',
                     'train_depth', 'per_scene', 'lr_scale')   # the dataset first: a run of the other one differs in more


def read_checkpoint(path, args, variant, stages):
    """The checkpoint to resume, refused (one line, saying why) if it is truncated, not ours, or
    from another variant, stage or schedule than the command line asks for."""
    ckpt = files.load_torch_file(path, 'a checkpoint written by train.py')
    needed = {'format', 'variant', 'stage', 'step', 'done', 'skipped', 'coarse', 'optimizer',
              'rng', 'history', 'running_loss', 'config'}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys():
        raise cli.DataError(f'{path}: not a train.py checkpoint (no {sorted(needed)} entries)')
    if ckpt['format'] == 4:   # its val_loss was Eq. 4 / log_depth_std^2: into Eq. 4's units
        for row in ckpt['history']:
            if row.get('val_loss') is not None:
                row['val_loss'] *= variant.log_depth_std ** 2
        ckpt['format'] = 5
        print(f'{path}: format 4, its validation losses converted to Eq. 4 in (log m)^2')
    if ckpt['format'] not in (5, 6, 7, CHECKPOINT_FORMAT):   # 5: every net's weights inline
        raise cli.DataError(f"{path}: checkpoint format {ckpt['format']}, this train.py reads "
                             f"format {CHECKPOINT_FORMAT} (an older train.py wrote it: start "
                             f"afresh, or finish it with that version)")
    if ckpt['variant'] != variant.name:
        raise cli.DataError(f"{path}: is a checkpoint of the '{ckpt['variant']}' variant, this "
                             f"run is '{variant.name}'; resume it with --variant {ckpt['variant']}")
    if ckpt['format'] < 7 and STD_UNITS[variant.name] != 1.0 and ckpt['stage'] == 'coarse' \
            and ckpt['optimizer'] is not None:   # its stage unfinished
        raise cli.DataError(f"{path}: an unfinished coarse stage written while coarse1-5 worked in "
                             f"units of the input's std, where each bias step was "
                             f"{STD_UNITS[variant.name] ** 2:,.0f} times the authors'; this "
                             f"train.py takes the authors' steps: start afresh (--overwrite), or "
                             f"finish it with the train.py that wrote it")
    if ckpt['done']:
        return ckpt
    if args.stage == 'coarse' and ckpt['stage'] == 'fine':
        raise cli.DataError(f"{path}: holds the fine stage (step {ckpt['step']}), but --stage "
                             f"coarse was asked for; resume with --stage fine or --stage both")
    if args.stage in ('fine', 'refine') and ckpt['stage'] != args.stage:
        raise cli.DataError(f"{path}: holds an unfinished {ckpt['stage']} stage (step "
                             f"{ckpt['step']}), but --stage {args.stage} was asked for; resume "
                             f"with --stage {ckpt['stage']} or both")
    if ckpt['stage'] not in stages:
        raise cli.DataError(f"{path}: holds the {ckpt['stage']} stage (step {ckpt['step']}), "
                             f"which this run does not train; resume with --refine 2 and --stage "
                             f"both or {ckpt['stage']}")
    ckpt['config'].setdefault('lr_scale', 1.0)   # written before --lr-scale existed: the paper's
    ckpt['config'].setdefault('dataset', 'nyu')  # written before KITTI
    ckpt['config'].setdefault('loss', DEFAULT_LOSS)  # written before --loss: the paper's
    # written before --kitti-list: KITTI runs trained on the Eigen list
    ckpt['config'].setdefault('kitti_list', 'eigen' if ckpt['config']['dataset'] == 'kitti' else None)
    check_schedule(path, ckpt, args)
    return ckpt


def check_schedule(path, ckpt, args, converted=False):
    """Refuse (one line) a resume whose data or schedule differs from the checkpoint's. The
    samples of a stage given in epochs, and the data of --demo, are known only once the data is
    loaded (converted): train.py checks again then."""
    unit = 'coarse' if ckpt['stage'] == 'coarse' else 'fine'   # refine: the fine schedule
    pending = getattr(args, f'{unit}_epochs') is not None and not converted
    samples = None if pending else getattr(args, f'{unit}_samples')
    asked = {'batch_size': args.batch_size, 'samples': samples, 'loss': args.loss, 'lam': args.lam,
             'seed': args.seed, 'train_depth': args.train_depth, 'per_scene': args.per_scene,
             'lr_scale': args.lr_scale, 'dataset': args.dataset,
             'kitti_list': getattr(args, 'kitti_list', None),   # None for NYU: not compared
             'data': os.path.abspath(args.data) if converted else None}   # --demo: known then
    started_on = ckpt['config'].get('data')
    if asked['data'] and started_on and started_on != asked['data'] and \
            os.path.basename(started_on) == os.path.basename(asked['data']):
        # a copy of the same data elsewhere (a cluster job's scratch disk): the same run
        print(f'note: {path}: started on {started_on}; continuing on {asked["data"]}')
        asked['data'] = started_on
    for key in RESUME_MUST_MATCH:
        if key in ckpt['config'] and asked[key] is not None and ckpt['config'][key] != asked[key]:
            option = {'samples': f"--{unit}-samples"}.get(key, '--' + key.replace('_', '-'))
            raise cli.DataError(f"{path}: was started with {option} {ckpt['config'][key]}, "
                                 f"this run asks for {asked[key]}; resume with the same setting")
    return ckpt


def remove_stale_temporaries(folder):
    """Half-written files of a run that was killed while saving (atomic_write's temporaries): the
    complete files beside them are what counts, so these are only clutter."""
    for tmp in files.temporaries(folder, ['checkpoint.pth', *(f'{stage}.pth' for stage in NETS)]):
        os.remove(tmp)
        print(f'removed {tmp}, left by a run killed while saving')


def load_optimizer_state(optimizer, state):
    """Momentum buffers and rates from a checkpoint; the implementation (fused or not) stays the
    one this machine chose (a checkpoint may come from another machine or torch)."""
    chosen = {k: optimizer.defaults.get(k) for k in ('fused', 'foreach')}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(chosen)
        for p in group['params']:   # each buffer in its parameter's memory layout (channels_last
            buf = optimizer.state[p].get('momentum_buffer')   # on CUDA): fused SGD needs it
            if buf is not None and buf.stride() != p.stride():
                optimizer.state[p]['momentum_buffer'] = torch.empty_like(p).copy_(buf)


def per_tensor_groups(path, state, optimizer):
    """The optimizer state of a checkpoint before format 8, one group per layer, for `optimizer`'s
    one group per tensor. Both number the tensors in the same order (layer by layer, each layer's
    in its own order), which is all the momentum buffers are keyed by; the groups' settings are
    the ones this run chose (the rates must match to resume: RESUME_MUST_MATCH)."""
    ours = optimizer.state_dict()['param_groups']
    tensors = sum(len(g['params']) for g in state['param_groups'])
    if tensors != len(ours):
        raise cli.DataError(f"{path}: its optimizer holds {tensors} tensors, this run's net "
                            f"{len(ours)}: not a checkpoint of this net; start afresh (--overwrite)")
    return {'state': state['state'], 'param_groups': ours}


def resume(path, ckpt, optimizer, seed, gpus):
    """The optimizer's momentum (None: the stage had finished) and every process's random streams
    of a stage's checkpoint (read from `path`). Written by another number of processes or GPUs,
    dropout goes on with new streams (one line says so)."""
    if ckpt['optimizer'] is not None:
        state = ckpt['optimizer']
        if ckpt['format'] < 8:
            state = per_tensor_groups(path, state, optimizer)
            if any(g['weight_decay'] for g in optimizer.param_groups):
                print(f"note: a checkpoint of format {ckpt['format']}, which decayed the biases "
                      f"too; from step {ckpt['step'] + 1} on only the weights are decayed, as "
                      f"in the authors' depth.conf")
        load_optimizer_state(optimizer, state)
    states = ckpt['rng']
    if len(states) == DIST.world and len(states[DIST.rank]['cuda']) in (0, len(gpus)):
        set_rng_state(states[DIST.rank], gpus)
    else:
        seed_streams(seed, DIST.rank, gpus, salt=ckpt['step'])
        print(f'note: the checkpoint was written by {len(states)} process(es) on '
              f'{len(states[0]["cuda"])} GPU(s); dropout continues with new random streams')


def open_run(args, variant, stages):
    """The checkpoint this invocation continues (--resume, or --resume auto when one is there), or
    None for a fresh start, which may not overwrite a previous run's weights (previous_run). A
    finished checkpoint of an earlier stage (--stage coarse before this --stage fine) is not this
    run's: --resume auto starts the stage afresh on it, --resume is refused."""
    path = os.path.join(args.out, 'checkpoint.pth')
    if DIST.main:
        remove_stale_temporaries(args.out)
    auto = args.resume == 'auto'
    if args.resume and (os.path.isfile(path) or not auto):
        if not os.path.isfile(path):
            raise cli.DataError(f'{path}: no checkpoint to resume from')
        ckpt = read_checkpoint(path, args, variant, stages)
        if not (ckpt['done'] and NETS.index(ckpt['stage']) < NETS.index(stages[0])):
            if auto:
                print(f'--resume auto: continuing {path}')
            return ckpt
        if not auto:
            raise cli.DataError(f"{path}: holds the finished {ckpt['stage']} stage, which this "
                                 f"--stage {stages[0]} run starts from; start it without --resume")
    if auto:
        print(f'--resume auto: no checkpoint of this run in {args.out}, starting afresh')
    DIST.together(lambda: previous_run(args.out, stages, args.overwrite), main_only=True)
    return None


def stage_files(stage):
    """What train.py writes for one stage: its net's weights, its history and its loss plot."""
    return f'{stage}.pth', f'history_{stage}.csv', f'loss_{stage}.png'


def previous_run(out, stages, overwrite):
    """What of a previous run a fresh one would replace, refused in one line unless --overwrite:
    the weights of the stages it trains (and of the later ones, trained on the nets it replaces)
    and an unfinished (or unreadable) checkpoint. A history without weights, left by a run that
    stopped before its first checkpoint, is simply written anew. Returns the files' names."""
    later = NETS[NETS.index(stages[0]):]
    kept = [f'{s}.pth' for s in later if os.path.isfile(os.path.join(out, f'{s}.pth'))]
    path, unfinished = os.path.join(out, 'checkpoint.pth'), False
    if os.path.isfile(path):
        try:
            old = files.load_torch_file(path, 'a checkpoint written by train.py', mmap=True)   # its 'done'
            unfinished = not (isinstance(old, dict) and old.get('done'))
        except cli.DataError:
            if not overwrite:
                raise
            unfinished = True   # --overwrite: moved aside with the rest
    if unfinished:
        kept.insert(0, 'checkpoint.pth (unfinished)')
    if kept and not overwrite:
        go_on = 'continue it with --resume, ' if unfinished else ''
        raise cli.DataError(f'{out}: holds a previous run ({", ".join(kept)}) that this fresh run '
                             f'would replace; {go_on}choose another --out, or pass --overwrite to '
                             f'move those files aside (nothing was changed)')
    return kept


def move_aside(out, stages):
    """--overwrite, once the new run's data and weights have been read: the previous run's files
    that it replaces go into OUT/replaced-<date-time>/ with the histories and figures that belong
    to them, and the earlier stages' weights this run starts from are linked there too, so that
    folder holds the whole previous run. Nothing is deleted."""
    if not previous_run(out, stages, overwrite=True):
        return
    later = NETS[NETS.index(stages[0]):]
    stamp, count = time.strftime('replaced-%Y%m%d-%H%M%S'), 1
    aside = os.path.join(out, stamp)
    while os.path.exists(aside):   # two runs within a second
        count += 1
        aside = os.path.join(out, f'{stamp}-{count}')
    moved = [n for n in ('checkpoint.pth', 'predictions.png', 'eval.json', 'eval_examples.png',
                         *(n for s in later for n in stage_files(s)))
             if os.path.isfile(os.path.join(out, n))]
    try:
        os.makedirs(aside)
        for name in moved:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
        for stage in NETS[:NETS.index(stages[0])]:   # the inputs of a later stage stay in place
            source = os.path.join(out, f'{stage}.pth')
            if os.path.isfile(source):
                try:
                    os.link(source, os.path.join(aside, f'{stage}.pth'))
                except OSError:   # a filesystem without hard links
                    shutil.copy2(source, os.path.join(aside, f'{stage}.pth'))
    except OSError as e:
        raise cli.UserError(f'{aside}: could not move the previous run there ({e.strerror or e}); '
                            f'the files not yet moved are still in {out}') from None
    print(f'--overwrite: moved {", ".join(moved)} into {aside}')


def save(path, log, nets, optimizer, args, done=False):
    """Everything --resume needs, with every process's random streams; written by rank 0.
    At the end of the stage without the optimizer's momentum, which is then never needed
    again (283 MB less to write for the coarse net). A write that fails (disk full) stops the run
    with one line; a diverged net is never saved over a good checkpoint."""
    streams = DIST.gather(rng_state(log.gpus))
    if not all_finite(nets[log.stage]):
        raise cli.UserError(f'{log.stage} step {log.step}: the weights hold NaN or inf; not '
                             f'saved, {log.kept()}. {log.how_to_go_on("pass --skip-nonfinite")}')
    def write_state():
        finished = log.step == log.total_steps
        upto = NETS[:NETS.index(log.stage) + 1]   # this stage's net and the fixed ones before it
        if log.fixed_refs is None:   # the fixed nets do not change within a stage: hashed once
            log.fixed_refs = {k: reference(nets[k], args.out, k) for k in upto[:-1]}
        state = {'format': CHECKPOINT_FORMAT, 'variant': nets['coarse'].variant.name,
                 'stage': log.stage, 'step': log.step, 'done': done, 'skipped': log.skipped,
                 **{k: None for k in NETS}, **log.fixed_refs,
                 log.stage: nets[log.stage].state_dict(),
                 'optimizer': None if finished else optimizer.state_dict(), 'rng': streams,
                 'history': log.history, 'running_loss': (log.run_loss, log.run_count),
                 'config': {'batch_size': args.batch_size, 'samples': log.samples,
                            'loss': args.loss, 'lam': args.lam,
                            'seed': args.seed, 'train_depth': args.train_depth,
                            'per_scene': args.per_scene, 'lr_scale': args.lr_scale,
                            'dataset': args.dataset, 'data': os.path.abspath(args.data),
                            'kitti_list': getattr(args, 'kitti_list', None),
                            'processes': DIST.world}}
        write(path, lambda tmp: torch.save(state, tmp), 'checkpoint', log)
    DIST.together(write_state, main_only=True)   # rank 0 writes; its failure stops every rank
    log.saved(log.step)


def weights_hash(state):
    """sha256 of a state_dict's tensors (names, dtypes, shapes and values), as stored on the CPU."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous().reshape(-1)   # 0-dim tensors too
        h.update(f'{name} {t.dtype} {tuple(t.shape)};'.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def reference(net, folder, name):
    """What a later stage's checkpoint keeps of a fixed net: its weights file in the run's folder
    (written by the stage that trained it, or the one --stage fine / refine started from) and the
    hash of the weights the stage runs on, 283 MB fewer to write for the coarse net; the weights
    themselves where that file is missing or holds other weights."""
    state, path = net.state_dict(), os.path.join(folder, f'{name}.pth')
    digest = weights_hash(state)
    if os.path.isfile(path) and weights_hash(files.load_torch_file(path, f'the {name} net')) == digest:
        return {'file': f'{name}.pth', 'sha256': digest}
    return state


def load_nets(ckpt, nets, folder):
    """The checkpoint's stage net and the fixed nets before it into `nets`: weights inline, or
    (format 6) from the files they refer to, refused with one line when missing or changed."""
    for name in NETS[:NETS.index(ckpt['stage']) + 1]:
        entry = ckpt[name]
        if isinstance(entry, dict) and set(entry) == {'file', 'sha256'}:
            path = os.path.join(folder, entry['file'])
            again = f'put back the {name} net the {ckpt["stage"]} stage began on, or train that ' \
                    f'stage afresh (--stage {ckpt["stage"]}, another --out)'
            if not os.path.isfile(path):
                raise cli.DataError(f'{path}: missing; the checkpoint\'s {ckpt["stage"]} stage runs '
                                     f'on it: {again}')
            state = files.load_torch_file(path, f'the {name} net written by train.py')
            if not isinstance(state, dict) or weights_hash(state) != entry['sha256']:
                raise cli.DataError(f'{path}: not the {name} net the checkpoint\'s {ckpt["stage"]} '
                                     f'stage runs on (its weights changed since): {again}')
            entry = state
        # formats 5 and 6: a coarse net in std units, converted to the same net (load_weights)
        load_weights(nets[name], os.path.join(folder, f'{name}.pth'), f'the {name} net', entry)


def remove_later_weights(folder, stage, stages):
    """A stage that has just written its net leaves no weights of a later stage it does not train
    beside it: they were trained on the net it replaced (load_pretrained would use them)."""
    for later in NETS[NETS.index(stage) + 1:]:
        path = os.path.join(folder, f'{later}.pth')
        if later not in stages and os.path.isfile(path):
            os.remove(path)
            print(f'removed {path}: trained on the {stage} net this run replaced')


def write(path, write_to, what, log):
    """Write a file atomically; a full disk or other OSError stops the run with a message."""
    try:
        files.atomic_write(path, write_to)
    except (OSError, RuntimeError) as e:   # torch.save on a full disk: a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else cli.last_line(e)
        raise cli.UserError(f'{path}: could not write the {what} at {log.stage} step '
                             f'{log.step} ({reason}); {log.kept()}. '
                             f'{log.how_to_go_on(fix="free some space")}') from None


def end_of_step(stage, stages, nets, optimizer, log, stop, args, validation):
    """What train.train_stage does after a training step besides the next one: at a logging point
    the host reads the losses of the steps since the last one, adds a history row with the scores
    of validation() when one is due, and writes the checkpoint when one is due; at the stage's last
    step its weights. stages: the run's, in order. Returns None to go on, True at the end of the
    stage, False on a stop (a signal, --max-steps) with a checkpoint written."""
    limit = stop.step_done()
    # one process reacts to a signal at once; several agree at the logging points
    if not (limit or (stop.signalled and not DIST.active) or log.is_log_point()):
        return None
    mean_loss = log.read_losses(nets[stage])
    if log.validation_due():
        scores = DIST.together(validation, main_only=True) or {}   # rank 0's refusal stops all
        log.add_row(mean_loss, scores)   # history CSV and loss plot
    signalled, time_due = DIST.agree(stop.signalled, log.save_due())
    ckpt_path = os.path.join(args.out, 'checkpoint.pth')
    if log.step == log.total_steps:      # the stage's weights and its last checkpoint
        weights = os.path.join(args.out, f'{stage}.pth')
        net = nets[stage]
        DIST.together(lambda: write(weights, lambda tmp: torch.save(
            {k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp),
            f'{stage} net', log), main_only=True)
        if DIST.main:   # weights trained on the nets this stage replaced are stale now
            remove_later_weights(args.out, stage, stages)
        save(ckpt_path, log, nets, optimizer, args, done=stage == stages[-1])
        log.close(f'{stage} net written to {weights}')
        return True
    interrupted = limit or signalled
    if interrupted or time_due or log.save_every_due():
        save(ckpt_path, log, nets, optimizer, args)
    if interrupted:
        log.close(f'stopped ({stop.reason()}) at {stage} step {log.step}/{log.total_steps}; '
                  f'checkpoint written to {ckpt_path}; continue with --resume')
        return False
    return None
