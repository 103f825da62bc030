"""mfaguard's PAM front end, run by Debian's libpam-python (pam_python.so)."""
