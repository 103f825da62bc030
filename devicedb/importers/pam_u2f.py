"""pam_u2f authfiles (what pamu2fcfg prints), read into FIDO2 credentials for `mfa-admin migrate pam-u2f`.

One line per user: ``USER:CREDENTIAL[:CREDENTIAL...]``. A credential is one of:

- ``KEYHANDLE,PUBLICKEY,COSETYPE,OPTIONS`` (pamu2fcfg since pam_u2f 1.1, libfido2): the key handle
  (the credential id) and the public key in standard base64; COSETYPE ``es256``, ``eddsa`` or
  ``rs256``; OPTIONS a run of ``+presence``, ``+verification``, ``+pin`` (possibly empty). The public
  key is libfido2's raw form: es256 is X||Y (64 bytes, no 0x04 prefix), eddsa the 32-byte Ed25519
  key, rs256 the 256-byte modulus then the 3-byte exponent. Without OPTIONS pam_u2f assumes
  ``+presence``. A key handle of ``*`` is a resident credential, whose id the file does not hold.
- ``KEYHANDLE,PUBLICKEY`` (pam_u2f 1.0, libu2f-server): the key handle in web-safe base64 without
  padding and the public key in hex, an uncompressed P-256 point (0x04||X||Y, 65 bytes); es256,
  ``+presence``.

pam_u2f reads only the last line of a user. The RP id of every credential is pam_u2f's ``origin``
(default ``pam://HOSTNAME``). Parsing only reads and checks; it never touches the database.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from devicedb import fsafety
from devicedb.errors import InvalidInput, UnsafePathError

MAX_BYTES = 1 << 20
OPTIONS = ("+presence", "+verification", "+pin")
COSE_TYPES = ("es256", "eddsa", "rs256")
_OPTIONS = re.compile(r"(?:\+(?:presence|verification|pin))*", re.ASCII)
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}", re.ASCII)
_B64URL = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+", re.ASCII)


class AuthFileError(InvalidInput):
    """Lines or credentials that cannot be imported, each named by its line number."""

    def __init__(self, where: str, problems: list[str]) -> None:
        super().__init__(f"{where}: {len(problems)} problem(s), nothing was stored: " + "; ".join(problems))
        self.where = where
        self.problems = problems


@dataclass(frozen=True)
class U2fCredential:
    line: int
    index: int  # the credential's place on its line, from 1
    user: str  # as written in the file
    credential_id: bytes = field(repr=False)
    cose_key: dict[int, Any] = field(repr=False)
    cose_type: str
    options: tuple[str, ...]
    old_format: bool

    @property
    def where(self) -> str:
        return f"line {self.line}, key {self.index}"

    @property
    def uv_required(self) -> bool:
        return "+verification" in self.options or "+pin" in self.options


@dataclass(frozen=True)
class AuthFile:
    credentials: list[U2fCredential]  # those of each user's last line that could be read
    superseded: list[tuple[int, str]]  # (line, user): earlier lines of a user, which pam_u2f ignores
    problems: list[str]  # every line or credential that cannot be read; an import stores nothing if any

    def check(self, where: str) -> None:
        if self.problems:
            raise AuthFileError(where, self.problems)


@dataclass(frozen=True)
class OpenedFile:
    data: bytes = field(repr=False)
    owner_uid: int


def read_authfile(path: str, limit: int = MAX_BYTES) -> OpenedFile:
    """Read an authfile the way pam_u2f would trust it, and stricter: no symlink, a regular file,
    not writable by group or others (anyone who could write it could add their own key for any
    user). The owner is returned: pam_u2f accepts a file owned by root or by the user it names."""
    what = "pam_u2f authfile"
    try:
        fsafety.lstat_no_symlink(path, what)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except UnsafePathError as exc:
        raise InvalidInput(str(exc)) from None
    except FileNotFoundError:
        raise InvalidInput(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"{what} {path} cannot be opened ({exc.strerror}); symlinks are refused") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{what} {path} is not a regular file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InvalidInput(
                f"{what} {path} has mode {fsafety.describe_mode(st.st_mode)}: others could write it, and add "
                f"their own key for any user, so it is refused. Fix: chmod go-w {path}, check its lines, and "
                "run this again"
            )
        if st.st_size > limit:
            raise InvalidInput(f"{what} {path} is larger than {limit} bytes; not a pam_u2f authfile")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"{what} {path} is larger than {limit} bytes; not a pam_u2f authfile")
        return OpenedFile(data, st.st_uid)
    finally:
        os.close(fd)


def _b64(text: str) -> bytes | None:
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _websafe_b64(text: str) -> bytes | None:
    if not _B64URL.fullmatch(text.rstrip("=")):
        return _b64(text)  # tolerate a standard-alphabet handle
    try:
        stripped = text.rstrip("=")
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        return None


def cose_from_raw(cose_type: str, raw: bytes, *, old_format: bool = False) -> dict[int, Any]:
    """libfido2's raw public key (or pam_u2f 1.0's uncompressed point) as a COSE key map, checked:
    a point not on the curve, a short key or an RSA key of the wrong size is refused (ValueError)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    # The COSE maps (RFC 9053) are written out here; the keys are loaded with cryptography first,
    # which refuses a point off the curve or a malformed key.
    if cose_type == "es256":
        if old_format:
            if len(raw) != 65 or raw[0] != 4:
                raise ValueError(f"{len(raw)} bytes; pam_u2f 1.0 wrote an uncompressed point of 65 bytes (04||X||Y)")
            point = raw
        elif len(raw) == 64:
            point = b"\x04" + raw
        elif len(raw) == 65 and raw[0] == 4:
            point = raw
        else:
            raise ValueError(f"{len(raw)} bytes; an es256 key is X||Y, 64 bytes")
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return {1: 2, 3: -7, -1: 1, -2: point[1:33], -3: point[33:65]}
    if cose_type == "eddsa":
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes; an eddsa (Ed25519) key is 32 bytes")
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
        return {1: 1, 3: -8, -1: 6, -2: raw}
    if cose_type == "rs256":
        if len(raw) != 259:
            raise ValueError(f"{len(raw)} bytes; an rs256 key is a 256-byte modulus and a 3-byte exponent")
        n, e = int.from_bytes(raw[:256], "big"), int.from_bytes(raw[256:], "big")
        if n.bit_length() != 2048 or e < 3 or e % 2 == 0:
            raise ValueError("not an RSA-2048 public key")
        rsa.RSAPublicNumbers(e, n).public_key()
        return {1: 3, 3: -257, -1: raw[:256], -2: e.to_bytes((e.bit_length() + 7) // 8, "big")}
    raise ValueError(f"COSE type {cose_type!r}")


def _credential(number: int, index: int, user: str, text: str) -> U2fCredential:
    where = f"line {number}, key {index}"
    fields = text.split(",")
    if len(fields) == 2:
        handle_text, key_text = fields
        old = True
        cose_type, options_text = "es256", "+presence"
    elif len(fields) in (3, 4):
        handle_text, key_text, cose_type = fields[0], fields[1], fields[2].strip().lower()
        options_text = fields[3].strip() if len(fields) == 4 else "+presence"
        old = False
    else:
        raise InvalidInput(
            f"{where}: {len(fields)} comma-separated fields; expected KEYHANDLE,PUBLICKEY,COSETYPE,OPTIONS "
            "(or KEYHANDLE,PUBLICKEY from pam_u2f 1.0)"
        )
    handle_text, key_text = handle_text.strip(), key_text.strip()
    if handle_text == "*":
        raise InvalidInput(
            f"{where}: a resident credential (key handle '*'): the file does not hold its credential id, which "
            "mfaguard needs to ask the key for it; enroll this key again with "
            f"`mfa-admin enroll fido {user} --resident`"
        )
    if not old and cose_type not in COSE_TYPES:
        raise InvalidInput(f"{where}: COSE type {fields[2]!r}; pam_u2f writes es256, eddsa or rs256")
    if not _OPTIONS.fullmatch(options_text):
        raise InvalidInput(f"{where}: options {options_text!r}; pam_u2f writes a run of {', '.join(OPTIONS)}")
    handle = _websafe_b64(handle_text) if old else _b64(handle_text)
    if handle is None:
        alphabet = "web-safe base64 (pam_u2f 1.0)" if old else "base64"
        raise InvalidInput(f"{where}: the key handle is not {alphabet}")
    if not 16 <= len(handle) <= 1024:
        raise InvalidInput(f"{where}: the key handle is {len(handle)} bytes; a credential id has 16 to 1024")
    if old:
        if not _HEX.fullmatch(key_text):
            raise InvalidInput(f"{where}: the public key is not hex (pam_u2f 1.0 lines hold it in hex)")
        raw = bytes.fromhex(key_text)
    else:
        decoded = _b64(key_text)
        if decoded is None:
            raise InvalidInput(f"{where}: the public key is not base64")
        raw = decoded
    try:
        cose = cose_from_raw(cose_type, raw, old_format=old)
    except ValueError as exc:
        raise InvalidInput(f"{where}: the {cose_type} public key is not valid ({exc})") from None
    options = tuple(o for o in OPTIONS if o in options_text)
    return U2fCredential(number, index, user, handle, cose, cose_type, options, old)


def parse(data: bytes, where: str) -> AuthFile:
    """Every credential of the file, and every line that cannot be read in ``problems`` (by number).
    A caller imports nothing while ``problems`` is not empty (``AuthFile.check``)."""
    if len(data) > MAX_BYTES:
        return AuthFile([], [], [f"larger than {MAX_BYTES} bytes; not a pam_u2f authfile"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return AuthFile([], [], [f"not UTF-8 text (byte {exc.start})"])
    problems: list[str] = []
    credentials: list[U2fCredential] = []
    last_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        if not sep or not user.strip() or not rest.strip():
            problems.append(f"line {number}: expected USER:KEYHANDLE,PUBLICKEY,COSETYPE,OPTIONS[:...]")
            continue
        user = user.strip()
        last_line[user] = number
        for index, chunk in enumerate(rest.split(":"), start=1):
            try:
                credentials.append(_credential(number, index, user, chunk))
            except InvalidInput as exc:
                problems.append(str(exc))
    if not credentials and not problems:
        problems.append("the file holds no credential")
    superseded = sorted({(c.line, c.user) for c in credentials if c.line != last_line[c.user]})
    return AuthFile([c for c in credentials if c.line == last_line[c.user]], superseded, problems)
