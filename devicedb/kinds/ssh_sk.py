"""OpenSSH security keys (sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com).

sshd verifies the key's signature, touch and PIN itself; mfaguard owns which keys are
allowed (served to sshd through AuthorizedKeysCommand), the device limit and the audit.
When sshd's SSH_AUTH_INFO_0 names a publickey login with one of the user's enabled keys,
the PAM auth phase counts the FIDO factor as done. Such a device takes no typed code.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

from devicedb.errors import InvalidInput
from devicedb.kinds import Match
from devicedb.models import Device

KIND = "ssh-sk"
FINGERPRINT_DOMAIN = "ssh-sk"
KEY_TYPES = ("sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
# Options that keep their meaning when sshd gets the key from AuthorizedKeysCommand.
KNOWN_OPTIONS = ("no-touch-required", "verify-required")
MAX_LINE = 8192


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    blob_b64: str
    options: tuple[str, ...]
    comment: str

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.blob_b64)

    def authorized_keys_line(self) -> str:
        prefix = ",".join(self.options) + " " if self.options else ""
        return f"{prefix}{self.key_type} {self.blob_b64}"


def _first_string(blob: bytes) -> bytes | None:
    if len(blob) < 4:
        return None
    length = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + length] if 4 + length <= len(blob) else None


def parse_public_key(line: str) -> PublicKey:
    """A .pub or authorized_keys line: ``[options] TYPE BASE64 [comment]``; only sk- types."""
    text = line.strip()
    if not text or len(text) > MAX_LINE or "\n" in text or not text.isprintable():
        raise InvalidInput("not a single line of an OpenSSH public key")
    words = text.split()
    options: tuple[str, ...] = ()
    if words[0] not in KEY_TYPES and len(words) > 1 and words[1] in KEY_TYPES:
        options = tuple(o for o in words[0].split(",") if o)
        words = words[1:]
    if words[0] not in KEY_TYPES:
        raise InvalidInput(
            f"key type {words[0]!r} is not a security key; accepted: {', '.join(KEY_TYPES)} "
            "(make one with ssh-keygen -t ed25519-sk)"
        )
    unknown = [o for o in options if o not in KNOWN_OPTIONS]
    if unknown:
        raise InvalidInput(f"option(s) {', '.join(unknown)} are not accepted; allowed: {', '.join(KNOWN_OPTIONS)}")
    if len(words) < 2:
        raise InvalidInput("the key line has no key data")
    try:
        blob = base64.b64decode(words[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the key data is not base64") from None
    if _first_string(blob) != words[0].encode():
        raise InvalidInput("the key data does not hold a key of the type the line names")
    return PublicKey(words[0], words[1], options, " ".join(words[2:])[:128])


def from_device(device: Device) -> PublicKey:
    params = device.params
    return PublicKey(
        str(params["key_type"]),
        str(params["public_key"]),
        tuple(params.get("options", ())),
        str(params.get("comment", "")),
    )


def used_keys(auth_info: str) -> list[tuple[str, str]]:
    """(type, base64) of every security key SSH_AUTH_INFO_0 says this login used."""
    out = []
    for line in auth_info.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "publickey" and words[1] in KEY_TYPES:
            out.append((words[1], words[2]))
    return out


def matches_login(device: Device, auth_info: str) -> bool:
    key = from_device(device)
    return any(
        kind == key.key_type and hmac.compare_digest(b64.encode(), key.blob_b64.encode())
        for kind, b64 in used_keys(auth_info)
    )


def code_lengths(device: Device) -> set[int]:
    return set()  # a security key takes no typed code


def match(device: Device, secret: bytes, code: str, now: float, window: int) -> Match | None:
    return None
