"""mfa-radiusd: the RADIUS front end (VPNs, network gear) over the mfaguard core.

It maps RADIUS to one Verifier call and the Decision back to RADIUS. It holds no policy:
lockout, replay, audit and user-name canonicalisation all come from ``devicedb``.
"""

import os

DICTIONARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dictionary")
