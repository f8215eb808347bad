"""The top layer: the `mvm` command, which assembles the roles (`serve`, `host`, `edge`) from the layers below."""
