"""A search space YAML file -> an Optuna define-by-run space, the points to try first, ASHA settings.

    parameters:            # each a simdiffrec.config.Config field, with its Optuna distribution
      alpha:   {type: float, low: 0.1, high: 0.5}
      tau:     {type: float, low: 0.05, high: 1.0, log: true}
      dropout: {type: float, low: 0.1, high: 0.5, step: 0.1}
      k_noise: {type: categorical, choices: [1, 5, 10, 25, 50, 100]}
      tau_end: {type: float, low: 0.05, high: 1.0, log: true, when: {tau_schedule: [linear, cosine]}}
    fixed: {batch_size: 256}                  # settings every trial shares
    points_to_evaluate: [{alpha: 0.4, beta: 0.4}]   # tried first, in order; the rest is sampled
    asha: {max_epochs: 100, grace_period: 5, reduction_factor: 3}
    sampler: {multivariate: true, group: true, constant_liar: true}   # Optuna's TPESampler settings

`type` is float, int or categorical; `log` and `step` mean what they mean to Optuna's
`suggest_float` / `suggest_int`.  `when` makes a parameter conditional on an earlier categorical
one, which is why the space is define-by-run.  Every mistake is a ValueError naming the file and
the key, raised when the file is read, never halfway through a search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from simdiffrec.config import SASREC, SIMDIFFREC_ONLY, Config, read_yaml, setting_type

# Settings a trial never samples: the tuner owns epochs (ASHA's max) and device (Ray's GPU);
# kcore shapes the prepared data, which all trials share.  (A searched max_len is cut from data
# prepared at its largest value: Space.data_max_len.)
NOT_SEARCHABLE = {"epochs": "set by asha.max_epochs", "device": "Ray assigns the device",
                  "kcore": "it shapes the shared data: put it under fixed"}
NOT_FIXABLE = {"epochs": "set asha.max_epochs instead", "device": "Ray assigns the device"}
TYPE_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
             "categorical": {"choices"}}
TOP_KEYS = {"base", "parameters", "fixed", "points_to_evaluate", "asha", "sampler"}
MERGED = ("parameters", "fixed", "asha", "sampler")  # a file's own entries go over its base's, by key
# A space parameter that is no setting: a trial of family sasrec is SASRec-CE (SASREC), one of
# simdiffrec the model its other settings say.  SimDiffRec's own settings must then be sampled
# for simdiffrec trials only (`when`), so the two families share every other dimension.
FAMILY = "family"
FAMILIES = ("sasrec", "simdiffrec")
SIMDIFFREC_PARAMS = {"alpha", "beta", *SIMDIFFREC_ONLY}
# Optuna's TPESampler settings a space may set (each a bool, n_startup_trials an int): multivariate +
# group + constant_liar is Optuna's advice for parallel trials in a conditional space
SAMPLER_KEYS = {"multivariate": bool, "group": bool, "constant_liar": bool, "n_startup_trials": int}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}
# Each setting's value type as Config declares it ("int | None" -> "int"): a float range for an
# integer setting would pass the extremes check (1.0, 3.0) and then fail every trial on 1.7.
SETTING_TYPES = {f.name: setting_type(f).__name__ for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[str, tuple] | None = None  # (earlier categorical parameter, values that enable this one)

    def active(self, values: dict[str, Any]) -> bool:
        return self.when is None or values.get(self.when[0]) in self.when[1]

    def suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def extremes(self) -> tuple:
        return self.choices if self.type == "categorical" else (self.low, self.high)


@dataclass(frozen=True)
class Asha:
    max_epochs: int
    grace_period: int
    reduction_factor: float
    min_rung_results: int = 1  # earlier results a rung needs before it stops a trial (1: Ray's rule)


@dataclass(frozen=True)
class Space:
    source: str  # the file, named in every error
    params: tuple[Param, ...]
    asha: Asha
    fixed: dict[str, Any] = field(default_factory=dict)
    points: tuple[dict[str, Any], ...] = ()
    sampler: dict[str, Any] = field(default_factory=dict)  # TPESampler's settings (SAMPLER_KEYS)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the mapping parsed, its base merged in

    def __call__(self, trial: Any) -> None:
        """Optuna's define-by-run: sample each parameter whose condition holds, in file order."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)

    def config(self, params: dict[str, Any], epochs: int | None = None) -> Config:
        """The trial's settings: fixed ones, then the sampled ones (a sasrec `family`: SASRec-CE),
        for at most `epochs` epochs (None: Config's)."""
        params = dict(params)
        family = params.pop(FAMILY, "simdiffrec")
        return Config.from_dict({**self.fixed, **params, **(SASREC if family == "sasrec" else {}),
                                 **({} if epochs is None else {"epochs": epochs}), "device": "auto"},
                                source=self.source)

    def data_max_len(self) -> int | None:
        """The max_len to prepare the data all trials share at: a searched max_len's largest
        value (each trial cuts its own from it), else the fixed one (None: the dataset's)."""
        searched = [max(p.extremes()) for p in self.params if p.name == "max_len"]
        return int(searched[0]) if searched else self.fixed.get("max_len")

    def with_max_epochs(self, epochs: int | None) -> "Space":
        """Override asha.max_epochs (from --max-epochs); the grace period is capped at it."""
        if epochs is None:
            return self
        if epochs < 1:
            raise ValueError(f"max epochs {epochs}: must be at least 1")
        asha = dataclasses.replace(self.asha, max_epochs=epochs, grace_period=min(self.asha.grace_period, epochs))
        return dataclasses.replace(self, asha=asha)


