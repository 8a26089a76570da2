"""Atomic writes: all or nothing, and a normal file mode."""
from __future__ import annotations

import os

import pytest

from metriclab.core.atomic import atomic_write, markdown_subsections, replace_markdown_section, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"mAP": 0.5})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"mAP": 0.')  # half-written, then the writer dies
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == '{\n  "mAP": 0.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "a.json", [1])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_replace_markdown_section_keeps_the_others(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n## One\n\nfirst\n\n## Two\n\nsecond\n")
    replace_markdown_section(doc, "## One", "new")
    replace_markdown_section(doc, "## Three", "third")
    assert doc.read_text() == "# B\n\n## One\n\nnew\n\n## Two\n\nsecond\n\n## Three\n\nthird\n"


def test_markdown_subsections_split_one_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n## One\n\nsummary\n\n### a\n\n1\n\n### b\n\n2\n\n## Two\n\n### c\n\n3\n")
    assert markdown_subsections(doc, "## One") == ("summary", {"a": "### a\n\n1\n", "b": "### b\n\n2\n"})
    assert markdown_subsections(doc, "## Two") == ("", {"c": "### c\n\n3\n"})
    assert markdown_subsections(doc, "## Three") == ("", {})
    assert markdown_subsections(tmp_path / "missing.md", "## One") == ("", {})
