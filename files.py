"""Reading and writing files safely: existence checks with a message that says what the file should
be, checkpoints and weights loaded without ever running a pickled program, and atomic writes (a
crash never leaves half a file)."""
import os
import pickle

import torch

from cli import DataError


def check_exists(path, what, url=None):
    """A DataError naming `path` and what it should be (and where to get it) if it is missing."""
    if not os.path.exists(path):
        if url is None:
            raise DataError(f'{path}: not found ({what})')
        raise DataError(f"{path}: not found. This should be {what}; download it from {url} "
                        f"into nyu/, or run `python train.py --demo` to use synthetic scenes.")


def check_file(path, what, url=None):
    check_exists(path, what, url)
    if not os.path.isfile(path):
        raise DataError(f"{path}: is a directory, not {what}")


def check_folder(path, what):
    """A DataError naming `path` if it is missing or a file, where a folder is expected."""
    check_exists(path, what)
    if not os.path.isdir(path):
        raise DataError(f'{path}: is a file, not {what}')


def check_out_folder(path, what='--out'):
    """A folder for a script's outputs, made when there is something to write: a file at that
    path is refused now, in one line, not after the work (os.makedirs' traceback)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f'{path}: is a file; {what} names a folder for the outputs')


def load_torch_file(path, what):
    """torch.load a checkpoint or weights file safely: weights_only=True, so a file holding a
    pickled program is refused instead of run, and every failure is a one-line DataError."""
    path = os.fspath(path)
    check_file(path, what)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            raise DataError(f'{path}: refused: it holds Python objects other than tensors, which '
                            f'could run code when loaded; only files written by this project '
                            f'are read ({what})') from None
        raise DataError(f'{path}: truncated or not a PyTorch file ({what})') from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise DataError(f'{path}: truncated or not a PyTorch file (a copy or save that was cut '
                        f'short?); expected {what}') from None


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over `path`: a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
