"""Yubico OTP, the YubiKey's default slot, validated offline with the key's AES-128 key.

An OTP is the key's public id (12 modhex characters) and a 32-character modhex token:
AES-128 of private id (6) | use counter (2, LE) | timestamp (3) | session use (1) |
random (2) | CRC-16 (2). The token must decrypt to the key's private id with a good
CRC, and the (use counter, session use) pair must be above every pair accepted before.
"""

from __future__ import annotations

import hmac
from typing import Any

from devicedb.errors import InvalidInput
from devicedb.kinds import Match
from devicedb.models import Advance, Device

KIND = "yubico"
FINGERPRINT_DOMAIN = "yubico-aes"
MODHEX = "cbdefghijklnrtuv"
_FROM_MODHEX = {c: i for i, c in enumerate(MODHEX)}
PUBLIC_ID_CHARS = 12
TOKEN_CHARS = 32
OTP_CHARS = PUBLIC_ID_CHARS + TOKEN_CHARS
KEY_BYTES = 16
PRIVATE_ID_BYTES = 6
_CRC_RESIDUE = 0xF0B8


def modhex_decode(text: str) -> bytes | None:
    if len(text) % 2 or any(c not in _FROM_MODHEX for c in text):
        return None
    return bytes((_FROM_MODHEX[text[i]] << 4) | _FROM_MODHEX[text[i + 1]] for i in range(0, len(text), 2))


def modhex_encode(data: bytes) -> str:
    return "".join(MODHEX[b >> 4] + MODHEX[b & 0xF] for b in data)


def crc16(data: bytes) -> int:
    """ISO 13239 CRC-16 as the YubiKey computes it; over a whole token it leaves 0xF0B8."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc


def validate(public_id: str, private_id: bytes, aes_key: bytes) -> None:
    if len(public_id) != PUBLIC_ID_CHARS or modhex_decode(public_id) is None:
        raise InvalidInput(f"--public-id {public_id!r} is not {PUBLIC_ID_CHARS} modhex characters ({MODHEX})")
    if len(private_id) != PRIVATE_ID_BYTES:
        raise InvalidInput(f"the private id must be {PRIVATE_ID_BYTES} bytes (12 hex digits)")
    if len(aes_key) != KEY_BYTES:
        raise InvalidInput(f"the AES key must be {KEY_BYTES} bytes (32 hex digits)")


def decrypt_token(aes_key: bytes, token: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    # ECB is the YubiKey's own format: one block, fresh counters and random bytes in each.
    decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()  # noqa: S305
    return decryptor.update(token) + decryptor.finalize()


def parse(secret: bytes, otp: str) -> tuple[bytes, int] | None:
    """(private id, combined counter) of a well-formed token, or None."""
    token = modhex_decode(otp[PUBLIC_ID_CHARS:])
    if token is None or len(token) != 16:
        return None
    plain = decrypt_token(secret[:KEY_BYTES], token)
    if crc16(plain) != _CRC_RESIDUE:
        return None
    use_counter = int.from_bytes(plain[6:8], "little") & 0x7FFF  # the top bit flags a caps-lock trigger
    session_use = plain[11]
    return plain[:6], (use_counter << 8) | session_use


def code_lengths(device: Device) -> set[int]:
    return {OTP_CHARS}


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    if len(code) != OTP_CHARS or not code.isascii():
        return None
    public_id = str(device.params.get("public_id", ""))
    if not hmac.compare_digest(code[:PUBLIC_ID_CHARS].encode(), public_id.encode()):
        return None
    parsed = parse(secret, code)
    if parsed is None:
        return None
    private_id, counter = parsed
    if not hmac.compare_digest(private_id, secret[KEY_BYTES : KEY_BYTES + PRIVATE_ID_BYTES]):
        return None
    expected = device.next_counter or 0
    if counter < expected:
        return Match(None, replay=True)
    # next_counter holds the lowest pair still acceptable: strictly above the last one used.
    return Match(Advance("next_counter", counter + 1), offset=counter - expected)


def describe(device: Device) -> dict[str, Any]:
    return {"public_id": device.params.get("public_id"), "next_counter": device.next_counter}
