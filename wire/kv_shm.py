"""Same-host KV hand-off through a shared-memory file: the bytes skip the gRPC stream.

Over loopback gRPC a prompt's KV crosses HTTP/2 framing, TLS and three copies, and 2 vCPUs
move it at ~0.2 GB/s inside a busy mesh. When the prefill and decode workers share a host, the
decode worker (the puller) instead:

1. makes an empty file with room for the KV in its shared-memory dir (`Segment.create`;
   `/dev/shm`, mode 0600, a name no one can guess), or takes one a finished pull left
   (`Segments`: its pages already allocated and mapped, under a fresh name), and names it in
   its PullKVRequest;
2. the prefill worker opens that name in *its own* dir (`open_for_writing`: a strict name, no
   symlink, a regular file of its own uid with one link and room for the lease), writes
   each chunk there and streams only "bytes [offset, offset+n) are in the file";
3. the decode worker checks each piece where it lies, through a mapping of its file, as its
   notice arrives (while the next piece is being written): CRC-32 and finiteness, exactly as
   streamed bytes are checked; the engine then copies the KV from the mapping into its pool.
   The KV is copied into the file and out of it into the pool: no message is built around
   it, parsed, or reassembled.

Anything else falls back to streaming the bytes, chunk by chunk: a sender on another host (or
in another container: its own /dev/shm) finds no such file; a full tmpfs fails a write (an
error: bytes only ever go in with pwrite, never through a mapping), and the rest goes inline.
A file another process rewrote fails the checksum, and the KV is recomputed; the file can be
truncated or rewritten after the check only by this user's own processes, which are inside the
trust boundary (they could attach to the worker as well). The puller deletes a file whose
pull failed, keeps one whose pull ended cleanly for the next (`Segments`), and deletes those
when it stops; files left by a puller that was killed are removed by the next one to start
(`remove_stale`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import threading

from splitserve.wire.kept import KeptBySize

DEFAULT_DIR = "/dev/shm"
# Written and announced in pieces this size, so the puller checks one while the next is written:
# 8 MiB took 46-63 ms for 47 MB on 2 vCPUs, 4 MiB 70-110 ms (a notice costs more than a copy).
# (2026-12-03, Sapphire Rapids: a piece of a sixth or a quarter of the KV, down to 1 MiB, was
# no faster than 8 MiB for 12 MB of int8 KV and slower for 47 MB of float32.)
PIECE_BYTES = 8 * 1024 * 1024
PREFIX = "splitserve-kv-"
NAME = re.compile(r"splitserve-kv-([0-9]{1,10})-[0-9a-f]{32}")


class SegmentError(OSError):
    """A segment that can't be made, opened or used: the transfer streams its bytes instead."""


def default_dir() -> str:
    """`/dev/shm` where it is a directory this process can write, else "" (off)."""
    return DEFAULT_DIR if os.access(DEFAULT_DIR, os.W_OK | os.X_OK) else ""


