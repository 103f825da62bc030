"""Who must present a second factor: everybody, root included, except the exceptions named."""

from __future__ import annotations

import datetime as dt
import grp
import os
import pwd
from typing import TYPE_CHECKING

from devicedb.manage import DeviceManager
from devicedb.models import Context, Requirement
from devicedb.policy import in_any_group
from devicedb.store import Store
from devicedb.verifier import Verifier

if TYPE_CHECKING:
    from conftest import Lib, MfaEnv

CTX = Context(service="test")

UNTIL = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
GRACE = "enforcement:\n  grace:\n    until: 2030-01-01T00:00:00Z\n    users: [newbie, Carol]\n"


def setup(mfa_env: MfaEnv, extra: str = "") -> tuple[Store, Verifier]:
    store = mfa_env.open(mfa_env.initialise(extra))
    return store, mfa_env.verifier(store)


def requirement(verifier: Verifier, user: str | bytes) -> Requirement:
    return verifier.requirement(user, CTX).requirement


def test_everybody_is_required_by_default(mfa_env: MfaEnv) -> None:
    _, verifier = setup(mfa_env)
    for user in ("root", "alice", "nobody"):
        decision = verifier.requirement(user, CTX)
        assert decision.requirement is Requirement.REQUIRED, user
        assert decision.user == user


def test_exempt_users(lib: type[Lib], mfa_env: MfaEnv) -> None:
    store, verifier = setup(mfa_env, "enforcement:\n  exempt_users: [svc-backup, Deploy]\n")
    decision = verifier.requirement("svc-backup", CTX)
    assert decision.requirement is Requirement.EXEMPT
    assert "exempt_users" in decision.reason
    assert requirement(verifier, "Deploy") is Requirement.EXEMPT
    assert requirement(verifier, "deploy") is Requirement.REQUIRED  # no case folding configured
    assert requirement(verifier, "svc-backup2") is Requirement.REQUIRED
    assert requirement(verifier, "root") is Requirement.REQUIRED
    # Exemption holds even with devices enrolled.
    lib.enroll(store, "svc-backup", lib.secret_for(1))
    assert requirement(verifier, "svc-backup") is Requirement.EXEMPT


def test_exempt_users_are_compared_in_canonical_form(mfa_env: MfaEnv) -> None:
    _, verifier = setup(
        mfa_env, "usernames:\n  strip_realms: [CORP]\n  case_fold: true\nenforcement:\n  exempt_users: [Svc]\n"
    )
    for raw in ("svc", "SVC", "CORP\\Svc", "svc@corp"):
        assert requirement(verifier, raw) is Requirement.EXEMPT, raw
    assert requirement(verifier, "svc@OTHER") is Requirement.REQUIRED


def test_a_refused_name_is_required_never_exempt(mfa_env: MfaEnv) -> None:
    _, verifier = setup(mfa_env, "enforcement:\n  exempt_users: [svc]\n")
    for raw in ("svc\x00", b"sv\xffc", "svc\n", "\u202esvc"):
        assert requirement(verifier, raw) is Requirement.REQUIRED


def test_exempt_groups_use_the_system_group_database(mfa_env: MfaEnv) -> None:
    root_group = grp.getgrgid(0).gr_name
    assert pwd.getpwnam("root").pw_gid == 0
    _, verifier = setup(mfa_env, f"enforcement:\n  exempt_groups: [{root_group}]\n")
    assert requirement(verifier, "root") is Requirement.EXEMPT  # root's primary group
    assert in_any_group("root", [root_group])
    assert not in_any_group("no-such-user-mfaguard", [root_group])
    assert requirement(verifier, "no-such-user-mfaguard") is Requirement.REQUIRED


def test_an_unknown_group_exempts_nobody(mfa_env: MfaEnv) -> None:
    _, verifier = setup(mfa_env, "enforcement:\n  exempt_groups: [no-such-group-mfaguard]\n")
    assert requirement(verifier, "root") is Requirement.REQUIRED
    assert not in_any_group("root", [])


