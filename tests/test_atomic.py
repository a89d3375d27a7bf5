"""Atomic writes leave the old file intact when the write fails, and no temp file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fed_nessa import atomic


def test_write_and_replace(tmp_path: Path) -> None:
    p = atomic.atomic_write_text(tmp_path / "a" / "f.txt", "one")
    atomic.atomic_write_bytes(p, b"two")
    assert p.read_text() == "two" and [q.name for q in p.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = atomic.atomic_write_text(tmp_path / "f.txt", "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(p, "new")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]
