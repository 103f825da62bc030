"""mfa-admin: enroll and manage second factors, and read the audit log.

An adapter over devicedb: it parses arguments, calls the core and prints. It
holds no policy of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import os
import pwd
import re
import signal
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from devicedb import errors
from devicedb.kinds import hotp
from devicedb.manage import DeviceManager
from devicedb.models import Context, Device, Requirement, Result
from devicedb.settings import Settings, load_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_FILES = 4
EXIT_REFUSED = 5
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    a negative answer: code rejected, enrollment not confirmed, audit log
       tampered with, or (report) an account without an active device
  2    usage error: unknown command or bad arguments
  3    configuration error: the settings file is missing, unsafe or invalid
  4    database, key file or folder problem: not initialised, unsafe mode or
       owner, symlink, schema too new, locked or unreadable
  5    refused: no such device, device limit reached, secret already
       enrolled, invalid user name or value
  130  interrupted
"""

CONFIRM_TRIES = 3


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, errors.ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, errors.UnsafePathError | errors.KeyFileError | errors.SchemaError | errors.DatabaseError):
        return EXIT_FILES
    if isinstance(exc, errors.SealError):
        return EXIT_FILES
    return EXIT_REFUSED


def admin_context() -> Context:
    """Who is acting, for the audit log: the sudo caller if any, else the login name."""
    who = os.environ.get("SUDO_USER")
    if not who:
        try:
            who = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            who = f"uid {os.getuid()}"
    tty = None
    try:
        tty = os.ttyname(sys.stdin.fileno()) if sys.stdin.isatty() else None
    except (OSError, ValueError):
        tty = None
    return Context(service="mfa-admin", ruser=who, tty=tty)


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


_RELATIVE = re.compile(r"(\d+)([smhdw])", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SINCE_SECONDS = 36_500 * 86400  # a relative --since reaches back at most about 100 years


def parse_since(text: str, now: float) -> float:
    """`30m`, `2h`, `7d`, `1w`, a date `2026-12-01` or a time `2026-12-01T08:00:00Z` (UTC if no zone)."""
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        if len(m.group(1)) > 12 or int(m.group(1)) * _UNITS[m.group(2)] > MAX_SINCE_SECONDS:
            raise CliError(
                f"--since {_shown(text)} reaches back more than {MAX_SINCE_SECONDS // 86400:,} days; "
                "use a smaller amount (30m, 2h, 7d, 1w) or a date such as 2026-12-01",
                EXIT_USAGE,
            )
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--since {_shown(text)} is not understood; use 30m, 2h, 7d, 1w, 2026-12-01 or 2026-12-01T08:00:00Z",
            EXIT_USAGE,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences from a remote host name,
    say) are shown as \\xNN instead of being sent to the admin's terminal."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _print_table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() + "\n")


def _device_params(d: Device) -> str:
    parts = []
    if d.kind == "totp":
        parts.append(f"{d.digits} digits, {(d.algorithm or 'sha1').upper()}, {d.period}s")
    elif d.kind == "fido2":
        protocol = "FIDO2 (U2F)" if d.params.get("protocol") == "u2f" else "FIDO2"
        parts.append(f"{protocol}, RP {d.params.get('rp_id')}, UV {d.params.get('uv')}, sign count {d.sign_count}")
    elif d.kind == "ssh-sk":
        parts.append(f"{d.params.get('key_type')}, options {','.join(d.params.get('options', [])) or 'none'}")
    elif d.kind == "yubico":
        parts.append(f"public id {d.params.get('public_id')}, next counter {d.next_counter}")
    elif d.kind == "hotp":
        parts.append(f"{d.digits} digits, {(d.algorithm or 'sha1').upper()}, next counter {d.next_counter}")
    if d.drift or d.params.get("hardware"):
        parts.append(f"drift {d.drift:+d} steps")
    if d.params.get("weak"):
        parts.append("WEAK secret")
    return "; ".join(parts)


