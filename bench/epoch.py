"""Training and evaluation speed: sequences/s, seconds per epoch, seconds per evaluation pass.

    python bench/epoch.py --data ../shared/data/Beauty.txt              # full epochs
    python bench/epoch.py --data ../shared/data/Beauty.txt --batches 20  # CPU: a slice, extrapolated

Plain SASRec (α = β = 0, the same code path) is the baseline measured in the same run; the ratio
is what SimDiffRec's similarity noise, diffusion, restoration and two extra encoder passes cost.
Each figure is the median of --repeats timings after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from simdiffrec.config import Config
from simdiffrec.data import load_data
from simdiffrec.device import resolve_device
from simdiffrec.evaluate import evaluate, scorer
from simdiffrec.model import SimDiffRec
from simdiffrec.train import plan_epoch, run_epoch

VARIANTS = {
    "SASRec (alpha=beta=0, ce)": dict(alpha=0.0, beta=0.0),
    "SimDiffRec (alpha=beta=0.4, ce)": dict(alpha=0.4, beta=0.4),
    "SimDiffRec (alpha=beta=0.4, bce)": dict(alpha=0.4, beta=0.4, sr_loss="bce"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Config, data, batches: int | None, repeats: int) -> dict[str, float]:
    device = data.train_input.device
    torch.manual_seed(cfg.seed)
    model = SimDiffRec(cfg, data.n_items, data.max_len).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    full = len(plan_epoch(data.train_lengths, cfg.batch_size, device))
    epoch_times, rows = [], 0
    for i in range(repeats + 1):
        plan = plan_epoch(data.train_lengths, cfg.batch_size, device)[:batches]
        rows = sum(len(b.rows) for b in plan)
        sync(device)
        start = time.perf_counter()
        run_epoch(cfg, model, optimizer, data, plan, tau=cfg.tau)  # ends with a device sync
        if i:  # the first pass is the warm-up
            epoch_times.append((time.perf_counter() - start) * full / len(plan))
    model.eval()

    score = scorer(cfg, model, device)
    eval_times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            evaluate(score, data.valid)
            if i:
                eval_times.append(time.perf_counter() - start)
    epoch = statistics.median(epoch_times)
    return {"epoch": epoch, "seq_per_s": len(data.train_lengths) / epoch, "eval": statistics.median(eval_times),
            "timed_rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/Beauty.txt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, default=None, help="time this many batches per epoch and extrapolate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))),
                        help="comma-separated indices into the variant list")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_data(args.data).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"data {args.data}: {len(data.train_lengths):,} training sequences, {data.n_items:,} items; "
          f"device {name}; torch {torch.__version__}")
    print(f"| variant | s/epoch | sequences/s | eval s/split | ratio to SASRec |")
    print(f"|---|---|---|---|---|")
    chosen = [list(VARIANTS.items())[int(i)] for i in args.variants.split(",")]
    base = None
    for label, overrides in chosen:
        cfg = Config(device=str(device), max_len=data.max_len, **overrides)
        r = measure(cfg, data, args.batches, args.repeats)
        base = base or r["epoch"]
        print(f"| {label} | {r['epoch']:.3f} | {r['seq_per_s']:,.0f} | {r['eval']:.3f} | {r['epoch'] / base:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
