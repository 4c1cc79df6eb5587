"""How the command-line scripts talk to their user: problems the user can fix as one line,
`error: <file>: <what is wrong>`, exit status 1 (--debug shows the traceback instead), and progress
bars that suit a terminal and stay out of log files."""
import sys


class UserError(Exception):
    """A problem the user can fix (bad input, a refused checkpoint, a full disk, a diverged run).
    The command-line scripts print its message as one `error: ...` line and exit with status 1;
    with --debug they show the traceback instead (run_cli)."""


class DataError(UserError):
    """A dataset or model file that is missing or not what it claims to be; the message says which."""


def run_cli(main):
    """Run a script's main() as a command: its return value is the exit status; a UserError is one
    line on stderr and status 1, Ctrl-C before training has started is one line and status 130."""
    debug = '--debug' in sys.argv[1:]
    try:
        status = main()
    except UserError as e:
        if debug:
            raise
        # one write: under torchrun every process prints its line into the same stderr, and
        # print's separate newline let two of them run together
        sys.stderr.write(f'error: {e}\n')
        sys.stderr.flush()
        status = 1
    except KeyboardInterrupt:
        if debug:
            raise
        print('interrupted', file=sys.stderr)
        status = 130
    sys.exit(status)


def progress(iterable=None, enabled=True, **kwargs):
    """A tqdm progress bar on a terminal; none where stderr is a file or a pipe (a cluster job's
    log), where its carriage-return updates would pile up on one line."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), **kwargs)
