"""Edge workers parse untrusted HTTP, so they give up root once their listener and files are open.

A worker started as root (by `mvm serve` or `mvm edge`) becomes `server.worker_user`: no
supplementary groups, no capabilities (the kernel clears them when every uid leaves 0) and
no_new_privs, so nothing it execs can gain them back. What it still needs of root's world
it opened before: the listening socket, the TLS key, the token keys, the catalog. Guests are
reached through the host's upstream broker (fleet.upstream_broker) or the data port.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from vmm.errors import ConfigError

_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Identity:
    """The uid and gid a worker runs as."""

    user: str
    uid: int
    gid: int


def worker_identity(user: str) -> Identity | None:
    """Who workers become; None when they keep the identity they were started with.

    That is when `server.worker_user` is "" or this process is not root (it has nothing to give up).
    """
    if not user or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"server.worker_user: no user {user!r} on this machine (scripts/install.sh makes it;"
            ' "" keeps edge workers as the user that started them)'
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigError(f"server.worker_user: {user!r} is root's uid or gid; name an unprivileged user")
    identity = Identity(user, entry.pw_uid, entry.pw_gid)
    paths = sysconfig.get_paths()
    code = [Path(__file__).resolve().parents[1], *(Path(paths[name]) for name in ("stdlib", "platstdlib", "purelib"))]
    check_code_readable(identity, code)
    return identity


def check_code_readable(identity: Identity, roots: list[Path]) -> None:
    """A worker imports modules after it dropped root, so it must be able to read the code and the venv.

    Every directory above each root needs x for the worker, and each root r+x; a clone under a
    private home directory (/root is 0700) fails here, at start, instead of in a worker's lazy import.
    """
    for root in roots:
        for directory in [*reversed(root.parents), root]:
            wanted = 0o5 if directory == root else 0o1  # r-x on the root itself, --x above it
            if not _allows(directory.stat(), identity, wanted):
                raise ConfigError(
                    f"server.worker_user: {identity.user!r} cannot reach {directory} (edge workers read the code"
                    f' and venv under {root} after they drop root): allow it there, or set worker_user = ""'
                )


def _allows(st: os.stat_result, identity: Identity, bits: int) -> bool:
    if st.st_uid == identity.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid == identity.gid:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def drop_to(identity: Identity) -> None:
    """Become `identity` for good: groups, gid, uid (real, effective, saved), then no_new_privs."""
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
