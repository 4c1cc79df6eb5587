"""Reading and writing files safely: existence checks with a message that says what the file should
be, checkpoints and weights loaded without ever running a pickled program, and atomic writes (a
crash never leaves half a file)."""
import os
import pickle
import re

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
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not {what}")
    if not os.path.isfile(path):   # a device (/dev/null), a pipe, a socket
        raise DataError(f"{path}: is not a regular file, not {what}")


def check_folder(path, what):
    """A DataError naming `path` if it is missing or a file, where a folder is expected."""
    check_exists(path, what)
    if not os.path.isdir(path):
        raise DataError(f'{path}: is a file, not {what}')


def nearest_existing(path):
    """The nearest path at or above `path` that exists (where a folder made at `path` would go)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_out_folder(path, what='--out'):
    """A folder for a script's outputs, made when there is something to write: a path where no
    folder can be made or written (a file there or above it, a folder without write permission,
    an empty path) is refused now, in one line, not after the work (os.makedirs' traceback).
    Nothing is written to find out: the folder and its nearest existing parent are inspected."""
    if not path:
        raise DataError(f'{what}: an empty path; {what} names a folder for the outputs')
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f'{path}: is a file; {what} names a folder for the outputs')
    parent = nearest_existing(path)   # the folders os.makedirs would make go in this one
    if not os.path.isdir(parent):
        raise DataError(f'{path}: {parent} is a file, so no folder can be made there; {what} '
                        f'names a folder for the outputs')
    if not os.access(parent, os.W_OK | os.X_OK):   # also a read-only file system (EROFS)
        raise DataError(f'{path}: cannot write in {parent} (no write permission, or a read-only '
                        f'file system); choose another {what}')


# torch.save writes a zip archive; before PyTorch 1.6, a pickle whose first object is this number
_ZIP_START = b'PK\x03\x04'
_LEGACY_MAGIC = (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


def _torch_file_kind(path):
    """'torch' (a zip archive, or a pickle that starts with torch.save's magic number), 'pickle'
    (some other pickle), 'empty' or 'other' (text, an image, ...), from the file's first bytes."""
    with open(path, 'rb') as f:
        head = f.read(64)
    if not head:
        return 'empty'
    if head.startswith(_ZIP_START) or (head[0] == 0x80 and _LEGACY_MAGIC in head):
        return 'torch'
    return 'pickle' if head[0] == 0x80 else 'other'


def load_torch_file(path, what, mmap=False):
    """torch.load a checkpoint or weights file safely: weights_only=True, so a file holding a
    pickled program is refused instead of run, and every failure is a one-line DataError: a file
    that is not from torch.save (text, another pickle) says so, apart from a PyTorch file holding
    Python objects other than tensors. mmap: the tensors are mapped, read from disk only where
    used (a look at a checkpoint's entries costs no read of its hundreds of MB)."""
    path = os.fspath(path)
    check_file(path, what)
    kind = _torch_file_kind(path)
    if kind == 'empty':
        raise DataError(f'{path}: is empty (a copy or save that was cut short?); expected {what}')
    if kind == 'pickle':
        raise DataError(f'{path}: a Python pickle, not a PyTorch file; refused without loading it '
                        f'(a pickle can run code when loaded); expected {what}')
    if kind == 'other':
        raise DataError(f'{path}: not a PyTorch file (neither a zip archive nor a pickle); '
                        f'expected {what}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            raise DataError(f'{path}: refused: it holds Python objects other than tensors, which '
                            f'could run code when loaded; only files written by this project '
                            f'are read ({what})') from None
        raise DataError(f'{path}: truncated or not a PyTorch file ({what})') from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError):
        if mmap:   # a file system that cannot map files: read it, which also tells a bad file
            return load_torch_file(path, what)
        raise DataError(f'{path}: truncated or not a PyTorch file (a copy or save that was cut '
                        f'short?); expected {what}') from None


TEMPORARY = '.tmp'   # atomic_write writes <path>.tmp<pid> first: a process killed then leaves it


def temporaries(folder, names):
    """The files in `folder` that atomic_write left of any of `names` (<name>.tmp<pid>, written
    by a process killed while writing), as paths; nothing else (none where there is no folder)."""
    if not os.path.isdir(folder):
        return []
    left = re.compile('(' + '|'.join(map(re.escape, names)) + ')' + re.escape(TEMPORARY) + r'\d+')
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if left.fullmatch(name)]


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over `path`: a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f'{path}{TEMPORARY}{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