class App:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self._settings: Settings | None = None
        self._store: Store | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.args.config)
        return self._settings

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- init ----------------------------------------------------------------------------
    def cmd_init(self) -> int:
        report = Store.initialise(self.settings, allow_new_database_with_old_key=self.args.force)
        db = self.settings.database
        for folder in report.created_folders:
            self.say(f"created folder {folder} (mode 0700)")
        self.say(f"{'created' if report.created_key else 'kept existing'} key file {db.key_file}")
        if report.created_key:
            self.say("  back this key up offline: without it no enrolled secret can be used")
        self.say(f"{'created' if report.created_database else 'kept existing'} database {db.path}")
        if report.migrated_to:
            self.say(f"schema now at version {report.migrated_to[-1]}")
        else:
            self.say("schema already current")
        if self.settings.source is None:
            self.say("note: no settings file found; the built-in defaults were used (see config/mfaguard.yaml)")
        return EXIT_OK

    # -- enroll ----------------------------------------------------------------------------
    def cmd_enroll_totp(self) -> int:
        a = self.args
        if a.no_confirm:
            return self._enroll_totp(pending=False)
        # A hangup (dropped SSH session) or SIGTERM at the prompt must not leave a pending
        # device behind to hold a slot: turn them into an interruption that discards it.
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}

        def interrupted(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in previous:
            signal.signal(sig, interrupted)
        try:
            return self._enroll_totp(pending=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _enroll_totp(self, *, pending: bool) -> int:
        a = self.args
        manager = DeviceManager(self.store)
        ctx = admin_context()
        self._warn_if_not_an_account(a.user)
        enrollment = manager.enroll_totp(
            a.user,
            ctx,
            label=a.label,
            digits=a.digits,
            algorithm=a.algorithm,
            period=a.period,
            pending=pending,
        )
        device = enrollment.device
        try:
            if not a.no_qr:
                import segno

                self.say(f"Scan this QR code with the authenticator app of {device.user}:")
                segno.make(enrollment.uri, error="m").terminal(out=self.out, compact=True)
            self.say(f"otpauth URI: {enrollment.uri}")
            self.say(f"Secret for manual entry: {enrollment.secret_b32}")
            self.say(f"Parameters: {_device_params(device)}")
            if not pending:
                self.say(f"Device {device.id} ({device.label}) is active for {device.user}.")
                return EXIT_OK
            verifier = Verifier(self.settings, store=self.store)
            entered = 0
            for attempt in range(1, CONFIRM_TRIES + 1):
                try:
                    code = input(f"Enter the current code from the app ({attempt}/{CONFIRM_TRIES}): ")
                except EOFError:
                    break
                entered += 1
                decision = verifier.confirm_enrollment(device.user, device.id, code.strip(), ctx)
                if decision.accepted:
                    self.say(f"Code verified. Device {device.id} ({device.label}) is active for {device.user}.")
                    return EXIT_OK
                self.say(f"That code did not verify ({decision.reason}).")
        except KeyboardInterrupt:
            if pending:
                manager.discard_pending(device.user, device.id, ctx)
                self.err.write("\ninterrupted: the enrollment was discarded\n")
            return EXIT_INTERRUPTED
        except BaseException:
            if pending:
                manager.discard_pending(device.user, device.id, ctx)
            raise
        manager.discard_pending(device.user, device.id, ctx)
        if not entered:
            self.err.write(
                "\nmfa-admin: no code was entered (standard input ended at the prompt), so the enrollment "
                "was not confirmed and the pending device was discarded. Run the command again where you "
                "can type a code from the app (or use --no-confirm in scripts).\n"
            )
            return EXIT_REJECTED
        self.err.write(
            "mfa-admin: enrollment not confirmed; the device was discarded. Check the phone's clock "
            "and run the command again (or use --no-confirm in scripts).\n"
        )
        return EXIT_REJECTED

    def cmd_enroll_hotp(self) -> int:
        a = self.args
        self._warn_if_not_an_account(a.user)
        secret = read_seed(a.secret_file)
        device = DeviceManager(self.store).enroll_hotp(
            a.user,
            admin_context(),
            secret=secret,
            label=a.label,
            digits=a.digits,
            algorithm=a.algorithm,
            counter=a.counter,
            look_ahead=a.look_ahead,
            resync_window=a.resync_window,
        )
        self.say(f"Device {device.id} ({device.label}) is active for {device.user}: {_device_params(device)}.")
        if device.params.get("weak"):
            self.err.write("warning: this secret is shorter than 128 bits; it is kept and flagged weak\n")
        return EXIT_OK

    def cmd_enroll_yubico(self) -> int:
        a = self.args
        self._warn_if_not_an_account(a.user)
        key = read_seed(a.secret_file, prompt="AES key (32 hex digits): ")
        try:
            private_id = bytes.fromhex(a.private_id)
        except ValueError:
            raise CliError(f"--private-id {a.private_id!r} is not hex (12 hex digits)", EXIT_REFUSED) from None
        device = DeviceManager(self.store).enroll_yubico(
            a.user, admin_context(), public_id=a.public_id, private_id=private_id, aes_key=key, label=a.label
        )
        self.say(f"Device {device.id} ({device.label}) is active for {device.user}: {_device_params(device)}.")
        return EXIT_OK

    def cmd_enroll_ssh_key(self) -> int:
        a = self.args
        line = read_input_line(a.file, "public key")
        device = DeviceManager(self.store).enroll_ssh_key(a.user, line, admin_context(), label=a.label)
        self._warn_if_not_an_account(a.user)
        options = ", ".join(device.params.get("options", [])) or "none"
        self.say(
            f"Device {device.id} ({device.label}) is active for {device.user}: {device.params['key_type']}, "
            f"options {options}. sshd learns it through `mfa-admin authorized-keys {device.user}`."
        )
        return EXIT_OK

    def cmd_enroll_fido(self) -> int:
        a = self.args
        from devicedb.kinds import fido2_key
        from pam_module.fido import attached_keys

        manager = DeviceManager(self.store)
        # Every argument is checked before any key is looked for, touched or asked for its PIN.
        manager.check_fido_enrollment(a.user, label=a.label, uv=a.uv, rp_id=a.rp_id)
        self._warn_if_not_an_account(a.user)
        keys = attached_keys()
        if not keys:
            raise CliError(
                "no FIDO2 key found on this machine's USB (neither a FIDO2 nor a U2F security key); plug one in "
                "and run the command again",
                EXIT_REFUSED,
            )

        def ask_pin() -> str | None:
            # Asked only when the key has a PIN. Never an argument, never logged or echoed.
            if a.pin_stdin:
                return sys.stdin.readline().rstrip("\r\n") or None
            try:
                return getpass.getpass("PIN of the security key: ")
            except EOFError:
                return None

        try:
            device = manager.enroll_fido(
                a.user,
                keys[0],
                admin_context(),
                label=a.label,
                uv=a.uv,
                resident=a.resident,
                rp_id=a.rp_id,
                pin=ask_pin,
                touch=lambda: self.say("Touch your security key..."),
            )
        except fido2_key.PinRejected as exc:
            raise CliError(f"{exc}; nothing was stored", EXIT_REJECTED) from None
        how = {"pin": "the key's PIN", "built-in": "the key's built-in verification"}.get(
            str(device.params.get("enrollment_uv")), "none"
        )
        u2f = " (a U2F key: a touch at every login, no PIN)" if device.params.get("protocol") == "u2f" else ""
        self.say(
            f"Device {device.id} ({device.label}) is active for {device.user}: {_device_params(device)}; "
            f"user verified at enrollment: {how}{u2f}."
        )
        return EXIT_OK

    def cmd_authorized_keys(self) -> int:
        for line in DeviceManager(self.store).authorized_keys(self.args.user):
            self.say(line)
        return EXIT_OK

    def cmd_devices_resync(self) -> int:
        a = self.args
        manager = DeviceManager(self.store)
        result = manager.resync(a.user, a.device, a.code1, a.code2, admin_context())
        device = next(d for d in manager.list_devices(a.user) if d.id == a.device)
        if device.kind == "hotp":
            self.say(f"device {a.device} re-synchronised; next counter {result}")
        else:
            self.say(f"device {a.device} re-synchronised; clock drift {result:+d} steps")
        return EXIT_OK

    def cmd_enroll_totp_token(self) -> int:
        a = self.args
        self._warn_if_not_an_account(a.user)
        secret = read_seed(a.secret_file)
        enrollment = DeviceManager(self.store).enroll_totp(
            a.user,
            admin_context(),
            label=a.label,
            digits=a.digits,
            algorithm=a.algorithm,
            period=a.period,
            pending=False,
            secret=secret,
            hardware=True,
        )
        device = enrollment.device
        self.say(f"Device {device.id} ({device.label}) is active for {device.user}: {_device_params(device)}.")
        if device.params.get("weak"):
            self.err.write("warning: this secret is shorter than 128 bits; it is kept and flagged weak\n")
        return EXIT_OK

    # -- devices ------------------------------------------------------------------------------
    def cmd_devices_list(self) -> int:
        manager = DeviceManager(self.store)
        devices = manager.list_devices(self.args.user)
        if self.args.json:
            json.dump([d.public_dict() for d in devices], self.out, indent=2)
            self.say()
            return EXIT_OK
        if not devices:
            self.say("no devices" + (f" for {manager.canonical(self.args.user)}" if self.args.user else ""))
            return EXIT_OK
        rows = [["ID", "USER", "KIND", "LABEL", "STATUS", "PARAMETERS", "CREATED", "LAST USED"]]
        for d in devices:
            rows.append(
                [
                    str(d.id),
                    d.user,
                    d.kind,
                    d.label,
                    d.status,
                    _device_params(d),
                    iso(d.created_at),
                    iso(d.last_used_at),
                ]
            )
        _print_table(rows, self.out)
        return EXIT_OK

    def _warn_if_not_an_account(self, raw_user: str) -> None:
        """A name the passwd database does not know is only a warning: a RADIUS user needs no local
        account. An invalid name is refused here, before anything else happens."""
        user = DeviceManager(self.store).canonical(raw_user)
        try:
            pwd.getpwnam(user)
        except KeyError:
            self.err.write(
                f"warning: {printable(user)!r} is not an account on this system (no passwd entry); that is "
                "expected only for a RADIUS user without a local account, so check the spelling\n"
            )
            self.err.flush()

    def _warn_if_last(self, user: str) -> None:
        manager = DeviceManager(self.store)
        if manager.active_device_count(user) == 0:
            name = manager.canonical(user)
            left = self.store.backup_codes_left(name)
            backup = f" except with one of {left} backup codes" if left else ""
            self.err.write(f"warning: {name} has no active device left and cannot log in{backup}\n")

    def cmd_devices_enable(self) -> int:
        changed = DeviceManager(self.store).set_enabled(self.args.user, self.args.device, True, admin_context())
        self.say(f"device {self.args.device} " + ("enabled" if changed else "was already enabled"))
        return EXIT_OK

    def cmd_devices_disable(self) -> int:
        changed = DeviceManager(self.store).set_enabled(
            self.args.user, self.args.device, False, admin_context(), force=self.args.force
        )
        self.say(f"device {self.args.device} " + ("disabled" if changed else "was already disabled"))
        if changed:
            self._warn_if_last(self.args.user)
        return EXIT_OK

    def cmd_devices_remove(self) -> int:
        device = DeviceManager(self.store).remove(
            self.args.user, self.args.device, admin_context(), force=self.args.force
        )
        self.say(f"removed device {device.id} ({device.kind}, {device.label}) of {device.user}")
        self._warn_if_last(self.args.user)
        return EXIT_OK

    def cmd_devices_rename(self) -> int:
        label = DeviceManager(self.store).rename(self.args.user, self.args.device, self.args.label, admin_context())
        self.say(f"device {self.args.device} is now labelled {label!r}")
        return EXIT_OK

    # -- backup codes, unlock, verify, status ------------------------------------------------
    def cmd_backup_codes_generate(self) -> int:
        self._warn_if_not_an_account(self.args.user)
        manager = DeviceManager(self.store)
        codes = manager.generate_backup_codes(self.args.user, admin_context())
        user = manager.canonical(self.args.user)
        self.say(f"Backup codes for {user}. Each works once. They are shown only now; any older set is void.")
        for code in codes:
            self.say(f"  {code}")
        return EXIT_OK

    def cmd_unlock(self) -> int:
        self._warn_if_not_an_account(self.args.user)
        manager = DeviceManager(self.store)
        before = manager.unlock(self.args.user, admin_context())
        user = manager.canonical(self.args.user)
        if before.hard_locked or before.locked_until:
            self.say(f"unlocked {user} (was {'hard-' if before.hard_locked else ''}locked); failure counters reset")
        else:
            self.say(f"{user} was not locked; failure counters reset")
        return EXIT_OK

    def cmd_verify(self) -> int:
        DeviceManager(self.store).canonical(self.args.user)  # an invalid name is refused (exit 5), not audited
        code = self.args.code
        if code is None or code == "-":
            code = getpass.getpass("Code: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
        if not code:
            raise CliError("no code given; give the code as CODE, or on standard input", EXIT_USAGE)
        verifier = Verifier(self.settings, store=self.store)
        decision = verifier.verify(self.args.user, code, admin_context())
        if decision.result is Result.ERROR:
            self.say(f"error: {printable(decision.reason)}")
            return EXIT_FILES
        if decision.accepted:
            which = f"device {decision.device_id}" if decision.device_id else decision.reason
            self.say(f"accepted ({which})")
            return EXIT_OK
        self.say(f"rejected: {decision.reason}")
        return EXIT_REJECTED

    def cmd_status(self) -> int:
        status = DeviceManager(self.store).status(self.args.user)
        data = status.as_dict()
        if self.args.json:
            json.dump(data, self.out, indent=2)
            self.say()
            return EXIT_OK
        self.say(f"user:            {data['user']}")
        self.say(f"requirement:     {data['requirement']} ({data['requirement_reason']})")
        self.say(f"active devices:  {data['active_devices']} of {len(status.devices)}")
        for d in status.devices:
            self.say(f"  {d.id}: {d.kind} {d.label!r} {d.status}, last used {iso(d.last_used_at)}")
        lock = (
            "hard-locked (run mfa-admin unlock)"
            if data["hard_locked"]
            else (f"locked until {data['locked_until']}" if data["locked"] else "not locked")
        )
        self.say(f"lock:            {lock}")
        self.say(f"failures:        {data['failures']} (consecutive {data['consecutive_failures']})")
        self.say(f"last success:    {data['last_success_at'] or '-'}")
        self.say(f"backup codes:    {data['backup_codes_left']} left")
        return EXIT_OK

    # -- report ------------------------------------------------------------------------------
    def cmd_report(self) -> int:
        from mfa_admin.report import coverage

        result = coverage(self.store)
        if self.args.json:
            json.dump(result, self.out, indent=2)
            self.say()
        else:
            rows = [["ACCOUNT", "UID", "SHELL", "STATUS", "ACTIVE", "NOTE"]]
            for acct in result["accounts"]:
                rows.append(
                    [
                        acct["user"],
                        str(acct["uid"]),
                        acct["shell"],
                        acct["status"],
                        str(acct["active_devices"]),
                        acct["note"],
                    ]
                )
            _print_table(rows, self.out)
            self.say()
            self.say(
                f"coverage: {result['covered']} of {result['total']} login-capable accounts have an active device"
                f" ({result['exempt']} exempt)"
            )
            if result["uncovered"]:
                self.say("without an active device: " + ", ".join(result["uncovered"]))
        return EXIT_REJECTED if result["uncovered"] else EXIT_OK

    # -- token inventory ---------------------------------------------------------------------
    def _inventory(self) -> Any:
        from devicedb.inventory import Inventory

        return Inventory(self.store)

    def cmd_tokens_import(self) -> int:

        from devicedb.importers import csvfile, pskc

        a = self.args
        data = read_input_file(a.file, 64 << 20, f"{a.format} token file")
        if a.format == "pskc":
            key = None
            if a.key_file:
                key = read_seed(a.key_file, prompt="")
            password = None
            if a.password_file:
                password = read_input_line(a.password_file, "password", 4096).rstrip("\r\n")
            elif a.password:
                password = (
                    getpass.getpass("PSKC password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
                )
            records = pskc.parse(data, key=key, password=password)
        else:
            records = csvfile.parse(data)
        count = self._inventory().import_tokens(records, f"{a.format}:{os.path.basename(a.file)}", admin_context())
        self.say(f"imported {count} token(s) from {a.file} into the inventory (unassigned)")
        weak = [r.serial for r in records if len(r.secret) < 16]
        if weak:
            self.err.write(
                f"warning: {len(weak)} token(s) have seeds under 128 bits, flagged weak: {', '.join(weak)}\n"
            )
        return EXIT_OK

    def cmd_tokens_list(self) -> int:
        tokens = self._inventory().list("unassigned" if self.args.unassigned else None)
        if self.args.json:
            json.dump([t.public_dict() for t in tokens], self.out, indent=2)
            self.say()
            return EXIT_OK
        if not tokens:
            self.say("no tokens")
            return EXIT_OK
        rows = [["SERIAL", "KIND", "PARAMETERS", "STATUS", "USER", "DEVICE", "IMPORTED", "SOURCE"]]
        for t in tokens:
            detail = f"{t.digits} digits, {(t.algorithm or 'sha1').upper()}"
            detail += f", {t.period}s" if t.kind == "totp" else f", counter {t.counter}"
            if t.params.get("weak"):
                detail += ", WEAK seed"
            rows.append(
                [
                    t.serial,
                    t.kind,
                    detail,
                    t.status,
                    t.user or "-",
                    str(t.device_id or "-"),
                    iso(t.imported_at),
                    t.source or "-",
                ]
            )
        _print_table(rows, self.out)
        return EXIT_OK

    def cmd_tokens_assign(self) -> int:
        self._warn_if_not_an_account(self.args.user)
        device_id = self._inventory().assign(self.args.serial, self.args.user, admin_context())
        self.say(
            f"token {self.args.serial} assigned to {DeviceManager(self.store).canonical(self.args.user)} "
            f"as device {device_id}"
        )
        return EXIT_OK

    def cmd_tokens_unassign(self) -> int:
        token = self._inventory().unassign(self.args.serial, admin_context())
        self.say(f"token {token.serial} taken back from {token.user}; it is unassigned again")
        return EXIT_OK

    def cmd_tokens_revoke(self) -> int:
        token = self._inventory().revoke(self.args.serial, admin_context())
        self.say(f"token {token.serial} revoked" + (f" and removed from {token.user}" if token.user else ""))
        return EXIT_OK

    # -- migration -----------------------------------------------------------------------------
    def _migrate_one(self, user: str, path: str) -> list[str]:
        from devicedb.importers import google_authenticator

        owner: int | None
        try:
            owner = pwd.getpwnam(user).pw_uid
        except KeyError:
            owner = None  # an account outside the passwd database (RADIUS): only root's files then
        data = read_user_file(path, owner=owner)
        ga = google_authenticator.parse(data, path)
        device, mapping = DeviceManager(self.store).migrate_google_authenticator(
            user, ga, admin_context(), replace_backup_codes=self.args.replace_backup_codes
        )
        return [f"device {device.id} ({device.kind}) for {device.user}", *mapping]

    def cmd_migrate_google_authenticator(self) -> int:
        a = self.args
        if a.all:
            if a.user or a.file:
                raise CliError("--all takes no USER or FILE", EXIT_USAGE)
            failures = 0
            found = 0
            for entry in sorted(pwd.getpwall(), key=lambda e: (e.pw_uid != 0, e.pw_name)):
                path = os.path.join(entry.pw_dir or "/nonexistent", ".google_authenticator")
                if not os.path.lexists(path):
                    continue
                found += 1
                try:
                    lines = self._migrate_one(entry.pw_name, path)
                except errors.MfaguardError as exc:
                    failures += 1
                    self.say(f"{entry.pw_name}: NOT migrated: {exc}")
                    continue
                self.say(f"{entry.pw_name}: migrated")
                for line in lines:
                    self.say(f"    {line}")
            self.say(f"{found} file(s) found, {found - failures} migrated, {failures} not")
            return EXIT_REJECTED if failures else EXIT_OK
        if not a.user:
            raise CliError("give USER (and optionally FILE), or --all", EXIT_USAGE)
        path = a.file
        if path is None:
            try:
                home = pwd.getpwnam(a.user).pw_dir
            except KeyError:
                raise CliError(
                    f"{a.user!r} is not in the passwd database; give the FILE to read", EXIT_REFUSED
                ) from None
            path = os.path.join(home, ".google_authenticator")
        for line in self._migrate_one(a.user, path):
            self.say(line)
        self.say("the original file is left as it was; remove pam_google_authenticator from the PAM stacks")
        return EXIT_OK

    def cmd_migrate_pam_u2f(self) -> int:
        from devicedb.importers import pam_u2f

        a = self.args
        opened = pam_u2f.read_authfile(a.file)
        only_user: str | None = None
        if opened.owner_uid not in {0, os.geteuid()}:
            # pam_u2f itself uses a file owned by anyone else than root only for that owner's own logins.
            try:
                only_user = pwd.getpwuid(opened.owner_uid).pw_name
            except KeyError:
                raise CliError(
                    f"{a.file} is owned by uid {opened.owner_uid}, which is no account; pam_u2f would not use it. "
                    "Refused",
                    EXIT_REFUSED,
                ) from None
        try:
            result = DeviceManager(self.store).migrate_pam_u2f(
                pam_u2f.parse(opened.data, a.file),
                admin_context(),
                where=a.file,
                rp_id=a.origin,
                require_uv=a.require_uv,
                only_user=only_user,
                dry_run=a.dry_run,
            )
        except pam_u2f.AuthFileError as exc:
            self.err.write(f"mfa-admin: error: {printable(exc.where)}: nothing was stored; fix these and run again:\n")
            for problem in exc.problems:
                self.err.write(f"  {printable(problem)}\n")
            return EXIT_REFUSED
        verb = "would add" if result.dry_run else "added"
        for device in result.added:
            self.say(
                f"{verb} {'a device' if result.dry_run else f'device {device.id}'} for {device.user}: "
                f"{device.label}, {device.params.get('cose_type')}, {_device_params(device)}"
            )
        for line in result.skipped:
            self.say(line)
        for note in result.notes:
            self.say(f"  {note}")
        count = len(result.added)
        if result.dry_run:
            self.say(f"(dry run: {count} credential(s) would be imported; nothing was stored)")
        else:
            self.say(
                f"{count} credential(s) imported from {a.file}; the file is left as it was. Remove pam_u2f from "
                "the PAM stacks once mfaguard's are in place"
            )
        return EXIT_OK

    # -- PAM and doctor ----------------------------------------------------------------------
    def cmd_pam_install(self) -> int:
        from mfa_admin import pam_setup
        from mfa_admin.report import coverage
        from pam_module.pam_mfaguard import code_tree_problems

        a = self.args
        source = self.settings.source
        if source is None:
            raise CliError(
                "there is no settings file, and the PAM module refuses to run without one: every login on this "
                "stack would fail. Create /etc/mfaguard/mfaguard.yaml from config/mfaguard.yaml, or pass --config",
                EXIT_CONFIG,
            )
        problems = code_tree_problems(pam_setup.entry_file(), sys.prefix)
        if problems:
            raise CliError(
                "the code the PAM module would run as root is not safe: "
                + "; ".join(problems)
                + ". Install mfaguard in a root-owned folder such as /opt/mfaguard",
                EXIT_FILES,
            )
        plan = pam_setup.plan_install(a.service, a.pam_dir, source)
        if a.dry_run:
            self.out.write(plan.diff())
            self.say("(dry run: nothing was changed)")
            return EXIT_OK
        manager = DeviceManager(self.store)
        status = manager.status("root")
        pam_setup.guard_root(status.requirement, sum(1 for d in status.devices if d.usable))
        operator = os.environ.get("SUDO_USER")
        if operator and a.service in pam_setup.OPERATOR_SERVICES and not a.force:
            mine = manager.status(operator)
            if mine.requirement is Requirement.REQUIRED and not any(d.usable for d in mine.devices):
                raise CliError(
                    f"you ({operator}) have no active device: after this, your own sudo would be refused. "
                    f"Run `mfa-admin enroll totp {operator}` first, or pass --force",
                    EXIT_REFUSED,
                )
        uncovered = coverage(self.store)["uncovered"]
        backup = pam_setup.install(plan)
        self.say(f"mfaguard added to {plan.path}; the original is kept as {backup}")
        if uncovered:
            self.err.write(
                f"warning: these login-capable accounts have no active device and will be refused by {a.service}: "
                f"{', '.join(uncovered)} (see `mfa-admin report`)\n"
            )
        self.say("keep a root shell open and test a login in a second one before you log out")
        return EXIT_OK

    def cmd_pam_uninstall(self) -> int:
        from mfa_admin import pam_setup

        self.say(pam_setup.uninstall(self.args.service, self.args.pam_dir))
        return EXIT_OK

    def cmd_doctor(self) -> int:
        from mfa_admin import doctor

        findings = doctor.run(self.settings, self.args.pam_dir)
        if self.args.json:
            json.dump([f.__dict__ for f in findings], self.out, indent=2)
            self.say()
        else:
            for f in findings:
                self.say(f"[{f.level.upper():4}] {f.topic}: {f.text}")
                if f.fix and f.level != "ok":
                    self.say(f"       fix: {f.fix}")
            bad = sum(1 for f in findings if f.level == "fail")
            self.say(f"\n{bad} problem(s), {sum(1 for f in findings if f.level == 'warn')} warning(s)")
        return EXIT_REJECTED if any(f.level == "fail" for f in findings) else EXIT_OK

    # -- audit -------------------------------------------------------------------------------
    def _audit_rows(self) -> list[Any]:
        a = self.args
        since = getattr(a, "since", None)  # already a time: see _since
        user_text = getattr(a, "user", None)
        user = DeviceManager(self.store).canonical(user_text) if user_text is not None else None
        return self.store.audit_rows(
            user=user, since=since, after_id=getattr(a, "after_id", None), limit=getattr(a, "limit", None)
        )

    def cmd_audit_show(self) -> int:
        rows = self._audit_rows()
        if self.args.json:
            for r in rows:
                self.out.write(json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True) + "\n")
            return EXIT_OK
        table = [["ID", "TIME", "EVENT", "USER", "DEVICE", "SERVICE", "SOURCE", "REASON"]]
        for r in rows:
            table.append(
                [
                    str(r.id),
                    iso(r.ts),
                    r.event,
                    r.user or "-",
                    str(r.device_id) if r.device_id is not None else "-",
                    r.service or "-",
                    r.source or "-",
                    r.reason or "",
                ]
            )
        _print_table(table, self.out)
        return EXIT_OK

    def cmd_audit_export(self) -> int:
        for r in self._audit_rows():
            self.out.write(json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True) + "\n")
        return EXIT_OK

    def cmd_audit_verify(self) -> int:
        report = self.store.verify_audit()
        if self.args.json:
            json.dump(
                {
                    "ok": report.ok,
                    "rows_checked": report.rows_checked,
                    "head_id": report.head_id,
                    "head_hash": report.head_hash,
                    "problems": [{"row": p.row_id, "problem": p.problem} for p in report.problems],
                },
                self.out,
                indent=2,
            )
            self.say()
        elif report.ok:
            self.say(f"audit log intact: {report.rows_checked} rows, head row {report.head_id} {report.head_hash}")
            self.say("keep the head hash elsewhere: it is what proves later that no newest row was cut off")
        else:
            for p in report.problems:
                self.say(f"row {p.row_id}: {p.problem}")
            self.say(f"audit log TAMPERED: {len(report.problems)} problem(s) in {report.rows_checked} rows")
        return EXIT_OK if report.ok else EXIT_REJECTED


def read_seed(path: str | None, prompt: str = "Token seed (hex or base32): ") -> bytes:
    """A token seed, hex or base32, from a file or stdin: never from the command line (ps shows it)."""
    import base64
    import binascii

    if path in (None, "-"):
        text = getpass.getpass(prompt) if sys.stdin.isatty() else read_input_line("-", "seed", 4096)
    else:
        text = read_input_line(path, "seed", 4096)
    text = text.strip().replace(" ", "")
    if not text:
        raise CliError("no seed given; put the hex or base32 seed on standard input or in --secret-file", EXIT_USAGE)
    try:
        if len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
            return bytes.fromhex(text)
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (ValueError, binascii.Error):
        raise CliError("the seed is neither hex nor base32", EXIT_REFUSED) from None


def read_input_file(path: str, limit: int, what: str) -> bytes:
    """A file the administrator names (a key, a seed, an import): a regular file of at most ``limit``
    bytes. /dev/zero or a FIFO must give an error, not fill the memory or hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise CliError(f"{path}: cannot be read ({exc.strerror or exc})", EXIT_USAGE) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CliError(f"{path} is not a regular file; give the {what} as a file", EXIT_USAGE)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise CliError(f"{path} is larger than {limit} bytes: not a {what}", EXIT_USAGE)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_input_line(path: str, what: str, limit: int = 65536) -> str:
    """The first line of a small text file, or of standard input for ``-``, at most ``limit`` bytes."""
    if path == "-":
        line = sys.stdin.readline(limit + 1)
        if len(line) > limit:
            raise CliError(f"standard input: the {what} is longer than {limit} characters", EXIT_USAGE)
        return line
    data = read_input_file(path, limit, what)
    try:
        return data.decode("utf-8", errors="strict").splitlines()[0] if data else ""
    except UnicodeDecodeError:
        raise CliError(f"{path}: the {what} is not UTF-8 text", EXIT_USAGE) from None


def read_user_file(path: str, limit: int = 4096, owner: int | None = None) -> bytes:
    """Read a file in a user's home as root: no symlinks, regular files only, small, owned by the
    account (or root) and private, as pam_google_authenticator itself requires: a secret somebody
    else wrote, or could read, must not become this account's device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CliError(f"{path} does not exist", EXIT_REFUSED) from None
    except OSError as exc:
        raise CliError(f"{path} cannot be opened ({exc.strerror}); symlinks are refused", EXIT_REFUSED) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"{path} is not a regular file", EXIT_REFUSED)
        if st.st_uid not in {0, owner}:
            raise CliError(f"{path} is owned by uid {st.st_uid}, not by the account or root: refused", EXIT_REFUSED)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CliError(
                f"{path} has mode {oct(st.st_mode & 0o777)}: others could read or change its secret, so it is "
                "refused; enroll a new device instead",
                EXIT_REFUSED,
            )
        if st.st_size > limit:
            raise CliError(f"{path} is larger than {limit} bytes; not a google-authenticator file", EXIT_REFUSED)
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


# The largest integer SQLite stores (a signed 64-bit INTEGER): no argument may reach the core above it.
SQLITE_MAX_INT = 2**63 - 1
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,40}", re.ASCII)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _int_in(what: str, low: int, high: int, *, allowed: Sequence[int] | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ASCII digits within [low, high] (or one of ``allowed``),
    else a usage error (exit 2) that says what is accepted."""
    accepted = " or ".join(str(v) for v in allowed) if allowed else f"a whole number from {low:,} to {high:,}"

    def parse(text: str) -> int:
        value = int(text) if _WHOLE_NUMBER.fullmatch(text) else None
        if value is None or not low <= value <= high or (allowed is not None and value not in allowed):
            raise argparse.ArgumentTypeError(f"{_shown(text)} is not {what}; use {accepted}")
        return value

    parse.__name__ = what
    return parse


_positive_int = _int_in("a device id", 1, SQLITE_MAX_INT)
_count = _int_in("a row count", 1, SQLITE_MAX_INT)
_row_id = _int_in("an audit row id", 0, SQLITE_MAX_INT)
_digits = _int_in("a code length", 6, 8, allowed=(6, 8))
_period = _int_in("a period in seconds", 30, 60, allowed=(30, 60))
_counter = _int_in("an HOTP counter", 0, SQLITE_MAX_INT)
_look_ahead = _int_in("a look-ahead", 1, hotp.MAX_LOOK_AHEAD)
_resync_window = _int_in("a resync window", 1, hotp.MAX_RESYNC_WINDOW)


def _since(text: str) -> float:
    """argparse type of --since: the instant it names, now."""
    try:
        return parse_since(text, time.time())
    except CliError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfa-admin",
        allow_abbrev=False,
        description="Enroll and manage mfaguard second factors, and read the audit log.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="settings file (default: $MFAGUARD_CONFIG, else /etc/mfaguard/mfaguard.yaml)",
    )
    parser.add_argument("--version", action="version", version="mfaguard 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        parent: Any, name: str, handler: Callable[[App], int], help_text: str, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            allow_abbrev=False,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        p.set_defaults(handler=handler)
        return p

    p = add(sub, "init", App.cmd_init, "create the database and key file with safe modes, or upgrade the schema")
    p.add_argument(
        "--force",
        action="store_true",
        help="create a new database although the key file already exists (the old database is lost)",
    )

    def group(name: str, help_text: str) -> Any:
        parser_ = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser_

    enroll = group("enroll", "enroll a new device")
    enroll_sub = enroll.add_subparsers(dest="kind", metavar="KIND", required=True)
    p = add(enroll_sub, "totp", App.cmd_enroll_totp, "enroll a TOTP authenticator app")
    p.add_argument("user", metavar="USER")
    p.add_argument("--label", help="a name for the device (default: 'TOTP app')")
    p.add_argument("--digits", type=_digits, choices=(6, 8), help="code length (default: totp.digits)")
    p.add_argument("--algorithm", choices=("sha1", "sha256", "sha512"), help="HMAC algorithm (default: totp.algorithm)")
    p.add_argument("--period", type=_period, choices=(30, 60), help="seconds per code (default: totp.period)")
    p.add_argument("--no-confirm", action="store_true", help="activate at once without asking for a code (scripts)")
    p.add_argument("--no-qr", action="store_true", help="print the URI only, no QR code")

    p = add(
        enroll_sub,
        "hotp",
        App.cmd_enroll_hotp,
        "enroll an HOTP hardware token from its seed (read from stdin or --secret-file, hex or base32)",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("--label", help="a name for the token, such as its serial (default: 'HOTP token')")
    p.add_argument("--secret-file", metavar="FILE", help="file whose first line is the seed (default: stdin)")
    p.add_argument("--digits", type=_digits, choices=(6, 8), default=6, help="code length (default 6)")
    p.add_argument("--algorithm", choices=("sha1", "sha256", "sha512"), default="sha1", help="HMAC (default sha1)")
    p.add_argument("--counter", type=_counter, default=0, help="the token's next counter (default 0)")
    p.add_argument("--look-ahead", type=_look_ahead, default=10, help="counters checked past the next one (default 10)")
    p.add_argument(
        "--resync-window",
        type=_resync_window,
        default=100,
        help="how far two consecutive codes may re-synchronise (default 100)",
    )

    p = add(
        enroll_sub,
        "totp-token",
        App.cmd_enroll_totp_token,
        "enroll a hardware TOTP token from its seed (stdin or --secret-file, hex or base32); its drift is learned",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("--label", help="a name for the token, such as its serial (default: 'TOTP token')")
    p.add_argument("--secret-file", metavar="FILE", help="file whose first line is the seed (default: stdin)")
    p.add_argument("--digits", type=_digits, choices=(6, 8), help="code length (default: totp.digits)")
    p.add_argument("--algorithm", choices=("sha1", "sha256", "sha512"), help="HMAC (default: totp.algorithm)")
    p.add_argument("--period", type=_period, choices=(30, 60), help="seconds per code (default: totp.period)")
    p = add(
        enroll_sub,
        "yubico",
        App.cmd_enroll_yubico,
        "enroll a YubiKey's Yubico OTP slot; the AES key is read from stdin or --secret-file (hex)",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("--public-id", required=True, help="the key's public id: the first 12 modhex characters of an OTP")
    p.add_argument("--private-id", required=True, help="the private id (uid), 12 hex digits")
    p.add_argument("--secret-file", metavar="FILE", help="file whose first line is the AES key (default: stdin)")
    p.add_argument("--label", help="a name for the key (default: 'YubiKey PUBLICID')")

    p = add(
        enroll_sub,
        "fido",
        App.cmd_enroll_fido,
        "register a FIDO2 or U2F security key attached to this machine (for console and sudo logins)",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("--label", help="a name for the key (default: 'FIDO2 key', or 'U2F key' for a U2F-only key)")
    p.add_argument(
        "--uv",
        choices=("required", "preferred", "discouraged"),
        default="preferred",
        help="user verification (PIN or biometrics) at login (default: preferred)",
    )
    p.add_argument("--resident", action="store_true", help="store a discoverable (resident) credential on the key")
    p.add_argument("--rp-id", help="the relying party id (default: pam://HOSTNAME; set one to share keys)")
    p.add_argument(
        "--pin-stdin",
        action="store_true",
        help="read the key's PIN from the first line of standard input instead of asking on the terminal "
        "(for scripts; the PIN is only read when the key has one)",
    )
    p.epilog = (
        "A key with a PIN set asks for it (on the terminal, echo off): the credential is registered with a\n"
        "PIN token for makeCredential only. A wrong PIN exits 1 with the retries the key reports, and\n"
        "nothing is stored. --uv required with a key that has no PIN set and no built-in verification is\n"
        "refused: set a PIN on the key first.\n\n"
        "A key that speaks only U2F (CTAP1) is registered through U2F: its attestation signature is\n"
        "checked, and it logs in with a touch (no PIN). U2F has no user verification and no resident\n"
        "credentials, so --uv required and --resident are refused for such a key.\n\n" + EXIT_CODES_HELP
    )
    p = add(
        enroll_sub,
        "ssh-key",
        App.cmd_enroll_ssh_key,
        "enroll an OpenSSH security key (sk-ssh-ed25519 or sk-ecdsa) from its .pub file ('-' for stdin)",
    )
    p.add_argument("user", metavar="USER")
    p.add_argument("file", metavar="FILE.pub")
    p.add_argument("--label", help="a name for the key (default: the .pub file's comment)")

    devices = group("devices", "list and manage devices")
    dev_sub = devices.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(dev_sub, "list", App.cmd_devices_list, "list devices, of one user or of everybody")
    p.add_argument("user", metavar="USER", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON")
    for name, handler, text in (
        ("enable", App.cmd_devices_enable, "enable a disabled device"),
        ("disable", App.cmd_devices_disable, "disable a device without removing it"),
        ("remove", App.cmd_devices_remove, "remove a device for good"),
    ):
        p = add(dev_sub, name, handler, text)
        p.add_argument("user", metavar="USER")
        p.add_argument("device", metavar="DEVICE", type=_positive_int, help="device id, from `devices list`")
        if name != "enable":
            p.add_argument("--force", action="store_true", help="allow leaving root with no active device")
    p = add(dev_sub, "resync", App.cmd_devices_resync, "re-synchronise an HOTP token from two consecutive codes")
    p.add_argument("user", metavar="USER")
    p.add_argument("device", metavar="DEVICE", type=_positive_int)
    p.add_argument("code1", metavar="CODE1", help="a code from the token")
    p.add_argument("code2", metavar="CODE2", help="the code the next button press gives")
    p = add(dev_sub, "rename", App.cmd_devices_rename, "change a device's label")
    p.add_argument("user", metavar="USER")
    p.add_argument("device", metavar="DEVICE", type=_positive_int)
    p.add_argument("label", metavar="LABEL")

    backup = group("backup-codes", "backup codes for a lost device")
    backup_sub = backup.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(backup_sub, "generate", App.cmd_backup_codes_generate, "print 10 new one-time codes; voids the old set")
    p.add_argument("user", metavar="USER")

    p = add(
        sub,
        "authorized-keys",
        App.cmd_authorized_keys,
        "print USER's enabled security keys in authorized_keys format, for sshd's AuthorizedKeysCommand",
    )
    p.add_argument("user", metavar="USER")

    p = add(sub, "unlock", App.cmd_unlock, "lift a lock and reset the failure counters of a user")
    p.add_argument("user", metavar="USER")

    p = add(sub, "verify", App.cmd_verify, "try a code through the core (audited as service mfa-admin)")
    p.add_argument("user", metavar="USER")
    p.add_argument("code", metavar="CODE", nargs="?", help="the code; omit or '-' to read it from the terminal/stdin")

    p = add(sub, "status", App.cmd_status, "show a user's devices, lock state and backup codes")
    p.add_argument("user", metavar="USER")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add(
        sub,
        "report",
        App.cmd_report,
        "MFA coverage of every login-capable account, root first; exits 1 if any lacks an active device",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    tokens = group("tokens", "the hardware token inventory: import seed files, assign tokens to users")
    tokens_sub = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = tokens_sub.add_parser(
        "import",
        help="import a vendor seed file (all or nothing)",
        description="import a vendor seed file",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp_sub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = add(imp_sub, "pskc", App.cmd_tokens_import, "import a PSKC (RFC 6030) file: plain, pre-shared key or password")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key-file", metavar="FILE", help="file holding the pre-shared AES key, in hex")
    p.add_argument("--password", action="store_true", help="ask for the PBKDF2 password (or read it from stdin)")
    p.add_argument("--password-file", metavar="FILE", help="file whose first line is the PBKDF2 password")
    p = add(
        imp_sub, "csv", App.cmd_tokens_import, "import CSV lines: serial,seed(hex|base32),type,digits,period-or-counter"
    )
    p.add_argument("file", metavar="FILE")
    p = add(tokens_sub, "list", App.cmd_tokens_list, "list the inventory")
    p.add_argument("--unassigned", action="store_true", help="only tokens not yet given to anybody")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(tokens_sub, "assign", App.cmd_tokens_assign, "give a token to a user as one of their devices")
    p.add_argument("serial", metavar="SERIAL")
    p.add_argument("user", metavar="USER")
    p = add(tokens_sub, "unassign", App.cmd_tokens_unassign, "take a token back: its device is removed")
    p.add_argument("serial", metavar="SERIAL")
    p = add(tokens_sub, "revoke", App.cmd_tokens_revoke, "revoke a token for good (lost or broken)")
    p.add_argument("serial", metavar="SERIAL")

    migrate = group("migrate", "bring users over from other MFA tools")
    migrate_sub = migrate.add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = add(
        migrate_sub,
        "google-authenticator",
        App.cmd_migrate_google_authenticator,
        "turn ~USER/.google_authenticator into a device and its scratch codes into backup codes; prints the mapping",
    )
    p.add_argument("user", metavar="USER", nargs="?")
    p.add_argument("file", metavar="FILE", nargs="?", help="default: ~USER/.google_authenticator")
    p.add_argument("--all", action="store_true", help="every home directory in the passwd database, reported per user")
    p.add_argument(
        "--replace-backup-codes",
        action="store_true",
        help="import the scratch codes even where the user has unused backup codes (those are voided)",
    )

    p = add(
        migrate_sub,
        "pam-u2f",
        App.cmd_migrate_pam_u2f,
        "import a pam_u2f authfile (pamu2fcfg lines) as FIDO2 devices: all of it or nothing",
    )
    p.add_argument(
        "file", metavar="FILE", help="the authfile, such as /etc/u2f_mappings or ~USER/.config/Yubico/u2f_keys"
    )
    p.add_argument(
        "--origin",
        "--rp-id",
        dest="origin",
        metavar="ORIGIN",
        help="the origin= of the pam_u2f line, which is the RP id the keys were registered for "
        "(default: pam://HOSTNAME, pam_u2f's own default); recorded with each device",
    )
    p.add_argument(
        "--require-uv",
        action="store_true",
        help="require user verification (the key's PIN) at login for every key, as pam_u2f's "
        "userverification=1 or pinverification=1 did",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check everything and print what would be imported; store nothing"
    )
    p.epilog = (
        "Lines are USER:KEYHANDLE,PUBLICKEY,COSETYPE,OPTIONS[:...] (base64, es256/eddsa/rs256,\n"
        "+presence/+verification/+pin), or pam_u2f 1.0's USER:KEYHANDLE,HEXKEY. +verification and +pin\n"
        "become uv required; otherwise uv discouraged (pam_u2f asks for no PIN by default). Sign counts\n"
        "start at 0. pam_u2f reads only a user's last line, and so does this. Every line that cannot be\n"
        "imported is named (bad format, resident '*' credentials, unknown users, the device limit, a\n"
        "credential of another user) and then nothing is stored; a credential the user already has is\n"
        "skipped. The file must not be a symlink or writable by group or others; a file owned by a user\n"
        "(not root) may only hold that user's lines.\n\n" + EXIT_CODES_HELP
    )

    from mfa_admin.pam_setup import SERVICES as PAM_SERVICES

    pam = group("pam", "add mfaguard to a PAM stack, or take it out")
    pam_sub = pam.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(
        pam_sub,
        "install",
        App.cmd_pam_install,
        "add mfaguard's auth and account lines after the password step; keeps FILE.mfaguard-orig. "
        "Refused while root has no active device",
    )
    p.add_argument("--service", required=True, choices=PAM_SERVICES)
    p.add_argument("--dry-run", action="store_true", help="show the change as a diff; change nothing")
    p.add_argument("--force", action="store_true", help="install even though you (the sudo caller) have no device")
    p.add_argument("--pam-dir", default="/etc/pam.d", help="the PAM folder (default /etc/pam.d)")
    p = add(pam_sub, "uninstall", App.cmd_pam_uninstall, "restore the stack saved by `pam install`")
    p.add_argument("--service", required=True, choices=PAM_SERVICES)
    p.add_argument("--pam-dir", default="/etc/pam.d", help="the PAM folder (default /etc/pam.d)")
    p = add(
        sub,
        "doctor",
        App.cmd_doctor,
        "check PAM stacks, sshd, the database and key modes and MFA coverage; exits 1 on any problem",
    )
    p.add_argument("--pam-dir", default="/etc/pam.d", help="the PAM folder (default /etc/pam.d)")
    p.add_argument("--json", action="store_true", help="print JSON")

    audit = group("audit", "read and check the audit log")
    audit_sub = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add(audit_sub, "show", App.cmd_audit_show, "show audit rows, oldest first")
    p.add_argument("--user", metavar="USER")
    p.add_argument("--since", metavar="WHEN", type=_since, help="30m, 2h, 7d, 1w, 2026-12-01 or 2026-12-01T08:00:00Z")
    p.add_argument("--limit", type=_count, metavar="N", help="only the newest N rows")
    p.add_argument("--json", action="store_true", help="JSON lines, the export format")
    p = add(audit_sub, "export", App.cmd_audit_export, "JSON lines for a SIEM, oldest first")
    p.add_argument("--since", metavar="WHEN", type=_since, help="as for audit show")
    p.add_argument("--after-id", type=_row_id, metavar="ID", help="only rows after this id (incremental shipping)")
    p = add(audit_sub, "verify", App.cmd_audit_verify, "check the hash chain; names every edited, missing or moved row")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _fail(err: TextIO, message: str, code: int) -> int:
    err.write(f"mfa-admin: error: {message}\n")
    return code


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    import logging

    # The core logs tracebacks for the daemons' log files; on a terminal the error line says enough.
    logging.getLogger("mfaguard").addHandler(logging.NullHandler())
    logging.getLogger("mfaguard").propagate = False
    app = App(args, out, err)
    try:
        return int(args.handler(app))
    except BrokenPipeError:
        # `mfa-admin ... | head`: the reader went away; that is not an error of ours.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except CliError as exc:
        return _fail(err, str(exc), exc.code)
    except errors.DatabaseError as exc:
        return _fail(err, f"{exc}. If the file is damaged, restore it from backup", EXIT_FILES)
    except errors.MfaguardError as exc:
        return _fail(err, printable(str(exc)), _exit_code_for(exc))
    except sqlite3.Error as exc:
        return _fail(err, f"database error: {exc}; if the file is damaged, restore it from backup", EXIT_FILES)
    except PermissionError as exc:
        return _fail(err, f"{exc.filename or 'a file'}: permission denied; run mfa-admin as root", EXIT_FILES)
    except OSError as exc:
        return _fail(err, f"{exc.filename or 'a file'}: {exc.strerror or exc}", EXIT_FILES)
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    finally:
        app.close()


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
