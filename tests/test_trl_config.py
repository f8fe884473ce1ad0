"""PowerMeanGRPOConfig validates our options with the verl configs' errors, and TRL's own options we rely on."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("trl")

from hmpo_verl.config import LOSS_PREFIX, AdaptivePowerMeanLossConfig, PowerMeanLossConfig  # noqa: E402
from hmpo_verl.trl import PREFIX, PowerMeanGRPOConfig  # noqa: E402

BASE = dict(report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2, num_generations=2)


def _trl(tmp_path, **kw):
    return PowerMeanGRPOConfig(output_dir=str(tmp_path), **BASE, **kw)


def _error(make) -> str:
    with pytest.raises(ValueError) as err:
        make()
    return str(err.value)


# (field, bad value, whether the option belongs to adaptive p)
BAD = [
    ("power", math.nan, False),
    ("power", "1", False),
    ("clip_level", "row", False),
    ("clip_space", "logit", False),
    ("agm_iters", -1, False),
    ("agm_iters", 1.5, False),
    ("adapt", "bandit", True),
    ("p_min", 0.5, True),
    ("p_max", -0.5, True),
    ("p_min", -1.5e4, True),
    ("p_max", 1e5, True),
    ("sign_rule", "both", True),
    ("ess_target_min", 0.0, True),
    ("ess_target_min", 1.5, True),
    ("schedule", "step", True),
    ("p_start", math.inf, True),
    ("p_end", math.nan, True),
    ("schedule_steps", 0, True),
]


@pytest.mark.parametrize("name,value,adaptive", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_same_error_as_the_verl_config(tmp_path, name, value, adaptive):
    if adaptive:
        adapt = {} if name == "adapt" else {"adapt": "schedule"}
        verl_msg = _error(lambda: AdaptivePowerMeanLossConfig(**{"adapt": "schedule", name: value}))
        trl_msg = _error(lambda: _trl(tmp_path, **adapt, **{name: value}))
    else:
        verl_msg = _error(lambda: PowerMeanLossConfig(**{name: value}))
        trl_msg = _error(lambda: _trl(tmp_path, **{name: value}))
    assert verl_msg.startswith(f"{LOSS_PREFIX}.{name}=")
    expected = verl_msg.replace(LOSS_PREFIX, PREFIX)
    if name == "adapt":  # in TRL one config holds every mean: None (a fixed power) is allowed too
        expected = expected.replace("allowed: ess", "allowed: None, ess")
    assert trl_msg == expected


def test_ess_needs_token_clip_with_the_same_error(tmp_path):
    verl_msg = _error(lambda: AdaptivePowerMeanLossConfig(adapt="ess", clip_level="sequence"))
    trl_msg = _error(lambda: _trl(tmp_path, adapt="ess", clip_level="sequence"))
    assert trl_msg == verl_msg.replace(LOSS_PREFIX, PREFIX)
    assert verl_msg.endswith("allowed: token (or use adapt='schedule')")  # both hosts run adapt='schedule'


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"mean": "median"}, "PowerMeanGRPOConfig.mean='median' is invalid; allowed: power, agm"),
        ({"adapt": "ess", "mean": "agm"}, "PowerMeanGRPOConfig.mean='agm' is invalid with adapt='ess'; allowed: power"),
        ({"loss_type": "cispo"}, "PowerMeanGRPOConfig.loss_type='cispo' is invalid; allowed: grpo, bnpo, dr_grpo"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence' is invalid; allowed: token"),
        ({"epsilon": 1.5}, "PowerMeanGRPOConfig.epsilon=1.5, PowerMeanGRPOConfig.epsilon_high=1.5 are invalid"),
        ({"epsilon_high": -0.1}, "epsilon_high=-0.1 are invalid for clip_space='ratio'"),
        ({"delta": 0.9}, "PowerMeanGRPOConfig.delta=0.9 is invalid; allowed: a number > 1"),
        # wrong types: an unnamed TypeError ('>=' not supported), or True taken as 1 (ratio_low 0)
        ({"epsilon": "0.2"}, "PowerMeanGRPOConfig.epsilon='0.2', PowerMeanGRPOConfig.epsilon_high='0.2' are invalid"),
        ({"epsilon": True}, "PowerMeanGRPOConfig.epsilon=True, PowerMeanGRPOConfig.epsilon_high=True are invalid"),
        ({"epsilon_high": "0.3"}, "PowerMeanGRPOConfig.epsilon_high='0.3' are invalid for clip_space='ratio'; "
                                  "allowed: numbers"),
        ({"delta": "2"}, "PowerMeanGRPOConfig.delta='2' is invalid; allowed: a number > 1"),
        ({"power": 10**400}, "PowerMeanGRPOConfig.power=1000"),  # an int past float64: no OverflowError
        ({"delta": 2.0, "clip_level": "sequence"}, "delta=2.0 is invalid with clip_level='sequence'"),
        ({"entropy_coef": 0.01}, "PowerMeanGRPOConfig.entropy_coef=0.01, use_adaptive_entropy=False are invalid"),
        # TRL's compute_loss would call compute_liger_loss (plain GRPO), never the power-mean _compute_loss
        ({"use_liger_kernel": True}, "PowerMeanGRPOConfig.use_liger_kernel=True is invalid; allowed: False"),
    ],
)
def test_trl_specific_errors(tmp_path, kw, match):
    assert match in _error(lambda: _trl(tmp_path, **kw))


def test_liger_is_the_one_branch_by_which_trls_compute_loss_skips_ours():
    """PowerMeanGRPOTrainer overrides _compute_loss; the installed TRL's compute_loss reaches it unless
    use_liger_kernel (refused above). A new branch there would be another way around the power-mean loss."""
    import inspect
    import re

    from trl import GRPOTrainer

    assert re.findall(r"if self\.(\w+)", inspect.getsource(GRPOTrainer.compute_loss)) == ["use_liger_kernel"]


def test_the_installed_trl_lets_verl_start_its_actor():
    """verl 0.9.1 imports TRL's value-head model whenever TRL is installed, while it patches the actor
    model (apply_monkey_patch); TRL >= 1.13 no longer has it and the actor fails to start."""
    pytest.importorskip("verl")
    code = textwrap.dedent(
        """
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from verl.models.transformers.monkey_patch import apply_monkey_patch
        config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        apply_monkey_patch(Qwen2ForCausalLM(config), use_remove_padding=False)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_log_space_allows_epsilon_above_one_and_defaults(tmp_path):
    args = _trl(tmp_path, clip_space="log", epsilon=1.5, power=-math.inf)
    assert args.power == -math.inf and args.epsilon == 1.5
    defaults = _trl(tmp_path)
    assert (defaults.power, defaults.mean, defaults.clip_level, defaults.clip_space, defaults.loss_type,
            defaults.adapt) == (-1.0, "power", "token", "ratio", "grpo", None)


