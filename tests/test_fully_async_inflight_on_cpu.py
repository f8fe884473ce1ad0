"""A fully-async resume says how many prompts it will never train (``hmpo_verl.guards.inflight``).

verl's fully-async trainer saves the rollouter's dataloader past the prompts in flight (pending,
being generated, finished in the message queue) and resumes past them. The entry point's own main
(Ray's start replaced by a failure) must log the count before Ray starts. The checkpoint is laid
out as verl's FSDP saver writes it, with the ``data.pt`` of a real ``StatefulDataLoader`` that
yielded one prompt at a time, as the rollouter's does.
"""

from __future__ import annotations

import logging

import pytest
import ray
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from test_run_settings_on_cpu import _entry_main, saved_run, verl_config

from hmpo_verl.inflight import inflight_at

VERSION = 2  # saved_run's checkpoint: global_step_2


def _rollouter_state(drawn: int) -> dict:
    """The state of a rollouter's dataloader (``gen_batch_size=1``) after ``drawn`` prompts."""
    loader = StatefulDataLoader(list(range(64)), batch_size=1)
    iterator = iter(loader)
    for _ in range(drawn):
        next(iterator)
    return loader.state_dict()


def _launch(tmp_path, drawn: int, monkeypatch, caplog) -> list[str]:
    """The fully-async entry point on a checkpoint whose rollouter had drawn ``drawn`` prompts; its warnings."""

    def ray_init(*args, **kwargs):
        raise AssertionError("Ray starts here")

    monkeypatch.setattr(ray, "init", ray_init)
    step_dir = saved_run(tmp_path, entry="fully_async")
    torch.save(_rollouter_state(drawn), step_dir / "data.pt")
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"), pytest.raises(AssertionError, match="Ray starts here"):
        _entry_main("fully_async")(verl_config(tmp_path, entry="fully_async"))
    return [r.getMessage() for r in caplog.records if "fully-async run resumes" in r.getMessage()]


def _per_sync(tmp_path) -> int:
    config = verl_config(tmp_path, entry="fully_async")
    sync = config.async_training
    return config.actor_rollout_ref.actor.ppo_mini_batch_size * sync.require_batches * sync.trigger_parameter_sync_step


def test_the_resume_names_the_prompts_in_flight_before_ray_starts(tmp_path, monkeypatch, caplog):
    trained = VERSION * _per_sync(tmp_path)
    warnings = _launch(tmp_path, trained + 5, monkeypatch, caplog)
    assert len(warnings) == 1, warnings
    assert f"Its trainer had trained {trained} prompts then ({VERSION} syncs x {trained // VERSION})" in warnings[0]
    assert f"its rollouter had drawn {trained + 5} of the current epoch: the 5 prompts between were in flight" \
        in warnings[0]
    assert "the resumed run never trains them" in warnings[0] and "trainer.resume_mode=disable" in warnings[0]


def test_nothing_in_flight_is_nothing_to_say(tmp_path, monkeypatch, caplog):
    assert _launch(tmp_path, VERSION * _per_sync(tmp_path), monkeypatch, caplog) == []


def test_an_uncountable_state_is_still_named(tmp_path):
    step_dir = saved_run(tmp_path, entry="fully_async")  # its data.pt holds no dataloader counts
    assert inflight_at(step_dir, 8) == (None, 16, None)
    torch.save(_rollouter_state(3), step_dir / "data.pt")  # a later epoch than 16 trained prompts reach
    assert inflight_at(step_dir, 8) == (3, 16, None)
