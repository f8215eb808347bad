"""What the edge process sets up for itself at start: the open-files limit."""

from __future__ import annotations

import resource

from edge.app import raise_nofile_limit


def test_nofile_soft_limit_is_raised_up_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        unlimited = hard == resource.RLIM_INFINITY
        cap = 4096 if unlimited else hard
        got = raise_nofile_limit(cap if unlimited else cap + 1000)
        assert got == cap == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_nofile_limit(32) == cap, "never lowered"
        assert raise_nofile_limit(0) == cap
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
