"""The sealing key: AES-GCM for secrets at rest, and the keys derived from it.

The key file holds 32 random bytes. Sub-keys are derived with HMAC-SHA256 under
distinct labels so that sealing, duplicate detection and the audit chain never
share a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from devicedb.errors import KeyFileError, SealError, UnsafePathError
from devicedb.fsafety import check_file, read_trusted_file

KEY_BYTES = 32
_SEAL_VERSION = b"\x01"
_NONCE_BYTES = 12


def _derive(master: bytes, label: bytes) -> bytes:
    return hmac.new(master, b"mfaguard/" + label, hashlib.sha256).digest()


def _token_aad(serial: str) -> bytes:
    return b"mfaguard-token-v1\0" + serial.encode("utf-8")


def _aad(device_id: int, user: str) -> bytes:
    # Binds a sealed secret to its row: moving it to another device or user breaks the tag.
    return b"mfaguard-seal-v1\0" + str(device_id).encode() + b"\0" + user.encode("utf-8")


class Keyring:
    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_BYTES:
            raise KeyFileError(f"a sealing key must be {KEY_BYTES} bytes, got {len(master)}")
        self._seal_key = _derive(master, b"seal/v1")
        self._fingerprint_key = _derive(master, b"fingerprint/v1")
        self.audit_key = _derive(master, b"audit/v1")
        self._aead: Any = None  # AESGCM under the seal key, made on first use (cryptography imports lazily)

    @classmethod
    def load(cls, path: str) -> Keyring:
        try:
            raw = read_trusted_file(path, "key file", secret=True, limit=4096)
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} not found; run `mfa-admin init` to create it") from None
        except UnsafePathError:
            raise
        except OSError as exc:
            raise KeyFileError(f"key file {path} cannot be read: {exc.strerror or exc}") from None
        if len(raw) != KEY_BYTES:
            raise KeyFileError(
                f"key file {path} holds {len(raw)} bytes; a key file holds exactly {KEY_BYTES} random bytes. "
                "Restore it from backup; never replace it, or every sealed secret is lost"
            )
        return cls(raw)

    @staticmethod
    def create(path: str) -> bool:
        """Create a new key file with mode 0600. Never overwrites: returns False if one exists."""
        if os.path.lexists(path):
            check_file(path, "key file", secret=True)
            return False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            data = secrets.token_bytes(KEY_BYTES)
            written = os.write(fd, data)
            if written != KEY_BYTES:  # pragma: no cover - a short write to a local file
                raise KeyFileError(f"short write to key file {path}")
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _cipher(self) -> Any:
        if self._aead is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(self._seal_key)
        return self._aead

    def _seal(self, aad: bytes, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed: bytes = self._cipher().encrypt(nonce, secret, aad)
        return _SEAL_VERSION + nonce + sealed

    def _open(self, aad: bytes, sealed: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _SEAL_VERSION:
            raise SealError(f"{what}: sealed secret has an unknown format")
        try:
            opened: bytes = self._cipher().decrypt(sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :], aad)
            return opened
        except InvalidTag:
            raise SealError(
                f"{what}: sealed secret does not open: wrong key file, or the row was altered or moved"
            ) from None

    def seal(self, device_id: int, user: str, secret: bytes) -> bytes:
        return self._seal(_aad(device_id, user), secret)

    def open(self, device_id: int, user: str, sealed: bytes) -> bytes:
        return self._open(_aad(device_id, user), sealed, f"device {device_id} of user {user!r}")

    def seal_token(self, serial: str, secret: bytes) -> bytes:
        """Seal an inventory token's seed, bound to its serial (it has no device or user yet)."""
        return self._seal(_token_aad(serial), secret)

    def open_token(self, serial: str, sealed: bytes) -> bytes:
        return self._open(_token_aad(serial), sealed, f"token {serial}")

    def fingerprint(self, domain: str, material: bytes) -> str:
        """A keyed digest that finds a secret enrolled twice without storing it in the clear."""
        return hmac.new(self._fingerprint_key, domain.encode() + b"\0" + material, hashlib.sha256).hexdigest()
