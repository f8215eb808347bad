"""libnghttp2's HPACK in place of python-hyper's hpack (edge.hpack_native): RFC 7541's examples,
round trips against hpack both ways, hpack's errors for bad and oversized blocks, seeded fuzz, and
an h2 connection with it (never-indexed fields, a peer's table size)."""

from __future__ import annotations

import random

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived, ResponseReceived
from h2.settings import SettingCodes
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

from edge import hpack_native
from edge.hpack_native import NativeDecoder, NativeEncoder, use_native_hpack

Fields = list[tuple[bytes, bytes]]

_REQUESTS = [
    ("C.3.1", "828684410f7777772e6578616d706c652e636f6d"),
    ("C.3.2", "828684be58086e6f2d6361636865"),
    ("C.3.3", "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
]
_REQUESTS_HUFFMAN = [
    ("C.4.1", "828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    ("C.4.2", "828684be5886a8eb10649cbf"),
    ("C.4.3", "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
]
_REQUEST_FIELDS: list[Fields] = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
     (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"), (b":authority", b"www.example.com"),
     (b"custom-key", b"custom-value")],
]  # fmt: skip
_RESPONSES = [
    ("C.5.1", "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
              "6e1768747470733a2f2f7777772e6578616d706c652e636f6d"),
    ("C.5.2", "4803333037c1c0bf"),
    ("C.5.3", "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f"
              "3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076"
              "657273696f6e3d31"),
]  # fmt: skip
_RESPONSES_HUFFMAN = [
    ("C.6.1", "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f"
              "0b97c8e9ae82ae43d3"),
    ("C.6.2", "4883640effc1c0bf"),
    ("C.6.3", "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335df"
              "dfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"),
]  # fmt: skip
_DATE1, _DATE2 = b"Mon, 21 Oct 2013 20:13:21 GMT", b"Mon, 21 Oct 2013 20:13:22 GMT"
_LOCATION = b"https://www.example.com"
_RESPONSE_FIELDS: list[Fields] = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", _DATE1), (b"location", _LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", _DATE1), (b"location", _LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", _DATE2), (b"location", _LOCATION),
     (b"content-encoding", b"gzip"), (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")],
]  # fmt: skip
_TABLE_256 = bytes([0x3F, 0xE1, 0x01])  # a dynamic table size update to 256 (RFC 7541 §6.3)


def _python_decoder(table: int = 4096) -> Decoder:
    decoder = Decoder()
    decoder.max_allowed_table_size = decoder.header_table_size = table
    return decoder


@pytest.mark.parametrize("blocks", [_REQUESTS, _REQUESTS_HUFFMAN], ids=["C.3", "C.4"])
def test_rfc7541_request_examples(blocks: list[tuple[str, str]]) -> None:
    native, python = NativeDecoder(), _python_decoder()
    for (_, wire), fields in zip(blocks, _REQUEST_FIELDS, strict=True):
        block = bytes.fromhex(wire)
        assert native.decode(block, raw=True) == fields == python.decode(block, raw=True)


@pytest.mark.parametrize("blocks", [_RESPONSES, _RESPONSES_HUFFMAN], ids=["C.5", "C.6"])
def test_rfc7541_response_examples_with_a_256_byte_table(blocks: list[tuple[str, str]]) -> None:
    """The examples' encoder evicts at 256 bytes: the decoder is told so by our SETTINGS, and the
    first block then starts with the table size update RFC 7541 §4.2 requires."""
    native, python = NativeDecoder(), _python_decoder(256)
    native.max_allowed_table_size = 256
    assert native.max_allowed_table_size == 256
    for i, ((_, wire), fields) in enumerate(zip(blocks, _RESPONSE_FIELDS, strict=True)):
        block = bytes.fromhex(wire)
        assert native.decode(_TABLE_256 + block if i == 0 else block, raw=True) == fields
        assert python.decode(block, raw=True) == fields
    assert native.header_table_size == 256


def test_rfc7541_single_fields_keep_their_kind() -> None:
    native = NativeDecoder()
    assert native.decode(bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572"), raw=True) == [
        (b"custom-key", b"custom-header")
    ]
    plain = native.decode(bytes.fromhex("040c2f73616d706c652f70617468"), raw=True)
    never = native.decode(bytes.fromhex("100870617373776f726406736563726574"), raw=True)
    assert plain == [(b":path", b"/sample/path")] and type(plain[0]) is HeaderTuple
    assert never == [(b"password", b"secret")] and type(never[0]) is NeverIndexedHeaderTuple
    assert native.decode(b"\x82") == [(":method", "GET")], "not raw: text, as hpack gives"
    assert native.decode(b"") == []


def _random_fields(rng: random.Random) -> list[HeaderTuple]:
    names = [
        b":path",
        b"content-type",
        b"authorization",
        b"cookie",
        b"x-custom",
        b"x-" + rng.randbytes(3).hex().encode(),
    ]
    fields: list[HeaderTuple] = []
    for _ in range(rng.randint(0, 12)):
        name = rng.choice(names)
        value = rng.choice([b"", b"text/plain", bytes(rng.choices(range(0x20, 0x7F), k=rng.randint(0, 300)))])
        kind = NeverIndexedHeaderTuple if rng.random() < 0.2 else HeaderTuple
        fields.append(kind(name, value))
    return fields


def _table_size_change(rng: random.Random) -> int | None:
    return rng.choice([0, 64, 256, 4096]) if rng.random() < 0.1 else None


def test_round_trips_from_python_hpack() -> None:
    """hpack's encoder (Huffman or not, never-indexed fields, table size updates) into both decoders."""
    rng = random.Random(15)
    for _ in range(20):
        encoder, native, python = Encoder(), NativeDecoder(), _python_decoder()
        for _ in range(30):
            size = _table_size_change(rng)
            if size is not None:
                encoder.header_table_size = size
            fields = _random_fields(rng)
            block = encoder.encode(fields, huffman=rng.random() < 0.5)
            got, expected = native.decode(block, raw=True), python.decode(block, raw=True)
            assert got == fields == expected
            assert [type(f) for f in got] == [type(f) for f in expected]  # (hpack sends a field in its table indexed)


def test_round_trips_into_python_hpack() -> None:
    """Ours encodes, hpack decodes: the same fields, never-indexed ones still so, table size updates
    (the peer's SETTINGS_HEADER_TABLE_SIZE) carried."""
    rng = random.Random(7541)
    for _ in range(20):
        encoder, python = NativeEncoder(), _python_decoder()
        for _ in range(30):
            size = _table_size_change(rng)
            if size is not None:
                encoder.header_table_size = size
                assert encoder.header_table_size == size
            fields = _random_fields(rng)
            got = python.decode(encoder.encode(fields), raw=True)
            assert got == fields
            for sent, came in zip(fields, got, strict=True):
                if not sent.indexable:
                    assert type(came) is NeverIndexedHeaderTuple, sent[0]


def test_encode_takes_text_and_three_tuples() -> None:
    python = _python_decoder()
    got = python.decode(NativeEncoder().encode([(":status", "200"), (b"x-secret", b"s3cr3t", True)]), raw=True)
    assert got == [(b":status", b"200"), (b"x-secret", b"s3cr3t")] and type(got[1]) is NeverIndexedHeaderTuple


@pytest.mark.parametrize(
    "wire",
    [
        "80",  # index 0
        "ff7f",  # index 254: past both tables
        "ffffffffff0f",  # an index whose integer overflows
        "400a637573746f6d2d6b6579",  # truncated: the value is missing
        "0005616263",  # a literal name shorter than its length
        "0001618100",  # a Huffman value padded with zeros, not the EOS code's ones
        "0081ff0161",  # a Huffman name of 8 padding bits (more than 7)
        "8220",  # a table size update after a field
        "3fe21f",  # a table size update past our SETTINGS (4096)
    ],
)
def test_malformed_blocks_raise_hpack_decoding_error(wire: str) -> None:
    native = NativeDecoder()
    with pytest.raises(HPACKDecodingError):
        native.decode(bytes.fromhex(wire), raw=True)
    with pytest.raises(HPACKDecodingError, match="compression context is lost"):
        native.decode(b"\x82", raw=True)


def test_a_smaller_table_in_our_settings_needs_the_peers_update() -> None:
    native = NativeDecoder()
    native.max_allowed_table_size = 0
    with pytest.raises(HPACKDecodingError):
        native.decode(b"\x82", raw=True)
    native = NativeDecoder()
    native.max_allowed_table_size = 0
    assert native.decode(b"\x20\x82", raw=True) == [(b":method", b"GET")]


def test_an_oversized_list_stops_as_it_passes_the_limit() -> None:
    """The HPACK bomb: one 4 KB field indexed, then a byte per copy. The error comes as the limit
    is passed, before the rest of the block is read (here: bytes that would not decode)."""
    encoder = Encoder()
    big = (b"x-bomb", b"b" * 4000)
    bomb = encoder.encode([big]) + encoder.encode([big] * 500)
    native = NativeDecoder(max_header_list_size=64 * 1024)
    with pytest.raises(OversizedHeaderListError):
        native.decode(bomb + b"\xff\xff\xff\xff\xff\xff", raw=True)
    with pytest.raises(HPACKDecodingError):
        native.decode(b"\x82", raw=True)
    native = NativeDecoder(max_header_list_size=4038)  # exactly the one field (4000 + 6 + 32)
    assert native.decode(Encoder().encode([big]), raw=True) == [big]


@pytest.mark.parametrize("update", [b"", b"\x3f\xe1\x1f"], ids=["alone", "after a table size update"])
@pytest.mark.parametrize("field", [(b"x-big", b"v" * 70_000), (b"n" * 70_000, b"v")], ids=["value", "name"])
def test_a_field_over_64_kib_is_an_oversized_list_where_it_passes_the_limit(
    update: bytes, field: tuple[bytes, bytes]
) -> None:
    """libnghttp2 refuses a name or value over 64 KiB as it reads its length; where hpack would
    have counted it past max_header_list_size, the error is still the oversized list."""
    block = update + Encoder().encode([(b"x-first", b"1"), field], huffman=False)
    with pytest.raises(OversizedHeaderListError):
        NativeDecoder(max_header_list_size=64 * 1024).decode(block, raw=True)
    with pytest.raises(HPACKDecodingError) as refused:
        NativeDecoder(max_header_list_size=1024 * 1024).decode(block, raw=True)
    assert not isinstance(refused.value, OversizedHeaderListError), "libnghttp2's own bound: 64 KiB a string"


def test_fuzzed_blocks_decode_as_hpack_does_or_raise_its_error() -> None:
    """Seeded and bounded: random bytes, and valid blocks with bytes flipped or cut. Ours answers
    a list or HPACKDecodingError; where both decode, the fields are hpack's."""
    rng = random.Random(2024)
    encoder = Encoder()
    valid = [encoder.encode(_random_fields(rng), huffman=rng.random() < 0.7) for _ in range(50)]
    both = 0
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.4:
            block = rng.randbytes(rng.randint(0, 40))
        else:
            block = bytearray(rng.choice(valid))
            if block and choice < 0.8:
                block[rng.randrange(len(block))] ^= 1 << rng.randrange(8)
            else:
                del block[rng.randrange(len(block) + 1) :]
            block = bytes(block)
        try:
            got = NativeDecoder().decode(block, raw=True)
        except HPACKDecodingError:
            continue
        try:
            expected = _python_decoder().decode(block, raw=True)
        except HPACKDecodingError:
            continue
        both += 1
        assert got == expected
    assert both > 100


def _pair(native_server: bool) -> tuple[H2Connection, H2Connection]:
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    if native_server:
        use_native_hpack(server)
    client.initiate_connection()
    server.initiate_connection()
    return client, server


def _exchange(a: H2Connection, b: H2Connection) -> list[object]:
    events: list[object] = []
    for _ in range(3):
        events += b.receive_data(a.data_to_send())
        events += a.receive_data(b.data_to_send())
    return events


def test_an_h2_connection_with_it_keeps_never_indexed_fields_and_the_peers_table_size() -> None:
    client, server = _pair(native_server=True)
    client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})  # the client keeps no table
    _exchange(client, server)
    assert server.encoder.header_table_size == 0
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                            (b":authority", b"a"), NeverIndexedHeaderTuple(b"authorization", b"Bearer t")],
                        end_stream=True)  # fmt: skip
    request = [e for e in _exchange(client, server) if isinstance(e, RequestReceived)]
    assert type(request[0].headers[-1]) is NeverIndexedHeaderTuple
    server.send_headers(1, [(b":status", b"200"), NeverIndexedHeaderTuple(b"set-cookie", b"t=1")], end_stream=True)
    answer = [e for e in _exchange(client, server) if isinstance(e, ResponseReceived)]
    assert answer[0].headers == [(b":status", b"200"), (b"set-cookie", b"t=1")]
    assert type(answer[0].headers[1]) is NeverIndexedHeaderTuple


def test_a_missing_library_fails_start_up_naming_it() -> None:
    with pytest.raises(ImportError, match=r"libnghttp2-missing\.so\.0 is missing .*scripts/install\.sh"):
        hpack_native._load("libnghttp2-missing.so.0")
