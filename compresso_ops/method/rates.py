"""Learning rates of the gates and the Lagrange multipliers, and the check that the gates followed the ramp.

Torch-free, so `validate` can warn about a schedule before any training (docs/method.md §5).
"""

from __future__ import annotations

# The paper's learning rate for gates and multipliers suits its 1,628-step ramp. A short ramp needs travel:
# Adam moves a parameter by about lr per step, and the multipliers must grow until the Lagrangian outweighs
# the LM loss while the target still ramps. Too fast gates overshoot the target and the multipliers swing
# back (a 40-step ramp at 2.5 / 1.5 ends at 0.008 for 0.2). "auto" keeps lr x ramp steps at least these,
# measured on stories260K (benchmarks/gate_lr.py): at 0.1 / 0.1 a 200-step ramp ends at 0.19 for 0.2 and a
# 40-step one at 0.006; 0.375 / 0.625 brings the 40-step ramp to the target.
REFERENCE_LR = 0.1
GATE_TRAVEL = 15.0
LAMBDA_TRAVEL = 25.0


def gate_learning_rates(gates: float | str, lagrangian: float | str, ramp_steps: int) -> tuple[float, float]:
    """The gates' and the multipliers' learning rates: the recipe's numbers, or for "auto" the paper's 0.1
    raised so that a short ramp gives them the travel a long one does."""
    def resolve(value: float | str, travel: float) -> float:
        return max(REFERENCE_LR, travel / max(1, ramp_steps)) if value == "auto" else float(value)
    return resolve(gates, GATE_TRAVEL), resolve(lagrangian, LAMBDA_TRAVEL)


def ramp_lag(expected_at_ramp_end: float | None, target: float) -> str | None:
    """A warning when the expected sparsity ended the ramp far (over a quarter of the target) from it: the
    gates did not follow the schedule, and the final masks are cut from gates trained away from the target."""
    if expected_at_ramp_end is None or abs(expected_at_ramp_end - target) <= 0.25 * target:
        return None
    return (f"the expected sparsity ended the ramp at {expected_at_ramp_end:.3f} for a target of {target:.3f}: "
            "the gates did not follow the schedule; use prune.lr.gates / prune.lr.lagrangian: auto or a longer ramp")


# In benchmarks/gate_lr.py the multipliers' travel (lr x ramp steps) decided whether the ramp was followed:
# 4 and 10 ended far below the target, 20 and more reached it.
MIN_LAMBDA_TRAVEL = 15.0


def ramp_too_short(lagrangian: float | str, ramp_steps: int) -> str | None:
    """A warning when the multipliers' learning rate cannot follow a ramp of `ramp_steps` steps ("auto"
    always can)."""
    if lagrangian == "auto" or float(lagrangian) * ramp_steps >= MIN_LAMBDA_TRAVEL:
        return None
    return (f"{float(lagrangian):g} x a {ramp_steps}-step ramp is too little for the multipliers to pull the "
            f"gates to the target (lr x ramp steps under {MIN_LAMBDA_TRAVEL:g} ended far below it in "
            "benchmarks/gate_lr.py); use auto or a longer ramp")
