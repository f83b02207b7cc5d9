"""A trained model as a folder that loads anywhere: weights, settings, and the item id map.

    model.pt        {"n_items", "max_len", "config", "state_dict"}
    config.yaml     the settings, readable
    items.parquet   column `item_id`: the user's id of model item 1, 2, ... (row order; without an
                    id map, the model's own ids 1..n)
    metrics.json    whatever metrics the writer had (optional)

Every file is written atomically (`files.py`), so a crash never leaves half a file, and
model.pt is read with `weights_only` (tensors and plain values: loading it runs no code).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Config, write_yaml
from .files import FileFault, read_torch, save_torch, write_atomic
from .model import SimDiffRec


def save_model(folder: str | Path, model: SimDiffRec, item_ids: np.ndarray | None = None,
               metrics: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"n_items": model.n_items, "max_len": model.encoder.positions.num_embeddings,
               "config": model.cfg.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_torch(payload, folder / "model.pt")
    write_yaml(folder / "config.yaml", model.cfg.to_dict())
    ids = list(item_ids[1:]) if item_ids is not None else list(range(1, model.n_items + 1))
    write_atomic(folder / "items.parquet", pd.DataFrame({"item_id": ids}).to_parquet(index=False))
    if metrics is not None:
        write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2).encode())
    return folder


@dataclass
class LoadedModel:
    model: SimDiffRec
    config: Config
    item_ids: np.ndarray  # index = model item id, [0] = padding placeholder

    @property
    def max_len(self) -> int:
        return self.model.encoder.positions.num_embeddings


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    folder = Path(folder)
    path = folder / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no model.pt: not a model folder written by simdiffrec")
    payload = read_torch(path, ("n_items", "max_len", "config", "state_dict"), map_location=device)
    check_sizes(path, payload)
    broken = [name for name, weight in payload["state_dict"].items()
              if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not weight.isfinite().all()]
    if broken:  # every score would be NaN: recommend's answer would be items 1..k, evaluate's all misses
        raise FileFault(f"{path}: weights hold NaN or infinite values ({broken[0]}"
                        f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}): the model is broken")
    cfg = Config.from_dict(payload["config"], source=str(path))
    model = SimDiffRec(cfg, payload["n_items"], payload["max_len"]).to(device)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise FileFault(f"{path}: weights do not fit its settings ({str(err).splitlines()[0]})") from None
    model.eval()
    items = folder / "items.parquet"
    if not items.is_file():  # recommendations would come out in ids the user never gave
        raise FileNotFoundError(f"{items} is missing: the model folder has no item id map")
    try:
        ids = pd.read_parquet(items)["item_id"].to_numpy()
    except (OSError, ValueError, KeyError) as err:
        raise FileFault(f"{items}: cannot be read ({type(err).__name__})") from None
    if len(ids) != model.n_items:
        raise FileFault(f"{items}: {len(ids)} item ids for a model of {model.n_items} items")
    twice = pd.Series(ids).astype(str).duplicated()  # recommend matches ids by their text
    if twice.any():  # one of the two could be recommended though the history holds the other
        raise FileFault(f"{items}: item id {str(ids[twice.to_numpy().argmax()])!r} appears more than once")
    return LoadedModel(model=model, config=cfg,
                       item_ids=np.concatenate([np.array([None], dtype=object), ids.astype(object)]))


def check_sizes(path: Path, payload: dict[str, Any]) -> None:
    """Refuse an n_items or max_len that its weights do not have: a crafted value (1e12, -1) would
    build a model of that size before the weights are read."""
    shapes = {"n_items": ("encoder.items.weight", 1), "max_len": ("encoder.positions.weight", 0)}
    for key, (weight, padding) in shapes.items():
        tensor = payload["state_dict"].get(weight) if isinstance(payload["state_dict"], dict) else None
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise FileFault(f"{path}: no {weight} among its weights: not a model this project wrote")
        if type(payload[key]) is not int or payload[key] != tensor.shape[0] - padding:
            raise FileFault(f"{path}: {key}={payload[key]!r} does not fit its weights "
                            f"({tensor.shape[0] - padding} by {weight})")


@torch.no_grad()
def recommend(loaded: LoadedModel, histories: Sequence[Sequence[Any]], k: int = 10) -> list[list[Any]]:
    """Top-k items for each history, in the user's item ids, never an item of the history.

    Ids are matched by their text (`"242"` is item 242), so command-line tokens need no typing;
    ids the model has never seen are left out with a warning naming them.  `k` must leave room:
    1 <= k <= items minus the history's known items."""
    n_items = loaded.model.n_items
    index = {str(item): i for i, item in enumerate(loaded.item_ids) if i > 0}
    to_model = []
    for row, history in enumerate(histories):
        unknown = [str(x) for x in history if str(x) not in index]
        if unknown:
            warnings.warn(f"history {row + 1}: unknown item id(s) {' '.join(unknown)} left out "
                          f"(not among the model's {n_items} items)"
                          + ("; no known item left, so the answer is not personal" if len(unknown) == len(history)
                             else ""), stacklevel=2)
        items = [index[str(x)] for x in history if str(x) in index]
        free = n_items - len(set(items))
        if not 1 <= k <= free:
            raise ValueError(f"k={k}: must be between 1 and {free} (the model's {n_items} items "
                             f"minus the {n_items - free} of history {row + 1})")
        to_model.append(items)
    device = next(loaded.model.parameters()).device
    seq = torch.zeros(len(to_model), loaded.max_len, dtype=torch.long)
    for row, items in enumerate(to_model):
        tail = items[-loaded.max_len:]
        if tail:
            seq[row, -len(tail):] = torch.tensor(tail)
    scores = loaded.model.score(seq.to(device)).float().nan_to_num(nan=float("-inf"))
    top = []
    for row, items in enumerate(to_model):
        order = scores[row].argsort(descending=True, stable=True).cpu().numpy() + 1
        top.append(order[~np.isin(order, items)][:k])
    return [[loaded.item_ids[i] for i in row] for row in top]
