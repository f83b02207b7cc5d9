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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .files import write_atomic

SELECT_BY = "NDCG@10"  # the valid metric that early stopping, checkpoints and the search select by

SASREC = {"alpha": 0.0, "beta": 0.0, "sr_loss": "ce"}  # SASRec with the full softmax (SASRec-CE): no L_cl, no L_d
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: every setting reaches torch as one


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), simdiffrec_only: bool = False,
            resumable: bool = False, shown: str | None = None) -> Any:
    """A Config field and everything said about it in one place: its one line of `--help`, the
    named options it takes, whether only L_cl and L_d read it (with alpha = beta = 0, SASRec, it
    changes no loss and no score, so finalize's SASRec baselines ignore it), whether it may
    change when a run is resumed, and how --help shows a default of None.  Its type, flag and
    YAML coercion come from the annotation."""
    return field(default=default, metadata={"help": help, "choices": choices, "simdiffrec_only": simdiffrec_only,
                                            "resumable": resumable, "shown": shown})


@dataclass
class Config:
    # data
    max_len: int | None = setting(None, "items of each sequence kept, the most recent ones",
                                  shown="the dataset's: 50, 200 for ml-1m")
    kcore: int = setting(5, "keep users and items with at least this many interactions (0: no filter)")
    # SASRec encoder
    hidden: int = setting(64, "embedding and hidden size of the encoder and denoiser")
    layers: int = setting(2, "Transformer layers of the SASRec encoder")
    heads: int = setting(2, "attention heads of the encoder")
    inner: int | None = setting(None, "feed-forward size inside each Transformer layer", shown="4 × hidden")
    dropout: float = setting(0.5, "dropout on hidden states")
    attn_dropout: float = setting(0.5, "dropout on attention weights")
    # diffusion (Section 4.2)
    steps: int = setting(1000, "diffusion steps T", simdiffrec_only=True)
    schedule: str = setting("cosine", "noise schedule of the forward process (alpha-bar_t)",
                            choices=("cosine", "linear", "sqrt"), simdiffrec_only=True)
    mix: str = setting("convex", "how z_t mixes z_0 and the noise: convex (1 - a_t) or vp (sqrt(1 - a_t^2))",
                       choices=("convex", "vp"), simdiffrec_only=True)
    denoiser_layers: int = setting(1, "Transformer layers of the denoiser", simdiffrec_only=True)
    denoiser_heads: int = setting(2, "attention heads of the denoiser", simdiffrec_only=True)
    restore_steps: int = setting(1, "deterministic steps restoring z_T (Eq. 11)", simdiffrec_only=True)
    rounding: str = setting("pred", "what L_d's rounding term scores: the denoiser's output (pred) or z_0",
                            choices=("z0", "pred"), simdiffrec_only=True)
    # SimDiffRec (Sections 4.1, 4.3, 4.4, Eq. 18)
    alpha: float = setting(0.4, "weight of the contrastive loss L_cl (0 with --beta 0: plain SASRec)")
    beta: float = setting(0.4, "weight of the diffusion loss L_d")
    k_noise: int = setting(25, "similar items averaged into the noise (Eq. 6-7)", simdiffrec_only=True)
    k_sample: int = setting(2, "rank of the hard-negative substitute item", simdiffrec_only=True)
    tau: float = setting(1.0, "contrastive temperature (its start value under a schedule)", simdiffrec_only=True)
    tau_end: float | None = setting(None, "final temperature of a linear or cosine tau schedule",
                                    simdiffrec_only=True, shown="none")
    tau_schedule: str = setting("constant", "temperature over the epochs", choices=("constant", "linear", "cosine"),
                                simdiffrec_only=True)
    aug_ratio: float = setting(0.2, "share of each sequence's positions replaced in the views", simdiffrec_only=True)
    min_substitutions: int = setting(1, "positions substituted per view at least (the paper: one)",
                                     simdiffrec_only=True)
    aug_dropout: bool = setting(True, "restore and score the views with the denoiser's dropout on "
                                      "(--no-aug-dropout: eval mode; on: the authors' code)", simdiffrec_only=True)
    view_dropout: bool = setting(True, "encode L_cl's sequence and views with dropout (--no-view-dropout: "
                                       "without; on: the authors' code)", simdiffrec_only=True)
    similarity: str = setting("cosine", "Eq. 17's sim: cosine (the paper) or dot product (CaDiRec)",
                              choices=("cosine", "dot"), simdiffrec_only=True)
    shared_denoiser: bool = setting(False, "the denoiser runs the encoder's Transformer layers (the authors' code)",
                                    simdiffrec_only=True)
    alpha_warmup: int = setting(0, "epochs over which alpha grows linearly to its value (0: none)",
                                simdiffrec_only=True)
    sr_loss: str = setting("ce", "next-item loss: full softmax (ce, the authors' code) or one sampled negative "
                                 "(bce, Eq. 3)", choices=("ce", "bce"))
    # ablation switches (Table 3)
    noise_type: str = setting("similarity", "Eq. 6-7's similarity noise, or isotropic gaussian (ablation)",
                              choices=("similarity", "gaussian"), simdiffrec_only=True)
    aug_positions: str = setting("confidence", "replace Eq. 14-16's most confident positions, or random ones "
                                               "(ablation)", choices=("confidence", "random"), simdiffrec_only=True)
    hard_negative: bool = setting(True, "a hard-negative view per sequence besides in-batch negatives",
                                  simdiffrec_only=True)
    exclude_original: bool = setting(True, "the positive view never puts back the original item",
                                     simdiffrec_only=True)
    # optimisation
    lr: float = setting(1e-3, "Adam learning rate")
    weight_decay: float = setting(0.0, "Adam weight decay")
    batch_size: int = setting(256, "sequences per step (with batching=tokens: the mean number of real positions "
                                   "per step is this times the mean length)")
    batching: str = setting("tokens", "tokens: rows grouped by length under a budget of real positions (little "
                                      "padding); random: shuffled rows", choices=("tokens", "random"))
    epochs: int = setting(200, "most epochs; early stopping usually ends sooner", resumable=True)
    eval_every: int = setting(1, "epochs between validation passes", resumable=True)
    patience: int = setting(10, "validation passes without a better valid NDCG@10 before stopping", resumable=True)
    seed: int = setting(42, "random seed (weights, batches, noise)")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...", resumable=True)
    amp: bool = setting(True, "bf16 autocast on CUDA (scores are always fp32)")
    compile: str = setting("auto", "torch.compile the training step: auto (CUDA only), on, off",
                           choices=("auto", "on", "off"), resumable=True)

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
        for name, allowed in choices(type(self)).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.max_len is not None and (isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                                         or self.max_len < 1):
            raise ValueError(f"max_len={self.max_len!r}: must be a positive integer (or unset)")
        if self.inner is not None and (isinstance(self.inner, bool) or not isinstance(self.inner, int)
                                       or self.inner < 1):
            raise ValueError(f"inner={self.inner!r}: must be a positive integer (or unset: 4 × hidden)")
        positive_ints = ("hidden", "layers", "heads", "steps", "denoiser_layers",
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

    @property
    def ff_size(self) -> int:
        """The Transformer layers' feed-forward size: `inner`, else 4 × hidden."""
        return self.inner or 4 * self.hidden

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


def choices(cls: type | None = None) -> dict[str, tuple[str, ...]]:
    """Each setting with named options -> its options (the one list of them)."""
    return {f.name: f.metadata["choices"] for f in fields(cls or Config) if f.metadata.get("choices")}


def simdiffrec_only(cls: type | None = None) -> tuple[str, ...]:
    """The settings only L_d and L_cl read: with alpha = beta = 0 (SASRec) they change no loss
    and no score of a model with given weights (the denoiser they shape is built but unused)."""
    return tuple(f.name for f in fields(cls or Config) if f.metadata.get("simdiffrec_only"))


def resumable(cls: type | None = None) -> set[str]:
    """The settings that may differ between a checkpoint and the run resuming it."""
    return {f.name for f in fields(cls or Config) if f.metadata.get("resumable")}


CHOICES = choices()
SIMDIFFREC_ONLY = simdiffrec_only()


def setting_type(field: dataclasses.Field) -> type:
    """The type a setting holds, as its annotation names it (`int | None` -> int)."""
    return {"int": int, "float": float, "bool": bool, "str": str}[str(field.type).split(" | ")[0]]


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    """Accept what YAML and Ray hand us (numpy scalars, ints for floats), reject the rest."""
    if value is None and field.default is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar from a search space
    kind = setting_type(field)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {field.name}={value!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{source}: {field.name}={value!r} must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {field.name}={value!r} must be a number")
        return float(value)
    if not isinstance(value, str):
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