class _File:
    """An open segment: written with pwrite (an error, never a SIGBUS, when tmpfs is full) by
    one helper thread at a time. Closing waits for a write in flight, so the descriptor can't be
    closed (and its number reused by another open) under the write of a cancelled stream."""

    def __init__(self, fd: int, nbytes: int) -> None:
        self._fd = fd
        self.nbytes = nbytes
        self._lock = threading.Lock()

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.nbytes:
            raise SegmentError(f"{len(view)} bytes at {offset} run past {self.nbytes}")
        done = 0
        with self._lock:
            if self._fd < 0:
                raise SegmentError("the KV segment is closed")
            try:
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:  # ENOSPC: a full tmpfs
                raise SegmentError(f"KV segment write: {exc.strerror}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class SegmentWriter(_File):
    """The sender's side: the puller's file, opened by `open_for_writing`."""


class Segment(_File):
    """The puller's file: made empty with the KV's size, read through a mapping, deleted when
    the pull is over."""

    def __init__(self, directory: str, name: str, fd: int, nbytes: int) -> None:
        super().__init__(fd, nbytes)
        self.path = os.path.join(directory, name)
        self.name = name
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls, directory: str, nbytes: int) -> Segment:
        if nbytes <= 0:
            raise SegmentError(f"a KV segment of {nbytes} bytes")
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(directory, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise SegmentError(f"cannot make {path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, nbytes)  # sparse: the writer's pages are the only ones used
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise SegmentError(f"cannot size {path}: {exc.strerror}") from None
        return cls(directory, name, fd, nbytes)

    def rename(self) -> None:
        """A fresh unguessable name, for the next pull: a sender that learned the old one
        (a stream that outlived its pull) can't write into the next pull's KV."""
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(os.path.dirname(self.path), name)
        try:
            os.rename(self.path, path)
        except OSError as exc:
            raise SegmentError(f"cannot rename {self.path}: {exc.strerror}") from None
        self.path, self.name = path, name

    def view(self) -> memoryview:
        """The file's bytes, mapped: read where they lie, no copy. Only ever read through (a
        write into a page tmpfs can't provide is SIGBUS; `write` is how bytes go in), and by
        the time a piece is read its writer is done with it. A page the file doesn't have
        reads as zeros; the file can't shrink under the mapping, since only this user can
        truncate it, and other processes of this user are inside the trust boundary anyway."""
        with self._lock:
            if self._fd < 0:
                raise SegmentError(f"{self.path} is closed")
            if self._map is None:
                # Writable only so that torch takes it without a warning; never written.
                self._map = mmap.mmap(self._fd, self.nbytes, mmap.MAP_SHARED)
            return memoryview(self._map)

    def close(self) -> None:
        """Delete the file. The mapping goes now if nothing views it any more, else when
        the last view does (a tensor over it still being copied into the pool keeps it)."""
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        super().close()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Segments(KeptBySize[Segment]):
    """The puller's files, kept for the next pulls up to `keep_bytes` in all (wire/kept.py): a
    file a pull used has its tmpfs pages and its mapping already, so the next sender's writes
    are plain copies (a fresh file's first writes allocate and zero every page: 21 ms of a 47
    MB hand-off on 2 vCPUs). A segment comes back only through `give`, after a pull that ended
    cleanly (its sender wrote everything it announced, and wrote nothing after); one whose pull
    failed or was cancelled is deleted instead, whatever its sender still writes lands in a
    deleted file. A kept segment is handed out again under a fresh name; sizes are rounded up
    to whole pieces so that prompts of about the same length share files."""

    def __init__(self, directory: str, keep_bytes: int) -> None:
        super().__init__(keep_bytes)
        self.directory = directory

    def _size(self, item: Segment) -> int:
        return item.nbytes

    def _new(self, nbytes: int) -> Segment:
        return Segment.create(self.directory, -(-nbytes // PIECE_BYTES) * PIECE_BYTES)

    def _reuse(self, item: Segment) -> Segment | None:
        try:
            item.rename()
            return item
        except SegmentError:
            item.close()
            return None

    def _drop(self, item: Segment) -> None:
        item.close()


def open_for_writing(directory: str, name: str, nbytes: int) -> SegmentWriter:
    """The segment `name` in `directory` (this process's own setting, never the peer's), or
    SegmentError: a name not of the form Segment.create makes, a missing file (another host),
    a symlink, anything but a regular file of this uid with one link and `nbytes` or more."""
    if not directory:
        raise SegmentError("shared-memory hand-off is off here")
    if not NAME.fullmatch(name):
        raise SegmentError(f"{name[:80]!r} is not a KV segment name")
    path = os.path.join(directory, name)
    try:  # O_NONBLOCK: a FIFO planted under the name fails at once instead of blocking
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SegmentError(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise SegmentError(f"{path} is not a regular file of this user with one link")
        if st.st_size < nbytes:
            raise SegmentError(f"{path} holds {st.st_size} bytes; the KV is {nbytes}")
    except BaseException:
        os.close(fd)
        raise
    return SegmentWriter(fd, nbytes)


def remove_stale(directory: str) -> int:
    """Delete segments whose maker is gone (killed mid-pull); returns how many. A segment of
    a live process that only looks dead from here (another pid namespace sharing the dir)
    costs that transfer its fast path: its sender finds no file and streams the bytes."""
    if not directory:
        return 0
    removed = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = NAME.fullmatch(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.geteuid():
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True
