"""Every setting of a SimDiffRec run in one flat dataclass.

Flat on purpose: a Ray Tune trial hands us a flat dict, the CLI has one flag per field and the
YAML file is one mapping, so one shape serves all three.  Defaults follow the paper (Section
5.1.4) where it speaks and the authors' code or CaDiRec where it does not; docs/method.md says
which is which.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .files import write_atomic

SELECT_BY = "NDCG@10"  # the valid metric that early stopping, checkpoints and the search select by

CHOICES: dict[str, tuple[str, ...]] = {
    "sr_loss": ("ce", "bce"),
    "noise_type": ("similarity", "gaussian"),
    "aug_positions": ("confidence", "random"),
    "schedule": ("cosine", "linear", "sqrt"),
    "mix": ("convex", "vp"),
    "rounding": ("z0", "pred"),
    "tau_schedule": ("constant", "linear", "cosine"),
    "similarity": ("cosine", "dot"),
    "batching": ("tokens", "random"),
    "compile": ("auto", "on", "off"),
}

# The settings only L_d and L_cl read: with alpha = beta = 0 (SASRec) they change no loss and no score
# of a model with given weights (the denoiser they shape is built but unused).
SIMDIFFREC_ONLY = ("steps", "schedule", "mix", "denoiser_layers", "denoiser_heads", "restore_steps", "rounding",
                   "k_noise", "k_sample", "tau", "tau_end", "tau_schedule", "aug_ratio", "min_substitutions",
                   "aug_dropout", "view_dropout", "similarity", "shared_denoiser", "alpha_warmup",
                   "noise_type", "aug_positions", "hard_negative", "exclude_original")

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: every setting reaches torch as one


@dataclass
class Config:
    # data
    max_len: int | None = None  # None: the dataset's default (50; 200 for ml-1m)
    kcore: int = 5
    # SASRec encoder
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    # diffusion (Section 4.2)
    steps: int = 1000
    schedule: str = "cosine"
    mix: str = "convex"
    denoiser_layers: int = 1
    denoiser_heads: int = 2
    restore_steps: int = 1
    rounding: str = "pred"
    # SimDiffRec (Sections 4.1, 4.3, 4.4, Eq. 18)
    alpha: float = 0.4
    beta: float = 0.4
    k_noise: int = 25
    k_sample: int = 2
    tau: float = 1.0
    tau_end: float | None = None
    tau_schedule: str = "constant"
    aug_ratio: float = 0.2
    min_substitutions: int = 1  # positions substituted per view at least (the paper: one)
    aug_dropout: bool = True  # restore and score the views with the denoiser's dropout on (the authors' code)
    view_dropout: bool = True  # L_cl's e_u, e_v+, e_v- encoded with dropout (the authors' code)
    similarity: str = "cosine"  # Eq. 17's sim: cosine (the paper) or dot product (CaDiRec)
    shared_denoiser: bool = False  # the denoiser runs the encoder's layers (the authors' code)
    alpha_warmup: int = 0  # α grows linearly to its value over this many epochs (0: from the start)
    sr_loss: str = "ce"  # L_sr: full softmax (ce, the authors' code) or one sampled negative (bce, Eq. 3)
    # ablation switches (Table 3)
    noise_type: str = "similarity"  # Eq. 6-7's similarity noise, or isotropic gaussian
    aug_positions: str = "confidence"  # Eq. 14-16's most confident positions, or random ones
    hard_negative: bool = True
    exclude_original: bool = True
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    batching: str = "tokens"  # rows grouped by length under a budget of real positions, or random rows
    epochs: int = 200
    eval_every: int = 1
    patience: int = 10
    seed: int = 42
    device: str = "auto"
    amp: bool = True
    compile: str = "auto"  # torch.compile the training step: auto = on CUDA only

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r}: must be a finite number")
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # the optimiser's step overflows
                raise ValueError(f"{f.name}={value!r}: must be at most {FLOAT32_MAX:.3g} in size "
                                 "(training computes in float32)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.max_len is not None and (isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                                         or self.max_len < 1):
            raise ValueError(f"max_len={self.max_len!r}: must be a positive integer (or unset)")
        positive_ints = ("hidden", "layers", "heads", "inner", "steps", "denoiser_layers",
                         "denoiser_heads", "restore_steps", "k_noise", "k_sample", "min_substitutions", "batch_size",
                         "epochs", "eval_every", "patience")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if isinstance(self.alpha_warmup, bool) or not isinstance(self.alpha_warmup, int) or self.alpha_warmup < 0:
            raise ValueError(f"alpha_warmup={self.alpha_warmup!r}: must be an integer >= 0 (0: no warm-up)")
        if not isinstance(self.kcore, int) or self.kcore < 0:
            raise ValueError(f"kcore={self.kcore!r}: must be an integer >= 0 (0 disables filtering)")
        if self.hidden % self.heads or self.hidden % self.denoiser_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads} "
                             f"and denoiser_heads={self.denoiser_heads}")
        if self.restore_steps > self.steps:
            raise ValueError(f"restore_steps={self.restore_steps} exceeds steps={self.steps}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be in [0, 1)")
        if not 0.0 < self.aug_ratio <= 1.0:
            raise ValueError(f"aug_ratio={self.aug_ratio!r}: must be in (0, 1]")
        for name in ("alpha", "beta", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau!r}: must be > 0")
        if self.tau_schedule != "constant" and (self.tau_end is None or self.tau_end <= 0):
            raise ValueError(f"tau_end={self.tau_end!r}: a {self.tau_schedule} tau schedule needs tau_end > 0")

    def for_items(self, n_items: int) -> "Config":
        """The settings as used on data of `n_items` items: k_noise and k_sample cannot exceed
        the other items (n_items - 1), so larger values are lowered to that, with a warning, and
        what a run records is what it used."""
        cap = max(n_items - 1, 1)
        lowered = {name: cap for name in ("k_noise", "k_sample") if getattr(self, name) > cap}
        if lowered:
            warnings.warn(", ".join(f"{k}={getattr(self, k)} exceeds the data's {n_items} items - 1: using {cap}"
                                    for k in lowered), stacklevel=2)
        return self.replace(**lowered)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        """Build from a mapping; unknown keys and wrong types name `source` and the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown parameter(s) {', '.join(unknown)}")
        clean = {}
        for key, value in values.items():
            clean[key] = _coerce(known[key], value, source)
        try:
            return cls(**clean)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def load_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of parameter: value")
        return cls.from_dict(values, source=str(path))


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    """Accept what YAML and Ray hand us (numpy scalars, ints for floats), reject the rest."""
    default = field.default
    if value is None and default is None:
        return None
    if field.name == "max_len":
        default = 0
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar from a search space
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {field.name}={value!r} must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{source}: {field.name}={value!r} must be an integer")
        return value
    if isinstance(default, float) or field.name == "tau_end":
        if value is None and field.name == "tau_end":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {field.name}={value!r} must be a number")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{source}: {field.name}={value!r} must be a string")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently, so `alpha: 0.1` ... `alpha: 0.4` would quietly mean 0.4)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def write_yaml(path: str | Path, values: Any) -> None:
    """`values` as YAML in their own key order, written atomically (a reader never sees half)."""
    write_atomic(path, yaml.safe_dump(values, sort_keys=False).encode())


def read_yaml(path: str | Path) -> Any:
    """A settings or space file as Python values; errors (duplicate keys too) name file and line."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem})") from None
