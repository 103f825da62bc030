"""Exceptions raised by the core.

Every message names the file, key or field at fault and says what would be
accepted. No message ever contains a code or a secret.
"""

from __future__ import annotations


class MfaguardError(Exception):
    """Base class for every error the core raises on purpose."""


class ConfigError(MfaguardError):
    """The settings file is missing, unsafe or invalid."""


class UnsafePathError(MfaguardError):
    """A file or folder the core relies on is a symlink, has the wrong owner or is too open."""


class KeyFileError(MfaguardError):
    """The sealing key file is missing, unreadable or malformed."""


class SchemaError(MfaguardError):
    """The database is not initialised, or its schema is newer than this code knows."""


class DatabaseError(MfaguardError):
    """The database cannot be opened or used."""


class InvalidUserName(MfaguardError):
    """A login name is empty, not valid UTF-8, or holds control characters."""


class InvalidInput(MfaguardError):
    """A value given by an administrator is out of range or malformed."""


class NotFound(MfaguardError):
    """The named device or user record does not exist."""


class DeviceLimitError(MfaguardError):
    """The user already has the maximum number of devices."""


class DuplicateDeviceError(MfaguardError):
    """The same secret or credential is already enrolled."""


class SealError(MfaguardError):
    """A sealed secret failed to open: wrong key, or the row was moved or altered."""


class LockoutGuardError(MfaguardError):
    """The change would leave root with no way to log in."""