def test_grace_for_a_named_user_without_devices_before_until(mfa_env: MfaEnv) -> None:
    store, verifier = setup(mfa_env, GRACE)
    assert mfa_env.clock() < UNTIL.timestamp()
    decision = verifier.requirement("newbie", CTX)
    assert decision.requirement is Requirement.GRACE
    assert "2030-01-01" in decision.reason
    assert requirement(verifier, "Carol") is Requirement.GRACE
    # Only the users named.
    assert requirement(verifier, "alice") is Requirement.REQUIRED
    assert requirement(verifier, "root") is Requirement.REQUIRED
    assert requirement(verifier, "carol") is Requirement.REQUIRED  # no case folding configured
    grace_rows = [r for r in store.audit_rows() if r.reason and r.reason.startswith("grace")]
    assert [r.user for r in grace_rows] == ["newbie", "Carol"]


def test_grace_ends_with_the_first_device(lib: type[Lib], mfa_env: MfaEnv) -> None:
    store, verifier = setup(mfa_env, GRACE)
    assert requirement(verifier, "newbie") is Requirement.GRACE
    device = lib.enroll(store, "newbie", lib.secret_for(1)).device
    assert requirement(verifier, "newbie") is Requirement.REQUIRED
    DeviceManager(store).set_enabled("newbie", device.id, False, CTX)
    assert requirement(verifier, "newbie") is Requirement.REQUIRED  # a disabled device is still a device


def test_a_pending_enrollment_does_not_end_the_grace(lib: type[Lib], mfa_env: MfaEnv) -> None:
    """An enrollment cut off before its code was confirmed must not lock the user out."""
    store, verifier = setup(mfa_env, GRACE)
    enrollment = lib.enroll(store, "newbie", lib.secret_for(1), pending=True)
    assert requirement(verifier, "newbie") is Requirement.GRACE
    assert DeviceManager(store).status("newbie").requirement is Requirement.GRACE
    code = lib.code(lib.secret_for(1), mfa_env.clock())
    assert verifier.confirm_enrollment("newbie", enrollment.device.id, code, CTX).accepted
    assert requirement(verifier, "newbie") is Requirement.REQUIRED


def test_grace_ends_at_until(mfa_env: MfaEnv) -> None:
    _, verifier = setup(mfa_env, GRACE)
    mfa_env.clock.set(UNTIL.timestamp() - 1)
    assert requirement(verifier, "newbie") is Requirement.GRACE
    mfa_env.clock.set(UNTIL.timestamp())
    assert requirement(verifier, "newbie") is Requirement.REQUIRED
    mfa_env.clock.set(UNTIL.timestamp() + 86400)
    assert requirement(verifier, "newbie") is Requirement.REQUIRED


def test_grace_for_a_group(mfa_env: MfaEnv) -> None:
    root_group = grp.getgrgid(0).gr_name
    _, verifier = setup(mfa_env, f"enforcement:\n  grace:\n    until: 2030-01-01\n    groups: [{root_group}]\n")
    assert requirement(verifier, "root") is Requirement.GRACE
    assert requirement(verifier, "no-such-user-mfaguard") is Requirement.REQUIRED
    mfa_env.clock.set(UNTIL.timestamp() + 1)
    assert requirement(verifier, "root") is Requirement.REQUIRED


def test_status_agrees_with_the_verifier(mfa_env: MfaEnv) -> None:
    store, verifier = setup(mfa_env, GRACE + "  exempt_users: [svc]\n")
    manager = DeviceManager(store)
    for user, expected in (("svc", Requirement.EXEMPT), ("newbie", Requirement.GRACE), ("root", Requirement.REQUIRED)):
        assert manager.status(user).requirement is expected
        assert requirement(verifier, user) is expected


def test_a_broken_database_means_required(mfa_env: MfaEnv) -> None:
    store, verifier = setup(mfa_env, GRACE)
    store.close()
    os.chmod(mfa_env.db_dir, 0o777)  # noqa: S103 - the unsafe mode is what is tested
    try:
        fresh = Verifier(store.settings, clock=mfa_env.clock)
        decision = fresh.requirement("newbie", CTX)
        assert decision.requirement is Requirement.REQUIRED
        assert decision.reason.startswith("error")
    finally:
        os.chmod(mfa_env.db_dir, 0o700)
