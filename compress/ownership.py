"""Which directories compress may replace or delete: only those it wrote itself.

A checkpoint is recognised by its report.json, whose `files` record lists every file the export wrote; `--force`
replaces such a directory only while it holds nothing else, and deletes only the files listed. The directories a
run keeps beside its output (run state, training checkpoints) carry a marker file of their own; a directory of
that name without the marker belongs to the user and is refused, never deleted. The input model is never an
output."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from compress.errors import CompressError
from compress.integrity import REPORT_FILE

MARKER = ".compress-owned"


def make_owned(directory: Path, kind: str) -> Path:
    """Create `directory` (and its parents) marked as compress's own `kind`, or accept it if it already is."""
    refuse_unowned(directory, kind)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"tool": "compress", "kind": kind}))
    return directory


def is_owned(directory: Path, kind: str) -> bool:
    try:
        found = json.loads((directory / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(found, dict) and found.get("tool") == "compress" and found.get("kind") == kind


def refuse_unowned(directory: Path, kind: str) -> None:
    """Raise if `directory` exists but compress did not make it as `kind` (it is the user's: leave it alone)."""
    if (directory.exists() or directory.is_symlink()) and not (directory.is_dir() and is_owned(directory, kind)):
        raise CompressError(
            f"{str(directory)!r} exists but was not made by compress (no {MARKER} marker of a {kind}); it is left "
            "alone: move it away or choose another output"
        )


def remove_owned(directory: Path, kind: str) -> None:
    """Delete `directory` if compress made it as `kind`; refuse (and delete nothing) if it did not."""
    if not directory.exists() and not directory.is_symlink():
        return
    refuse_unowned(directory, kind)
    shutil.rmtree(directory)


def fresh_path(parent: Path, prefix: str) -> Path:
    """A name in `parent` starting with `prefix` that nothing uses yet."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        if not path.exists() and not path.is_symlink():
            return path


def checkpoint_files(directory: Path) -> list[str] | None:
    """The files a compress export wrote into `directory` (report.json included), or None if it is no checkpoint
    of compress's (no report.json with a record of its files)."""
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("files"), dict):
        return None
    if not isinstance(report.get("environment"), dict) or "compress" not in report["environment"]:
        return None
    names = [name for name in report["files"] if isinstance(name, str)]
    if any(Path(name).is_absolute() or ".." in Path(name).parts for name in names):
        return None
    return [*names, REPORT_FILE]


def foreign_entries(directory: Path, files: list[str]) -> list[str]:
    """What `directory` holds beyond `files` and the folders they lie in (relative paths, sorted)."""
    allowed = set(files)
    folders = {parent.as_posix() for name in files for parent in Path(name).parents if parent != Path(".")}
    found = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        kept = name in folders if path.is_dir() and not path.is_symlink() else name in allowed and path.is_file()
        if not kept:
            found.append(name)
    return found


def check_replaceable(out: Path, sources: list[Path]) -> None:
    """Refuse `out` as an output if it is, holds or lies inside an input, or if it exists and is anything but a
    checkpoint written by compress that holds only its own files."""
    resolved = out.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise CompressError(
                f"output {str(out)!r} is the input model {str(source)!r}, or holds it or lies inside it; name a new "
                "directory"
            )
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise CompressError(f"output {str(out)!r} exists and is not a directory")
    if not any(out.iterdir()):
        return
    files = checkpoint_files(out)
    if files is None:
        raise CompressError(
            f"output {str(out)!r} is a non-empty directory that is not a checkpoint written by compress (no "
            f"{REPORT_FILE} with its file list); --force only replaces checkpoints"
        )
    foreign = foreign_entries(out, files)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CompressError(
            f"output {str(out)!r} is a checkpoint but also holds files compress did not write ({shown}); --force "
            "replaces only a checkpoint's own files: move them away or choose another output"
        )


def remove_checkpoint(directory: Path) -> None:
    """Delete the files a compress export wrote into `directory`, their folders, then the directory itself; whatever
    else is found there is left in place (and the directory with it)."""
    files = checkpoint_files(directory) or []
    for name in files:
        path = directory / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    folders = {parent for name in files for parent in (directory / name).parents if directory in parent.parents}
    for folder in [*sorted(folders, key=lambda p: len(p.parts), reverse=True), directory]:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else lies there, and it stays
            pass
