"""RADIUS wire format: strict parsing of requests and building of signed replies.

The hot path is done by hand (pyrad's Packet costs about 60 µs a request); the attribute
types come from our dictionary, read with pyrad. Anything malformed raises ``Malformed``,
which the server turns into a silent drop: it never raises further and never reaches the core.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from pyrad.dictionary import Dictionary

from radius_server import DICTIONARY_PATH

ACCESS_REQUEST = 1
ACCESS_ACCEPT = 2
ACCESS_REJECT = 3
ACCOUNTING_REQUEST = 4
ACCESS_CHALLENGE = 11
STATUS_SERVER = 12

MIN_PACKET = 20
MAX_PACKET = 4096

USER_NAME = 1
USER_PASSWORD = 2
CHAP_PASSWORD = 3
NAS_IP_ADDRESS = 4
REPLY_MESSAGE = 18
STATE = 24
CLASS = 25
VENDOR_SPECIFIC = 26
CALLING_STATION_ID = 31
NAS_IDENTIFIER = 32
PROXY_STATE = 33
CHAP_CHALLENGE = 60
EAP_MESSAGE = 79
MESSAGE_AUTHENTICATOR = 80
NAS_IPV6_ADDRESS = 95

MICROSOFT = 311
MS_CHAP_ATTRIBUTES = frozenset({1, 11, 25})  # MS-CHAP-Response, MS-CHAP-Challenge, MS-CHAP2-Response

_FIXED_LENGTHS = {"integer": (4, 4), "date": (4, 4), "ipaddr": (4, 4), "ipv6addr": (16, 16), "ifid": (8, 8)}
_RANGE_LENGTHS = {"ipv6prefix": (2, 18), "integer64": (8, 8), "short": (2, 2), "byte": (1, 1), "signed": (4, 4)}


class Malformed(Exception):
    """A datagram that is not a well-formed RADIUS packet. Its text names what is wrong."""


@dataclass(frozen=True)
class AttributeTypes:
    """Allowed value lengths (min, max) per attribute type, and per (vendor, type) for known vendors."""

    standard: dict[int, tuple[int, int]]
    vendor: dict[tuple[int, int], tuple[int, int]]
    names: dict[str, tuple[int, str]]

    @classmethod
    def load(cls, path: str = DICTIONARY_PATH) -> AttributeTypes:
        d = Dictionary(path)
        standard: dict[int, tuple[int, int]] = {}
        vendor: dict[tuple[int, int], tuple[int, int]] = {}
        names: dict[str, tuple[int, str]] = {}
        for name in d.attributes:
            attr = d.attributes[name]
            limits = _FIXED_LENGTHS.get(attr.type) or _RANGE_LENGTHS.get(attr.type) or (1, 253)
            if attr.vendor:
                vendor[(d.vendors[attr.vendor], attr.code)] = limits
            else:
                if attr.code == MESSAGE_AUTHENTICATOR:
                    limits = (16, 16)
                standard[attr.code] = limits
                names[name] = (attr.code, attr.type)
        return cls(standard, vendor, names)


@dataclass(slots=True)
class Request:
    code: int
    ident: int
    authenticator: bytes
    raw: bytes
    attrs: list[tuple[int, bytes]] = field(default_factory=list)
    # Offsets of the value of each Message-Authenticator in raw.
    ma_offsets: list[int] = field(default_factory=list)
    vsas: list[tuple[int, int, bytes]] = field(default_factory=list)

    def get(self, attr_type: int) -> list[bytes]:
        return [v for t, v in self.attrs if t == attr_type]

    def first(self, attr_type: int) -> bytes | None:
        for t, v in self.attrs:
            if t == attr_type:
                return v
        return None


def header(data: bytes) -> tuple[int, int, int]:
    """Code, identifier and the length field of a datagram of at least 20 bytes."""
    code, ident, length = struct.unpack_from("!BBH", data)
    return code, ident, length


def first_attribute(data: bytes, wanted: int) -> bytes | None:
    """The value of the first attribute of type ``wanted``, found without a full parse (to route a
    request to its worker); None when there is none or the attribute list is malformed."""
    end = len(data)
    if end < MIN_PACKET or int.from_bytes(data[2:4], "big") != end:
        return None
    i = 20
    while i + 2 <= end:
        kind, length = data[i], data[i + 1]
        if length < 2 or i + length > end:
            return None
        if kind == wanted:
            return data[i + 2 : i + length]
        i += length
    return None


def parse(data: bytes, types: AttributeTypes) -> Request:
    """Parse a whole datagram strictly. Raises Malformed."""
    size = len(data)
    if size < MIN_PACKET:
        raise Malformed(f"datagram of {size} bytes is shorter than a RADIUS header")
    if size > MAX_PACKET:
        raise Malformed(f"datagram of {size} bytes is longer than {MAX_PACKET}")
    code, ident, length = struct.unpack_from("!BBH", data)
    if length != size:
        raise Malformed(f"header length {length} disagrees with the datagram's {size} bytes")
    req = Request(code, ident, data[4:20], data)
    attrs = req.attrs
    standard = types.standard
    pos = 20
    while pos < size:
        if pos + 2 > size:
            raise Malformed(f"attribute header at offset {pos} runs past the end")
        attr_type = data[pos]
        attr_len = data[pos + 1]
        if attr_len < 2:
            raise Malformed(f"attribute {attr_type} at offset {pos} has length {attr_len}")
        end = pos + attr_len
        if end > size:
            raise Malformed(f"attribute {attr_type} at offset {pos} runs past the end of the packet")
        limits = standard.get(attr_type)
        if limits is None:
            raise Malformed(f"unknown attribute type {attr_type}")
        value_len = attr_len - 2
        if not limits[0] <= value_len <= limits[1]:
            raise Malformed(f"attribute {attr_type} has a value of {value_len} bytes; allowed {limits[0]}-{limits[1]}")
        value = data[pos + 2 : end]
        if attr_type == MESSAGE_AUTHENTICATOR:
            req.ma_offsets.append(pos + 2)
        elif attr_type == VENDOR_SPECIFIC:
            _parse_vsa(value, types, req)
        attrs.append((attr_type, value))
        pos = end
    return req


def _parse_vsa(value: bytes, types: AttributeTypes, req: Request) -> None:
    """RFC 2865 section 5.26 layout: vendor id, then type/length/value sub-attributes."""
    if len(value) < 7:
        raise Malformed(f"Vendor-Specific of {len(value)} bytes is too short")
    vendor = int.from_bytes(value[:4], "big")
    pos = 4
    while pos < len(value):
        if pos + 2 > len(value):
            raise Malformed(f"vendor {vendor} sub-attribute header runs past the end")
        sub_type = value[pos]
        sub_len = value[pos + 1]
        if sub_len < 3:
            raise Malformed(f"vendor {vendor} sub-attribute {sub_type} has length {sub_len}")
        if pos + sub_len > len(value):
            raise Malformed(f"vendor {vendor} sub-attribute {sub_type} runs past the end")
        limits = types.vendor.get((vendor, sub_type))
        if limits is not None and not limits[0] <= sub_len - 2 <= limits[1]:
            raise Malformed(f"vendor {vendor} sub-attribute {sub_type} has a wrong length")
        req.vsas.append((vendor, sub_type, value[pos + 2 : pos + sub_len]))
        pos += sub_len


def message_authenticator_ok(req: Request, secret: bytes) -> bool:
    """RFC 3579 section 3.2: HMAC-MD5 over the packet with the attribute's value zeroed."""
    if len(req.ma_offsets) != 1:
        return False
    off = req.ma_offsets[0]
    raw = req.raw
    expected = hmac.new(secret, raw[:off] + bytes(16) + raw[off + 16 :], hashlib.md5).digest()
    return hmac.compare_digest(expected, raw[off : off + 16])


