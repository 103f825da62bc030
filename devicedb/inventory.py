"""The token inventory: vendor seed files in, tokens handed to users, tokens taken back or revoked.

An import is all-or-nothing: every token of a file is stored in one transaction, or
none (a bad line or package is reported by its position). Seeds are sealed like every
other secret, bound to the token's serial until it is assigned, then to its device.
"""

from __future__ import annotations

from devicedb.errors import InvalidInput, NotFound
from devicedb.importers import TokenRecord
from devicedb.kinds import hotp, totp, yubico
from devicedb.manage import add_device
from devicedb.models import Context
from devicedb.store import InventoryToken, Store
from devicedb.usernames import canonical_user


def _domain(kind: str) -> str:
    """Duplicate detection shares one space per secret family: OATH seeds, and Yubico AES keys."""
    return yubico.FINGERPRINT_DOMAIN if kind == "yubico" else totp.FINGERPRINT_DOMAIN


def _material(kind: str, secret: bytes) -> bytes:
    return secret[: yubico.KEY_BYTES] if kind == "yubico" else secret


class Inventory:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings

    def import_tokens(self, records: list[TokenRecord], source: str, context: Context) -> int:
        serials = [r.serial for r in records]
        seen: set[str] = set()
        for record in records:
            if record.serial in seen:
                raise InvalidInput(f"{record.position}: serial {record.serial} appears twice in the file")
            seen.add(record.serial)
        with self.store.transaction() as tx:
            for record in records:
                record.check()
                params: dict[str, object] = dict(record.params)
                if record.kind != "yubico" and len(record.secret) < 16:
                    params["weak"] = True
                tx.insert_token(
                    serial=record.serial,
                    kind=record.kind,
                    secret=record.secret,
                    fingerprint_material=_material(record.kind, record.secret),
                    fingerprint_domain=_domain(record.kind),
                    algorithm=record.algorithm,
                    digits=record.digits,
                    period=record.period,
                    counter=record.counter,
                    params=params,
                    source=source,
                    where=record.position or f"token {record.serial}",
                )
            tx.audit(
                "tokens_imported",
                None,
                context,
                reason=f"{len(records)} token(s) from {source}",
                detail={"serials": serials[:1000], "count": len(records)},
            )
        return len(records)

    def list(self, status: str | None = None) -> list[InventoryToken]:
        with self.store.transaction() as tx:
            return tx.tokens(status)

    def assign(self, serial: str, raw_user: str, context: Context) -> int:
        """Give a token to a user: it becomes one of their devices (the device limit applies)."""
        user = canonical_user(raw_user, self.settings.usernames)
        with self.store.transaction() as tx:
            token = tx.token(serial)
            if token.status != "unassigned":
                who = f" to {token.user}" if token.user else ""
                raise InvalidInput(f"token {serial} is {token.status}{who}; only unassigned tokens can be assigned")
            secret = tx.open_token_secret(token)
            params: dict[str, object] = {"serial": serial, **({"weak": True} if token.params.get("weak") else {})}
            material = _material(token.kind, secret)
            if token.kind == "hotp":
                params |= {"look_ahead": hotp.DEFAULT_LOOK_AHEAD, "resync_window": hotp.DEFAULT_RESYNC_WINDOW}
            elif token.kind == "totp":
                params["hardware"] = True
            elif token.kind == "yubico":
                params["public_id"] = token.params["public_id"]
            else:
                raise InvalidInput(f"token {serial} is of kind {token.kind}, which cannot be assigned")
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason=f"token {serial} assigned",
                detail={"serial": serial},
                user=user,
                kind=token.kind,
                label=f"{token.kind.upper()} token {serial}"[:64],
                secret=secret,
                fingerprint_domain=_domain(token.kind),
                fingerprint_material=material,
                algorithm=token.algorithm,
                digits=token.digits,
                period=token.period,
                next_counter=token.counter if token.kind in ("hotp", "yubico") else None,
                params=params,
            )
            tx.restore_replay_state(
                device_id,
                last_step=token.params.get("last_step"),
                drift=int(token.params.get("drift") or 0),
            )
            tx.set_token_status(serial, "assigned", user, device_id)
            tx.audit("token_assigned", user, context, device_id=device_id, reason=f"token {serial}")
        return device_id

    def _take_back(self, serial: str, context: Context, status: str) -> InventoryToken:
        with self.store.transaction() as tx:
            token = tx.token(serial)
            if token.status == "revoked":
                raise InvalidInput(f"token {serial} is revoked")
            if status == "unassigned" and token.status != "assigned":
                raise InvalidInput(f"token {serial} is not assigned")
            if token.device_id is not None and token.user is not None:
                try:
                    tx.remove(token.user, token.device_id)
                except NotFound:
                    pass  # the device was removed by hand already
                else:
                    # Tx.remove kept the token's replay state: its codes used so far stay used.
                    verb = "revoked" if status == "revoked" else "unassigned"
                    tx.audit(
                        "device_removed",
                        token.user,
                        context,
                        device_id=token.device_id,
                        reason=f"token {serial} {verb}",
                    )
            tx.set_token_status(serial, status, None, None)
            event = "token_revoked" if status == "revoked" else "token_unassigned"
            tx.audit(event, token.user, context, reason=f"token {serial}")
        return token

    def unassign(self, serial: str, context: Context) -> InventoryToken:
        return self._take_back(serial, context, "unassigned")

    def revoke(self, serial: str, context: Context) -> InventoryToken:
        return self._take_back(serial, context, "revoked")
