"""PSKC (RFC 6030) key containers: plain seeds, seeds encrypted under a pre-shared AES key, and
password-based (PBKDF2) encryption. Every encrypted seed's MAC is checked.

Element names are matched by local name, so either the default namespace or a ``pskc:``
prefix works. A document type declaration is refused outright (no entities, no external
references).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import xml.etree.ElementTree as ET  # noqa: S405 - DOCTYPE is refused before parsing
from collections.abc import Iterator

from devicedb.errors import InvalidInput
from devicedb.importers import TokenRecord, parse_count

_ALGORITHMS = {
    "urn:ietf:params:xml:ns:keyprov:pskc:hotp": "hotp",
    "urn:ietf:params:xml:ns:keyprov:pskc#hotp": "hotp",
    "urn:ietf:params:xml:ns:keyprov:pskc:totp": "totp",
    "urn:ietf:params:xml:ns:keyprov:pskc#totp": "totp",
}
_CIPHERS = {
    "http://www.w3.org/2001/04/xmlenc#aes128-cbc": 16,
    "http://www.w3.org/2001/04/xmlenc#aes192-cbc": 24,
    "http://www.w3.org/2001/04/xmlenc#aes256-cbc": 32,
}
_MACS = {
    "http://www.w3.org/2000/09/xmldsig#hmac-sha1": hashlib.sha1,
    "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256": hashlib.sha256,
}
_PBKDF2 = "http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#pbkdf2"
MAX_BYTES = 16 << 20


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in elem if _local(child.tag) == name)


def _find(elem: ET.Element | None, *path: str) -> ET.Element | None:
    for name in path:
        if elem is None:
            return None
        elem = next(_children(elem, name), None)
    return elem


def _text(elem: ET.Element | None) -> str | None:
    return None if elem is None or elem.text is None else "".join(elem.text.split())


def _b64(text: str | None, where: str) -> bytes:
    try:
        return base64.b64decode(text or "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where}: not valid base64") from None


def _decrypt(key: bytes, blob: bytes, where: str) -> bytes:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(blob) < 32 or len(blob) % 16:
        raise InvalidInput(f"{where}: the encrypted value is not IV + whole AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(blob[:16])).decryptor()
    padded = decryptor.update(blob[16:]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise InvalidInput(f"{where}: does not decrypt (wrong key or password?)") from None


def _number(data: ET.Element | None, name: str, default: int, where: str) -> int:
    text = _text(_find(data, name, "PlainValue"))
    return default if text is None else parse_count(text, where, name)


class _Keys:
    def __init__(self, root: ET.Element, key: bytes | None, password: str | None) -> None:
        self.encryption_key: bytes | None = None
        encryption = _find(root, "EncryptionKey")
        if encryption is not None:
            derived = _find(encryption, "DerivedKey")
            if derived is not None:
                method = _find(derived, "KeyDerivationMethod")
                if method is None or method.get("Algorithm") != _PBKDF2:
                    raise InvalidInput("EncryptionKey: only PBKDF2 key derivation is supported")
                params = _find(method, "PBKDF2-params")
                salt = _b64(_text(_find(params, "Salt", "Specified")), "PBKDF2 salt")
                try:
                    iterations = int(_text(_find(params, "IterationCount")) or "")
                    length = int(_text(_find(params, "KeyLength")) or "")
                except ValueError:
                    raise InvalidInput("PBKDF2-params: IterationCount and KeyLength must be numbers") from None
                if not 1 <= iterations <= 10_000_000 or length not in (16, 24, 32):
                    raise InvalidInput("PBKDF2-params: IterationCount or KeyLength out of range")
                if password is None:
                    raise InvalidInput("this file is encrypted with a password: give it with --password")
                self.encryption_key = hashlib.pbkdf2_hmac("sha1", password.encode("utf-8"), salt, iterations, length)
            else:
                if key is None:
                    name = _text(_find(encryption, "KeyName")) or "a pre-shared key"
                    raise InvalidInput(f"this file is encrypted under {name}: give the key with --key-file")
                self.encryption_key = key
        self.mac_key: bytes | None = None
        self.mac_hash = None
        mac_method = _find(root, "MACMethod")
        if mac_method is not None:
            self.mac_hash = _MACS.get(mac_method.get("Algorithm", ""))
            if self.mac_hash is None:
                raise InvalidInput(f"MACMethod {mac_method.get('Algorithm')!r} is not supported")
            mac_key = _find(mac_method, "MACKey")
            if mac_key is None:
                raise InvalidInput("MACMethod has no MACKey")
            if _find(mac_key, "CipherData") is None:
                # Anybody who edits the file could recompute a MAC under a key written in the clear.
                raise InvalidInput("MACMethod's MACKey is not encrypted, so the MAC proves nothing; refused")
            self.mac_key = self.value(mac_key, "MACKey")

    def value(self, holder: ET.Element, where: str) -> bytes:
        """The bytes of an element that holds either a CipherData or a PlainValue."""
        cipher = _find(holder, "CipherData", "CipherValue")
        if cipher is None:
            return _b64(_text(_find(holder, "PlainValue")), where)
        method = _find(holder, "EncryptionMethod")
        size = _CIPHERS.get("" if method is None else method.get("Algorithm", ""))
        if size is None:
            raise InvalidInput(f"{where}: only AES-CBC encryption (xmlenc aes128/192/256-cbc) is supported")
        if self.encryption_key is None or len(self.encryption_key) != size:
            raise InvalidInput(f"{where}: encrypted, but no key of {size * 8} bits was given")
        return _decrypt(self.encryption_key, _b64(_text(cipher), where), where)


def parse(data: bytes, *, key: bytes | None = None, password: str | None = None) -> list[TokenRecord]:
    if len(data) > MAX_BYTES:
        raise InvalidInput(f"the file is larger than {MAX_BYTES} bytes")
    try:
        data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        # Only UTF-8 is accepted, so that the document-type check below sees the text as it is.
        raise InvalidInput("the file is not UTF-8; PSKC files from token vendors are") from None
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise InvalidInput("the file has a document type declaration; PSKC files have none")
    try:
        root = ET.fromstring(data)  # noqa: S314 - no DTD, so no entities
    except ET.ParseError as exc:
        raise InvalidInput(f"not well-formed XML: {exc}") from None
    if _local(root.tag) != "KeyContainer":
        raise InvalidInput(f"the root element is {_local(root.tag)!r}, not a PSKC KeyContainer")
    keys = _Keys(root, key, password)
    records = []
    for number, package in enumerate(_children(root, "KeyPackage"), start=1):
        where = f"KeyPackage {number}"
        key_elem = _find(package, "Key")
        if key_elem is None:
            raise InvalidInput(f"{where}: no Key")
        kind = _ALGORITHMS.get(key_elem.get("Algorithm", ""))
        if kind is None:
            raise InvalidInput(f"{where}: algorithm {key_elem.get('Algorithm')!r} is not HOTP or TOTP")
        serial = _text(_find(package, "DeviceInfo", "SerialNo")) or key_elem.get("Id") or ""
        fmt = _find(key_elem, "AlgorithmParameters", "ResponseFormat")
        if fmt is not None and fmt.get("Encoding", "DECIMAL") != "DECIMAL":
            raise InvalidInput(f"{where}: response encoding {fmt.get('Encoding')!r}; only DECIMAL codes are supported")
        try:
            digits = int(fmt.get("Length", "6")) if fmt is not None else 6
        except ValueError:
            raise InvalidInput(f"{where}: ResponseFormat Length is not a number") from None
        suite = (_text(_find(key_elem, "AlgorithmParameters", "Suite")) or "HMAC-SHA1").upper()
        algorithm = {"HMAC-SHA1": "sha1", "HMAC-SHA256": "sha256", "HMAC-SHA512": "sha512"}.get(suite)
        if algorithm is None:
            raise InvalidInput(f"{where}: Suite {suite!r} is not supported")
        data_elem = _find(key_elem, "Data")
        secret_elem = _find(data_elem, "Secret")
        if secret_elem is None:
            raise InvalidInput(f"{where}: no Secret")
        encrypted = _find(secret_elem, "EncryptedValue")
        if encrypted is not None:
            blob = _b64(_text(_find(encrypted, "CipherData", "CipherValue")), f"{where} Secret")
            if keys.mac_key is None or keys.mac_hash is None:
                raise InvalidInput(f"{where}: the seed is encrypted but the file has no MACMethod to check it")
            given = _b64(_text(_find(secret_elem, "ValueMAC")), f"{where} ValueMAC")
            expected = hmac.new(keys.mac_key, blob, keys.mac_hash).digest()
            if not hmac.compare_digest(given, expected):
                raise InvalidInput(f"{where}: the seed's MAC does not match (a damaged file, or the wrong key)")
            secret = keys.value(encrypted, f"{where} Secret")
        else:
            secret = keys.value(secret_elem, f"{where} Secret")

        record = TokenRecord(
            serial=serial,
            kind=kind,
            secret=secret,
            algorithm=algorithm,
            digits=digits,
            period=_number(data_elem, "TimeInterval", 30, where) if kind == "totp" else None,
            counter=_number(data_elem, "Counter", 0, where) if kind == "hotp" else None,
            position=where,
        )
        record.check()
        records.append(record)
    if not records:
        raise InvalidInput("the file holds no KeyPackage")
    return records
