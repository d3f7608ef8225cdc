"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

import errno
import importlib
import re


class SedenseError(Exception):
    """A problem with the user's input that they can fix; the message says what to do."""

    exit_code = 2


class DataError(SedenseError, ValueError):
    """A problem with an image folder or a data option."""


class ConfigError(SedenseError, ValueError):
    """A problem with a model or trainer option, or with a checkpoint."""


class TrainingError(SedenseError):
    """Training cannot go on (e.g. the loss is no longer a number)."""


def require_extra(module: str, needs: str, extra: str):
    """``import module``, or one line: ``{needs}: pip install 'sedense[{extra}]'`` (an optional extra is missing)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SedenseError(f"{needs}: pip install 'sedense[{extra}]'") from None


# What to do about a file that cannot be written, by the reason the system gives.
_STORAGE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere (--trainer.default_root_dir)",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere (--trainer.default_root_dir)",
    errno.EFBIG: "the file is larger than this system allows (a file-size limit): raise the limit or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere (--trainer.default_root_dir)",
    errno.EACCES: "no permission to write there: fix its permissions or write elsewhere (--trainer.default_root_dir)",
    errno.EPERM: "no permission to write there: fix its permissions or write elsewhere (--trainer.default_root_dir)",
}
STORAGE_ERRNOS = frozenset(_STORAGE_ADVICE)


class StorageError(SedenseError, OSError):
    """A file cannot be written (full disk, read-only file system, no permission); names the file.

    Whatever was written before stays: every sedense write replaces a file whole or not at all.
    """

    exit_code = 1

    def __init__(self, path, err: OSError) -> None:
        reason = err.strerror or str(err)
        advice = _STORAGE_ADVICE.get(err.errno, "check the folder and try again")
        super().__init__(f"cannot write {path}: {reason}; {advice}")
        self.errno, self.filename = err.errno, str(path)

    def __str__(self) -> str:
        return self.args[0]


def first_line(err: BaseException) -> str:
    """The first line of an error's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__
