"""hmpo-verl: the power-mean family of policy optimization (HMPO, geometric, arithmetic,
any real p, AGM) as a verl plugin. Importing the package registers its losses with verl.
"""

from hmpo_verl.config import PowerMeanLossConfig
from hmpo_verl.means import (
    effective_sample_size,
    log_agm,
    log_power_mean,
    power_mean,
    power_mean_weights,
)
from hmpo_verl.registry import register

register()

__all__ = [
    "PowerMeanLossConfig",
    "effective_sample_size",
    "log_agm",
    "log_power_mean",
    "power_mean",
    "power_mean_weights",
    "register",
]
