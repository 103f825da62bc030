"""CSV seed files: one token a line, ``serial,seed,type,digits,period-or-counter``.

The seed is hex or base32; type is hotp or totp; the last field is the HOTP counter or
the TOTP period. Blank lines and lines starting with # are skipped; so is a first line
that names the columns (``serial,...``).
"""

from __future__ import annotations

import csv
import io

from devicedb.errors import InvalidInput
from devicedb.importers import TokenRecord, parse_seed


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
        if len(cells) != 5:
            raise InvalidInput(f"{where}: {len(cells)} fields; expected serial,seed,type,digits,period-or-counter")
        serial, seed, kind, digits_text, last = cells
        kind = kind.lower()
        try:
            digits, last_value = int(digits_text), int(last)
        except ValueError:
            raise InvalidInput(f"{where}: digits and period-or-counter must be whole numbers") from None
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