def shipped() -> dict[str, Path]:
    """The YAML files shipped in search_spaces/, by name (beauty, toys, ..., default)."""
    folder = resources.files("search_spaces")
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def find(space: str | Path) -> Path:
    """`--space` as given: a path to a YAML file, or the name of a shipped one."""
    path = Path(space)
    if path.is_file():
        return path.resolve()
    known = shipped()
    if str(space) in known:
        return known[str(space)]
    raise FileNotFoundError(f"search space {space}: no such file, and not a shipped space either "
                            f"(known: {', '.join(sorted(known))})")


def load(space: str | Path) -> Space:
    path = find(space)
    return parse(resolve(path), str(path))


def resolve(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """The file's mapping with its `base` (a shipped space's name or a path beside it) merged
    in: its own `parameters`, `fixed`, `asha` and `sampler` entries go over the base's (an entry
    set to null drops the base's), its `points_to_evaluate` replace them."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    name = raw.pop("base")
    beside = path.parent / f"{name}"
    base_path = beside if beside.is_file() else find(name)
    if base_path in seen or base_path == path:
        raise ValueError(f"{path}: base: {name} leads back to itself")
    base = resolve(base_path, (*seen, path))
    if not isinstance(base, dict):
        raise ValueError(f"{base_path}: expected a mapping (the base of {path})")
    merged = {**base, **{k: v for k, v in raw.items() if k not in MERGED}}
    for key in MERGED:
        entries = {**(base.get(key) or {}), **(raw.get(key) or {})}
        if entries or key in base or key in raw:
            merged[key] = {k: v for k, v in entries.items() if v is not None}
    return merged


def parse(raw: Any, source: str) -> Space:
    """Check a parsed YAML mapping and build the Space; errors name `source` and the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _no_unknown(raw, TOP_KEYS, source, "")
    for key in ("parameters", "asha"):
        if key not in raw:
            raise ValueError(f"{source}: {key}: missing")
    fixed = _mapping(raw.get("fixed") or {}, source, "fixed")
    for name, why in NOT_FIXABLE.items():
        if name in fixed:
            raise ValueError(f"{source}: fixed.{name}: cannot be fixed ({why})")
    Config.from_dict(fixed, source=f"{source}: fixed")
    params: list[Param] = []
    for name, spec in _mapping(raw["parameters"], source, "parameters").items():
        if name in fixed:
            raise ValueError(f"{source}: parameters.{name}: also under fixed; keep one")
        params.append(_param(name, spec, params, source))
    if not params:
        raise ValueError(f"{source}: parameters: empty; give at least one parameter to search")
    _check_family(params, source)
    space = Space(source=source, params=tuple(params), asha=_asha(raw["asha"], source), fixed=fixed,
                  points=_points(raw.get("points_to_evaluate") or [], params, source),
                  sampler=_sampler(raw.get("sampler") or {}, source), raw=raw)
    _check_against_config(space)
    return space


def _param(name: str, spec: Any, earlier: list[Param], source: str) -> Param:
    where = f"{source}: parameters.{name}"
    if name == FAMILY:
        if not isinstance(spec, dict) or spec.get("type") != "categorical" \
                or not set(spec.get("choices") or ["?"]) <= set(FAMILIES):
            raise ValueError(f"{where}: must be {{type: categorical, choices: [...]}} of {', '.join(FAMILIES)}")
    elif name not in CONFIG_FIELDS:
        raise ValueError(f"{where}: unknown parameter (not a simdiffrec setting)")
    if name in NOT_SEARCHABLE:
        raise ValueError(f"{where}: cannot be searched ({NOT_SEARCHABLE[name]})")
    spec = _mapping(spec, source, f"parameters.{name}")
    kind = spec.get("type")
    if kind not in TYPE_KEYS:
        raise ValueError(f"{where}.type: {kind!r}; expected one of {', '.join(TYPE_KEYS)}")
    _no_unknown(spec, TYPE_KEYS[kind] | {"type", "when"}, source, f"parameters.{name}.")
    setting = SETTING_TYPES.get(name, "str")
    if kind != "categorical" and (setting not in ("int", "float") or (kind, setting) == ("float", "int")):
        fits = "int" if setting == "int" else "categorical"
        raise ValueError(f"{where}.type: {kind} for {name}, a setting of type {setting}; use type: {fits}")
    when = _when(spec["when"], earlier, where) if "when" in spec else None
    if kind == "categorical":
        return Param(name, kind, choices=_choices(spec.get("choices"), where), when=when)
    return _range(name, kind, spec, when, where)


def _choices(choices: Any, where: str) -> tuple:
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}.choices: expected a non-empty list")
    if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
        raise ValueError(f"{where}.choices: only numbers, strings, booleans and null can be choices")
    if len(set(map(repr, choices))) != len(choices):
        raise ValueError(f"{where}.choices: {choices} repeats a value")
    return tuple(choices)


