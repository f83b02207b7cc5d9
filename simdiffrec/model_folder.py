"""A trained model as a folder that loads anywhere: weights, settings, and the item id map.

    model.pt        {"n_items", "max_len", "config", "state_dict"}
    config.yaml     the settings, readable
    items.parquet   column `item_id`: the user's id of model item 1, 2, ... (row order)
    metrics.json    whatever metrics the writer had (optional)

Every file is written atomically (`files.py`), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from .config import Config
from .files import atomic_path, write_atomic
from .model import SimDiffRec


def save_model(folder: str | Path, model: SimDiffRec, item_ids: np.ndarray | None = None,
               metrics: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"n_items": model.n_items, "max_len": model.encoder.positions.num_embeddings,
               "config": model.cfg.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(folder / "model.pt") as tmp:
        torch.save(payload, tmp)
    write_atomic(folder / "config.yaml", yaml.safe_dump(model.cfg.to_dict(), sort_keys=False).encode())
    if item_ids is not None:
        with atomic_path(folder / "items.parquet") as tmp:
            pd.DataFrame({"item_id": list(item_ids[1:])}).to_parquet(tmp, index=False)
    if metrics is not None:
        write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2).encode())
    return folder


@dataclass
class LoadedModel:
    model: SimDiffRec
    config: Config
    item_ids: np.ndarray | None  # index = model item id, [0] = padding placeholder

    @property
    def max_len(self) -> int:
        return self.model.encoder.positions.num_embeddings


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    folder = Path(folder)
    path = folder / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no model.pt: not a model folder written by simdiffrec")
    payload = torch.load(path, map_location=device, weights_only=False)
    cfg = Config.from_dict(payload["config"], source=str(path))
    model = SimDiffRec(cfg, payload["n_items"], payload["max_len"]).to(device)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    item_ids = None
    if (folder / "items.parquet").is_file():
        ids = pd.read_parquet(folder / "items.parquet")["item_id"].to_numpy()
        item_ids = np.concatenate([np.array([None], dtype=object), ids.astype(object)])
    return LoadedModel(model=model, config=cfg, item_ids=item_ids)


@torch.no_grad()
def recommend(loaded: LoadedModel, histories: Sequence[Sequence[Any]], k: int = 10) -> list[list[Any]]:
    """Top-k unseen items for each history, in the user's item ids (ids the model has never
    seen are ignored; with no item map, ids are the model's own 1..n)."""
    n_items = loaded.model.n_items
    if loaded.item_ids is not None:
        index = {item: i for i, item in enumerate(loaded.item_ids) if i > 0}
        to_model = [[index[x] for x in h if x in index] for h in histories]
    else:
        to_model = [[int(x) for x in h if 1 <= int(x) <= n_items] for h in histories]
    device = next(loaded.model.parameters()).device
    seq = torch.zeros(len(to_model), loaded.max_len, dtype=torch.long)
    for row, items in enumerate(to_model):
        tail = items[-loaded.max_len:]
        if tail:
            seq[row, -len(tail):] = torch.tensor(tail)
    scores = loaded.model.score(seq.to(device)).float()
    for row, items in enumerate(to_model):
        if items:
            scores[row, torch.tensor(items, device=device) - 1] = float("-inf")
    top = scores.topk(min(k, n_items), dim=1).indices.cpu().numpy() + 1
    if loaded.item_ids is None:
        return top.tolist()
    return [[loaded.item_ids[i] for i in row] for row in top]
