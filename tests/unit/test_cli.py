import pytest

from mvm.cli import _parser


@pytest.mark.parametrize(
    ("argv", "config"),
    [
        (["--config", "x.toml", "vm", "ls"], "x.toml"),
        (["vm", "ls", "--config", "y.toml"], "y.toml"),
        (["serve", "--config", "z.toml"], "z.toml"),
        (["vm", "ls"], None),
    ],
)
def test_config_is_taken_before_or_after_the_command(argv: list[str], config: str | None) -> None:
    args = _parser().parse_args(argv)
    assert (str(args.config) if getattr(args, "config", None) else None) == config
