"""The training loop: `train(config, data, report=...)`, the one function the CLI and the tuner wrap.

One training row per user (its training part, loss at every position): under causal attention
this is the signal of training on every prefix, at a fraction of the work.  The whole dataset
lives on the device; each epoch's batch plan (shuffled rows, trimmed width, flat indices of the
item positions) is computed once on the host and uploaded in one copy, so a step neither
waits for the device nor does host work beyond launching kernels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SELECT_BY, Config, resumable
from .data import SequenceData
from .device import autocast, resolve_device
from .evaluate import evaluate, scorer
from .files import FileFault, read_torch, save_torch
from .model import LOSSES, SimDiffRec

RESUMABLE_CHANGES = resumable()  # settings that may differ between a checkpoint and the run resuming it


class Diverged(ValueError):
    """Training produced a loss that is not finite: the weights are lost, the run ends."""


@dataclass
class Batch:
    rows: torch.Tensor  # (B,) training rows
    width: int  # columns kept: the longest sequence in the batch
    item_pos: torch.Tensor  # flat indices of the positions holding an item in the (B, width) batch


def plan_epoch(lengths: np.ndarray, batch_size: int, device: torch.device, batching: str = "tokens") -> list[Batch]:
    """Cut one epoch into batches, every row exactly once, each batch trimmed to its longest row.

    `random`: shuffled rows, `batch_size` at a time.  `tokens`: rows sorted by length (shuffled
    within a length), cut into batches of at most `batch_size` × mean length real positions,
    in random order: as many positions per step as `random` on average, so a loss averaged over
    a batch's positions weights them as before, but almost no padding.  All shuffles draw from
    torch's CPU generator, so checkpoints capture them.
    """
    perm = torch.randperm(len(lengths)).numpy()
    if batching == "random":
        groups = np.split(perm, range(batch_size, len(perm), batch_size))
    else:
        perm = perm[np.argsort(lengths[perm], kind="stable")]
        groups = np.split(perm, token_cuts(lengths[perm], batch_size * lengths.mean()))
        groups = [groups[i] for i in torch.randperm(len(groups)).tolist()]
    perm = np.concatenate(groups)
    plans, item_pos_parts, start = [], [], 0
    for rows in groups:
        lens = lengths[rows]
        width = int(lens.max())
        first = np.arange(len(rows)) * width + width - lens  # flat index of each row's first item
        offsets = np.cumsum(lens) - lens
        item_pos_parts.append(np.arange(lens.sum()) - np.repeat(offsets - first, lens))
        plans.append((start, start + len(rows), width, lens.sum()))
        start += len(rows)
    perm_dev = torch.from_numpy(perm).to(device)
    item_pos_dev = torch.from_numpy(np.concatenate(item_pos_parts)).to(device)
    batches, at = [], 0
    for start, stop, width, count in plans:
        batches.append(Batch(perm_dev[start:stop], width, item_pos_dev[at:at + count]))
        at += count
    return batches


def token_cuts(lengths: np.ndarray, budget: float) -> list[int]:
    """Where to cut rows of these lengths, in order, so that no batch holds more than `budget`
    real positions (a single longer row makes a batch of its own)."""
    cuts, used = [], 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > budget:
            cuts.append(i)
            used = 0
        used += n
    return cuts


def temperature(cfg: Config, epoch: int) -> float:
    """τ for an epoch (1-based): constant, or annealed from τ to τ_end over cfg.epochs."""
    if cfg.tau_schedule == "constant":
        return cfg.tau
    progress = (epoch - 1) / max(cfg.epochs - 1, 1)
    if cfg.tau_schedule == "cosine":
        progress = (1 - math.cos(math.pi * progress)) / 2
    return cfg.tau + (cfg.tau_end - cfg.tau) * progress


def alpha_factor(cfg: Config, epoch: int) -> float:
    """The share of α used in an epoch (1-based): epoch/alpha_warmup during the warm-up, then 1."""
    return min(1.0, epoch / cfg.alpha_warmup) if cfg.alpha_warmup else 1.0


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # all validation passes: with train_seconds, the run's time across resumes
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / max(self.epoch, 1)


@dataclass
class Evaluation:
    """What `report` receives after each validation pass."""

    epoch: int
    valid: dict[str, float]
    losses: dict[str, float]
    best_epoch: int
    best_valid: dict[str, float]
    seconds_per_epoch: float
    stopping: bool  # early stopping ends the run after this evaluation
    model: SimDiffRec  # the weights of this epoch (read-only: training continues with them)
    save: Callable[[str | Path], None]  # write a resumable checkpoint of this moment


@dataclass
class TrainResult:
    model: SimDiffRec  # holding the best (by valid NDCG@10) weights
    valid: dict[str, float]
    test: dict[str, float]  # empty when train(test=False)
    best_epoch: int
    seconds_per_epoch: float
    eval_seconds: float  # one pass over one split
    minutes: float  # training and validation over the whole run, resumes included
    history: list[dict[str, Any]]


def train(cfg: Config, data: SequenceData, report: Callable[[Evaluation], None] | None = None,
          resume: str | Path | None = None, progress: bool = False, test: bool = True) -> TrainResult:
    """Train SimDiffRec, early-stopping on valid NDCG@10; return the best model and its metrics
    (the test split is evaluated once, on the best model, unless `test` is False)."""
    if cfg.max_len is None:
        cfg = cfg.replace(max_len=data.max_len)
    elif cfg.max_len != data.max_len:
        raise ValueError(f"max_len={cfg.max_len} but the data was prepared with max_len={data.max_len}")
    cfg = cfg.for_items(data.n_items)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    data = data.to(device)
    model = SimDiffRec(cfg, data.n_items, data.max_len).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    state = TrainState()
    best_weights = _copy_weights(model)
    if resume is not None:
        state, best_weights = load_checkpoint(resume, cfg, model, optimizer)

    score = scorer(cfg, model, device)
    step = step_losses(cfg, model, device)
    # No total and so no ETA: early stopping ends most runs long before cfg.epochs; the postfix
    # says how many evaluations without progress remain before it does.
    bar = tqdm(initial=state.epoch, desc="epochs", unit="ep", disable=not progress)
    eval_seconds = 0.0
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.bad_evals >= cfg.patience:  # resumed after its stopping evaluation: it has ended
            break
        started = time.perf_counter()
        batches = plan_epoch(data.train_lengths, cfg.batch_size, device, cfg.batching)
        losses = run_epoch(cfg, model, step, optimizer, data, batches, tau=temperature(cfg, epoch),
                           alpha_share=alpha_factor(cfg, epoch), progress=progress)
        check_finite(losses, epoch, cfg)
        state.train_seconds += time.perf_counter() - started
        state.epoch = epoch
        bar.update(1)
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            continue
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            valid = evaluate(score, data.valid)
        eval_seconds = time.perf_counter() - started
        state.eval_seconds += eval_seconds
        model.train()
        if valid[SELECT_BY] > state.best_score:
            state.best_score, state.best_epoch, state.best_valid = valid[SELECT_BY], epoch, valid
            state.bad_evals = 0
            best_weights = _copy_weights(model)
        else:
            state.bad_evals += 1
        state.history.append({"epoch": epoch, **losses, **{f"valid/{k}": v for k, v in valid.items()}})
        stopping = state.bad_evals >= cfg.patience
        total = sum(v for k, v in losses.items() if k.startswith("loss_"))
        bar.set_postfix({"loss": f"{total:.3f}", SELECT_BY: f"{valid[SELECT_BY]:.4f}",
                         "best": state.best_epoch, "early stop in ≤": f"{cfg.patience - state.bad_evals} evals"})
        if report is not None:
            snapshot = (state, best_weights)
            report(Evaluation(epoch=epoch, valid=valid, losses=losses, best_epoch=state.best_epoch,
                              best_valid=state.best_valid, seconds_per_epoch=state.seconds_per_epoch,
                              stopping=stopping, model=model,
                              save=lambda path: save_checkpoint(path, cfg, model, optimizer, *snapshot)))
        if stopping:
            break
    bar.close()

    model.load_state_dict(best_weights)
    model.eval()
    with torch.no_grad():
        test_metrics = evaluate(score, data.test) if test else {}
    return TrainResult(model=model, valid=state.best_valid, test=test_metrics, best_epoch=state.best_epoch,
                       seconds_per_epoch=state.seconds_per_epoch, eval_seconds=eval_seconds,
                       minutes=(state.train_seconds + state.eval_seconds) / 60, history=state.history)


def step_losses(cfg: Config, model: SimDiffRec, device: torch.device) -> Callable[..., dict[str, torch.Tensor]]:
    """`model.losses`, or its torch.compile'd form where `cfg.compile` asks for it (auto: CUDA).

    On a GPU a step is ~1,600 small kernels, launch-bound; compiled, they fuse.  Shapes are
    dynamic, so the batches' varying widths and position counts do not recompile; torch.unique's
    data-dependent shape splits the graph there.  Under `auto` a failed compilation falls back to
    running eagerly instead of ending the run.
    """
    if cfg.compile == "off" or (cfg.compile == "auto" and device.type != "cuda"):
        return model.losses
    if cfg.compile == "auto":
        torch._dynamo.config.suppress_errors = True
    return torch.compile(model.losses, dynamic=True)


def run_epoch(cfg: Config, model: SimDiffRec, step: Callable[..., dict[str, torch.Tensor]],
              optimizer: torch.optim.Optimizer, data: SequenceData, batches: list[Batch], *, tau: float,
              alpha_share: float = 1.0, progress: bool = False) -> dict[str, float]:
    """One pass over `batches`, each batch's losses from `step` (`step_losses`) at temperature
    `tau`, with `alpha_share` of α (`alpha_factor`); returns the mean of each loss (`loss_sr`, ...)
    and of L_cl's health numbers (`cl_margin`, ...), read in the epoch's one device sync."""
    model.train()
    device = data.train_input.device
    totals: dict[str, torch.Tensor] = {}
    for batch in tqdm(batches, desc="batches", leave=False, disable=not progress):
        cut = data.max_len - batch.width
        seq = data.train_input[batch.rows, cut:]
        target = data.train_target[batch.rows, cut:]
        with autocast(cfg, device):
            parts = step(seq, target, batch.item_pos, tau)
        loss = model.objective(parts, alpha_share)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value.detach()
    names = list(totals)
    means = (torch.stack([totals[n] for n in names]) / len(batches)).tolist()
    return {f"loss_{n}" if n in LOSSES else n: v for n, v in zip(names, means)}


def check_finite(losses: dict[str, float], epoch: int, cfg: Config) -> None:
    """Raise Diverged when an epoch's mean loss is NaN or infinite (read once per epoch anyway:
    no extra device sync); its weights are then NaN too, and must never be evaluated or kept."""
    bad = {name: value for name, value in losses.items() if name.startswith("loss_") and not math.isfinite(value)}
    if bad:
        name, value = next(iter(bad.items()))
        raise Diverged(f"{name} became {value} at epoch {epoch}: training diverged; {remedy(name, cfg)}")


def remedy(loss: str, cfg: Config) -> str:
    """The settings that scale the diverged `loss`: L_cl grows with alpha and 1/tau, L_d with
    beta, every loss with the learning rate."""
    lr = f"--lr (now {cfg.lr:g})"
    if loss == "loss_cl":
        return f"lower --alpha (now {cfg.alpha:g}) or {lr}, or raise --tau (now {cfg.tau:g})"
    if loss == "loss_d":
        return f"lower --beta (now {cfg.beta:g}) or {lr}"
    return f"lower {lr}"


def _copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(path: str | Path, cfg: Config, model: SimDiffRec, optimizer: torch.optim.Optimizer,
                    state: TrainState, best_weights: dict[str, torch.Tensor]) -> None:
    """Write a resumable checkpoint atomically."""
    payload = {
        "config": cfg.to_dict(),
        "n_items": model.n_items,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best_model": best_weights,
        "state": asdict(state),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    save_torch(payload, path)


def check_resumable(path: str | Path, cfg: Config, n_items: int) -> None:
    """Refuse, before any work, a checkpoint that `load_checkpoint` would refuse later."""
    _refuse_other_run(path, read_torch(path, ("config", "n_items")), cfg, n_items)


def _refuse_other_run(path: str | Path, payload: dict[str, Any], cfg: Config, n_items: int) -> None:
    saved = Config.from_dict(payload["config"], source=str(path))
    changed = sorted(k for k, v in saved.to_dict().items()
                     if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v)
    if changed or payload["n_items"] != n_items:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"checkpoint {path} was made with other settings or data ({detail or 'n_items'}); "
                         "only " + ", ".join(sorted(RESUMABLE_CHANGES)) + " may change on resume")


def load_checkpoint(path: str | Path, cfg: Config, model: SimDiffRec,
                    optimizer: torch.optim.Optimizer) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore weights, optimizer, loop state and RNG states from `save_checkpoint`'s file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = read_torch(path, ("config", "n_items", "model", "optimizer", "best_model", "state", "rng"),
                         map_location=next(model.parameters()).device)
    _refuse_other_run(path, payload, cfg, model.n_items)
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise FileFault(f"checkpoint {path}: weights do not fit its settings ({str(err).splitlines()[0]})") from None
    try:  # plain values a crafted file may have set to anything
        state = TrainState(**payload["state"])
        torch.set_rng_state(payload["rng"]["cpu"].cpu())
        if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in payload["rng"]["cuda"]])
    except (TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise FileFault(f"checkpoint {path}: its loop or random state is not what this project wrote "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    return state, payload["best_model"]

