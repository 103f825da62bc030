"""TOTP authenticator apps (RFC 6238).

pyotp generates the codes an administrator sees (``code_at``); matching at login uses
``codes``, the same RFC 4226 arithmetic on ``hmac.digest`` (one C call per candidate instead of
pyotp's pure-Python HMAC set-up), which tests check against pyotp and the RFC vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from typing import Any, ClassVar
from urllib.parse import quote

import pyotp

from devicedb.errors import InvalidInput
from devicedb.kinds import Match, is_digit_code
from devicedb.models import Advance, Device

KIND = "totp"
FINGERPRINT_DOMAIN = "oath"
SECRET_BYTES = 20  # 160 bits, the RFC 4226 recommendation
ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
DIGITS = (6, 8)
PERIODS = (30, 60)


class _SealedSecretOtp(pyotp.OTP):
    # The strength of a secret is judged when it is enrolled or imported (80-bit
    # google-authenticator secrets are kept and flagged weak); at verify time every
    # stored secret must still work.
    min_secret_length_bits: ClassVar[int] = 8

    def __init__(self, secret: bytes, *, digits: int, digest: Any) -> None:
        self._secret_bytes = secret
        super().__init__(b32(secret), digits=digits, digest=digest)

    def byte_secret(self) -> bytes:
        # pyotp decodes the base32 form again for every code; the bytes are already at hand.
        return self._secret_bytes


_XOR_36 = bytes(b ^ 0x36 for b in range(256))
_XOR_5C = bytes(b ^ 0x5C for b in range(256))


class OathCodes:
    """RFC 4226 HOTP values for one secret: ``generate_otp(counter)`` as pyotp's, computed faster.

    The HMAC's inner and outer pads are hashed once per secret (RFC 2104), so each candidate
    costs two hash copies instead of a full HMAC set-up."""

    __slots__ = ("_inner", "_outer", "_modulus", "_digits")

    def __init__(self, secret: bytes, digits: int, algorithm: str) -> None:
        if algorithm not in ALGORITHMS or digits not in (6, 7, 8, 9, 10):
            raise InvalidInput(f"unsupported OATH parameters: {digits} digits, {algorithm}")
        new = ALGORITHMS[algorithm]
        block = new().block_size
        key = new(secret).digest() if len(secret) > block else secret
        key = key.ljust(block, b"\0")
        self._inner = new(key.translate(_XOR_36))
        self._outer = new(key.translate(_XOR_5C))
        self._digits = digits
        self._modulus = 10**digits

    def generate_otp(self, counter: int) -> str:
        inner = self._inner.copy()
        inner.update(struct.pack(">Q", counter))
        outer = self._outer.copy()
        outer.update(inner.digest())
        mac = outer.digest()
        offset = mac[-1] & 0x0F
        value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
        return str(value % self._modulus).zfill(self._digits)


def codes(secret: bytes, digits: int, algorithm: str) -> OathCodes:
    return OathCodes(secret, digits, algorithm)


def validate_params(digits: int, algorithm: str, period: int) -> None:
    if digits not in DIGITS:
        raise InvalidInput(f"--digits {digits} is not allowed; use 6 or 8")
    if algorithm not in ALGORITHMS:
        raise InvalidInput(f"--algorithm {algorithm!r} is not allowed; use sha1, sha256 or sha512")
    if period not in PERIODS:
        raise InvalidInput(f"--period {period} is not allowed; use 30 or 60")


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def b32(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def otp(secret: bytes, digits: int, algorithm: str) -> pyotp.OTP:
    return _SealedSecretOtp(secret, digits=digits, digest=ALGORITHMS[algorithm])


def code_at(secret: bytes, digits: int, algorithm: str, period: int, unix_time: float) -> str:
    return otp(secret, digits, algorithm).generate_otp(int(unix_time // period))


def provisioning_uri(secret: bytes, *, user: str, issuer: str, digits: int, algorithm: str, period: int) -> str:
    # Built by hand so that every parameter is always present: some apps assume defaults wrongly.
    label = quote(f"{issuer}:{user}", safe="@:")
    query = (
        f"secret={b32(secret)}&issuer={quote(issuer, safe='')}"
        f"&algorithm={algorithm.upper()}&digits={digits}&period={period}"
    )
    return f"otpauth://totp/{label}?{query}"


def code_lengths(device: Device) -> set[int]:
    return {device.digits or 6}


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    digits = device.digits or 6
    period = device.period or 30
    algorithm = device.algorithm or "sha1"
    if not is_digit_code(code, digits) or algorithm not in ALGORITHMS:
        return None
    generator = codes(secret, digits, algorithm)
    current = int(now // period) + (device.drift or 0)
    wanted = code.encode("ascii")
    matched: list[int] = []
    # Every candidate is computed and compared, matched or not.
    for step in range(max(0, current - window), current + window + 1):
        if hmac.compare_digest(generator.generate_otp(step).encode("ascii"), wanted):
            matched.append(step)
    if not matched:
        return None
    step = max(matched)
    replay = device.last_step is not None and step <= device.last_step
    extra: dict[str, int | float | None] = {}
    if device.params.get("hardware"):
        # A hardware token's clock runs away slowly and cannot be set: learn its offset from
        # every success, so that the ±window stays centred on where the token really is.
        extra["drift"] = (device.drift or 0) + (step - current)
    return Match(advance=Advance("last_step", step, extra), replay=replay, offset=step - current)


# How far an administrator's `devices resync` looks for a hardware token's clock: ±1 hour. A resync
# moves the replay state forward for good, so a wider reach would let one mistaken (or hostile) pair
# of codes from far ahead leave the token dead against its real clock for that long.
ADMIN_RESYNC_SECONDS = 3600


def find_consecutive(device: Device, secret: bytes, first: str, second: str, now: float) -> int | None:
    """The step of ``second`` when it directly follows ``first`` within ±1 hour of now (admin resync)."""
    digits = device.digits or 6
    period = device.period or 30
    algorithm = device.algorithm or "sha1"
    if not (is_digit_code(first, digits) and is_digit_code(second, digits)) or algorithm not in ALGORITHMS:
        return None
    generator = codes(secret, digits, algorithm)
    current = int(now // period)
    span = ADMIN_RESYNC_SECONDS // period
    a, b = first.encode("ascii"), second.encode("ascii")
    found = None
    for step in range(max(0, current - span), current + span):
        if hmac.compare_digest(generator.generate_otp(step).encode("ascii"), a) and hmac.compare_digest(
            generator.generate_otp(step + 1).encode("ascii"), b
        ):
            found = step + 1
    return found


def describe(device: Device) -> dict[str, Any]:
    return {"digits": device.digits, "algorithm": device.algorithm, "period": device.period}
