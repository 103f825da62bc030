from mfa_admin.cli import entry

entry()
