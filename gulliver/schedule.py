"""
How far a training run has got, and the learning rate that goes with it.

A run ends at max_iters iterations or after max_seconds of wall time, whichever comes first,
so its progress is the larger of the two fractions:

    progress = max(iter / max_iters, elapsed / max_seconds)        (max_seconds None: no budget)

The learning rate rises linearly over the first warmup_iters iterations and follows a cosine
from learning_rate down to min_lr over progress 0 -> 1:

    lr = min(1, (iter + 1) / (warmup_iters + 1)) * (min_lr + (learning_rate - min_lr) * (1 + cos(pi p)) / 2)

with p = min(progress, 1). With a cooldown fraction f the peak holds instead, and the decay
is linear over the last f of the run (warm-up, stable, decay):

    lr = min(1, (iter + 1) / (warmup_iters + 1)) * (min_lr + (learning_rate - min_lr) * min(1, (1 - p) / f))

A budgeted run therefore ends its decay at min_lr whatever the speed of the machine: a slow
CPU takes fewer, a fast one more, iterations to get there. Warm-up counts iterations because
what it protects against (large early updates from Adam's uninitialised second moments) is a
number of steps, not of seconds.
"""
import math


def training_progress(iter_num, max_iters, elapsed, max_seconds):
    """The fraction of the run done, in [0, inf): 1 means the run is over."""
    by_iters = iter_num / max_iters if max_iters else 1.0
    by_time = elapsed / max_seconds if max_seconds else 0.0
    return max(by_iters, by_time)


def learning_rate_at(iter_num, progress, learning_rate, min_lr, warmup_iters, cooldown=None):
    """Linear warm-up in iterations times a decay in progress: a cosine over the whole run, or
    with cooldown, the peak and then a line to min_lr over that last fraction (module docstring)."""
    warmup = min(1.0, (iter_num + 1) / (warmup_iters + 1))
    p = min(progress, 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * p)) if cooldown is None else min(1.0, (1.0 - p) / cooldown)
    return warmup * (min_lr + decay * (learning_rate - min_lr))
