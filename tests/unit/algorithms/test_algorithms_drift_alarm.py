"""The drift alarm (rollout.max_mismatch_k3 + mismatch_patience) on a real optimisation loop in miniature: a bigram
policy trained by GRPO, an "engine" copy of its weights that samples the rollouts and reports log-probs, and a weight
sync after every step. Skipping the syncs (the fault we inject on purpose; the real pool cannot be told to miss one)
makes the trainer's old log-probs drift from the engine's; the alarm must warn once, then stop with a message naming
the likely causes. With every sync done, the drift is exactly 0 and the alarm stays quiet."""
import copy

import pytest
import torch

from algo_harness import make_algo
from megahybrid.algorithms.base import Batch
from megahybrid.training.mismatch import MismatchAlarm, MismatchAlarmError

V, T, K, B = 6, 8, 4, 3


def token_logp(model, tokens):
    """[S, T] log-prob of token t given token t-1 (position 0: none)."""
    logits = model(tokens[:, :-1])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(tokens.shape[0], 1, dtype=lp.dtype), lp], dim=1)


def sample(model, gen):
    tokens = torch.zeros(B * K, T, dtype=torch.long)
    with torch.no_grad():
        for t in range(1, T):
            probs = torch.softmax(model(tokens[:, t - 1]), -1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return tokens


def run(steps: int, skip_sync_from: int | None, alarm: MismatchAlarm) -> list[float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    policy = torch.nn.Embedding(V, V).double()
    engine = copy.deepcopy(policy)
    opt = torch.optim.SGD(policy.parameters(), lr=10.0)
    algo = make_algo("grpo")
    k3s = []
    for step in range(steps):
        tokens = sample(engine, gen)
        mask = torch.zeros(B * K, T, dtype=torch.bool)
        mask[:, 1:] = True
        with torch.no_grad():
            engine_logp, old_logp = token_logp(engine, tokens), token_logp(policy, tokens)
        batch = Batch(tokens=tokens, response_mask=mask, prompt_index=torch.arange(B).repeat_interleave(K),
                      is_demo=torch.zeros(B * K, dtype=torch.bool), rewards=(tokens[:, -1] == 0).double(),
                      old_logp=old_logp, old_entropy=torch.zeros(B * K, T, dtype=torch.float64),
                      engine_logp=engine_logp)
        plan = algo.plan(step)
        batch, stats = algo.prepare_batch(batch, plan)
        logp = token_logp(policy, tokens)
        loss, _ = algo.loss(batch, logp, torch.zeros_like(logp), stats, plan)
        opt.zero_grad()
        (loss - 2.0 * logp[mask].mean()).backward()  # plus a likelihood push so every step moves the policy
        opt.step()
        metrics = algo.final_metrics(stats)
        k3s.append(metrics["mismatch/k3"])
        alarm.check(step, metrics)
        if skip_sync_from is None or step < skip_sync_from:
            engine.load_state_dict(policy.state_dict())  # the weight sync
    return k3s


def test_synced_run_has_zero_drift_and_no_alarm(capsys):
    k3s = run(6, None, MismatchAlarm(0.01, patience=2))
    assert max(k3s) == pytest.approx(0.0, abs=1e-12)
    assert "warning" not in capsys.readouterr().err


def test_skipped_weight_sync_warns_once_then_stops_the_run(capsys):
    alarm = MismatchAlarm(0.01, patience=3)
    with pytest.raises(MismatchAlarmError, match="weight sync") as exc:
        run(12, skip_sync_from=2, alarm=alarm)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "rollout.max_mismatch_k3" in err
    msg = str(exc.value)
    assert "dtype or kernel" in msg and "temperature" in msg and "3 consecutive steps" in msg


def test_alarm_counter_resets_and_round_trips():
    alarm = MismatchAlarm(1.0, patience=3)
    alarm.check(0, {"mismatch/k3": 2.0})
    alarm.check(1, {"mismatch/k3": 2.0})
    restored = MismatchAlarm(1.0, patience=3)
    restored.load_state_dict(alarm.state_dict())
    with pytest.raises(MismatchAlarmError):
        restored.check(2, {"mismatch/k3": 2.0})
    alarm.check(2, {"mismatch/k3": 0.5})  # a step under the bound resets the count
    assert alarm.check(3, {"mismatch/k3": 2.0}) == {"mismatch/alarm_steps": 1.0}
    assert MismatchAlarm(None, 3).check(0, {"mismatch/k3": 1e9}) == {}