def test_options_parse_from_the_command_line(tmp_path):
    """TRL users configure through HfArgumentParser; our fields (Optional ones included) must parse, and an
    option the chosen mean or adapt rule does not read is refused by name (it would silently do nothing)."""
    from transformers import HfArgumentParser

    common = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--per_device_train_batch_size", "2",
              "--num_generations", "2", "--report_to", "none"]

    def parse(*extra):
        return HfArgumentParser(PowerMeanGRPOConfig).parse_args_into_dataclasses([*common, *extra])[0]

    args = parse("--power", "-0.5", "--clip_level", "sequence")
    assert (args.power, args.clip_level, args.adapt, args.agm_iters) == (-0.5, "sequence", None, None)
    args = parse("--mean", "agm", "--agm_iters", "3")
    assert (args.mean, args.agm_iters) == ("agm", 3)
    args = parse("--adapt", "schedule", "--p_start", "1.5")
    assert (args.adapt, args.p_start) == ("schedule", 1.5)
    with pytest.raises(ValueError, match=rf"^{PREFIX}\.power=-0\.5, {PREFIX}\.agm_iters=3: not read with "
                                         r"adapt='schedule', so the run would ignore it"):
        parse("--power", "-0.5", "--adapt", "schedule", "--agm_iters", "3")


REWARD_BAD = [("reward_gamma", -0.1), ("reward_gamma", math.inf), ("feedback_clip", 1), ("feedback_clip_min", -0.1),
              ("feedback_clip_max", 0.1), ("feedback_delta", 0.0)]


@pytest.mark.parametrize("name,value", REWARD_BAD, ids=[f"{n}={v!r}" for n, v in REWARD_BAD])
def test_reward_adapt_options_have_the_verl_configs_errors(tmp_path, name, value):
    verl_msg = _error(lambda: AdaptivePowerMeanLossConfig(**{"adapt": "reward", name: value}))
    assert verl_msg.startswith(f"{LOSS_PREFIX}.{name}=")
    assert _error(lambda: _trl(tmp_path, adapt="reward", **{name: value})) == verl_msg.replace(LOSS_PREFIX, PREFIX)
    clip = _error(lambda: AdaptivePowerMeanLossConfig(adapt="reward", clip_level="sequence"))
    assert "allowed: clip_level='token', clip_space='ratio'" in clip
