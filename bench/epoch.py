"""Training and evaluation speed: sequences/s, seconds per epoch, seconds per evaluation pass.

    python bench/epoch.py --data ../shared/data/Beauty.txt              # full epochs
    python bench/epoch.py --data ../shared/data/Beauty.txt --batches 20  # CPU: a slice, extrapolated
    python bench/epoch.py --data ../shared/data/Toys_and_Games.txt --batches 10 --batching tokens \
        --variants 0,1 --hidden 64,128,256                                # what a wider encoder costs

Each variant runs with every --batching (random: the old plan, as baseline in the same run) and
every --compile setting.  Plain SASRec (α = β = 0, the same code path) with the same batching is
the baseline of the last-but-one column: what SimDiffRec's noise, diffusion, restoration and two
extra encoder passes cost.  On the CPU the last column divides by the floor that
../shared/tools/cpu_floor.py (outside the project) measures first, in the same run, for this
data's positions and items: the item-table work no full-softmax SimDiffRec epoch can avoid.
The floor is measured again right before each variant, since a shared machine's load drifts.
Each figure is the median of --repeats timings after one warm-up pass; `warm-up s` is what that
first pass took beyond the median (compilation, allocator), `graphs` how many graphs
torch.compile built for the variant (recompilations included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from simdiffrec.config import Config
from simdiffrec.data import SequenceData, load_data
from simdiffrec.device import resolve_device
from simdiffrec.evaluate import evaluate, scorer
from simdiffrec.model import SimDiffRec
from simdiffrec.train import plan_epoch, run_epoch, step_losses

VARIANTS = {
    "SASRec (alpha=beta=0, ce)": dict(alpha=0.0, beta=0.0),
    "SimDiffRec (alpha=beta=0.4, ce)": dict(alpha=0.4, beta=0.4),
    "SimDiffRec (alpha=beta=0.4, bce)": dict(alpha=0.4, beta=0.4, sr_loss="bce"),
}
FLOOR = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "cpu_floor.py"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Config, data: SequenceData, batches: int | None, repeats: int) -> dict[str, float]:
    device = data.train_input.device
    torch.manual_seed(cfg.seed)
    model = SimDiffRec(cfg, data.n_items, data.max_len).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    step = step_losses(cfg, model, device)
    graphs = counters["stats"]["unique_graphs"]
    full = len(plan_epoch(data.train_lengths, cfg.batch_size, device, cfg.batching))
    times = []
    for _ in range(repeats + 1):
        plan = plan_epoch(data.train_lengths, cfg.batch_size, device, cfg.batching)[:batches]
        sync(device)
        start = time.perf_counter()
        run_epoch(cfg, model, step, optimizer, data, plan, tau=cfg.tau)  # ends with a device sync
        times.append((time.perf_counter() - start, len(plan)))
    per_batch = statistics.median(t / n for t, n in times[1:])
    model.eval()

    score = scorer(cfg, model, device)
    eval_times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            evaluate(score, data.valid)
            if i:  # the first pass is the warm-up
                eval_times.append(time.perf_counter() - start)
    epoch = per_batch * full
    return {"epoch": epoch, "seq_per_s": len(data.train_lengths) / epoch, "eval": statistics.median(eval_times),
            "warmup": times[0][0] - per_batch * times[0][1], "graphs": counters["stats"]["unique_graphs"] - graphs}


def cpu_floor(data: SequenceData, batch_size: int, script: Path) -> float:
    """Seconds of the floor epoch for this data (cpu_floor.py in a subprocess, same threads)."""
    positions = int(data.train_lengths.sum())
    steps = math.ceil(len(data.train_lengths) / batch_size)
    args = ["--positions", str(positions), "--items", str(data.n_items), "--batch-positions", str(positions // steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["floor_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/Beauty.txt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, default=None, help="time this many batches per epoch and extrapolate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))),
                        help="comma-separated indices into the variant list")
    parser.add_argument("--batching", default="random,tokens", help="comma-separated batching settings")
    parser.add_argument("--compile", default="auto", help="comma-separated compile settings (auto, on, off)")
    parser.add_argument("--floor", type=Path, default=FLOOR, help=f"cpu_floor.py (default {FLOOR})")
    parser.add_argument("--hidden", default="64", help="comma-separated hidden sizes (inner: 4 × hidden), "
                                                       "as a search's space samples them")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_data(args.data).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"data {args.data}: {len(data.train_lengths):,} training sequences, {data.n_items:,} items; "
          f"device {name}; torch {torch.__version__}")
    floor_script = args.floor if device.type == "cpu" else None
    if floor_script and not floor_script.is_file():
        print(f"note: {floor_script} not found: no ratio to the CPU floor (cpu_floor.py lives outside the "
              f"project, in ../shared/tools/ next to the project root; --floor names another place)", file=sys.stderr)
        floor_script = None
    print("| variant | hidden | batching | compile | s/epoch | sequences/s | eval s/split | warm-up s | graphs "
          "| ratio to the first row | floor s/epoch | ratio to floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    chosen = [list(VARIANTS.items())[int(i)] for i in args.variants.split(",")]
    base: dict[tuple[str, str], float] = {}  # per compile and batching: its first row (SASRec, the first hidden)
    for compile_ in args.compile.split(","):
        for batching in args.batching.split(","):
            for hidden in (int(h) for h in args.hidden.split(",")):
                for label, overrides in chosen:
                    cfg = Config(device=str(device), max_len=data.max_len, batching=batching, compile=compile_,
                                 hidden=hidden, **overrides)
                    floor = cpu_floor(data, cfg.batch_size, floor_script) if floor_script else None
                    r = measure(cfg, data, args.batches, args.repeats)
                    base.setdefault((compile_, batching), r["epoch"])
                    to_floor = f"{floor:.1f} | {r['epoch'] / floor:.2f}" if floor else "- | -"
                    print(f"| {label} | {hidden} | {batching} | {compile_} | {r['epoch']:.3f} | {r['seq_per_s']:,.0f} | "
                          f"{r['eval']:.3f} | {r['warmup']:.2f} | {r['graphs']} | "
                          f"{r['epoch'] / base[compile_, batching]:.2f} | {to_floor} |", flush=True)


if __name__ == "__main__":
    main()
