"""The [http2] section: HTTP/2 toward clients, and the limits that keep a hostile one cheap.

Each limit answers one known attack on HTTP/2 servers; the comment names it. A limit that
is crossed ends the stream (RST_STREAM) or the connection (GOAWAY) with the code RFC 9113
gives for it, counted in mvm_h2_resets / mvm_h2_goaways.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Http2Settings:
    """What [http2] holds (loaded by mvm.config); times in seconds, sizes in bytes."""

    enabled: bool = True  # ALPN h2 on the TLS listener (else http/1.1 only)
    h2c: bool = False  # prior-knowledge h2c on a plain (tls = false) listener
    max_concurrent_streams: int = 128  # more at once: RST_STREAM REFUSED_STREAM
    # HPACK bomb: decoded headers past this end the connection (and one name or value past 64 KiB,
    # whatever this says: libnghttp2's own bound, a COMPRESSION_ERROR)
    max_header_list_size: int = 64 * 1024
    max_continuation_frames: int = 16  # CONTINUATION flood: more frames in one header block: GOAWAY
    max_frame_size: int = 16384  # frames larger than this: GOAWAY FRAME_SIZE_ERROR
    stream_window: int = 256 * 1024  # per-stream receive window: request body bytes in flight per stream
    connection_window: int = 1024 * 1024  # the whole connection's receive window
    stream_buffer: int = 256 * 1024  # answer bytes kept per stream waiting for the client's window
    max_resets: int = 200  # rapid reset (CVE-2023-44487): client RST_STREAMs per flood_window, then GOAWAY
    max_settings: int = 100  # SETTINGS flood: SETTINGS frames per flood_window
    max_pings: int = 100  # PING flood: PING frames per flood_window
    max_window_updates: int = 20000  # WINDOW_UPDATE flood: per flood_window
    flood_window: float = 10.0
    body_idle_timeout: float = 30.0  # a stream whose body stops coming this long: RST_STREAM CANCEL
    stall_timeout: float = 30.0  # zero-window stall: an answer the client gives no window for this long
    idle_timeout: float = 75.0  # a connection with no stream open this long gets GOAWAY
