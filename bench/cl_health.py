"""What L_cl does to a trained model's encoder, per setting: the cheap diagnosis behind the L_cl settings.

    python bench/cl_health.py --checkpoint runs/toys-paper/checkpoint.pt --data ../shared/data/Toys_and_Games.txt

Loads a training checkpoint (a few epochs suffice) and, on the same fixed batches, for the
checkpoint's own settings and each variant below: L_cl and its health numbers (docs/method.md),
and the cosine between the gradients of α·L_cl and L_sr on the encoder's Transformer layers
(negative: L_cl pulls against next-item prediction), with the ratio of their norms.  No
training; variants that change the parameters (shared_denoiser) are not comparable here.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from simdiffrec.config import Config
from simdiffrec.data import load_data
from simdiffrec.model import HEALTH, SimDiffRec
from simdiffrec.train import plan_epoch

VARIANTS = {
    "checkpoint's settings": {},
    "aug_dropout off": dict(aug_dropout=False),
    "view_dropout off": dict(view_dropout=False),
    "min_substitutions 3": dict(min_substitutions=3),
    "k_sample 20": dict(k_sample=20),
    "all three": dict(aug_dropout=False, view_dropout=False, min_substitutions=3),
    "all three, k_sample 20": dict(aug_dropout=False, view_dropout=False, min_substitutions=3, k_sample=20),
    "all three, k_sample 20, tau 0.1": dict(aug_dropout=False, view_dropout=False, min_substitutions=3,
                                             k_sample=20, tau=0.1),
}


def encoder_grad(model: SimDiffRec, loss: torch.Tensor) -> torch.Tensor:
    params = list(model.encoder.blocks.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def measure(weights: dict[str, torch.Tensor], data, batches, cfg: Config) -> dict[str, float]:
    model = SimDiffRec(cfg, data.n_items, data.max_len)
    model.load_state_dict(weights)
    model.train()
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # the same dropout and positions draws for every variant
        cut = data.max_len - batch.width
        parts = model.losses(data.train_input[batch.rows, cut:], data.train_target[batch.rows, cut:],
                             batch.item_pos, cfg.tau)
        g_sr, g_cl = encoder_grad(model, parts["sr"]), encoder_grad(model, cfg.alpha * parts["cl"])
        row = {**{k: float(parts[k].detach()) for k in ("cl", *HEALTH)},
               "grad_cos": float(F.cosine_similarity(g_sr, g_cl, dim=0)), "grad_ratio": float(g_cl.norm() / g_sr.norm())}
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(batches) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="the variants to measure (default: all)")
    args = parser.parse_args()
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    base = Config.from_dict(payload["config"]).replace(device="cpu")
    data = load_data(args.data, max_len=base.max_len)
    torch.manual_seed(0)
    batches = plan_epoch(data.train_lengths, base.batch_size, torch.device("cpu"))[:args.batches]
    print(f"{args.checkpoint}: epoch {payload['state']['epoch']}, {args.batches} batches")
    print("| variant | L_cl | substituted | view cos | margin | positive wins | grad cos (L_cl, L_sr) | |grad L_cl| / |grad L_sr| |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only or VARIANTS:
        m = measure(payload["model"], data, batches, base.replace(**VARIANTS[name]))
        print(f"| {name} | {m['cl']:.3f} | {m['cl_substituted']:.3f} | {m['cl_view_cos']:.3f} | "
              f"{m['cl_margin']:.4f} | {m['cl_pos_wins']:.2f} | {m['grad_cos']:+.2f} | {m['grad_ratio']:.2f} |")


if __name__ == "__main__":
    main()
