"""Files of a run or a prepared corpus on a full disk, and after a killed write.

    raise no_space(exc, where) or exc          # OSError ENOSPC (or a library's "no space left") -> NoSpaceLeft
    remove_orphan_temps(run_dir / "checkpoints")   # temp files of writes that were killed mid-way

Every atomic write of the project goes through a temporary file beside its target, named
``.<target name>.<random>.tmp`` (:func:`composer.weights.atomic_path`,
:func:`composer.data.util.atomic_write_bytes`): a write that fails is removed by the writer, one that
was killed (SIGKILL, power loss) stays behind. :func:`remove_orphan_temps` removes those when the next
run (or ``composer-prepare``) starts in the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Optional

from .errors import ComposerError

# errno values that mean "the disk (or the user's quota) is full"
FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# what libraries that do not raise OSError say (safetensors' Rust I/O, torch's C++ writer)
FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded")


class NoSpaceLeft(ComposerError):
    """A write failed because the disk is full; the files written before it are kept."""

    def __init__(self, place: str | os.PathLike, what: str = "", keep: str = ""):
        self.place, self.what, self.keep = Path(place), what, keep
        kept = f"; {keep}" if keep else ""
        super().__init__(
            f"no space left on {place}{f' while writing {what}' if what else ''}{kept}. "
            "Fix: free disk space (or write elsewhere) and run again"
        )

    def kept(self, keep: str) -> NoSpaceLeft:
        """The same error, saying which earlier files are intact."""
        return NoSpaceLeft(self.place, self.what, "; ".join(k for k in (self.keep, keep) if k))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk or the quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL:
            return True
        if any(text in str(exc).lower() for text in FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space(exc: BaseException, where: str | os.PathLike, keep: str = "") -> Optional[NoSpaceLeft]:
    """A :class:`NoSpaceLeft` naming ``where`` (the file's own name when the OSError has one) when
    ``exc`` is a full disk, else None. ``keep`` says which earlier files are intact."""
    if isinstance(exc, NoSpaceLeft):
        return exc.kept(keep) if keep else exc
    if not is_disk_full(exc):
        return None
    path = Path(getattr(exc, "filename", None) or where)
    place, what = (path, "") if path.is_dir() else (path.parent, path.name)
    return NoSpaceLeft(place, what, keep)


def is_orphan_temp(path: Path) -> bool:
    """A temporary file of an atomic write: ``.<name>.<random>.tmp``."""
    name = path.name
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed atomic writes left in ``folder`` (not recursive); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_orphan_temp(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


__all__ = ["NoSpaceLeft", "is_disk_full", "is_orphan_temp", "no_space", "remove_orphan_temps"]
