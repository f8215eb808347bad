"""Open client connections per address, shared by the edge workers of one machine.

`proxy.max_connections_per_ip` must hold for the machine, not for each worker that
SO_REUSEPORT happens to hand a connection to. The workers of one set (`mvm serve`,
`mvm edge --workers N`) therefore share one file, mmap'd by each of them:

  - a header, then one region per worker. A region is a linear-probing hash table
    (8-byte salted hash of the address -> that worker's open connections from it), written
    only by the worker that owns it; the others read it. An admission reads the other
    regions and adds one to its own under one flock on the file, so "count across workers,
    then add one" is atomic: the limit is exact, whichever worker the connection lands on.
  - a close takes no lock: it stores the smaller count (one aligned 4-byte store) and a key
    whose count reaches 0 stays where it is as a zero entry, so no entry ever moves under a
    reader. New keys reuse zero entries; when they fill half the region the owner rebuilds
    it from its live addresses (under the lock).
  - a region's owner is recorded as pid + start time. A worker killed with -9 cannot clean
    up, so its region is zeroed by whoever sees it gone: the supervisor when it reaps the
    child (`forget`), or the next worker that joins (`claim` reaps every dead owner). Nothing
    a dead worker wrote survives it, including a table it left half-edited.

The worker keeps its own counts in memory (the source of truth); its region mirrors them
for the others. Keys are a salted hash (a secret random salt per set), so no client can aim a
collision at another's address.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

from vmm.jsonlog import log

MAGIC = b"MVMIPS01"
_HEADER = struct.Struct("=8sII16s")  # magic, regions, slots per region, hash salt
_OWNER = struct.Struct("=IIQ")  # pid, unused, start time (clock ticks since boot)
_SLOT = struct.Struct("=QI4x")  # salted hash (0: empty), open connections (0: a zero entry, reusable)
_COUNT = struct.Struct("=I")
_COUNT_AT = 8  # the count's offset in a slot
_OWNERS_AT = 64


def _align(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


MAX_SLOTS = 1 << 22  # 64 MiB of address space per region (sparse): 2M connections per worker


def slots_for(max_connections: int) -> int:
    """Slots per region: a power of two at least twice the connections one worker can hold,
    so a region never fills and probes stay short (up to MAX_SLOTS)."""
    slots = 1024
    while slots < 2 * max_connections and slots < MAX_SLOTS:
        slots *= 2
    return slots


def start_time(pid: int) -> int | None:
    """The process's start time from /proc (tells a pid from a later one reusing it); None
    when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


