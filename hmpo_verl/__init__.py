"""hmpo-verl: the power-mean family of policy optimization (HMPO, geometric, arithmetic,
any real p, AGM) as a verl plugin.

Importing the package registers its losses with verl. verl itself imports it in every
process that imports verl, through the `verl.plugins` entry point -- but verl logs a
failing plugin import only at DEBUG level, so a broken install would surface much later
as "Unsupported loss mode". A failure here is therefore logged at ERROR (stderr) before
it is re-raised.
"""

import logging as _logging
import traceback as _traceback

try:
    from hmpo_verl.config import AdaptivePowerMeanLossConfig, PowerMeanAlgoConfig, PowerMeanLossConfig
    from hmpo_verl.means import (
        effective_sample_size,
        log_agm,
        log_power_mean,
        power_mean,
        power_mean_weights,
    )
    from hmpo_verl.registry import register

    register()
except Exception:  # noqa: BLE001 - report loudly whatever broke, then re-raise
    _logging.getLogger("hmpo_verl").error(
        "hmpo_verl failed to register with verl; its losses (hmpo, power_mean, agm, adaptive_power_mean) "
        "and advantage estimators (power_mean, agm) will be unavailable:\n%s",
        _traceback.format_exc(),
    )
    raise

__all__ = [
    "AdaptivePowerMeanLossConfig",
    "PowerMeanAlgoConfig",
    "PowerMeanLossConfig",
    "effective_sample_size",
    "log_agm",
    "log_power_mean",
    "power_mean",
    "power_mean_weights",
    "register",
]
