"""Atomic file writes: a temporary file in the target's folder, flushed to disk, then a rename, so a crash, a kill or
a full disk never leaves a half-written file. Imports nothing heavy (scripts like `make report` use it without
loading torch)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple


def atomic_write(path: Path | str, write: Callable[[str], Any], suffix: str = ".tmp",
                 keep_previous: Path | str | None = None) -> Path:
    """Call `write(tmp_path)`, flush it to disk and rename the result over `path`; on any failure the temporary file
    is removed and `path` is left as it was. `suffix` matters to writers that pick the format from the name
    (savefig, np.save). `keep_previous`: the file `path` held until now is kept under that name too (a hard link
    where the filesystem allows, else a copy), so a reader can fall back to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        _fsync(tmp)  # the data is on disk before the rename makes it the file: a power loss leaves old or new
        if keep_previous is not None and path.is_file():
            _keep_copy(path, Path(keep_previous))
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder some filesystems do not open: the rename is still atomic, only not yet durable
        return
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _keep_copy(src: Path, dst: Path) -> None:
    """`dst` becomes what `src` holds now, atomically."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here: copy it
        atomic_write(dst, lambda t: shutil.copyfile(src, t))
        return
    try:
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(path: Path | str, suffix: str = ".tmp") -> List[Path]:
    """Remove the temporary files that `atomic_write(path, ..., suffix)` left behind when its process was killed
    mid-write (a finished or failed write leaves none); returns what was removed. Only for a file that one process
    writes at a time: another writer's temporary file of the same target would go too."""
    path = Path(path)
    # mkstemp's random part: 8 characters of [a-z0-9_]
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text_atomic(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: Path | str, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(df: Any, path: Path | str) -> Path:
    """A pandas DataFrame as CSV without its index."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False), ".csv")


def atomic_savefig(fig: Any, path: Path | str, dpi: int = 80) -> Path:
    """A matplotlib figure as PNG (matplotlib picks the format from the suffix)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi), ".png")


def replace_markdown_section(path: Path | str, heading: str, body: str) -> Path:
    """Replace (or append) the `heading` section (`## ...` up to the next `## `) of a markdown file; the other
    sections stay as they are. Used by the benchmarks to write their results into docs/benchmarks.md."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else "\n" + text[end + 1:])
    return write_text_atomic(path, text)


def markdown_subsections(path: Path | str, heading: str) -> Tuple[str, Dict[str, str]]:
    """The `heading` section of a markdown file as (its text before the first `### `, {title: `### title` part}),
    parts in file order; ("", {}) when the file or the section is missing. A benchmark that writes one part per
    input replaces its own part and passes the rest back to `replace_markdown_section`."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start < 0:
        return "", {}
    end = text.find("\n## ", start + len(heading))
    body = text[start + len(heading): None if end < 0 else end].strip("\n")
    preamble, *chunks = ("\n" + body).split("\n### ")
    return preamble.strip("\n"), {c.split("\n", 1)[0].strip(): "### " + c.rstrip() + "\n" for c in chunks}