def _range(name: str, kind: str, spec: dict, when: tuple[str, tuple] | None, where: str) -> Param:
    """An int or float parameter: low < high, a log scale above 0, a positive step, not both."""
    number = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, number):
            raise ValueError(f"{where}.{key}: {value!r} must be {'an integer' if kind == 'int' else 'a number'}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if low >= high:
        raise ValueError(f"{where}: low={low} must be below high={high}")
    if not isinstance(log, bool):
        raise ValueError(f"{where}.log: {log!r} must be true or false")
    if log and low <= 0:
        raise ValueError(f"{where}: a log scale needs low > 0, got low={low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise ValueError(f"{where}.step: {step!r} must be a positive {'integer' if kind == 'int' else 'number'}")
        if log and (kind == "float" or step != 1):
            raise ValueError(f"{where}: step and log cannot be combined (Optuna samples one or the other)")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=when)


def _when(spec: Any, earlier: list[Param], where: str) -> tuple[str, tuple]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}.when: expected one 'parameter: [values]' pair")
    (parent, values), = spec.items()
    by_name = {p.name: p for p in earlier}
    if parent not in by_name or by_name[parent].type != "categorical":
        raise ValueError(f"{where}.when: {parent!r} must be a categorical parameter listed above this one")
    values = values if isinstance(values, list) else [values]
    outside = [v for v in values if v not in by_name[parent].choices]
    if outside:
        raise ValueError(f"{where}.when: {outside} not among the choices of {parent}")
    return parent, tuple(values)


