"""How `pytest -n 2` (scripts/test.sh) shares the tests between its workers: file by file (a file's module
fixtures, such as its edge and VMs, are made once, on one worker), and the files that must stay on one
worker together as one unit.

xdist's own `--dist loadgroup` cannot do this with pytest 9 (the group suffix it writes into a node id is
lost), so the grouping is this scheduler's: xdist's load-by-scope with a scope per file, or per group.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

ONE_WORKER = {
    # test_real_apps sweeps the shared buildah store of the untagged images that appeared during a test:
    # never while test_dockerfile_images builds in it.
    "tests/e2e/test_dockerfile_images.py": "buildah",
    "tests/e2e/test_real_apps.py": "buildah",
    "tests/e2e/test_image_build.py": "demo-image-build",  # its module fixture builds the demo image twice: once
    "tests/e2e/test_start_faults.py": "start-faults",  # it holds the machine alone: one wait for it, not one per test
}


class Scheduler(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return ONE_WORKER.get(path, path)
