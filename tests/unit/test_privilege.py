"""Edge workers' identity: who they become, and the refusals at start."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest

from fleet.privilege import Identity, check_code_readable, worker_identity
from vmm.errors import ConfigError

NOBODY = pwd.getpwnam("nobody")
WORKER = Identity("nobody", NOBODY.pw_uid, NOBODY.pw_gid)


def test_no_user_keeps_the_identity_it_was_started_with() -> None:
    assert worker_identity("") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has an identity to give up")
def test_a_missing_user_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^server.worker_user: no user 'no-such-user-mvm'"):
        worker_identity("no-such-user-mvm")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has an identity to give up")
def test_root_is_refused_as_a_worker_user() -> None:
    with pytest.raises(ConfigError, match="unprivileged user"):
        worker_identity("root")


def test_code_under_a_private_directory_is_refused() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as made:  # pytest's own tmp_path sits under a 0700 directory
        base = Path(made)
        base.chmod(0o755)
        _check_private_code(base)


def _check_private_code(base: Path) -> None:
    private = base / "home"
    code = private / "clone"
    code.mkdir(parents=True)
    private.chmod(0o700)
    code.chmod(0o755)
    with pytest.raises(ConfigError, match=rf"cannot reach {private} "):
        check_code_readable(WORKER, [code])
    private.chmod(0o711)  # passing through is enough above the code
    check_code_readable(WORKER, [code])
    code.chmod(0o711)  # the code itself must be listable: imports look in it
    with pytest.raises(ConfigError, match=rf"cannot reach {code} "):
        check_code_readable(WORKER, [code])
