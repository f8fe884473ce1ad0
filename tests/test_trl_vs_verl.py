"""The TRL adapter against the verl losses: same options, same inputs, same loss and gradient.

TRL's loss_type "grpo" is verl's seq-mean-token-mean and "bnpo" (one micro-batch) verl's
token-mean; TRL's `delta` is verl's `clip_ratio_c` (token level, ratio space), TRL's
`epsilon` / `epsilon_high` verl's `clip_ratio_low` / `clip_ratio_high`. This covers what
the comparison with TRL's own losses cannot: p other than 0 and 1, the AGM, adaptive p.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("verl")

from test_trl_vs_trl import B, T, TIGHT, _args, _inputs, _stub  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import hmpo_verl.verl_plugin  # noqa: E402,F401  (registers, as verl's plugin loading does)
from hmpo_verl.adaptive import scheduled_power  # noqa: E402
from hmpo_verl.config import AdaptivePowerMeanLossConfig, PowerMeanLossConfig  # noqa: E402
from hmpo_verl.trl import PowerMeanGRPOTrainer  # noqa: E402

EPS_LOW, EPS_HIGH, DUAL = 0.1, 0.15, 1.4

# (verl loss_mode, options shared by both configs, TRL-only options)
CASES = [
    ("hmpo", {}, {"power": -1.0}),
    ("power_mean", {"power": 0.5, "clip_level": "sequence"}, {}),
    ("power_mean", {"power": -math.inf}, {}),
    ("power_mean", {"power": 3.0, "clip_space": "log"}, {}),
    ("agm", {}, {"mean": "agm"}),
    ("agm", {"agm_iters": 2, "clip_level": "sequence"}, {"mean": "agm"}),
    ("adaptive_power_mean", {"adapt": "ess", "ess_target_min": 0.9}, {}),
    ("adaptive_power_mean", {"adapt": "ess", "sign_rule": "positive"}, {}),
]


def _verl_loss(loss_mode, fields, logps, inputs, agg, token_ratio_dual):
    """verl's loss; its dual clip clip_ratio_c = DUAL where one applies (token level, ratio space), else verl's
    default (set elsewhere, it is refused as unread)."""
    options = AdaptivePowerMeanLossConfig if loss_mode == "adaptive_power_mean" else PowerMeanLossConfig
    dual = {"clip_ratio_c": DUAL} if token_ratio_dual else {}
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=EPS_LOW,
                         clip_ratio_high=EPS_HIGH, **dual, policy_loss=options(loss_mode=loss_mode, **fields))
    mask = inputs["completion_mask"].bool()
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B,
                                    loss_scale_factor=None)
    advantages = inputs["advantages"].unsqueeze(1).expand(B, T)
    loss, _ = get_policy_loss_fn(loss_mode)(inputs["old_per_token_logps"], logps, advantages, mask, agg, config, None)
    return loss


@pytest.mark.parametrize("loss_type,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean")])
@pytest.mark.parametrize("loss_mode,fields,trl_only", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_trl_adapter_equals_the_verl_loss(tmp_path, loss_mode, fields, trl_only, loss_type, agg):
    token_ratio_dual = fields.get("clip_level", "token") == "token" and fields.get("clip_space", "ratio") == "ratio"
    args = _args(tmp_path, loss_type=loss_type, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                 delta=DUAL if token_ratio_dual else None, **fields, **trl_only)
    base, entropies, inputs = _inputs(seed=1, noise=0.3)

    logps = base.clone().requires_grad_(True)
    stub = _stub(args, logps, entropies, "token", training=False)  # eval: no gradient-accumulation factor
    ours = PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)
    (our_grad,) = torch.autograd.grad(ours, logps)

    logps_verl = base.clone().requires_grad_(True)
    theirs = _verl_loss(loss_mode, fields, logps_verl, inputs, agg, token_ratio_dual)
    (verl_grad,) = torch.autograd.grad(theirs, logps_verl)
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TIGHT)
    torch.testing.assert_close(our_grad, verl_grad, **TIGHT)
    assert our_grad.abs().sum() > 0


def test_schedule_follows_trls_optimizer_step(tmp_path):
    """adapt="schedule" reads TRL's state.global_step: at step k it is the fixed power p(k)."""
    schedule = dict(adapt="schedule", p_start=2.0, p_end=-2.0, schedule_steps=4, schedule="cosine")
    base, entropies, inputs = _inputs(seed=2, noise=0.3)
    for step in (0, 1, 3, 9):
        p = scheduled_power(step, 2.0, -2.0, 4, "cosine")
        losses = []
        for options in (schedule, {"power": p}):
            logps = base.clone().requires_grad_(True)
            stub = _stub(_args(tmp_path, **options), logps, entropies, "token")
            stub.state.global_step = step
            loss = PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)
            losses.append((loss.detach(), torch.autograd.grad(loss, logps)[0], stub._metrics["train"]["pm/power"]))
        torch.testing.assert_close(losses[0][0], losses[1][0], **TIGHT)
        torch.testing.assert_close(losses[0][1], losses[1][1], **TIGHT)
        assert losses[0][2] == pytest.approx([p])