def _asha(spec: Any, source: str) -> Asha:
    spec = _mapping(spec, source, "asha")
    keys = {f.name for f in dataclasses.fields(Asha)}
    _no_unknown(spec, keys, source, "asha.")
    optional = {f.name: f.default for f in dataclasses.fields(Asha) if f.default is not dataclasses.MISSING}
    missing = sorted(keys - set(spec) - set(optional))
    if missing:
        raise ValueError(f"{source}: asha.{missing[0]}: missing")
    spec = {**optional, **spec}
    for key in ("max_epochs", "grace_period", "min_rung_results"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise ValueError(f"{source}: asha.{key}: {spec[key]!r} must be a positive integer")
    factor = spec["reduction_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise ValueError(f"{source}: asha.reduction_factor: {factor!r} must be a number above 1")
    if spec["grace_period"] > spec["max_epochs"]:
        raise ValueError(f"{source}: asha.grace_period: {spec['grace_period']} exceeds max_epochs {spec['max_epochs']}")
    return Asha(spec["max_epochs"], spec["grace_period"], factor, spec["min_rung_results"])


def _check_family(params: list[Param], source: str) -> None:
    """With a `family` parameter, each of SimDiffRec's own settings is sampled only where the
    family is simdiffrec (through its own condition or the conditions it hangs on)."""
    by_name = {p.name: p for p in params}
    if FAMILY not in by_name:
        return
    for param in params:
        if param.name not in SIMDIFFREC_PARAMS:
            continue
        cause = param
        while cause.when is not None and cause.when[0] != FAMILY:
            cause = by_name[cause.when[0]]
        if cause.when is None or "sasrec" in cause.when[1]:
            raise ValueError(f"{source}: parameters.{param.name}: SimDiffRec's own, so it needs "
                             f"when: {{{FAMILY}: [simdiffrec]}} (SASRec trials do not sample it)")


def _sampler(spec: Any, source: str) -> dict[str, Any]:
    spec = _mapping(spec, source, "sampler")
    _no_unknown(spec, set(SAMPLER_KEYS), source, "sampler.")
    for key, kind in SAMPLER_KEYS.items():
        value = spec.get(key)
        if key in spec and (not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0))):
            raise ValueError(f"{source}: sampler.{key}: {value!r} must be "
                             f"{'true or false' if kind is bool else 'an integer >= 0'}")
    if spec.get("group") and not spec.get("multivariate"):
        raise ValueError(f"{source}: sampler.group: needs multivariate: true (Optuna groups only a multivariate TPE)")
    return spec


def _points(raw: Any, params: list[Param], source: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list):
        raise ValueError(f"{source}: points_to_evaluate: expected a list of parameter: value mappings")
    by_name = {p.name: p for p in params}
    points = []
    for i, point in enumerate(raw):
        point = _mapping(point, source, f"points_to_evaluate[{i}]")
        for name, value in point.items():
            if name not in by_name:
                raise ValueError(f"{source}: points_to_evaluate[{i}].{name}: not a parameter of this space")
            if not by_name[name].contains(value):
                raise ValueError(f"{source}: points_to_evaluate[{i}].{name}: {value!r} is outside its distribution")
        points.append(point)
    return tuple(points)


def _check_against_config(space: Space) -> None:
    """Every extreme value of every parameter, and every point, must make a valid Config; this
    catches a float range for an integer setting or a dropout of 1.0 before any trial runs."""
    base = {p.name: p.extremes()[0] for p in space.params}
    for param in space.params:
        for value in param.extremes():
            values = {**base, param.name: value}
            active = {p.name: values[p.name] for p in space.params if p.active(values)}
            dataclasses.replace(space, source=f"{space.source}: parameters.{param.name}").config(active)
    for i, point in enumerate(space.points):
        dataclasses.replace(space, source=f"{space.source}: points_to_evaluate[{i}]").config({**base, **point})


def _mapping(value: Any, source: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {key}: expected a mapping, got {value!r}")
    return value


def _no_unknown(spec: dict, allowed: set[str], source: str, prefix: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{source}: {prefix}{unknown[0]}: unknown key (expected {', '.join(sorted(allowed))})")