def decode_password(value: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """RFC 2865 section 5.2. Only trailing NULs (the padding) are stripped; the caller decodes UTF-8."""
    out = bytearray()
    prev = authenticator
    for i in range(0, len(value), 16):
        chunk = value[i : i + 16]
        pad = hashlib.md5(secret + prev).digest()  # noqa: S324 - RADIUS (RFC 2865) mandates MD5
        out += bytes(a ^ b for a, b in zip(chunk, pad, strict=True))
        prev = chunk
    return bytes(out).rstrip(b"\0")


def encode_password(password: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """The client side of decode_password (tests and the benchmark)."""
    padded = password + b"\0" * (-len(password) % 16 or (16 if not password else 0))
    out = bytearray()
    prev = authenticator
    for i in range(0, len(padded), 16):
        pad = hashlib.md5(secret + prev).digest()  # noqa: S324 - RADIUS (RFC 2865) mandates MD5
        chunk = bytes(a ^ b for a, b in zip(padded[i : i + 16], pad, strict=True))
        out += chunk
        prev = chunk
    return bytes(out)


def encode_attrs(attrs: list[tuple[int, bytes]]) -> bytes:
    parts = []
    for attr_type, value in attrs:
        if not 1 <= len(value) <= 253:
            raise ValueError(f"attribute {attr_type} value of {len(value)} bytes cannot be encoded")
        parts.append(bytes((attr_type, len(value) + 2)) + value)
    return b"".join(parts)


def build_reply(code: int, req: Request, secret: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    """A signed reply: Message-Authenticator first, then ``attrs``, then the request's Proxy-States in order."""
    proxy = [(PROXY_STATE, v) for t, v in req.attrs if t == PROXY_STATE]
    rest = encode_attrs(attrs + proxy)
    length = 20 + 18 + len(rest)
    if length > MAX_PACKET:
        raise ValueError("reply too long")
    hdr = struct.pack("!BBH", code, req.ident, length)
    ma = hmac.new(secret, hdr + req.authenticator + b"\x50\x12" + bytes(16) + rest, hashlib.md5).digest()
    body = b"\x50\x12" + ma + rest
    response_auth = hashlib.md5(hdr + req.authenticator + body + secret).digest()  # noqa: S324 - RADIUS (RFC 2865) mandates MD5
    return hdr + response_auth + body


def build_request(
    code: int,
    ident: int,
    authenticator: bytes,
    secret: bytes,
    attrs: list[tuple[int, bytes]],
    *,
    message_authenticator: bool = True,
) -> bytes:
    """A client request (tests, benchmark): with Message-Authenticator last, signed, if asked."""
    body = encode_attrs(attrs)
    if message_authenticator:
        body += b"\x50\x12" + bytes(16)
    hdr = struct.pack("!BBH", code, ident, 20 + len(body))
    packet = hdr + authenticator + body
    if message_authenticator:
        ma = hmac.new(secret, packet, hashlib.md5).digest()
        packet = packet[:-16] + ma
    return packet


def reply_ok(reply: bytes, request_authenticator: bytes, secret: bytes) -> bool:
    """Check a reply's Response Authenticator (tests, benchmark)."""
    expected = hashlib.md5(reply[:4] + request_authenticator + reply[20:] + secret).digest()  # noqa: S324 - RADIUS (RFC 2865) mandates MD5
    return hmac.compare_digest(expected, reply[4:20])
