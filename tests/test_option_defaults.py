"""Every host's power-mean options default to the one table `hmpo_verl.maths.options.DEFAULTS`.

The verl configs, TRL's config and `LossOptions` (OpenRLHF, SkyRL) each declare the same option names;
a default changed in one host and not the others would make the "same" loss differ by host. TRL's
`adapt` is the one by-design exception (None: a fixed power; TRL has no loss_mode).
"""

from dataclasses import MISSING, fields

import pytest

from hmpo_verl.hosts.host_loss import LossOptions
from hmpo_verl.hosts.verl.config import AdaptivePowerMeanLossConfig, PowerMeanLossConfig
from hmpo_verl.maths.options import DEFAULTS

# verl's configs declare no power (power_mean refuses to run without one; the other loss modes take DEFAULTS' -1)
BY_DESIGN = {("PowerMeanGRPOConfig", "adapt"): None, ("PowerMeanLossConfig", "power"): None,
             ("AdaptivePowerMeanLossConfig", "power"): None}


def host_configs():
    configs = [PowerMeanLossConfig, AdaptivePowerMeanLossConfig, LossOptions]
    try:
        from hmpo_verl.hosts.trl import PowerMeanGRPOConfig
    except ImportError:  # TRL not installed: the other hosts are still checked
        return configs
    return configs + [PowerMeanGRPOConfig]


def declared_defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.name in DEFAULTS:
            out[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return out


@pytest.mark.parametrize("cls", host_configs(), ids=lambda c: c.__name__)
def test_host_defaults_are_the_table(cls):
    declared = declared_defaults(cls)
    assert declared, f"{cls.__name__} declares none of the shared options"
    wrong = {name: (value, BY_DESIGN.get((cls.__name__, name), DEFAULTS[name])) for name, value in declared.items()
             if value != BY_DESIGN.get((cls.__name__, name), DEFAULTS[name])}
    assert not wrong, f"{cls.__name__}: defaults differ from DEFAULTS (declared, table): {wrong}"


def test_every_table_entry_is_an_option_of_the_verl_adaptive_config():
    """The table holds options, not leftovers: each name is a field of the fullest config."""
    names = {f.name for f in fields(AdaptivePowerMeanLossConfig)}
    assert set(DEFAULTS) <= names, sorted(set(DEFAULTS) - names)


def test_the_defaults_validate_in_every_host():
    """Constructing each host's config from the table alone passes its validation."""
    AdaptivePowerMeanLossConfig(**DEFAULTS)
    LossOptions(loss_mode="adaptive_power_mean", **{k: DEFAULTS[k] for k in declared_defaults(LossOptions)})
