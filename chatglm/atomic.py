"""Directory writes that leave either the old directory or the new one, never a mix.

`replacing_directory(target)` hands out a fresh directory beside `target` (same filesystem); when the block ends
without an error it becomes `target` in one step: an atomic exchange where the platform has one (Linux
renameat2), otherwise two renames with the old directory kept under a `.old-` name until the new one is in place.
Files of the old directory that the new one does not hold and `keep` accepts are carried over (hard links, so
nothing is copied), as are its subdirectories (moved); an error removes the half-written directory and leaves
the old one untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL (a filesystem without exchange), ENOSYS: the two-rename path


def _carry_over(old: str, new: str, keep: Callable[[str], bool]) -> list[str]:
    """Bring what `new` lacks from `old`; returns the subdirectories moved (to move back on a failure)."""
    moved = []
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(dst) or not keep(name):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            os.rename(src, dst)  # a subdirectory (earlier training checkpoints, logs): moved, not copied
            moved.append(name)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)
    return moved


@contextlib.contextmanager
def replacing_directory(target: str, keep: Callable[[str], bool] = lambda name: True) -> Iterator[str]:
    """Yield a new empty directory; on success it replaces `target` whole (see the module docstring)."""
    target = os.path.realpath(str(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target!r} exists and is not a directory")
    tmp = tempfile.mkdtemp(prefix=f".{name}.writing-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    moved: list[str] = []
    try:
        yield tmp
        if not os.path.isdir(target):
            os.rename(tmp, target)
            return
        moved = _carry_over(target, tmp, keep)
        if _exchange(tmp, target):
            moved = []
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            return
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.rename(target, old)  # from here until the next rename the old checkpoint lives on as `old`
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        moved = []
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        for entry in moved:  # subdirectories carried over go back where they were
            with contextlib.suppress(OSError):
                os.rename(os.path.join(tmp, entry), os.path.join(target, entry))
        shutil.rmtree(tmp, ignore_errors=True)
        raise
