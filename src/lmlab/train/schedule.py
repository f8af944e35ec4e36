"""Learning-rate schedules as pure functions of the step (the resume state is just the step).

Step `s` counts optimizer steps from 0. Warmup is linear and reaches the peak on step
`warmup - 1`, so no step trains at lr 0. After warmup:
- cosine: from the peak down to `min_ratio` along half a cosine, reaching it on the last step;
- wsd (MiniCPM's warmup-stable-decay): the peak until the last `decay_fraction` of all steps,
  then linearly down to `min_ratio` on the last step. A stable run can be branched and
  decayed at any point, which is why it suits continued pretraining;
- constant: the peak.
"""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine",
              min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = total - warmup - 1
        progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        start = max(warmup, total - decay_steps)
        if step < start:
            return 1.0
        # The first decay step already steps down; the last one lands on min_ratio.
        progress = min(1.0, (step - start + 1) / (total - start))
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_at(step: int, total: int, peak: float, **kwargs) -> float:
    return peak * lr_factor(step, total, **kwargs)
