"""Enrollment and device management, as used by `mfa-admin`.

Each operation canonicalises the user name, changes state and writes its audit
row in one transaction, or changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devicedb import backup_codes
from devicedb.errors import InvalidInput, InvalidUserName, LockoutGuardError
from devicedb.importers.google_authenticator import GoogleAuthenticatorFile
from devicedb.importers.pam_u2f import AuthFile, U2fCredential
from devicedb.kinds import hotp, totp, yubico
from devicedb.models import Context, Device, LockState, Requirement
from devicedb.policy import grace_applies, is_exempt
from devicedb.settings import Settings
from devicedb.store import Store, Tx, check_label
from devicedb.usernames import canonical_user

# A pending (unconfirmed) enrollment older than this is removed by the user's next enrollment.
STALE_PENDING_SECONDS = 3600


def local_login_name(user: str, what: str) -> str:
    """A name that a local login (PAM: console, sudo, sshd) can carry. Kinds used only there refuse
    a name with white space, which no login name holds (a RADIUS-only name may hold one)."""
    if any(ch.isspace() for ch in user):
        raise InvalidUserName(
            f"user name {user!r} holds white space; {what} is used only by local logins (console, sudo, "
            "SSH), whose login names never do"
        )
    return user


def add_device(
    tx: Tx, settings: Settings, context: Context, *, reason: str, detail: dict[str, Any], **fields: Any
) -> int:
    """Insert a device (the device limit and duplicate checks run in the same transaction) and audit it."""
    device_id = tx.insert_device(max_devices=settings.max_devices, **fields)
    tx.audit(
        "device_added",
        fields["user"],
        context,
        device_id=device_id,
        reason=reason,
        detail={"kind": fields["kind"], **detail},
    )
    return device_id


@dataclass(frozen=True)
class PamU2fImport:
    """What `migrate pam-u2f` did (or, in a dry run, would do)."""

    added: list[Device]  # in a dry run: the devices as they would be (their ids are not kept)
    skipped: list[str]  # credentials already enrolled for the same user
    notes: list[str]  # how pam_u2f's settings map
    dry_run: bool


class _DryRunDone(Exception):
    def __init__(self, result: PamU2fImport) -> None:
        super().__init__("dry run")
        self.result = result


def _in_passwd(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class TotpEnrollment:
    device: Device
    secret_b32: str
    uri: str


@dataclass(frozen=True)
class UserStatus:
    user: str
    requirement: Requirement
    requirement_reason: str
    devices: list[Device]
    lock: LockState
    locked_now: bool
    backup_codes_left: int

    def as_dict(self) -> dict[str, Any]:
        def iso(ts: float | None) -> str | None:
            return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()

        return {
            "user": self.user,
            "requirement": self.requirement.value,
            "requirement_reason": self.requirement_reason,
            "active_devices": sum(1 for d in self.devices if d.usable),
            "devices": [d.public_dict() for d in self.devices],
            "locked": self.locked_now,
            "hard_locked": self.lock.hard_locked,
            "locked_until": iso(self.lock.locked_until),
            "failures": self.lock.failures,
            "consecutive_failures": self.lock.consecutive_failures,
            "last_failure_at": iso(self.lock.last_failure_at),
            "last_success_at": iso(self.lock.last_success_at),
            "backup_codes_left": self.backup_codes_left,
        }


class DeviceManager:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings

    def canonical(self, raw_user: str) -> str:
        return canonical_user(raw_user, self.settings.usernames)

    # -- enrollment ------------------------------------------------------------------
    def enroll_totp(
        self,
        raw_user: str,
        context: Context,
        *,
        label: str | None = None,
        digits: int | None = None,
        algorithm: str | None = None,
        period: int | None = None,
        pending: bool = True,
        secret: bytes | None = None,
        hardware: bool = False,
    ) -> TotpEnrollment:
        user = self.canonical(raw_user)
        defaults = self.settings.totp
        digits = defaults.digits if digits is None else digits
        algorithm = (defaults.algorithm if algorithm is None else algorithm).lower()
        period = defaults.period if period is None else period
        totp.validate_params(digits, algorithm, period)
        params: dict[str, bool] = {}
        if secret is None:
            secret = totp.new_secret()
        elif hardware and len(secret) >= 10:
            params["hardware"] = True
            if len(secret) < 16:
                params["weak"] = True  # vendor seeds of 80 bits are common: kept, and flagged
        elif len(secret) < 16:
            raise InvalidInput("a TOTP secret must be at least 128 bits (16 bytes)")
        label = label or ("TOTP token" if hardware else "TOTP app")
        with self.store.transaction() as tx:
            # An enrollment cut off before its code was confirmed (the admin's session killed, say)
            # must not hold one of the user's slots for ever.
            for stale in tx.devices(user):
                if stale.pending and tx.now - stale.created_at > STALE_PENDING_SECONDS:
                    tx.remove(user, stale.id)
                    tx.audit(
                        "device_removed", user, context, device_id=stale.id, reason="enrollment never confirmed (stale)"
                    )
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="pending confirmation" if pending else "active",
                detail={"digits": digits, "algorithm": algorithm, "period": period},
                user=user,
                kind=totp.KIND,
                label=label,
                secret=secret,
                fingerprint_domain=totp.FINGERPRINT_DOMAIN,
                fingerprint_material=secret,
                algorithm=algorithm,
                digits=digits,
                period=period,
                pending=pending,
                params=params,
            )
            device = tx.device(user, device_id)
        uri = totp.provisioning_uri(
            secret, user=user, issuer=self.settings.issuer, digits=digits, algorithm=algorithm, period=period
        )
        return TotpEnrollment(device, totp.b32(secret), uri)

    def enroll_hotp(
        self,
        raw_user: str,
        context: Context,
        *,
        secret: bytes,
        label: str | None = None,
        digits: int = 6,
        algorithm: str = "sha1",
        counter: int = 0,
        look_ahead: int = hotp.DEFAULT_LOOK_AHEAD,
        resync_window: int = hotp.DEFAULT_RESYNC_WINDOW,
    ) -> Device:
        """An HOTP hardware token, active at once: its seed comes from the vendor, not from a QR code."""
        user = self.canonical(raw_user)
        algorithm = algorithm.lower()
        hotp.validate_params(digits, algorithm, counter, look_ahead, resync_window)
        if len(secret) < 10:
            raise InvalidInput("an HOTP secret must be at least 80 bits (10 bytes)")
        weak = len(secret) < 16
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="active",
                detail={"digits": digits, "algorithm": algorithm, "counter": counter},
                user=user,
                kind=hotp.KIND,
                label=label or "HOTP token",
                secret=secret,
                fingerprint_domain=hotp.FINGERPRINT_DOMAIN,
                fingerprint_material=secret,
                algorithm=algorithm,
                digits=digits,
                next_counter=counter,
                params={"look_ahead": look_ahead, "resync_window": resync_window, **({"weak": True} if weak else {})},
            )
            return tx.device(user, device_id)

    def enroll_yubico(
        self,
        raw_user: str,
        context: Context,
        *,
        public_id: str,
        private_id: bytes,
        aes_key: bytes,
        label: str | None = None,
    ) -> Device:
        """A YubiKey's Yubico OTP slot, from its public id, private id and AES key; active at once."""
        user = self.canonical(raw_user)
        public_id = public_id.strip().lower()
        yubico.validate(public_id, private_id, aes_key)
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="active",
                detail={"public_id": public_id},
                user=user,
                kind=yubico.KIND,
                label=label or f"YubiKey {public_id}",
                secret=aes_key + private_id,
                fingerprint_domain=yubico.FINGERPRINT_DOMAIN,
                fingerprint_material=aes_key,
                next_counter=0,
                params={"public_id": public_id},
            )
            return tx.device(user, device_id)

    def enroll_ssh_key(self, raw_user: str, line: str, context: Context, *, label: str | None = None) -> Device:
        """An OpenSSH security key (sk- type) that sshd will accept for this user."""
        from devicedb.kinds import ssh_sk

        user = local_login_name(self.canonical(raw_user), "an SSH security key")
        if label is not None:
            check_label(label)
        key = ssh_sk.parse_public_key(line)
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="active",
                detail={"key_type": key.key_type, "options": list(key.options)},
                user=user,
                kind=ssh_sk.KIND,
                label=label or key.comment or "security key (SSH)",
                secret=None,
                fingerprint_domain=ssh_sk.FINGERPRINT_DOMAIN,
                fingerprint_material=key.blob,
                params={
                    "key_type": key.key_type,
                    "public_key": key.blob_b64,
                    "options": list(key.options),
                    "comment": key.comment,
                },
            )
            return tx.device(user, device_id)

    def check_fido_enrollment(
        self, raw_user: str, *, label: str | None = None, uv: str = "preferred", rp_id: str | None = None
    ) -> tuple[str, str]:
        """The arguments of enroll_fido, checked before any key is looked for or asked anything:
        (canonical user, RP id), or InvalidInput / InvalidUserName naming what is wrong."""
        from devicedb.kinds import fido2_key

        if uv not in fido2_key.UV_POLICIES:
            raise InvalidInput(f"--uv {uv!r} is not allowed; use one of {', '.join(fido2_key.UV_POLICIES)}")
        user = local_login_name(self.canonical(raw_user), "a FIDO2 key")
        if label is not None:
            check_label(label)
        if rp_id is not None:
            return user, fido2_key.check_rp_id(rp_id)
        return user, self.settings.fido.rp_id or fido2_key.default_rp_id()

    def enroll_fido(
        self,
        raw_user: str,
        device: Any,
        context: Context,
        *,
        label: str | None = None,
        uv: str = "preferred",
        resident: bool = False,
        rp_id: str | None = None,
        pin: Callable[[], str | None] | None = None,
        touch: Callable[[], None] | None = None,
        touch_timeout: float = 30.0,
    ) -> Device:
        """Register a credential on a FIDO2 key attached to this machine (a fido2 CtapDevice), through
        fido2's own CTAP2 client, and store its id, COSE public key, AAGUID and sign count.

        A key with a PIN set (getInfo clientPin) needs it to register: ``pin`` is asked for it (only
        then), and the credential is made with a pinUvAuthToken limited to makeCredential and this
        RP. A wrong PIN raises fido2_key.PinRejected with the retries the key reports. ``touch`` is
        called just before the key waits for its touch. Nothing is stored unless the key answered.

        A key that speaks no CTAP2 (no CBOR capability, or getInfo fails) is registered through
        fido2's Ctap1 (U2F): see _enroll_u2f. ``touch_timeout`` bounds the wait for its touch."""
        import secrets as random

        from fido2 import cbor
        from fido2.ctap import CtapError
        from fido2.webauthn import AuthenticatorData

        from devicedb.kinds import fido2_key

        user, rp = self.check_fido_enrollment(raw_user, label=label, uv=uv, rp_id=rp_id)
        challenge = random.token_bytes(32)
        client_data = fido2_key.client_data_hash(challenge, rp)
        ctap = fido2_key.open_ctap2(device)
        if ctap is None:
            return self._enroll_u2f(
                user,
                device,
                context,
                label=label,
                uv=uv,
                resident=resident,
                rp=rp,
                client_data=client_data,
                touch=touch,
                touch_timeout=touch_timeout,
            )
        key = fido2_key.key_options(ctap)
        options: dict[str, bool] = {"rk": resident}
        pin_uv: fido2_key.PinUv | None = None
        if key.get("clientPin") is True:
            # A key with a PIN wants it for makeCredential (CTAP 2.0, and 2.1 without makeCredUvNotRqd).
            text = pin() if pin is not None else None
            if not text:
                raise InvalidInput("the key has a PIN, and no PIN was given; nothing was stored")
            try:
                pin_uv = fido2_key.pin_auth(ctap, text, "make_credential", rp, client_data)
            except (CtapError, OSError) as exc:
                why = f"CTAP error {exc.code}" if isinstance(exc, CtapError) else str(exc)
                raise InvalidInput(f"the key failed during the PIN exchange ({why}); nothing was stored") from None
            finally:
                del text
            how = "pin"
        elif uv == "required":
            if key.get("uv") is True:
                options["uv"] = True
                how = "built-in"
            elif "clientPin" in key:
                raise InvalidInput(
                    "--uv required, but the key has no PIN set and no built-in user verification: set a PIN on "
                    "the key first (for example `ykman fido access change-pin` or `fido2-token -S DEVICE`), then "
                    "run this again; nothing was stored"
                )
            else:
                raise InvalidInput(
                    "--uv required, but the key can verify nobody (it supports no PIN and has no built-in user "
                    "verification); use another key, or --uv preferred; nothing was stored"
                )
        else:
            how = "none"
        if touch is not None:
            touch()
        try:
            response = ctap.make_credential(
                client_data,
                {"id": rp, "name": "mfaguard"},
                {"id": user.encode()[:64], "name": user},
                [{"type": "public-key", "alg": -7}],
                options=options,
                pin_uv_param=pin_uv.param if pin_uv else None,
                pin_uv_protocol=pin_uv.protocol if pin_uv else None,
            )
        except OSError as exc:
            raise InvalidInput(f"the key went away while registering ({exc}); nothing was stored") from None
        except CtapError as exc:
            reasons = {
                CtapError.ERR.PUAT_REQUIRED: "the key wants its PIN for this (set one, or check that it is set)",
                CtapError.ERR.PIN_AUTH_INVALID: "the key did not accept the PIN token",
                CtapError.ERR.OPERATION_DENIED: "the key refused (not touched, or the user declined)",
                CtapError.ERR.KEEPALIVE_CANCEL: "cancelled",
                CtapError.ERR.ACTION_TIMEOUT: "the key was not touched in time",
                CtapError.ERR.USER_ACTION_TIMEOUT: "the key was not touched in time",
                CtapError.ERR.UNSUPPORTED_OPTION: "the key does not support an option asked for",
                CtapError.ERR.INVALID_OPTION: "the key does not support an option asked for",
            }
            why = reasons.get(exc.code, f"CTAP error {exc.code}")
            raise InvalidInput(f"the key did not register a credential: {why}; nothing was stored") from None
        data = AuthenticatorData(response.auth_data)
        credential = data.credential_data
        if credential is None:
            raise InvalidInput("the key returned no credential")
        if (uv == "required" or pin_uv is not None) and not data.is_user_verified():
            raise InvalidInput(
                "the key did not report user verification"
                + (" although it took the PIN" if pin_uv is not None else " (set a PIN on it first)")
                + "; nothing was stored"
            )
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="active",
                detail={"rp_id": rp, "uv": uv, "enrollment_uv": how},
                user=user,
                kind=fido2_key.KIND,
                label=label or "FIDO2 key",
                secret=None,
                fingerprint_domain=fido2_key.FINGERPRINT_DOMAIN,
                fingerprint_material=bytes(credential.credential_id),
                sign_count=data.counter,
                params={
                    "credential_id": fido2_key.b64(bytes(credential.credential_id)),
                    "public_key": fido2_key.b64(cbor.encode(dict(credential.public_key))),
                    "aaguid": bytes(credential.aaguid).hex(),
                    "rp_id": rp,
                    "uv": uv,
                    "resident": resident,
                    # How the user was verified when the key registered: its PIN, its built-in UV, or not at all.
                    "enrollment_uv": how,
                    "user_verified": data.is_user_verified(),
                },
            )
            return tx.device(user, device_id)

    def _enroll_u2f(
        self,
        user: str,
        device: Any,
        context: Context,
        *,
        label: str | None,
        uv: str,
        resident: bool,
        rp: str,
        client_data: bytes,
        touch: Callable[[], None] | None,
        touch_timeout: float,
    ) -> Device:
        """Register a U2F (CTAP1) credential through fido2's Ctap1: application parameter SHA-256 of
        the RP id, challenge parameter the same client data hash as CTAP2's. The attestation signature
        over the registration is checked (RegistrationData.verify, under the attestation certificate's
        own key: it proves the answer is whole, not who made the key). Stored as the CTAP2 path stores
        a credential: the key handle as credential id, the public key as a COSE ES256 key, AAGUID all
        zeros (U2F has none), sign count 0, and params protocol "u2f"."""
        import hashlib
        import struct
        import threading

        from fido2 import cbor
        from fido2.ctap import CtapError
        from fido2.ctap1 import ApduError, Ctap1

        from devicedb.kinds import fido2_key

        def u2f_only(why: str) -> InvalidInput:
            return InvalidInput(f"this key speaks only U2F (CTAP1), {why}; nothing was stored")

        neither = "the key answers neither CTAP2 nor U2F (is it a security key? was it unplugged?); nothing was stored"
        if not fido2_key.speaks_u2f(device):
            raise InvalidInput(neither)
        ctap1 = Ctap1(device)
        app_param = hashlib.sha256(rp.encode()).digest()
        try:
            version = ctap1.get_version()
        except (ApduError, CtapError, OSError, ValueError, struct.error):
            raise InvalidInput(neither) from None
        if version != "U2F_V2":
            raise InvalidInput(
                f"the key reports U2F version {version[:20]!r}; only U2F_V2 is known; nothing was stored"
            )
        if uv == "required":
            raise u2f_only(
                "which has no user verification (no PIN, no biometrics): --uv required cannot be met; use a "
                "FIDO2 key, or --uv preferred or discouraged (a touch only)"
            )
        if resident:
            raise u2f_only("which cannot store a discoverable (resident) credential: leave out --resident")
        if touch is not None:
            touch()
        deadline = threading.Event()
        timer = threading.Timer(touch_timeout, deadline.set)
        timer.start()
        try:
            registration = fido2_key.u2f_poll(lambda: ctap1.register(client_data, app_param), deadline)
        except fido2_key.U2fTimeout:
            raise InvalidInput(
                f"the key was not touched within {touch_timeout:g} seconds; nothing was stored"
            ) from None
        except ApduError as exc:
            raise InvalidInput(
                f"the key did not register a credential: U2F status 0x{exc.code:04X}; nothing was stored"
            ) from None
        except CtapError as exc:
            raise InvalidInput(
                f"the key failed while registering (CTAP error {exc.code}); nothing was stored"
            ) from None
        except OSError as exc:
            raise InvalidInput(f"the key went away while registering ({exc}); nothing was stored") from None
        except (ValueError, struct.error):
            raise InvalidInput("the key's U2F registration response is malformed; nothing was stored") from None
        finally:
            timer.cancel()
        key_handle, point = bytes(registration.key_handle), bytes(registration.public_key)
        try:
            registration.verify(app_param, client_data)
        except Exception:
            raise InvalidInput(
                "the key's U2F registration does not verify (its attestation signature over the RP, the challenge, "
                "the key handle and the public key is wrong); nothing was stored"
            ) from None
        if not 16 <= len(key_handle) <= fido2_key.U2F_MAX_KEY_HANDLE:
            raise InvalidInput(f"the key returned a {len(key_handle)}-byte key handle; nothing was stored")
        try:
            cose = fido2_key.cose_from_u2f_point(point)
        except ValueError as exc:
            raise InvalidInput(f"the key returned a public key that is not valid ({exc}); nothing was stored") from None
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="active",
                detail={"rp_id": rp, "uv": uv, "enrollment_uv": "none", "protocol": fido2_key.U2F},
                user=user,
                kind=fido2_key.KIND,
                label=label or "U2F key",
                secret=None,
                fingerprint_domain=fido2_key.FINGERPRINT_DOMAIN,
                fingerprint_material=key_handle,
                sign_count=0,
                params={
                    "credential_id": fido2_key.b64(key_handle),
                    "public_key": fido2_key.b64(cbor.encode(cose)),
                    "aaguid": bytes(16).hex(),
                    "rp_id": rp,
                    "uv": uv,
                    "resident": False,
                    "enrollment_uv": "none",
                    "user_verified": False,
                    "protocol": fido2_key.U2F,
                },
            )
            return tx.device(user, device_id)

    def authorized_keys(self, raw_user: str) -> list[str]:
        """The user's enabled security keys, as authorized_keys lines for sshd's AuthorizedKeysCommand."""
        from devicedb.kinds import ssh_sk

        user = self.canonical(raw_user)
        return [
            ssh_sk.from_device(d).authorized_keys_line()
            for d in self.store.list_devices(user)
            if d.kind == ssh_sk.KIND and d.usable
        ]

    def resync(self, raw_user: str, device_id: int, first: str, second: str, context: Context) -> int:
        """Re-synchronise a token from two consecutive codes.

        Returns the new next counter (HOTP) or the new drift in steps (hardware TOTP)."""
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            device = tx.device(user, device_id)
            if device.kind == totp.KIND and device.params.get("hardware"):
                step = totp.find_consecutive(device, tx.open_secret(device), first, second, tx.now)
                drift = None if step is None else step - int(tx.now // (device.period or 30))
                if step is None or drift is None or not tx.set_clock(device, step, drift):
                    raise InvalidInput(
                        f"the two codes are not consecutive codes of device {device_id} within an hour of now; "
                        "give two codes the token shows one after the other"
                    )
                tx.audit(
                    "device_resynced",
                    user,
                    context,
                    device_id=device_id,
                    reason="by administrator",
                    detail={"drift": drift},
                )
                return drift
            if device.kind != hotp.KIND:
                raise InvalidInput(
                    f"device {device_id} is a {device.kind} device; resync applies to HOTP and hardware TOTP tokens"
                )
            found = hotp.find_consecutive(device, tx.open_secret(device), first, second)
            if found is None or not tx.set_counter(device, found + 1):
                raise InvalidInput(
                    f"the two codes are not consecutive codes of device {device_id} within the next "
                    f"{hotp.ADMIN_RESYNC_WINDOW} counters; press the token's button twice and give both codes in order"
                )
            tx.audit(
                "device_resynced",
                user,
                context,
                device_id=device_id,
                reason="by administrator",
                detail={"next_counter": found + 1},
            )
        return found + 1

    def migrate_google_authenticator(
        self, raw_user: str, ga: GoogleAuthenticatorFile, context: Context, *, replace_backup_codes: bool = False
    ) -> tuple[Device, list[str]]:
        """One ~/.google_authenticator file: its secret becomes a device and its scratch codes backup
        codes, in one transaction. Returns the device and how each option maps, for the operator."""
        user = self.canonical(raw_user)
        mapping = []
        if ga.kind == "totp":
            if ga.step not in totp.PERIODS:
                raise InvalidInput(f"STEP_SIZE {ga.step} is not supported; mfaguard accepts 30 or 60")
            mapping.append(f"TOTP_AUTH -> a TOTP device, period {ga.step} s")
        else:
            mapping.append(f"HOTP_COUNTER {ga.counter} -> an HOTP device, next counter {ga.counter}")
        if ga.window is not None:
            if ga.kind == "totp":
                mapping.append(
                    f"WINDOW_SIZE {ga.window} -> not per device in mfaguard: totp.window = {self.settings.totp.window}"
                    f" step(s) either side applies to everybody"
                )
            else:
                mapping.append(f"WINDOW_SIZE {ga.window} -> HOTP look-ahead {min(ga.window, hotp.MAX_LOOK_AHEAD)}")
        mapping.append(
            "DISALLOW_REUSE -> always on in mfaguard"
            if ga.disallow_reuse
            else "no DISALLOW_REUSE -> mfaguard refuses reuse anyway, which is stricter"
        )
        if ga.rate_limit is not None:
            n, seconds = ga.rate_limit
            lockout = self.settings.lockout
            mapping.append(
                f"RATE_LIMIT {n} {seconds} -> mfaguard's lockout applies instead: {lockout.max_failures} failures "
                f"lock for {lockout.lock_seconds} s"
            )
        for name in ga.unknown_options:
            mapping.append(f"{name} -> ignored (no mfaguard equivalent)")
        if ga.weak:
            mapping.append(f"the secret is {len(ga.secret) * 8} bits: kept working, and flagged weak; re-enroll soon")
        salt = backup_codes.new_salt()
        digests = [backup_codes.digest(code, salt) for code in ga.scratch_codes]
        params: dict[str, object] = {"migrated": "google-authenticator", **({"weak": True} if ga.weak else {})}
        if ga.kind == "hotp":
            look_ahead = min(ga.window or hotp.DEFAULT_LOOK_AHEAD, hotp.MAX_LOOK_AHEAD)
            params |= {"look_ahead": look_ahead, "resync_window": max(look_ahead, hotp.DEFAULT_RESYNC_WINDOW)}
        with self.store.transaction() as tx:
            device_id = add_device(
                tx,
                self.settings,
                context,
                reason="migrated from google-authenticator",
                detail={"weak": ga.weak},
                user=user,
                kind=ga.kind,
                label="google-authenticator",
                secret=ga.secret,
                fingerprint_domain=totp.FINGERPRINT_DOMAIN,
                fingerprint_material=ga.secret,
                algorithm="sha1",
                digits=6,
                period=ga.step if ga.kind == "totp" else None,
                next_counter=ga.counter if ga.kind == "hotp" else None,
                params=params,
            )
            existing = tx.backup_codes_left(user)
            if digests and existing and not replace_backup_codes:
                mapping.append(
                    f"{len(digests)} scratch code(s) NOT imported: {user} already has {existing} unused backup "
                    "codes, which are kept (--replace-backup-codes imports the scratch codes instead)"
                )
            elif digests:
                voided = tx.replace_backup_codes(user, salt, digests, code_digits=backup_codes.LEGACY_DIGITS)
                tx.audit(
                    "backup_codes_generated",
                    user,
                    context,
                    reason="scratch codes migrated",
                    detail={"count": len(digests), "voided_unused": voided},
                )
                mapping.append(
                    f"{len(digests)} scratch code(s) -> backup codes (8 digits, each works once)"
                    + (f"; {voided} older unused backup codes voided" if voided else "")
                )
            if ga.used_steps and ga.kind == "totp":
                tx.restore_replay_state(device_id, last_step=max(ga.used_steps), drift=0)
                mapping.append("the steps DISALLOW_REUSE lists as used stay used")
            device = tx.device(user, device_id)
        return device, mapping

    def migrate_pam_u2f(
        self,
        authfile: AuthFile,
        context: Context,
        *,
        where: str,
        rp_id: str | None = None,
        require_uv: bool = False,
        only_user: str | None = None,
        dry_run: bool = False,
        user_exists: Callable[[str], bool] = _in_passwd,
    ) -> PamU2fImport:
        """A pam_u2f authfile's credentials become FIDO2 devices, all in one transaction or none.

        Every problem is collected and raised together as AuthFileError, each named by its line: a
        user name that is invalid, unknown to this system (``user_exists``) or not ``only_user`` (a
        file owned by that user), a credential twice in the file or enrolled for another user, a user
        whose devices would exceed max_devices. A credential the same user already has is skipped and
        reported. A dry run does all of it, then rolls back."""
        from fido2 import cbor

        from devicedb.errors import DuplicateDeviceError
        from devicedb.importers.pam_u2f import AuthFileError
        from devicedb.kinds import fido2_key

        rp = fido2_key.default_rp_id() if rp_id is None else fido2_key.check_rp_id(rp_id, "--origin")
        problems: list[str] = list(authfile.problems)
        notes = [
            f"line {line} ({user}): not imported: pam_u2f reads only the last line of a user"
            for line, user in authfile.superseded
        ]
        owners: dict[bytes, str] = {}
        plan: dict[str, list[U2fCredential]] = {}
        for cred in authfile.credentials:
            try:
                user = self.canonical(cred.user)
            except InvalidUserName as exc:
                problems.append(f"line {cred.line}: user name {cred.user!r} is refused: {exc}")
                continue
            if only_user is not None and cred.user != only_user:
                problems.append(
                    f"line {cred.line}: the file is owned by {only_user}, so pam_u2f would not use it for "
                    f"{cred.user!r}; only root's files may name other users"
                )
                continue
            if not user_exists(cred.user):
                problems.append(f"line {cred.line}: user {cred.user!r} is unknown to this system (not in passwd)")
                continue
            first = owners.setdefault(cred.credential_id, cred.where)
            if first != cred.where:
                problems.append(f"{cred.where}: the same credential as {first}")
                continue
            plan.setdefault(user, []).append(cred)
        skipped: list[str] = []
        added: list[Device] = []
        try:
            with self.store.transaction() as tx:
                todo: list[tuple[str, U2fCredential]] = []
                for user, creds in plan.items():
                    existing = tx.devices(user)
                    have = {
                        fido2_key.credential_id(d)
                        for d in existing
                        if d.kind == fido2_key.KIND and d.params.get("credential_id")
                    }
                    new = []
                    for cred in creds:
                        if cred.credential_id in have:
                            skipped.append(f"{cred.where} ({user}): already enrolled for {user}; skipped")
                        else:
                            new.append(cred)
                    room = self.settings.max_devices - len(existing)
                    if len(new) > room:
                        lines = ", ".join(sorted({str(c.line) for c in new}))
                        problems.append(
                            f"line {lines} ({user}): {user} has {len(existing)} device(s), and {len(new)} more would "
                            f"exceed max_devices = {self.settings.max_devices}; remove devices first, or import fewer"
                        )
                        continue
                    todo += [(user, cred) for cred in new]
                if problems:
                    raise AuthFileError(where, problems)
                for user, cred in todo:
                    uv = "required" if cred.uv_required or require_uv else "discouraged"
                    try:
                        device_id = add_device(
                            tx,
                            self.settings,
                            context,
                            reason="migrated from pam_u2f",
                            detail={"rp_id": rp, "uv": uv, "line": cred.line, "cose_type": cred.cose_type},
                            user=user,
                            kind=fido2_key.KIND,
                            label=f"pam_u2f key {cred.index}",
                            secret=None,
                            fingerprint_domain=fido2_key.FINGERPRINT_DOMAIN,
                            fingerprint_material=cred.credential_id,
                            sign_count=0,
                            params={
                                "credential_id": fido2_key.b64(cred.credential_id),
                                "public_key": fido2_key.b64(cbor.encode(cred.cose_key)),
                                "rp_id": rp,
                                "uv": uv,
                                "resident": False,
                                "cose_type": cred.cose_type,
                                "migrated": "pam-u2f",
                                "pam_u2f_options": "".join(cred.options),
                            },
                        )
                    except DuplicateDeviceError:
                        problems.append(f"{cred.where} ({user}): this credential is already enrolled for another user")
                        continue
                    added.append(tx.device(user, device_id))
                if problems:
                    raise AuthFileError(where, problems)
                result = PamU2fImport(added, skipped, notes + self._pam_u2f_notes(authfile, rp, require_uv), dry_run)
                if dry_run:
                    raise _DryRunDone(result)
        except _DryRunDone as done:
            return done.result
        return result

    def _pam_u2f_notes(self, authfile: AuthFile, rp: str, require_uv: bool) -> list[str]:
        options = {o for c in authfile.credentials for o in c.options}
        notes = [f"RP id {rp}: the origin the keys were registered for (pam_u2f's origin=)"]
        configured = self.settings.fido.rp_id
        if configured and configured != rp:
            notes.append(
                f"fido.rp_id is {configured}: keys enrolled here later use that RP id, and a user's login asks "
                "the key for one RP id at a time"
            )
        if require_uv:
            notes.append("--require-uv: every imported key needs user verification (PIN) at login")
        if "+pin" in options or "+verification" in options:
            notes.append("+pin, +verification -> uv required: the key's PIN (or built-in verification) at login")
        if any(not c.uv_required for c in authfile.credentials) and not require_uv:
            notes.append("no +pin/+verification -> uv discouraged: a touch, as pam_u2f's default asked")
        if any("+presence" not in c.options for c in authfile.credentials):
            notes.append("no +presence -> mfaguard asks for a touch anyway (it always requires user presence)")
        if any(c.old_format for c in authfile.credentials):
            notes.append("pam_u2f 1.0 lines (hex public key): read as es256 with +presence")
        notes.append("sign counts start at 0; the first login moves them to the key's count")
        return notes

    def discard_pending(self, raw_user: str, device_id: int, context: Context) -> bool:
        """Remove an enrollment that was never confirmed. False if it is no longer pending."""
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            device = tx.device(user, device_id)
            if not device.pending:
                return False
            tx.remove(user, device_id)
            tx.audit("device_removed", user, context, device_id=device_id, reason="enrollment not confirmed")
        return True

    # -- management --------------------------------------------------------------------
    def list_devices(self, raw_user: str | None = None) -> list[Device]:
        return self.store.list_devices(None if raw_user is None else self.canonical(raw_user))

    def _guard_root(self, tx: Tx, user: str, device_id: int, force: bool) -> None:
        """Refuse to leave root without an active device: root could no longer log in."""
        tx.device(user, device_id)  # a missing device is reported as such, first
        if force or user != "root":
            return
        if any(d.usable and d.id != device_id for d in tx.devices(user)):
            return
        if is_exempt(user, self.settings.enforcement, self.settings.usernames):
            return
        raise LockoutGuardError(
            "this would leave root with no active device, and root could no longer log in where mfaguard "
            "is required. Enroll another device first, or pass --force"
        )

    def set_enabled(
        self, raw_user: str, device_id: int, enabled: bool, context: Context, *, force: bool = False
    ) -> bool:
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            if not enabled:
                self._guard_root(tx, user, device_id, force)
            changed = tx.set_enabled(user, device_id, enabled)
            if changed:
                event = "device_enabled" if enabled else "device_disabled"
                tx.audit(event, user, context, device_id=device_id, reason="by administrator")
        return changed

    def rename(self, raw_user: str, device_id: int, label: str, context: Context) -> str:
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            old = tx.device(user, device_id).label
            new = tx.rename(user, device_id, label)
            tx.audit("device_renamed", user, context, device_id=device_id, detail={"old": old, "new": new})
        return new

    def remove(self, raw_user: str, device_id: int, context: Context, *, force: bool = False) -> Device:
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            self._guard_root(tx, user, device_id, force)
            device = tx.remove(user, device_id)
            tx.audit(
                "device_removed",
                user,
                context,
                device_id=device_id,
                reason="by administrator",
                detail={"kind": device.kind, "label": device.label},
            )
        return device

    # -- backup codes --------------------------------------------------------------------
    def active_device_count(self, raw_user: str) -> int:
        return sum(1 for d in self.list_devices(raw_user) if d.usable)

    def generate_backup_codes(self, raw_user: str, context: Context) -> list[str]:
        """A new set of codes, shown once; the old set is void from the same commit."""
        user = self.canonical(raw_user)
        codes = backup_codes.generate()
        salt = backup_codes.new_salt()
        digests = [backup_codes.digest(code, salt) for code in codes]
        with self.store.transaction() as tx:
            voided = tx.replace_backup_codes(user, salt, digests)
            tx.audit(
                "backup_codes_generated",
                user,
                context,
                reason="new set",
                detail={"count": len(codes), "voided_unused": voided},
            )
        return [backup_codes.display(c) for c in codes]

    # -- lockout and status --------------------------------------------------------------
    def unlock(self, raw_user: str, context: Context) -> LockState:
        user = self.canonical(raw_user)
        with self.store.transaction() as tx:
            before = tx.unlock(user)
            tx.audit(
                "unlock",
                user,
                context,
                reason="by administrator",
                detail={"was_hard_locked": before.hard_locked, "consecutive_failures": before.consecutive_failures},
            )
        return before

    def status(self, raw_user: str) -> UserStatus:
        user = self.canonical(raw_user)
        rules = self.settings.enforcement
        with self.store.transaction() as tx:
            devices = tx.devices(user)
            lock = tx.lock_state(user)
            left = tx.backup_codes_left(user)
            now = tx.now
        exempt = is_exempt(user, rules, self.settings.usernames)
        grace = grace_applies(user, rules, self.settings.usernames, now)
        if exempt:
            requirement, why = Requirement.EXEMPT, exempt
        elif grace and not [d for d in devices if not d.pending]:
            requirement, why = Requirement.GRACE, grace
        else:
            requirement, why = Requirement.REQUIRED, "second factor required"
        return UserStatus(user, requirement, why, devices, lock, lock.locked_at(now), left)
