"""Output directories: checked before any work, locked while a run writes them, replaced whole or not at all.

A stage writes its results into a fresh staging directory beside `out` and `commit` swaps it in only when every
file is written, so a failure part-way (a full disk, a crash, an interrupt) leaves the earlier results untouched and
never a mix. What the old directory holds beyond the results (resumable shards, caches, other stages' folders) moves
into the new one, so resume keeps working. A lock file beside `out` stops two runs from writing one directory.

    check_output(out, "score")            # before loading anything: one line if `out` cannot be used
    with locked(out):                     # the whole run, shards included
        with staged(out, "score") as tmp: # results go to tmp; swapped in at the end of the block
            write(tmp / "scores.parquet")
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from prefsift.errors import PrefsiftError

# Entries a directory may hold without a manifest: the resumable passes' caches of an unfinished run.
CACHE_ENTRIES = {"shards", "embeddings", "influence"}


def not_regular(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is not a regular file (links followed): "a directory", "a FIFO (named
    pipe)", "a device", "a socket"; None for a regular file or nothing there. Opening a FIFO blocks until a writer
    comes, and a device reads forever: every file prefsift reads is checked with this first."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def require_file(path: str | os.PathLike, what: str) -> None:
    """One line when `path` (`what` it is, e.g. "--config", "the weights file") exists but is not a regular file."""
    kind = not_regular(path)
    if kind is not None:
        raise PrefsiftError(f"{what} {path} is {kind}, not a regular file")


def check_result_files(directory: str | os.PathLike) -> None:
    """One line when a result file of a stage's directory (scores.parquet, pairs.parquet, selected.jsonl,
    manifest.json, ...) is a directory or a FIFO (a read would block on it), whichever stage reads it next."""
    directory = Path(directory)
    for entry in directory.iterdir() if directory.is_dir() else ():
        if entry.suffix in (".parquet", ".json", ".jsonl") and not entry.name.startswith("."):
            require_file(entry, "the result file")


def temp_sibling(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and call (pid + random): two runs, or two threads, never
    write the same temporary file; `os.replace` it onto `path` when complete."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def stage_of(directory: Path) -> str | None:
    """The stage whose results `directory` holds, from its manifest.json; None when it has no readable one."""
    try:
        return json.loads((Path(directory) / "manifest.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None




def refuse_link(out: Path, *, flag: str = "--out") -> None:
    """One line when `out` itself is a symbolic link. Results are swapped in by renaming `out`: a link would be
    renamed aside and replaced by a directory, and whatever later followed the renamed link (a recovery carrying
    the old directory's entries) would move the files of the directory it points to. A link above `out` is fine:
    the renames happen inside the directory it leads to."""
    out = Path(out)
    if out.is_symlink():
        raise PrefsiftError(f"{flag} {out} is a symbolic link (to {os.readlink(out)}): give the directory it points "
                            f"to, or a new path")


def check_output(out: Path, stage: str, *, flag: str = "--out") -> None:
    """One line, before any work, when `out` cannot take `stage`'s results: it is a symbolic link, a file, it sits
    under a file, it holds another stage's results, or it holds files that are not prefsift's (a swap would lose
    them)."""
    out = Path(out)
    refuse_link(out, flag=flag)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out else f"is under {parent}, which is a file"
                raise PrefsiftError(f"{flag} {out} {what}: give a directory")
            break
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    found = stage_of(out)
    if found is not None and found != stage:
        raise PrefsiftError(f"{flag} {out} holds the results of `prefsift {found}`, not {stage}: choose another "
                            f"directory")
    if found is None and entries - CACHE_ENTRIES - {"manifest.json"}:
        raise PrefsiftError(f"{flag} {out} is not empty and holds no prefsift {stage} results: choose an empty or new "
                            f"directory")


def check_output_file(path: Path, stage: str, owned, *, flag: str = "--out") -> None:
    """`check_output` for a stage whose output is one file (an export's .jsonl): one line, before any work, when
    `path` sits under a file, is a directory, lies inside another stage's results directory (its swap would drop the
    file, or the file would replace one of its results), or exists and `owned(path)` says it is not a file this stage
    wrote (a user's own file is never replaced)."""
    path = Path(path)
    refuse_link(path, flag=flag)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PrefsiftError(f"{flag} {path} is under {parent}, which is a file: give a file in a directory")
            break
    if path.is_dir():
        raise PrefsiftError(f"{flag} {path} is a directory; {stage} writes a file there")
    found = stage_of(path.parent)
    if found is not None:
        raise PrefsiftError(f"{flag} {path} is inside {path.parent}, which holds the results of `prefsift {found}`: "
                            f"write it elsewhere")
    if path.exists() and not owned(path):
        raise PrefsiftError(f"{flag} {path} exists and is not a file prefsift {stage} wrote: choose a new file, or "
                            f"move that one away")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.lock"


@contextlib.contextmanager
def locked(out: Path, *, flag: str = "--out") -> Iterator[None]:
    """Hold `out`'s lock file (created with O_EXCL, holding pid and host) for the block. A lock left by a dead process
    on this host is taken over; a live one is refused with one line. Also the first write: a read-only or missing
    parent fails here, with one line, before any work."""
    out = Path(out)
    refuse_link(out, flag=flag)  # every writer takes the lock: none swaps a link
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PrefsiftError(f"{flag} {out}: cannot create its parent ({error.strerror})") from None
    path = lock_path(out)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = path.read_text().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, socket.gethostname()  # an empty lock: its writer died between open and write
            if host.strip() == socket.gethostname() and (pid < 0 or not _pid_alive(pid)):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise PrefsiftError(f"{flag} {out} is being written by process {pid} on {host.strip()} (lock {path}); "
                                f"wait for it, or delete the lock if that run is gone") from None
        except OSError as error:
            raise PrefsiftError(f"{flag} {out} is not writable ({error.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise PrefsiftError(f"{flag} {out}: cannot take its lock {path}")
    try:
        recover(out)
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()


def recover(out: Path) -> None:
    """Finish or undo a swap a crash interrupted (called under the lock, so every staging or old sibling is a dead
    run's): an old directory comes back when `out` is gone, else its caches move into `out`; staging is removed.
    Never through a link: a sibling that is a symbolic link (an older prefsift renamed a linked --out aside) is only
    renamed back when `out` is gone, and nothing is moved out of, or removed from, the directory it points to; a
    linked `out` is left as it is."""
    out = Path(out)
    if not out.parent.is_dir() or out.is_symlink():
        return
    for sibling in sorted(out.parent.glob(f".{out.name}.*-*-*")):
        if sibling.is_symlink():
            kind = sibling.name[len(out.name) + 2:].split("-")[0]
            if kind in ("old", "oldcache") and not out.exists():
                sibling.rename(out)  # the user's link back under its name; its target untouched
            continue
        if not sibling.is_dir():
            continue
        kind = sibling.name[len(out.name) + 2:].split("-")[0]
        if kind in ("old", "oldcache"):
            if not out.exists():
                sibling.rename(out)
                continue
            # the swap finished its renames: carry what that swap would have carried, and no more (an old seed
            # folder of a run must not land beside the new results)
            if _move_missing(sibling, out, CACHE_ENTRIES if kind == "oldcache" else None):
                shutil.rmtree(sibling, ignore_errors=True)
        elif kind == "staging":
            shutil.rmtree(sibling, ignore_errors=True)


def _move_missing(source: Path, target: Path, only: set[str] | None = None) -> bool:
    """Entries of `source` that `target` lacks (shards, caches, other stages' folders; with `only`, those names
    alone) move into it; returns whether all did (one that cannot move stays in `source` for `recover`)."""
    moved = True
    for entry in source.iterdir():
        if (only is None or entry.name in only) and not (target / entry.name).exists():
            try:
                entry.rename(target / entry.name)
            except OSError:
                moved = False
    return moved


def commit(staging: Path, out: Path, carry: set[str] | None = None) -> None:
    """Swap the complete `staging` directory in as `out`. Two renames; between them a crash leaves `out` missing and
    the old directory beside it, which `recover` renames back. `carry`: the old entries kept (default: all the new
    one lacks)."""
    if out.is_symlink():  # check_output and locked refuse one first; a swap never renames a link aside
        raise PrefsiftError(f"{out} is a symbolic link: results are never swapped in through one")
    if not out.exists():
        staging.rename(out)
        return
    if carry is not None and set(carry) != CACHE_ENTRIES:
        raise ValueError("commit carries every old entry or the caches (CACHE_ENTRIES)")
    old = _sibling(out, "old" if carry is None else "oldcache")  # `recover` reads what to carry from the name
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)  # the old results go back where they were
        raise
    # the new results are in place: from here nothing raises; what cannot move now, `recover` moves next time
    if _move_missing(old, out, carry):
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path, stage: str, *, flag: str = "--out", carry: set[str] | None = None) -> Iterator[Path]:
    """A staging directory beside `out` for `stage`'s results, swapped in as `out` when the block ends normally and
    removed (the old results untouched) when it raises. Disk-full and permission errors become one line. `carry`
    names the old directory's entries kept in the new one (default: every entry the new one lacks); a stage whose
    results are folders (`run`'s seed-S/) carries only the caches, so no old folder mixes with the new results."""
    out = Path(out)
    check_output(out, stage, flag=flag)
    staging = _sibling(out, "staging")
    try:
        staging.mkdir(parents=True)
        yield staging
        commit(staging, out, carry)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise PrefsiftError(f"cannot write {out}: {reason}; earlier results there are unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- what a long pass will cost, said before it is spent --------------------------------------------------------
ESTIMATE_AFTER = 5.0  # seconds of a pass measured before its rate is trusted (the first batches: compilation, caches)
ESTIMATE_ABOVE = 60.0  # a pass expected to take longer than this in all gets one line of its cost


def cheaper(max_length: int | None, device: str | None, *, sample: str = "a sample of the pairs") -> str:
    """How to make a model pass cheaper, for the cost line of `progress`: fewer items, shorter sequences, a GPU."""
    ways = [sample, f"a lower --max-length (now {max_length})" if max_length else "a --max-length"]
    if not device or device == "cpu":
        ways.append("a GPU (--device cuda)")
    return ", ".join(ways[:-1]) + " or " + ways[-1]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class progress(tqdm):  # noqa: N801 - used as tqdm is, a bar in a `with`
    """A pass's progress bar (tqdm, same arguments) that says what the whole pass will cost, once, when its rate
    measured over the first ESTIMATE_AFTER seconds puts it past ESTIMATE_ABOVE: the time left, the rate it rests
    on, and `cheaper` (how to cut it: `cheaper(...)`). A hidden bar (`disable`) says nothing."""

    clock = staticmethod(time.monotonic)  # a test's fake clock replaces it

    def __init__(self, *args, cheaper: str = "", **kwargs) -> None:
        kwargs.setdefault("dynamic_ncols", True)
        super().__init__(*args, **kwargs)
        self.cheaper, self.said = cheaper, False
        self.began = self.clock()
        self.out = kwargs.get("file") or sys.stderr

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if not self.said and not self.disable and self.total:
            self._estimate()
        return shown

    def _estimate(self) -> None:
        elapsed = self.clock() - self.began
        if elapsed < ESTIMATE_AFTER or self.n <= 0:
            return
        rate = self.n / elapsed
        left = (self.total - self.n) / rate
        self.said = True
        if elapsed + left <= ESTIMATE_ABOVE:
            return
        unit = self.unit if self.unit != "it" else "item"
        line = (f"{self.desc or 'this pass'}: about {_duration(left)} more for {self.total - self.n:,.0f} of "
                f"{self.total:,.0f} {unit}s ({_duration(elapsed + left)} in all, at {rate:.3g} {unit}/s measured "
                f"over the first {self.n:,.0f})")
        self.write(line + (f"; cheaper: {self.cheaper}" if self.cheaper else ""), file=self.out)