class SharedIpTable:
    """One process's view of the set's table: its own region (after `claim`) and the others'."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, self.regions, self.slots, self._salt = _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            self.close()
            raise ValueError(f"{path} is not a connection table")
        self._mask = self.slots - 1
        self._first = _align(_OWNERS_AT + _OWNER.size * self.regions)
        self._region_size = self.slots * _SLOT.size
        self.mine: int | None = None  # my region, once claimed
        self._base = 0  # its offset
        self._others: tuple[int, ...] = ()
        self._live: dict[bytes, tuple[int, int]] = {}  # my addresses with connections open: key, slot offset
        self._used = 0  # slots of my region ever filled since it was last emptied (zero entries included)
        self._full_logged = False

    @classmethod
    def create(cls, path: Path, regions: int, slots: int) -> SharedIpTable:
        """A fresh, zeroed table (the supervisor, before it starts the workers)."""
        if slots & (slots - 1) or slots * _SLOT.size % mmap.PAGESIZE:
            raise ValueError("slots must be a power of two filling whole pages")
        first = _align(_OWNERS_AT + _OWNER.size * regions)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, first + regions * slots * _SLOT.size)  # sparse: pages appear as they are used
            os.pwrite(fd, _HEADER.pack(MAGIC, regions, slots, secrets.token_bytes(16)), 0)
        finally:
            os.close(fd)
        return cls(path)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    def _lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def key(self, client: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(client, digest_size=8, salt=self._salt).digest(), "little") or 1

    # Owners

    def owner(self, region: int) -> tuple[int, int]:
        pid, _, started = _OWNER.unpack_from(self._mm, _OWNERS_AT + _OWNER.size * region)
        return pid, started

    def _set_owner(self, region: int, pid: int, started: int) -> None:
        _OWNER.pack_into(self._mm, _OWNERS_AT + _OWNER.size * region, pid, 0, started)

    def _zero(self, region: int) -> None:
        """Empty a region: its pages are handed back (tmpfs) or, failing that, overwritten."""
        base = self._first + region * self._region_size
        try:
            self._mm.madvise(mmap.MADV_REMOVE, base, self._region_size)
        except OSError:
            self._mm[base : base + self._region_size] = bytes(self._region_size)

    def _clear(self, region: int) -> None:
        """A region without owner, as if never used."""
        self._zero(region)
        self._set_owner(region, 0, 0)

    def claim(self, pid: int, on_reaped: Callable[[int], None] = lambda pid: None) -> bool:
        """Take a free region for `pid` (this worker), first zeroing the region of every owner
        that is gone (`on_reaped(pid)` for each). False when every region has a live owner."""
        started = start_time(pid)
        if started is None:
            raise ValueError(f"process {pid} is not running")
        self._lock()
        try:
            free = None
            for region in range(self.regions):
                owner, owner_started = self.owner(region)
                if owner and start_time(owner) != owner_started:
                    self._clear(region)
                    log.event("edge.connections_reaped", pid=owner)
                    on_reaped(owner)
                    owner = 0
                if not owner and free is None:
                    free = region
            if free is None:
                return False
            self._set_owner(free, pid, started)
        finally:
            self._unlock()
        self.mine, self._base = free, self._first + free * self._region_size
        self._others = tuple(r for r in range(self.regions) if r != free)
        self._live, self._used = {}, 0
        return True

    def forget(self, pid: int) -> bool:
        """Zero the region of `pid`, a worker that has ended (the supervisor reaped it); a
        region that a live process already holds again under a reused pid is left alone."""
        self._lock()
        try:
            for region in range(self.regions):
                owner, started = self.owner(region)
                if owner == pid and start_time(pid) != started:
                    self._clear(region)
                    return True
            return False
        finally:
            self._unlock()

    def release(self) -> None:
        """This worker stops: its connections are gone, and so is its region's content."""
        if self.mine is None:
            return
        self._lock()
        try:
            self._clear(self.mine)
        finally:
            self._unlock()
        self.mine, self._others, self._live = None, (), {}

    # Counts

    def _lookup(self, region: int, key: int) -> int:
        """`key`'s count in a region (0 when absent)."""
        mm, mask, unpack = self._mm, self._mask, _SLOT.unpack_from
        base = self._first + region * self._region_size
        i = key & mask
        for _ in range(self.slots):
            k, n = unpack(mm, base + i * _SLOT.size)
            if k == key:
                return int(n)
            if not k:
                return 0
            i = (i + 1) & mask
        return 0

    def _place(self, key: int) -> int:
        """Where `key` goes in my region: its own slot, else the first zero entry on its probe
        path, else the empty slot that ends the path; -1 when the region is full."""
        mm, mask, unpack = self._mm, self._mask, _SLOT.unpack_from
        i, reuse = key & mask, -1
        for _ in range(self.slots):
            offset = self._base + i * _SLOT.size
            k, n = unpack(mm, offset)
            if k == key:
                return offset
            if not k:
                if reuse >= 0:
                    return reuse
                self._used += 1
                return offset
            if not n and reuse < 0:
                reuse = offset
            i = (i + 1) & mask
        return reuse

    def total(self, client: bytes) -> int:
        """Open connections from `client` in all regions (for tests and diagnostics)."""
        key = self.key(client)
        self._lock()
        try:
            return sum(self._lookup(r, key) for r in range(self.regions))
        finally:
            self._unlock()

    def opened(self, client: bytes, mine: int, limit: int, exempt: Callable[[bytes], bool]) -> bool:
        """Admit one more connection from `client`, which already has `mine` open here: False
        when the machine-wide count is at `limit` (0: no limit, nothing to share) and the
        client is not exempt. Under the lock: no other worker admits in between."""
        if not limit:
            return True
        live = self._live.get(client)
        key = live[0] if live is not None else self.key(client)
        self._lock()
        try:
            held = mine
            for region in self._others:
                held += self._lookup(region, key)
            if held >= limit and not exempt(client):
                return False
            if live is not None:
                _COUNT.pack_into(self._mm, live[1] + _COUNT_AT, mine + 1)
                return True
            if self._used >= self.slots // 2:
                self._rebuild()
            offset = self._place(key)
            if offset < 0:
                self._full()
                return True
            _SLOT.pack_into(self._mm, offset, key, mine + 1)
            self._live[client] = (key, offset)
            return True
        finally:
            self._unlock()

    def closed(self, client: bytes, left: int) -> None:
        """One of `client`'s connections here ended; `left` are still open here.

        No lock: only this worker writes its region, the key stays in place (a zero entry,
        reused later) and a count is one aligned 4-byte store, which a reader sees whole."""
        live = self._live.get(client)
        if live is None:
            return
        _COUNT.pack_into(self._mm, live[1] + _COUNT_AT, left)
        if not left:
            del self._live[client]

    def _rebuild(self) -> None:
        """Drop the zero entries (slots of addresses with nothing open any more) so that
        probe paths stay short: my region again holds only live addresses. Under the lock."""
        assert self.mine is not None
        live = [(client, key, self._lookup(self.mine, key)) for client, (key, _) in self._live.items()]
        self._zero(self.mine)
        self._used, self._live = 0, {}
        for client, key, count in live:
            offset = self._place(key)
            _SLOT.pack_into(self._mm, offset, key, count)
            self._live[client] = (key, offset)

    def _full(self) -> None:
        if not self._full_logged:
            self._full_logged = True
            log.event("edge.connections_table_full", level="error", path=str(self.path), slots=self.slots)
