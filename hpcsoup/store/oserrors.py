"""Operating-system errors on a store, turned into one line that names the path and the fix.

A store lives on whatever file system the user points ``--store`` at: a read-only
mount, a path that is (or lies under) a regular file, a full disk or an exhausted
quota all surface deep inside zarr as an ``OSError`` with a traceback.
:func:`store_os_errors` wraps a block of store I/O and raises
:class:`~hpcsoup.errors.StoreAccessError` instead, whose message says what
happened, where, and what to do; callers remove their temporary files before it
propagates (see :meth:`hpcsoup.store.Store.write_group`).

Example::

    with store_os_errors(store_path, "write 'experts/sage-e000'"):
        ...  # any file system work
"""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from hpcsoup.errors import StoreAccessError

_FIXES = {
    errno.EROFS: ("is on a read-only file system",
                  "pass a writable --store path (e.g. on scratch), or remount it read-write"),
    errno.EACCES: ("is not writable by this user (permission denied)",
                   "fix its permissions (chmod/chown) or pass another --store path"),
    errno.EPERM: ("is not writable by this user (operation not permitted)",
                  "fix its permissions (chmod/chown) or pass another --store path"),
    errno.ENOSPC: ("is on a full file system (no space left on device)",
                   "free space there (e.g. `hpcsoup store rm` unwanted groups) or pass --store on "
                   "a larger file system"),
    errno.EDQUOT: ("is over its disk quota",
                   "free space within your quota (check `quota -s` or `lfs quota`) or pass --store "
                   "on a project/scratch file system"),
    errno.ENOTDIR: ("is not a folder: a part of its path is a regular file",
                    "pass a --store path whose parent folders are folders"),
}


def file_blocking(path: Path) -> Path | None:
    """The regular file that ``path`` is, or lies under; ``None`` when there is none."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.is_file():
            return candidate
    return None


def explain(exc: BaseException, store: Path, action: str) -> StoreAccessError:
    """A :class:`StoreAccessError` for ``exc`` raised while doing ``action`` on ``store``."""
    code = getattr(exc, "errno", None)
    blocking = file_blocking(store)
    if blocking is not None:
        what = ("is a regular file, not a store folder" if blocking == Path(store).absolute()
                else f"lies under the regular file '{blocking}'")
        fix = "pass a --store path that is a folder (e.g. ending in .zarr), or move the file away"
    elif code in _FIXES:
        what, fix = _FIXES[code]
    else:
        what = f"cannot be written ({getattr(exc, 'strerror', None) or exc})"
        fix = "check the path and the file system"
    where = getattr(exc, "filename", None)
    detail = f" (at '{where}')" if where and Path(str(where)) != Path(store) else ""
    return StoreAccessError(f"cannot {action}: store '{store}' {what}{detail}; {fix}")


@contextlib.contextmanager
def store_os_errors(store: str | Path, action: str):
    """Turn an ``OSError`` raised in the block into one :class:`StoreAccessError` naming the fix."""
    try:
        yield
    except StoreAccessError:
        raise
    except OSError as exc:
        raise explain(exc, Path(store), action) from exc
