"""Atomic file writes: a temporary file in the target's folder, then a rename, so a crash never leaves a
half-written file. Imports nothing heavy (scripts like `make report` use it without loading torch)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple


def atomic_write(path: Path | str, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Call `write(tmp_path)` and rename the result over `path`; the temporary file is removed on failure.
    `suffix` matters to writers that pick the format from the name (savefig, np.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
