"""A search's settings checked without importing Ray or torch, so that a bad flag is refused at
once (it took seconds of imports), by the command line and by `search.SearchSettings` alike."""

from __future__ import annotations

from typing import Any

GPU_CHOICES = ("auto", "always", "never")
AT_LEAST_ONE = ("num_samples", "trials_per_gpu", "max_concurrent", "keep_checkpoints")


def check(settings: dict[str, Any]) -> None:
    """Raise ValueError naming the first setting out of its range; one absent or None passes."""
    given = {k: v for k, v in settings.items() if v is not None}
    if "gpu" in given and given["gpu"] not in GPU_CHOICES:
        raise ValueError(f"gpu={given['gpu']!r}: must be one of {', '.join(GPU_CHOICES)}")
    for name in AT_LEAST_ONE:
        if given.get(name, 1) < 1:
            raise ValueError(f"{name}={given[name]}: must be at least 1")
    if given.get("cpus_per_trial", 1) <= 0:
        raise ValueError(f"cpus_per_trial={given['cpus_per_trial']}: must be above 0")
    if given.get("max_failures", 0) < 0:
        raise ValueError(f"max_failures={given['max_failures']}: must be at least 0")
