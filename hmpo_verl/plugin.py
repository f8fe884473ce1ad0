"""verl plugin entry point (group `verl.plugins`): importing this module registers hmpo_verl.

verl imports every entry point of that group in each process that imports verl, but logs
a failing import only at DEBUG level -- a broken plugin would then surface much later as
"Unsupported loss mode". So a failure here is logged at ERROR (stderr) before re-raising.
"""

import logging
import traceback

try:
    import hmpo_verl  # noqa: F401  (registers on import)
except Exception:  # noqa: BLE001 - report loudly whatever broke, then re-raise
    logging.getLogger("hmpo_verl").error(
        "hmpo_verl failed to register its losses with verl; loss_mode=hmpo/power_mean/agm will be "
        "unavailable:\n%s",
        traceback.format_exc(),
    )
    raise
