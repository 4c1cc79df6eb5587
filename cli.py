"""How the command-line scripts talk to their user: problems the user can fix as one line,
`error: <file>: <what is wrong>`, exit status 1 (--debug shows the traceback instead), and progress
bars that suit a terminal and stay out of log files."""
import argparse
import math
import sys


class UserError(Exception):
    """A problem the user can fix (bad input, a refused checkpoint, a full disk, a diverged run).
    The command-line scripts print its message as one `error: ...` line and exit with status 1;
    with --debug they show the traceback instead (run_cli)."""


class DataError(UserError):
    """A dataset or model file that is missing or not what it claims to be; the message says which."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' one-line errors: a bad option is `error: argument --x: ...`
    and status 1, as every other problem the user can fix, not the whole usage and status 2."""

    def error(self, message):
        raise UserError(f'{message} (see {self.prog} --help)')


def whole(low=0):
    """An argparse type: a whole number >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'{value} is below {low}, the smallest allowed')
        return value
    return parse


def real(low=None, above=None, high=None):
    """An argparse type: a finite number, >= low or > above, and <= high (nan and inf are
    refused: a rate or a schedule of nan would run, and fail far from the option that caused it)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'{text} is not a finite number')
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f'{value:g} is below {low:g}, the smallest allowed')
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f'{value:g} must be above {above:g}')
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f'{value:g} is above {high:g}, the largest allowed')
        return value
    return parse


def clock(seconds):
    """Seconds as H:MM:SS (the elapsed and remaining times of progress lines)."""
    s = round(seconds)
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


def last_line(error):
    """The telling line of an exception's message (its last), or its type if it says nothing:
    for one-line messages about errors from libraries, whose texts can run over many lines."""
    text = str(error).strip()
    return text.splitlines()[-1].strip() if text else type(error).__name__


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
