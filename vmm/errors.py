"""Errors the VM plane raises; each carries a message fit to show a user."""


class VmmError(Exception):
    """Base class: an operation on the VM plane failed for a stated reason."""

    http_status = 500


class NotFound(VmmError):
    """The VM, template or image named does not exist."""

    http_status = 404


class InvalidRequest(VmmError):
    """Input (policy, name, state transition) is not acceptable."""

    http_status = 422


class PermissionDenied(VmmError):
    """The guest refused access to a path."""

    http_status = 403


class Conflict(VmmError):
    """The VM is in a state that does not allow the operation."""

    http_status = 409


class RestoreFailed(VmmError):
    """A restore did not complete; the VM stays suspended with its snapshot intact."""

    http_status = 503


class VmFailed(VmmError):
    """The VM's QEMU died or could not be started; the VM is marked failed."""

    http_status = 502


class OverCapacity(VmmError):
    """The host cannot give what was asked (memory, vCPUs, disk space); nothing was changed."""

    http_status = 507


class NotRunning(VmmError):
    """The VM is not running and may not be woken now (auto_resume=false, or the edge is stopping)."""

    http_status = 503


class RegistryError(VmmError):
    """The registry could not record a transition (e.g. its disk is full); the transition did not happen."""

    http_status = 507


class CatalogError(VmmError):
    """The shared catalog cannot be used (bad `catalog.url`, server unreachable); names the config key."""

    http_status = 503


class ConfigError(Exception):
    """The configuration is unusable; the message starts with the offending key (`server.listen_port: ...`)."""
