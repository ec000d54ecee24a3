"""The read-ahead thread: files read front to back, in order, never more than ``ahead`` past the one in use."""

from __future__ import annotations

import time
from pathlib import Path

from kstory.core.models.read_ahead import ReadAhead

MiB = 2**20


def _settled(ahead: ReadAhead, expected: int, seconds: float = 20.0) -> int:
    """bytes_read once it reaches ``expected`` (or stops growing before the deadline)."""
    deadline = time.monotonic() + seconds
    last, still = -1, 0
    while time.monotonic() < deadline:
        now = ahead.bytes_read
        if now == expected:
            time.sleep(0.2)  # and stays there
            return ahead.bytes_read
        still = still + 1 if now == last else 0
        if still > 50:
            return now
        last = now
        time.sleep(0.02)
    return ahead.bytes_read


def test_reads_the_file_in_use_and_the_next_then_waits(tmp_path: Path) -> None:
    paths = []
    for index, size in enumerate((1, 2, 3, 1)):
        path = tmp_path / f"shard-{index}.bin"
        path.write_bytes(bytes([index]) * (size * MiB))
        paths.append(path)
    with ReadAhead(paths + [paths[0]], ahead=1, chunk_bytes=64 * 1024) as ahead:  # a repeated path is read once
        assert _settled(ahead, 3 * MiB) == 3 * MiB  # shard 0 (in use from the start) and shard 1
        ahead.using(paths[2])
        assert _settled(ahead, 7 * MiB) == 7 * MiB  # then 2 and 3: all of it
        ahead.using(tmp_path / "elsewhere.bin")  # a file it was not given changes nothing
    assert not ahead._thread.is_alive()


def test_a_missing_file_is_left_to_its_reader_and_a_waiting_thread_stops_when_closed(tmp_path: Path) -> None:
    present = tmp_path / "present.bin"
    present.write_bytes(b"x" * MiB)
    with ReadAhead([tmp_path / "missing.bin", present], ahead=5) as ahead:
        assert _settled(ahead, MiB) == MiB  # the missing one skipped, the next read
    # Waiting to be allowed to the next file, it still stops when closed (join would hang otherwise).
    waiting = ReadAhead([present, tmp_path / "next.bin"], ahead=0)
    assert _settled(waiting, MiB) == MiB
    waiting.close()
    assert not waiting._thread.is_alive() and waiting.bytes_read == MiB
