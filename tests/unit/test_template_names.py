from pathlib import Path

import pytest

from vmm import template
from vmm.errors import InvalidRequest, NotFound
from vmm.settings import VmmSettings


@pytest.mark.parametrize("name", ["../etc", "/tmp/x", "demo/../../x", "Demo", ""])
def test_template_names_cannot_reach_outside_the_templates_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match="template name"):
        template.load(VmmSettings(state_dir=tmp_path), name)


def test_unknown_template_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="mvm template create"):
        template.load(VmmSettings(state_dir=tmp_path), "nope")
