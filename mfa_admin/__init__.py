"""mfa-admin, the administrator's command over the mfaguard core."""
