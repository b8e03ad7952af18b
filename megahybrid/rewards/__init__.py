"""Rewards (SPEC 4.6, 6): `math` (Math-Verify), `srl_similarity` (difflib), `exact` (string/integer), `kk`
(Knights-and-Knaves assignments), `format`.

`RewardPool(cfg.reward).score(responses, references)` runs checks in time-limited worker processes.
This package's __init__ stays import-light: worker processes import `megahybrid.rewards.subproc` early.
"""
__all__ = ["RewardPool", "RewardResult"]


def __getattr__(name: str):
    if name in __all__:
        from megahybrid.rewards import pool

        return getattr(pool, name)
    raise AttributeError(name)
