from pathlib import Path

import pytest

from mvm.cli import _parser, main
from vmm.disk_image import BuildOptions
from vmm.errors import VmmError
from vmm.image import Image


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


def test_image_build_flags_reach_the_build_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[vmm]\nstate_dir = "{tmp_path}"\n[build]\nargs = {{ A = "1", B = "2" }}\n')
    seen: list[BuildOptions] = []

    def build(dockerfile: Path, context: Path | None, options: BuildOptions, *_: object) -> Image:
        seen.append(options)
        raise VmmError("stop here")

    monkeypatch.setattr("vmm.disk_image.build_from_dockerfile", build)
    argv = ["image", "build", "--config", str(config), "--dockerfile", "D", "--no-cache", "--no-host-trust",
            "--build-arg", "B=3", "--build-arg", "C=x=y"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)
    assert seen[0].no_cache and not seen[0].host_trust and seen[0].build_args == {"A": "1", "B": "3", "C": "x=y"}
    main_defaults = ["image", "build", "--config", str(config), "--dockerfile", "D"]
    with pytest.raises(SystemExit):
        main(main_defaults)
    assert not seen[1].no_cache and seen[1].host_trust and seen[1].ca_files == ()
    with pytest.raises(SystemExit):
        main([*main_defaults, "--build-arg", "novalue"])
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("argv", "method", "path", "body"),
    [
        (["vm", "fork", "v1", "-n", "4"], "POST", "/v1/vms/v1/fork", {"count": 4}),
        (["vm", "fork", "v1", "--checkpoint", "a"], "POST", "/v1/vms/v1/fork", {"count": 1, "checkpoint": "a"}),
        (["vm", "restore", "v1", "--checkpoint", "a"], "POST", "/v1/vms/v1/restore", {"checkpoint": "a"}),
        (["checkpoint", "create", "v1", "a"], "POST", "/v1/vms/v1/checkpoints", {"name": "a"}),
        (["checkpoint", "ls", "v1"], "GET", "/v1/vms/v1/checkpoints", None),
        (["checkpoint", "rm", "v1", "a"], "DELETE", "/v1/vms/v1/checkpoints/a", None),
    ],
)
def test_fork_and_checkpoint_commands_call_the_control_api(
    argv: list[str], method: str, path: str, body: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr("mvm.cli._api", lambda _args, m, p, b=None: calls.append((m, p, b)) or {})
    args = _parser().parse_args(argv)
    args.func(args)
    assert calls == [(method, path, body)]
