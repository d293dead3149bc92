"""Bounds on an explicit context beyond what the settings parser can know.

The settings resolver refuses contexts below 32 or above 2^24 tokens whatever the
model; here an explicit --ctx is judged against the model and the memory free now
(the planner, no loading): llama.cpp would otherwise allocate what it is told
(`--ctx 99999999` reached 5.2 GB resident) and a wrapped or oversized value ends
in swapping or the OOM killer instead of a message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvchat.errors import OutOfMemoryError, UsageError

if TYPE_CHECKING:
    from kvchat.memory import Budget, PlanSettings
    from kvchat.model_spec import ModelSpec

# How far past the training context an explicit --ctx may go without being forced:
# 4x is what rope scaling (YaRN, linear) is commonly used for.
TRAINING_CTX_FACTOR = 4
FORCE_ENV = "KVCHAT_FORCE"


def forced() -> bool:
    """KVCHAT_FORCE=1: go past the training-length and free-memory bounds."""
    return os.environ.get(FORCE_ENV, "") not in ("", "0", "false", "no")


def check_explicit_ctx(spec: ModelSpec, base: PlanSettings, budget: Budget, n_ctx: int, *,
                       force: bool) -> list[str]:
    """Refuse an explicit --ctx past 4x the training context or past the memory free
    now, unless forced; returns the warnings to show: a context llama.cpp rounds up,
    and one forced through."""
    from dataclasses import replace

    from kvchat.memory import CTX_PAD, fits, plan_memory, round_ctx

    warnings = []
    rounded = round_ctx(n_ctx, spec.n_ctx_train)[0]
    if rounded != n_ctx:
        warnings.append(f"--ctx {n_ctx} becomes {rounded}: llama.cpp rounds the context up to a multiple "
                        f"of {CTX_PAD}")
    train = spec.n_ctx_train
    if train and n_ctx > train * TRAINING_CTX_FACTOR and not force:
        raise UsageError(
            f"--ctx {n_ctx} is more than {TRAINING_CTX_FACTOR}x the model's training context ({train})",
            hint=f"use --ctx {train} or less, or set {FORCE_ENV}=1 to try it anyway",
        )
    plan = plan_memory(spec, replace(base, n_ctx=n_ctx))
    if fits(plan, budget):
        return warnings
    if not force:
        raise OutOfMemoryError(
            f"--ctx {n_ctx} needs about {plan.total / 2**30:.2f} GiB, more than the memory free now "
            f"({max(budget.ram, 0) / 2**30:.2f} GiB RAM)",
            hint=f"use a smaller --ctx or --ctx auto (see `kvchat estimate`), or set {FORCE_ENV}=1",
        )
    return [*warnings, f"--ctx {n_ctx} may not fit the memory free now ({FORCE_ENV} is set)"]
