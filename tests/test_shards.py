"""Shard format: round trip, atomic write, and one clear error per fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fed_nessa.data.shards import SHARD_SUFFIX, Shard, ShardError, load_shard, make_shard, shard_paths, write_shard


def _shard(n: int = 6, dx: int = 4, dy: int = 3, seed: int = 0) -> Shard:
    rng = np.random.default_rng(seed)
    return make_shard(rng.standard_normal((n, dx)), rng.standard_normal((n, dy)), np.arange(n) % 2, "X:1", "Y:2")


def _write_raw(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


META = {"format": "fed-nessa device shard", "schema_version": "1", "enroll_model": "X", "runtime_model": "Y"}


def test_round_trip(tmp_path: Path) -> None:
    s = _shard()
    p = write_shard(tmp_path / f"d{SHARD_SUFFIX}", s)
    back = load_shard(p, expect_dx=4, expect_dy=3)
    np.testing.assert_array_equal(back.enroll, s.enroll)
    np.testing.assert_array_equal(back.runtime, s.runtime)
    np.testing.assert_array_equal(back.speaker, s.speaker)
    assert (back.enroll_model, back.runtime_model, back.n, back.num_speakers) == ("X:1", "Y:2", 6, 2)
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"
    assert shard_paths(tmp_path) == [p]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="file not found") as err:
        load_shard(tmp_path / "nope.shard.safetensors")
    assert "nope.shard.safetensors" in str(err.value)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.95])
def test_truncated_file(tmp_path: Path, cut: float) -> None:
    p = write_shard(tmp_path / f"d{SHARD_SUFFIX}", _shard())
    blob = p.read_bytes()
    p.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(ShardError, match="unreadable or truncated") as err:
        load_shard(p)
    assert str(p) in str(err.value)


def test_corrupt_garbage(tmp_path: Path) -> None:
    p = tmp_path / f"d{SHARD_SUFFIX}"
    p.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ShardError, match="unreadable"):
        load_shard(p)


def test_nan_and_inf(tmp_path: Path) -> None:
    enroll = np.ones((4, 3), np.float32)
    enroll[2, 1] = np.nan
    runtime = np.ones((4, 2), np.float32)
    runtime[3, 0] = np.inf
    p = _write_raw(tmp_path / "a.shard.safetensors",
                   {"enroll": enroll, "runtime": runtime, "speaker": np.zeros(4, np.int64)}, META)
    with pytest.raises(ShardError, match=r"'enroll' has 1 non-finite row\(s\), first at row 2") as err:
        load_shard(p)
    assert "'runtime' has 1 non-finite row(s), first at row 3" in str(err.value)


def test_wrong_dimension(tmp_path: Path) -> None:
    p = write_shard(tmp_path / f"d{SHARD_SUFFIX}", _shard(dx=4, dy=3))
    with pytest.raises(ShardError, match=r"wrong enrollment dimension: 4 \(expected 5\)"):
        load_shard(p, expect_dx=5)
    with pytest.raises(ShardError, match=r"wrong runtime dimension: 3 \(expected 2\)"):
        load_shard(p, expect_dy=2)


def test_empty_device(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "e.shard.safetensors", {"enroll": np.zeros((0, 3), np.float32),
                   "runtime": np.zeros((0, 2), np.float32), "speaker": np.zeros(0, np.int64)}, META)
    with pytest.raises(ShardError, match="empty device"):
        load_shard(p)


def test_negative_ids_and_row_mismatch(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "n.shard.safetensors", {"enroll": np.zeros((3, 3), np.float32),
                   "runtime": np.zeros((2, 2), np.float32), "speaker": np.array([0, -1, 1])}, META)
    with pytest.raises(ShardError) as err:
        load_shard(p)
    assert "row counts differ" in str(err.value) and "negative speaker id" in str(err.value)


def test_unknown_schema_and_foreign_file(tmp_path: Path) -> None:
    tensors = {"enroll": np.zeros((2, 3), np.float32), "runtime": np.zeros((2, 2), np.float32),
               "speaker": np.zeros(2, np.int64)}
    p = _write_raw(tmp_path / "s.shard.safetensors", tensors, {**META, "schema_version": "99"})
    with pytest.raises(ShardError, match="unknown schema version 99"):
        load_shard(p)
    q = _write_raw(tmp_path / "f.shard.safetensors", tensors, {"something": "else"})
    with pytest.raises(ShardError, match="not a fed-nessa device shard"):
        load_shard(q)
    r = _write_raw(tmp_path / "m.shard.safetensors", {"enroll": tensors["enroll"]}, META)
    with pytest.raises(ShardError, match="missing tensor"):
        load_shard(r)


def test_wrong_dtype(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "t.shard.safetensors", {"enroll": np.zeros((2, 3), np.float64),
                   "runtime": np.zeros((2, 2), np.float32), "speaker": np.zeros(2, np.int64)}, META)
    with pytest.raises(ShardError, match="must be float32"):
        load_shard(p)


def test_write_refuses_invalid_and_keeps_old_file(tmp_path: Path) -> None:
    good = _shard()
    p = write_shard(tmp_path / f"d{SHARD_SUFFIX}", good)
    bad = Shard(enroll=good.enroll.copy(), runtime=good.runtime, speaker=good.speaker, enroll_model="X",
                runtime_model="Y")
    bad.enroll[0, 0] = np.nan
    with pytest.raises(ShardError):
        write_shard(p, bad)
    np.testing.assert_array_equal(load_shard(p).enroll, good.enroll)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="shard folder not found"):
        shard_paths(tmp_path / "absent")


def test_a_shard_with_an_all_zero_row_is_refused() -> None:
    """Issue 17 item 9: the shard loader shares the embedding-set loader's row check (non-finite, all-zero)."""
    enroll = np.ones((3, 4), np.float32)
    enroll[1] = 0.0
    with pytest.raises(ShardError, match=r"'enroll' has 1 all-zero row\(s\), first at row 1"):
        make_shard(enroll, np.ones((3, 2), np.float32), np.zeros(3), "X", "Y")
    with pytest.raises(ShardError, match=r"'runtime' has no columns"):
        make_shard(np.ones((3, 4), np.float32), np.ones((3, 0), np.float32), np.zeros(3), "X", "Y")
