"""An index of checked files, so that a second scan of an unchanged folder does not open every file again.

Checking a file means opening it (``data.verify: header``) or decoding it (``full``). The index keeps, for
every file of a folder, the result of its check and the image's width and height, keyed by its path relative to
the folder, its size, its modification time, its inode and its status-change time (to the nanosecond): a file
that changed, appeared or was replaced is checked again, also one put in place with the old size and
modification time (``cp -p``, ``rsync -a``, ``tar x``: the inode or the change time differ); one that is gone is
forgotten when the index is saved. Only verdicts about a file's content are kept: a file that could not be read
for a reason that may pass (no permission, an I/O error, too many open files) is checked again next time.
It lives in a cache folder, one SQLite file per folder: ``$SEDENSE_CACHE``, else ``$XDG_CACHE_HOME/sedense``,
else ``~/.cache/sedense``. An index that cannot be read or written is simply not used (the scan opens every file,
as without one).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import warnings
from pathlib import Path

LEVELS = {"header": 1, "full": 2}  # a full check also answers a header check
OK = ""  # the stored reason of a usable file
TABLE = "files_v2"  # an index of another layout is not read (its files are checked again)
Entry = tuple[int, int, int, int, int, str, int, int]  # size, mtime_ns, ino, ctime_ns, level, reason, width, height


def stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def cache_folder() -> Path:
    """Where sedense keeps its caches."""
    if os.environ.get("SEDENSE_CACHE"):
        return Path(os.environ["SEDENSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sedense"


class ScanIndex:
    """The check results of the files under ``root``; :meth:`save` writes what was looked up or added.

    Use it as a context manager: ``with ScanIndex(root) as index: ...``.
    """

    def __init__(self, root: Path, enabled: bool = True) -> None:
        self.root = Path(os.path.abspath(root))
        self.entries: dict[str, Entry] = {}  # rel path -> Entry
        self.seen: dict[str, Entry] = {}
        self.path: Path | None = None
        self.reused = 0
        if not enabled:
            return
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:20]
        self.path = cache_folder() / "scan-index" / f"{digest}.sqlite3"
        try:
            if self.path.is_file():
                with sqlite3.connect(self.path) as db:
                    if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (TABLE,)).fetchone():
                        rows = db.execute(f"SELECT * FROM {TABLE}").fetchall()
                        self.entries = {r[0]: tuple(r[1:]) for r in rows}
        except sqlite3.Error as err:
            self._disable(f"cannot read the scan index {self.path} ({err})")

    def _disable(self, why: str) -> None:
        warnings.warn(f"{why}; every file is checked", stacklevel=3)
        self.path, self.entries = None, {}

    def __enter__(self) -> ScanIndex:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.save()

    def key(self, path: Path) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def lookup(self, path: Path, stat: os.stat_result, verify: str) -> tuple[str | None, tuple[int, int] | None] | None:
        """``(reason, size)`` as stored (reason ``None``: usable) if ``path`` is unchanged and was checked as
        thoroughly, else ``None``.

        A file that passed a more thorough check passes this one; one that failed it is checked again at the level
        asked for (it may pass a header check), so that a scan's result never depends on the scans before it.
        """
        key = self.key(path)
        entry = self.entries.get(key)
        if entry is None or entry[:4] != stat_key(stat):
            return None
        level, reason = entry[4], entry[5]
        if level < LEVELS[verify] or (level > LEVELS[verify] and reason != OK):
            return None
        self.seen[key] = entry
        self.reused += 1
        return reason or None, (entry[6], entry[7]) if entry[6] else None

    def record(self, path: Path, stat: os.stat_result | None, verify: str, reason: str | None,
               size: tuple[int, int] | None = None) -> None:
        """Keep a verdict about ``path``'s content (callers leave out failures that may pass)."""
        if stat is not None:
            width, height = size or (0, 0)
            self.seen[self.key(path)] = (*stat_key(stat), LEVELS[verify], reason or OK, width, height)

    def save(self) -> None:
        """Keep the files of this scan (those not looked at are dropped: gone, or another subset's next time)."""
        if self.path is None or self.seen == self.entries:
            return
        keep = {**{k: v for k, v in self.entries.items() if k not in self.seen}, **self.seen}
        keep = {k: v for k, v in keep.items() if os.path.lexists(self.root / k)} if len(keep) > len(self.seen) else keep
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            with sqlite3.connect(tmp) as db:
                db.execute(f"CREATE TABLE {TABLE} (path TEXT PRIMARY KEY, size INT, mtime_ns INT, ino INT, "
                           "ctime_ns INT, level INT, reason TEXT, width INT, height INT)")
                db.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               ((k, *v) for k, v in keep.items()))
            os.replace(tmp, self.path)  # whole or not at all, also with several runs scanning at once
        except (OSError, sqlite3.Error) as err:
            tmp.unlink(missing_ok=True)
            self._disable(f"cannot write the scan index {self.path} ({err})")
