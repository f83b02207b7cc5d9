"""Full-ranking evaluation speed by block size: seconds per split for each number of user rows
scored at once, and the ratio to the largest block of the same run.

    OMP_NUM_THREADS=1 python bench/eval_blocks.py --data ../shared/data/Toys_and_Games.txt --hidden 64,256

Rows are ordered by history length, so a smaller block trims more padding from the encoder's
input and keeps its (rows × items) score matrix in cache; a larger one asks the device fewer
times.  The model is untrained (the time does not depend on its weights).  `ranks moved`
counts the users whose rank differs from the first block size's: a block's width and shape
change the float summation order, so a near-tie may turn.  Each figure is the median of
--repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from simdiffrec.config import Config
from simdiffrec.data import load_data
from simdiffrec.device import resolve_device
from simdiffrec.evaluate import block_width, scorer, target_ranks
from simdiffrec.model import SimDiffRec


def padded_positions(lengths: np.ndarray, rows: int, max_len: int) -> int:
    """Encoder positions a split costs in blocks of `rows` (each block padded to its longest)."""
    blocks = (lengths[s:s + rows] for s in range(0, len(lengths), rows))
    return sum(block_width(block, max_len) * len(block) for block in blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/Beauty.txt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hidden", default="64", help="comma-separated hidden sizes (inner: 4 × hidden)")
    parser.add_argument("--rows", default="4096,2048,1024,512,256,128,64", help="comma-separated block sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_data(args.data).to(device)
    split = data.valid
    lengths = np.diff(split.history_ptr)
    blocks = [int(r) for r in args.rows.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"data {args.data}: {len(lengths):,} users, {data.n_items:,} items, max_len {data.max_len}; "
          f"device {name}; torch {torch.__version__}\n")
    print("| hidden | rows per block | encoder positions | s/split | ratio to the largest block | ranks moved |")
    print("|---|---|---|---|---|---|")
    for hidden in (int(h) for h in args.hidden.split(",")):
        cfg = Config(alpha=0.0, beta=0.0, hidden=hidden, inner=4 * hidden)
        torch.manual_seed(0)
        model = SimDiffRec(cfg, data.n_items, data.max_len).to(device).eval()
        score = scorer(cfg, model, device)
        first, reference = None, None
        for rows in blocks:
            times = []
            with torch.no_grad():
                for i in range(args.repeats + 1):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    ranks = target_ranks(score, split, rows)
                    ranks.sum().item()  # waits for the device
                    if i:
                        times.append(time.perf_counter() - start)
            reference = ranks if reference is None else reference
            moved = int((ranks != reference).sum())
            median = statistics.median(times)
            first = first or median
            print(f"| {hidden} | {rows} | {padded_positions(lengths, rows, data.max_len):,} | {median:.2f} "
                  f"| {median / first:.2f} | {moved} |", flush=True)


if __name__ == "__main__":
    main()
