"""microvm-edge's Python SDK: `from microvm_edge import Client` (blocking) or `AsyncClient` (asyncio)."""

from .client import AsyncClient, Client, ExecEvent, ExecResult, LifecycleEvent, Token, Vm, VmMetrics
from .errors import (
    ApiError,
    Conflict,
    ExecFailed,
    InsufficientCapacity,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
    VmFailed,
)

__all__ = [
    "ApiError", "AsyncClient", "Client", "Conflict", "ExecEvent", "ExecFailed", "ExecResult",
    "InsufficientCapacity", "InvalidRequest", "LifecycleEvent", "NotFound", "Token", "Unauthorized", "Unavailable",
    "Vm", "VmFailed", "VmMetrics",
]  # fmt: skip
