"""CSV seed files: one token a line, ``serial,seed,type,digits,period-or-counter``.

The seed is hex or base32; type is hotp or totp; the last field is the HOTP counter or
the TOTP period. Blank lines and lines starting with # are skipped; so is a first line
that names the columns (``serial,...``).

The YubiKey Personalization Tool's log ("Yubico format") is read too, one programmed slot
a line: ``Yubico OTP,TIME,SLOT,PUBLIC-ID(modhex),PRIVATE-ID(hex),AES-KEY(hex),...`` and
``OATH-HOTP,TIME,SLOT,TOKEN-ID(modhex),,HMAC-KEY(hex),...``. The public id (token id) is
the serial. Its LOGGING START lines are skipped; static passwords and challenge-response
slots carry no one-time codes and are refused.
"""

from __future__ import annotations

import csv
import io

from devicedb.errors import InvalidInput
from devicedb.importers import TokenRecord, parse_count, parse_seed

_YUBICO_TYPES = ("Yubico OTP", "OATH-HOTP", "Static Password", "Challenge-Response")


def _yubico_line(cells: list[str], where: str) -> TokenRecord | None:
    from devicedb.kinds import yubico

    kind = cells[0]
    if kind.startswith("LOGGING"):
        return None
    if kind not in ("Yubico OTP", "OATH-HOTP"):
        raise InvalidInput(f"{where}: a {kind} slot has no one-time codes; only Yubico OTP and OATH-HOTP lines import")
    if len(cells) < 6:
        raise InvalidInput(f"{where}: {len(cells)} fields; a Yubico log line has at least 6")
    public_id, private_hex, key_hex = cells[3].lower(), cells[4], cells[5]
    if not public_id:
        raise InvalidInput(f"{where}: no public id (token identifier) to use as the serial")
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise InvalidInput(f"{where}: the secret key is not hex") from None
    if kind == "Yubico OTP":
        try:
            private_id = bytes.fromhex(private_hex)
        except ValueError:
            raise InvalidInput(f"{where}: the private id is not hex") from None
        yubico.validate(public_id, private_id, key)
        # The private id is part of the secret: it is sealed with the AES key, not kept beside it.
        record = TokenRecord(
            serial=public_id, kind="yubico", secret=key + private_id, params={"public_id": public_id}, position=where
        )
    else:
        digits = int(cells[11]) if len(cells) > 11 and cells[11] in ("6", "8") else 6
        record = TokenRecord(serial=public_id, kind="hotp", secret=key, digits=digits, counter=0, position=where)
    record.check()
    return record


def parse(data: bytes) -> list[TokenRecord]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the file is not UTF-8 (byte {exc.start})") from None
    records = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        where = f"line {number}"
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower() == "serial":
            continue
        if cells[0] in _YUBICO_TYPES or cells[0].startswith("LOGGING"):
            record = _yubico_line(cells, where)
            if record is not None:
                records.append(record)
            continue
        if len(cells) != 5:
            raise InvalidInput(f"{where}: {len(cells)} fields; expected serial,seed,type,digits,period-or-counter")
        serial, seed, kind, digits_text, last = cells
        kind = kind.lower()
        digits = parse_count(digits_text, where, "digits")
        last_value = parse_count(last, where, "period-or-counter")
        record = TokenRecord(
            serial=serial,
            kind=kind,
            secret=parse_seed(seed, where),
            digits=digits,
            period=last_value if kind == "totp" else None,
            counter=last_value if kind == "hotp" else None,
            position=where,
        )
        record.check()
        records.append(record)
    if not records:
        raise InvalidInput("the file holds no token")
    return records
