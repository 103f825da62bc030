"""Backup codes: ten one-time codes for a lost device.

Codes are 10 random digits, shown as two groups of five. They are stored only as
scrypt digests under one random salt per set, so a check costs one scrypt
(about 70 ms) however many codes remain. They are not a device.
"""

from __future__ import annotations

import hashlib
import re
import secrets

CODES_PER_SET = 10
CODE_DIGITS = 10
SALT_BYTES = 16
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_FORMAT = re.compile(r"[0-9]{5}-?[0-9]{5}", re.ASCII)
# Scratch codes migrated from google-authenticator are 8 plain digits.
_LEGACY_FORMAT = re.compile(r"[0-9]{8}", re.ASCII)
LEGACY_DIGITS = 8


def generate() -> list[str]:
    codes: set[str] = set()
    while len(codes) < CODES_PER_SET:
        codes.add(f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}")
    return sorted(codes)


def display(code: str) -> str:
    return f"{code[:5]}-{code[5:]}"


def normalise(response: str, digits: int = CODE_DIGITS) -> str | None:
    """The digits of a response shaped like a backup code of a set of that length, else None."""
    pattern = _LEGACY_FORMAT if digits == LEGACY_DIGITS else _FORMAT
    if not response.isascii() or pattern.fullmatch(response) is None:
        return None
    return response.replace("-", "")


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def digest(code: str, salt: bytes) -> bytes:
    return hashlib.scrypt(code.encode("ascii"), salt=salt, **_SCRYPT)
