"""verl's entry point for hmpo_verl (group `verl.plugins`, see pyproject.toml).

verl imports this module from `verl/__init__.py` in every process that imports verl
(driver, TaskRunner, Ray workers). It registers the losses and advantage estimators as
soon as verl's `core_algos` is imported, and adds our option checks to verl's
`validate_config` at once; see `hmpo_verl.registry`. Import it yourself only where verl's
plugin loading is off (`VERL_USE_EXTERNAL_PLUGINS=none`).
"""

from hmpo_verl.hosts.verl.registry import register_on_import

register_on_import()
