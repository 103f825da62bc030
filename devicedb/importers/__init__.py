"""Seed files from token vendors, read into TokenRecords for the inventory.

Parsers only read and check; they never touch the database. An import stores
all of a file's tokens in one transaction, or none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from devicedb.errors import InvalidInput

KINDS = ("hotp", "totp", "yubico")


@dataclass(frozen=True)
class TokenRecord:
    serial: str
    kind: str
    secret: bytes = field(repr=False)
    algorithm: str = "sha1"
    digits: int = 6
    period: int | None = None
    counter: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    position: str = ""

    def check(self) -> None:
        where = self.position or f"token {self.serial}"
        if (
            not self.serial
            or len(self.serial) > 64
            or not self.serial.isprintable()
            or self.serial != self.serial.strip()
        ):
            raise InvalidInput(f"{where}: serial {self.serial!r} is not 1-64 printable characters")
        if self.kind not in KINDS:
            raise InvalidInput(f"{where}: type {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("hotp", "totp"):
            if self.digits not in (6, 8):
                raise InvalidInput(f"{where}: {self.digits} digits; allowed: 6 or 8")
            if self.algorithm not in ("sha1", "sha256", "sha512"):
                raise InvalidInput(f"{where}: algorithm {self.algorithm!r}; allowed: sha1, sha256, sha512")
            if len(self.secret) < 10:
                raise InvalidInput(f"{where}: the seed is {len(self.secret) * 8} bits; at least 80 are needed")
        if not any(self.secret[:16]):
            raise InvalidInput(f"{where}: the seed or key is all zero bytes: a broken export, not a secret")
        if self.kind == "yubico" and len(self.secret) != 22:
            raise InvalidInput(f"{where}: a Yubico OTP secret is a 16-byte AES key and a 6-byte private id")
        if self.kind == "totp" and self.period not in (30, 60):
            raise InvalidInput(f"{where}: period {self.period}; allowed: 30 or 60")
        if self.kind == "hotp" and (self.counter is None or not 0 <= self.counter < 2**63):
            raise InvalidInput(f"{where}: counter {self.counter!r} is not a whole number from 0")


def parse_count(text: str, where: str, name: str) -> int:
    """A whole number written as plain ASCII digits (no sign, no underscores)."""
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise InvalidInput(f"{where}: {name} {text!r} is not a whole number")
    return int(value)


def parse_seed(text: str, where: str) -> bytes:
    """A seed written as hex or base32."""
    import base64
    import binascii

    value = text.strip().replace(" ", "")
    if not value:
        raise InvalidInput(f"{where}: the seed is empty")
    try:
        if len(value) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in value):
            return bytes.fromhex(value)
        return base64.b32decode(value.upper() + "=" * (-len(value) % 8))
    except (ValueError, binascii.Error):
        raise InvalidInput(f"{where}: the seed is neither hex nor base32") from None
