"""wire/kv_shm.py: the same-host hand-off file, and what a sender refuses to open."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from splitserve.wire import kv_codec, kv_shm
from splitserve.wire.kv_codec import KVAssembler, ReceiveBuffers, export_transfer

SHAPE = (2, 2, 3, 4, 1, 8)  # (layers, 2, blocks, block_size, kv heads, head dim)
POOL = (2, 2, 10, 4, 1, 8)


def kv() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def test_a_sender_writes_the_pieces_and_the_puller_checks_them_where_they_lie(tmp_path):
    header, data = export_transfer(kv(), 12)
    with kv_shm.Segment.create(str(tmp_path), len(data)) as seg:
        assert kv_shm.NAME.fullmatch(seg.name) and os.stat(seg.path).st_mode & 0o777 == 0o600
        writer = kv_shm.open_for_writing(str(tmp_path), seg.name, len(data))
        asm = KVAssembler(header, torch.float32, POOL, segment=seg)
        assert asm.buffer is None  # no receive buffer: the tensor is a view of the file
        for off in range(0, len(data) - 200, 200):
            writer.write(off, data[off : off + 200])
            asm.add_written(off, len(data[off : off + 200]))
        writer.close()
        last = off + 200
        asm.add(last, data[last:])  # a sender whose tmpfs filled up sends the rest inline
        got = asm.finish()
        assert torch.equal(got, kv())
        del asm, got
        path = seg.path
    assert not os.path.exists(path)  # deleted when the pull ends


def test_the_file_is_unmapped_only_once_no_tensor_views_it(tmp_path):
    header, data = export_transfer(kv(), 12)
    seg = kv_shm.Segment.create(str(tmp_path), len(data))
    kv_shm.open_for_writing(str(tmp_path), seg.name, len(data)).write(0, data)
    asm = KVAssembler(header, torch.float32, POOL, segment=seg)
    asm.add_written(0, len(data))
    got = asm.finish()
    del asm
    seg.close()  # the engine may still be copying out of it: the mapping stays
    assert not os.path.exists(seg.path) and torch.equal(got, kv())


def test_bytes_rewritten_after_they_were_written_fail_the_checksum(tmp_path):
    header, data = export_transfer(kv(), 12)
    with kv_shm.Segment.create(str(tmp_path), len(data)) as seg:
        writer = kv_shm.open_for_writing(str(tmp_path), seg.name, len(data))
        writer.write(0, data)
        writer.write(16, bytes(8))  # another process scribbles on the file
        asm = KVAssembler(header, torch.float32, POOL, segment=seg)
        asm.add_written(0, len(data))
        with pytest.raises(kv_codec.KVCodecError, match="checksum"):
            asm.finish()
        del asm


def test_a_notice_without_a_file_and_a_file_of_another_size_are_refused(tmp_path):
    header, data = export_transfer(kv(), 12)
    with pytest.raises(kv_codec.KVCodecError, match="named none"):
        KVAssembler(header, torch.float32, POOL).add_written(0, len(data))
    with kv_shm.Segment.create(str(tmp_path), 64) as seg:
        with pytest.raises(kv_codec.KVCodecError, match="segment for"):
            KVAssembler(header, torch.float32, POOL, segment=seg)
        with pytest.raises(kv_shm.SegmentError, match="run past"):
            seg.write(60, b"12345678")
    with pytest.raises(kv_shm.SegmentError, match="0 bytes"):
        kv_shm.Segment.create(str(tmp_path), 0)


def test_the_sender_opens_only_the_file_promised(tmp_path):
    d = str(tmp_path)
    good = kv_shm.Segment.create(d, 64)
    name = good.name
    with pytest.raises(kv_shm.SegmentError, match="holds 64 bytes"):
        kv_shm.open_for_writing(d, name, 65)
    with pytest.raises(kv_shm.SegmentError, match="off here"):
        kv_shm.open_for_writing("", name, 64)
    for bad in ["../" + name, "/etc/passwd", name + "x", "splitserve-kv-1-zz", "", "x" * 5000]:
        with pytest.raises(kv_shm.SegmentError, match="not a KV segment name"):
            kv_shm.open_for_writing(d, bad, 64)
    other = f"{kv_shm.PREFIX}1-{'a' * 32}"
    with pytest.raises(kv_shm.SegmentError, match="cannot open"):  # another host: no file
        kv_shm.open_for_writing(d, other, 64)
    os.symlink(good.path, os.path.join(d, other))  # a link to a real segment is still refused
    with pytest.raises(kv_shm.SegmentError, match="cannot open"):
        kv_shm.open_for_writing(d, other, 64)
    os.unlink(os.path.join(d, other))
    os.link(good.path, os.path.join(d, other))  # so is a second name for one file
    with pytest.raises(kv_shm.SegmentError, match="one link"):
        kv_shm.open_for_writing(d, other, 64)
    os.unlink(os.path.join(d, other))
    os.mkfifo(os.path.join(d, other))  # a FIFO fails at once instead of blocking the sender
    with pytest.raises(kv_shm.SegmentError):
        kv_shm.open_for_writing(d, other, 64)
    kv_shm.open_for_writing(d, name, 64).close()
    good.close()


def test_files_of_killed_pullers_are_removed_and_live_ones_kept(tmp_path):
    d = str(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"{kv_shm.PREFIX}{int(dead.stdout)}-{'b' * 32}"
    stale.write_bytes(b"x")
    (tmp_path / "unrelated").write_bytes(b"x")
    with kv_shm.Segment.create(d, 8) as live:
        assert kv_shm.remove_stale(d) == 1
        assert not stale.exists() and os.path.exists(live.path)
        assert (tmp_path / "unrelated").exists()
    assert kv_shm.remove_stale("") == 0


def test_closing_waits_for_a_write_in_flight(tmp_path, monkeypatch):
    """A cancelled pull closes its file while a helper thread may still be writing: the close
    waits, so the descriptor is never closed (and its number reused) under the write."""
    seg = kv_shm.Segment.create(str(tmp_path), 16)
    writer = kv_shm.open_for_writing(str(tmp_path), seg.name, 16)
    entered, real = threading.Event(), os.pwrite

    def slow_pwrite(fd, data, offset):
        entered.set()
        time.sleep(0.3)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    t = threading.Thread(target=writer.write, args=(0, b"x" * 16))
    t.start()
    entered.wait(5)
    start = time.monotonic()
    writer.close()
    assert time.monotonic() - start > 0.1 and not t.is_alive()
    with pytest.raises(kv_shm.SegmentError, match="closed"):
        writer.write(0, b"y")
    seg.close()


def test_receive_buffers_are_reused_within_their_budget():
    bufs = ReceiveBuffers(keep_bytes=100)
    a = bufs.take(60)
    assert len(a) == 60
    bufs.give(a)
    assert bufs.take(50) is a  # a longer kept buffer serves a smaller transfer
    bufs.give(a)
    bufs.give(bytearray(30))
    assert bufs.kept_bytes == 90
    bufs.give(bytearray(40))  # over the budget: the smallest go first
    assert bufs.kept_bytes <= 100 and any(b is a for b in bufs._free)
    bufs.give(bytearray(500))  # larger than the whole budget: never kept
    assert bufs.kept_bytes <= 100
    header, data = export_transfer(kv(), 12)
    asm = KVAssembler(header, torch.float32, POOL, buffers=ReceiveBuffers(1 << 20))
    asm.add(0, data)
    assert torch.equal(asm.finish(), kv())


def test_files_of_clean_pulls_are_reused_under_a_fresh_name(tmp_path):
    d = str(tmp_path)
    segments = kv_shm.Segments(d, keep_bytes=3 * kv_shm.PIECE_BYTES)
    seg = segments.take(100)
    assert seg.nbytes == kv_shm.PIECE_BYTES  # rounded up to whole pieces
    first_name, first_path = seg.name, seg.path
    seg.write(0, b"abc")
    view = seg.view()
    segments.give(seg)
    again = segments.take(kv_shm.PIECE_BYTES)  # the same file and mapping, renamed
    assert again is seg and again.name != first_name and not os.path.exists(first_path)
    assert bytes(again.view()[:3]) == b"abc" and os.path.exists(again.path)
    with pytest.raises(kv_shm.SegmentError):  # the old name opens nothing any more
        kv_shm.open_for_writing(d, first_name, 3)
    kv_shm.open_for_writing(d, again.name, kv_shm.PIECE_BYTES).close()
    big = segments.take(kv_shm.PIECE_BYTES + 1)
    assert big is not seg and big.nbytes == 2 * kv_shm.PIECE_BYTES
    segments.give(big)
    segments.give(again)
    segments.give(segments.take(1))  # over the budget: the smallest is deleted
    assert segments.kept_bytes <= 3 * kv_shm.PIECE_BYTES
    huge = segments.take(4 * kv_shm.PIECE_BYTES)
    segments.give(huge)  # larger than the whole budget: deleted at once
    assert not os.path.exists(huge.path)
    del view
    segments.close()
    assert not [p for p in os.listdir(d) if p.startswith(kv_shm.PREFIX)]
