"""Typed errors of the microvm-edge API; each carries the API's error code, HTTP status and message."""

from __future__ import annotations


class ApiError(Exception):
    """The control API answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message


class Unauthorized(ApiError):
    """401: a missing or wrong admin key."""


class NotFound(ApiError):
    """404: no such VM, template, image or file."""


class Conflict(ApiError):
    """409: the VM's state (or what uses it) does not allow this now."""


class InvalidRequest(ApiError):
    """422: the request names something wrongly; the message says which field."""


class InsufficientCapacity(ApiError):
    """507: the host (or the VM's disk) has no room for this."""


class VmFailed(ApiError):
    """502: the VM's QEMU or guest agent failed."""


class Unavailable(ApiError):
    """503: try again later (e.g. a restore that failed; the VM stays suspended)."""


class ExecFailed(ApiError):
    """An exec could not run or finish (its stream ended with an error, e.g. a timeout)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized, 404: NotFound, 409: Conflict, 422: InvalidRequest, 502: VmFailed, 503: Unavailable,
    507: InsufficientCapacity,
}  # fmt: skip


def error_for(status: int, code: str, message: str) -> ApiError:
    return _BY_STATUS.get(status, ApiError)(status, code, message)
