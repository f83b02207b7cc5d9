"""SimDiffRec: a SASRec encoder trained with L = L_sr + α·L_cl + β·L_d (Eq. 18).

One training step, top to bottom in `SimDiffRec.losses`:
item ids → encoder → L_sr; item embeddings z_0 → similarity noise (Eq. 6-7) → z_t (Eq. 9) →
denoiser → L_d (Eq. 13); z_T → restore → item distribution → confidence (Eq. 14-16) → positive
and hard-negative views → encoder → L_cl (Eq. 17).

Item scores cover ids 1..n (column j is item j + 1): padding is never a candidate.  Everything
that scores the item table works on the positions that hold an item (not padding) only, given as
flat indices `item_pos` into the (B, w) batch, which the training loop computes per epoch on the
host so that a step never waits for the device; `is_item` is the same as a (B, w) mask.  The
loss weights α and β enter in `SimDiffRec.objective` (Eq. 18).  Besides the losses, `losses`
returns a few detached numbers on the contrastive part's health (HEALTH), averaged per epoch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import item_softmax
from .config import Config
from .diffusion import coefficients, q_sample, restore


LOSSES = ("sr", "cl", "d")
HEALTH = ("cl_margin", "cl_pos_wins", "cl_view_cos", "cl_substituted")


@contextmanager
def no_dropout(module: nn.Module, off: bool = True) -> Iterator[None]:
    """Run `module` in eval mode (no dropout) inside the block when `off`; its mode is restored after."""
    was = module.training
    module.train(was and not off)
    try:
        yield
    finally:
        module.train(was)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, except on the CPU: there a uniform-threshold mask is used, because PyTorch's
    CPU Bernoulli sampler made dropout a third of a CPU training step (tests and CI run there)."""
    if not training or p == 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, True)
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Scaled dot-product attention with dropout `p` (0 when not training).  The fused kernel,
    except for CPU training, where its dropout goes through the slow Bernoulli sampler."""
    if q.is_cuda or p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    return dropout(weights, p, True) @ v


class Block(nn.Module):
    """Pre-norm Transformer layer; the attention mask makes it causal or bidirectional."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, inner)
        self.ff2 = nn.Linear(inner, hidden)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """mask: boolean, broadcastable to (B, heads, L, L), True where a query may attend.
        `last_only` computes the output of the last position alone (all it reads as keys)."""
        B, L, H = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, mask, x = q[:, :, -1:], mask[..., -1:, :], x[:, -1:]
        attn = attention(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(B, x.shape[1], H)))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm2(x))))))


class Encoder(nn.Module):
    """SASRec: item + learned position embeddings, causal self-attention, final layer norm.

    Sequences are left-padded and may be trimmed on the left to the batch's longest sequence;
    positions count from the right end and padding is masked out of attention (each position
    may always see itself, so no row is empty), so the output for real items does not depend
    on how much padding a batch has.
    """

    def __init__(self, n_items: int, max_len: int, cfg: Config):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, cfg.hidden)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.ff_size, cfg.dropout, cfg.attn_dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, w) ids -> (B, w, d) outputs, or (B, 1, d) for the last position with `last_only`."""
        w = seq.shape[1]
        is_item = seq > 0
        causal = torch.ones(w, w, dtype=torch.bool, device=seq.device).tril()
        mask = (causal & is_item[:, None, None, :]) | torch.eye(w, dtype=torch.bool, device=seq.device)
        x = self.drop(self.items(seq) + self.positions.weight[-w:])
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only and i == len(self.blocks) - 1)
        return self.norm(x)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Denoiser(nn.Module):
    """f_θ(z_t, t) -> ẑ_0: a small bidirectional Transformer over the noised sequence, with its
    own layers or (`blocks` given, shared_denoiser) the encoder's, as the authors' code does.

    Its last hidden state h (layer-normed, the "encoder output" of Eq. 14) is what gets scored
    against the item table; a linear head maps h to the continuous prediction ẑ_0 (squared
    error of Eq. 13, reverse steps).  Scoring ẑ_0 itself does not work: it must match item
    embeddings of norm ~0.2, and such dot products give a uniform softmax over the items.
    """

    def __init__(self, max_len: int, cfg: Config, blocks: nn.ModuleList | None = None):
        super().__init__()
        h = cfg.hidden
        self.positions = nn.Embedding(max_len, h)
        self.time = nn.Sequential(nn.Linear(h, 4 * h), nn.SiLU(), nn.Linear(4 * h, h))
        self.drop = Dropout(cfg.dropout)
        self.blocks = blocks if blocks is not None else nn.ModuleList(
            Block(h, cfg.denoiser_heads, cfg.ff_size, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.denoiser_layers))
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, h)

    def hidden(self, z: torch.Tensor, t: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        """z: (B, w, d) noised embeddings, t: (B,) timesteps, is_item: (B, w) positions holding an item -> h."""
        time = self.time(timestep_embedding(t, z.shape[-1]).to(z.dtype))
        x = self.drop(z + self.positions.weight[-z.shape[1]:] + time[:, None])
        mask = is_item[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, z: torch.Tensor, t: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(z, t, is_item))


class SimDiffRec(nn.Module):
    def __init__(self, cfg: Config, n_items: int, max_len: int):
        super().__init__()
        self.cfg = cfg = cfg.for_items(n_items)  # k_noise, k_sample at most the other items
        self.n_items = n_items
        self.encoder = Encoder(n_items, max_len, cfg)
        self.denoiser = Denoiser(max_len, cfg, self.encoder.blocks if cfg.shared_denoiser else None)
        z0_weight, noise_weight = coefficients(cfg.steps, cfg.schedule, cfg.mix)  # Eq. 9's a_t, b_t
        self.register_buffer("z0_weight", z0_weight.float(), persistent=False)
        self.register_buffer("noise_weight", noise_weight.float(), persistent=False)
        self.apply(_init)

    # --- scoring -------------------------------------------------------------------------
    def item_table(self) -> torch.Tensor:
        """Embeddings of items 1..n (row j is item j + 1)."""
        return self.encoder.items.weight[1:]

    def item_logits(self, h: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Eq. 2 / Eq. 14: dot products with every item, (..., d) -> (..., n_items).

        `fp32` computes them in full precision even under autocast: for scores that pick items
        and positions, where bf16's 8-bit mantissa would turn near-ties into arbitrary choices."""
        if not fp32:
            return h @ self.item_table().T
        with torch.autocast(h.device.type, enabled=False):
            return h.float() @ self.item_table().float().T

    def represent(self, seq: torch.Tensor) -> torch.Tensor:
        """The sequence representation: the encoder output at the last position."""
        return self.encoder(seq, last_only=True)[:, -1]

    def score(self, seq: torch.Tensor) -> torch.Tensor:
        """Next-item scores for each sequence, (B, w) -> (B, n_items)."""
        return self.item_logits(self.represent(seq))

    # --- losses --------------------------------------------------------------------------
    def objective(self, losses: dict[str, torch.Tensor], alpha_factor: float = 1.0) -> torch.Tensor:
        """Eq. 18: L = L_sr + α·L_cl + β·L_d, from the parts `losses` returns; `alpha_factor`
        scales α (the warm-up, `train.alpha_factor`)."""
        alpha = alpha_factor * self.cfg.alpha
        return losses["sr"] + alpha * losses.get("cl", 0.0) + self.cfg.beta * losses.get("d", 0.0)

    def losses(self, seq: torch.Tensor, target: torch.Tensor, item_pos: torch.Tensor,
               tau: float) -> dict[str, torch.Tensor]:
        """The three losses (LOSSES) for one batch, and with L_cl its health (HEALTH, detached);
        `item_pos` holds the flat indices of non-padding positions."""
        cfg = self.cfg
        h = self.encoder(seq)
        items = seq.reshape(-1)[item_pos]
        out = {"sr": self.sr_loss(h.reshape(-1, h.shape[-1])[item_pos], target.reshape(-1)[item_pos])}
        if cfg.alpha == 0 and cfg.beta == 0:
            return out
        z0 = self.encoder.items(seq)
        noise = self.noise(z0, items, item_pos)
        is_item = seq > 0
        if cfg.beta > 0:
            out["d"] = self.diffusion_loss(z0, noise, is_item, items, item_pos)
        if cfg.alpha > 0:
            out["cl"], health = self.contrastive_loss(h[:, -1], seq, z0, noise, items, item_pos, tau)
            out.update(health)
        return out

    def sr_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L_sr at every position holding an item: full softmax (ce) or Eq. 3 with one negative (bce)."""
        if self.cfg.sr_loss == "ce":
            return item_softmax.cross_entropy(h, self.item_table(), targets - 1)
        neg = sample_negatives(targets, self.n_items)
        table = self.encoder.items.weight
        pos_logit = (h * table[targets]).sum(-1).float()
        neg_logit = (h * table[neg]).sum(-1).float()
        return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))

    def noise(self, z0: torch.Tensor, items: torch.Tensor, item_pos: torch.Tensor) -> torch.Tensor:
        """Eq. 6-7: mean embedding of each item's k_noise most similar other items (pads: 0)."""
        B, w, d = z0.shape
        if self.cfg.noise_type == "gaussian":
            # The ablation: isotropic noise at the scale of the item embeddings.
            scale = self.item_table().detach().pow(2).mean().sqrt()
            noise_items = torch.randn(item_pos.shape[0], d, device=z0.device, dtype=z0.dtype) * scale
        else:
            # The neighbours depend on the item alone: find them once per distinct item of the batch.
            table = self.item_table()
            distinct, inverse = torch.unique(items, return_inverse=True)
            with torch.no_grad():
                sim = self.item_logits(table[distinct - 1])
                sim.scatter_(1, (distinct - 1)[:, None], float("-inf"))  # self-masking
                top = sim.topk(self.cfg.k_noise, dim=1).indices
            noise_items = table[top].mean(1)[inverse]
        return z0.new_zeros(B * w, d).index_put((item_pos,), noise_items.to(z0.dtype)).view(B, w, d)

    def diffusion_loss(self, z0: torch.Tensor, noise: torch.Tensor, is_item: torch.Tensor,
                       items: torch.Tensor, item_pos: torch.Tensor) -> torch.Tensor:
        """Eq. 13 with one random t per sequence.

        The forward process is deterministic, so z_0 = e and the t ≥ 2 and t = 1 terms are the
        same squared error; the rounding term -log p(s | z_0) is a softmax over the item table.
        """
        d = z0.shape[-1]
        t = torch.randint(1, self.cfg.steps + 1, (z0.shape[0],), device=z0.device)
        h = self.denoiser.hidden(q_sample(z0, noise, t, self.z0_weight, self.noise_weight), t, is_item).reshape(-1, d)[item_pos]
        true = z0.reshape(-1, d)[item_pos]
        mse = (self.denoiser.out(h).float() - true.float()).pow(2).sum(-1).mean()
        rounded = true if self.cfg.rounding == "z0" else h
        return mse + item_softmax.cross_entropy(rounded, self.item_table(), items - 1)

    @torch.no_grad()
    def augment(self, seq: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, items: torch.Tensor,
                item_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and hard-negative views (Sections 4.3-4.4).

        Restore the fully noised sequence, score every item at each position holding an item, take the
        most confident positions (a ratio of the sequence's length, at least min_substitutions) and
        put there the top-ranked item (positive view) or the k_sample-th (negative view).  Without
        aug_dropout the denoiser restores in eval mode: dropout would otherwise decide the ranking.
        """
        cfg = self.cfg
        B, w, d = z0.shape
        is_item = seq > 0
        T = torch.full((B,), cfg.steps, device=seq.device, dtype=torch.long)
        z_T = q_sample(z0, noise, T, self.z0_weight, self.noise_weight)
        with no_dropout(self.denoiser, not cfg.aug_dropout):
            h = restore(lambda z, t: self.denoiser(z, t, is_item), z_T, self.z0_weight, self.noise_weight,
                        cfg.restore_steps, last=lambda z, t: self.denoiser.hidden(z, t, is_item))
        logits = self.item_logits(h.reshape(-1, d)[item_pos], fp32=True)
        if cfg.aug_positions == "confidence":
            conf_items = logits.log_softmax(1).amax(1).exp()  # Eq. 15-16, max p = exp(max - logsumexp) in one softmax pass
        else:
            conf_items = torch.rand(item_pos.shape[0], device=seq.device)
        conf = torch.full((B * w,), -1.0, device=seq.device).index_put((item_pos,), conf_items).view(B, w)
        chosen = select_positions(conf, is_item, cfg.aug_ratio, cfg.min_substitutions).reshape(-1)[item_pos]
        at = chosen.nonzero().squeeze(1)  # rank items only where they replace the original (~1 in 6)
        best, kth = ranked_items(logits[at], items[at], cfg.k_sample, cfg.exclude_original)
        flat = seq.reshape(-1)
        positive = flat.index_put((item_pos[at],), best).view(B, w)
        negative = flat.index_put((item_pos[at],), kth).view(B, w)
        return positive, negative

    def contrastive_loss(self, u: torch.Tensor, seq: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                         items: torch.Tensor, item_pos: torch.Tensor,
                         tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 17: InfoNCE on `similarity` (cosine or dot) over τ; candidates are every sequence's
        positive view and (hard_negative) every sequence's negative view, the own positive being
        the label.  `u` is e_u from the training pass; without view_dropout e_u and the views are
        encoded without dropout, so that the substitutions, not dropout, tell them apart.

        Also returns the health of L_cl (detached): the share of item positions substituted, the
        cosine of e_u to its positive view, and (hard_negative) how far and how often the
        positive is above the negative in cosine."""
        cfg = self.cfg
        B = seq.shape[0]
        positive, negative = self.augment(seq, z0.detach(), noise.detach(), items, item_pos)
        views = [positive, negative] if cfg.hard_negative else [positive]
        if cfg.view_dropout:
            reps = torch.cat([u, self.represent(torch.cat(views))]).float()
        else:
            with no_dropout(self.encoder):
                reps = self.represent(torch.cat([seq, *views])).float()
        unit = F.normalize(reps, dim=-1)
        if cfg.similarity == "cosine":
            reps = unit
        logits = reps[:B] @ reps[B:].T / tau
        loss = F.cross_entropy(logits, torch.arange(B, device=seq.device))
        with torch.no_grad():
            cos = (unit[:B, None] * unit[B:].view(len(views), B, -1).transpose(0, 1)).sum(-1)  # (B, views)
            health = {"cl_view_cos": cos[:, 0].mean(),
                      "cl_substituted": (positive != seq).sum() / item_pos.shape[0]}
            if cfg.hard_negative:
                health["cl_margin"] = (cos[:, 0] - cos[:, 1]).mean()
                health["cl_pos_wins"] = (cos[:, 0] > cos[:, 1]).float().mean()
        return loss, health


def sample_negatives(targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """One uniform random item per target, never the target itself, without a per-row rejection
    loop: a draw from the n_items - 1 others, ids from the target's on shifted up by one."""
    neg = torch.randint(1, n_items, targets.shape, device=targets.device)
    return neg + (neg >= targets).long()


def select_positions(conf: torch.Tensor, is_item: torch.Tensor, ratio: float, minimum: int = 1) -> torch.Tensor:
    """The most confident item positions of each row: floor(ratio · length), at least `minimum`
    (all of a shorter row).

    conf: (B, w) scores, is_item: (B, w) positions holding an item -> (B, w) bool.  Padding is never chosen.
    """
    B, w = conf.shape
    count = (is_item.sum(1) * ratio).long().clamp(min=minimum)
    order = conf.masked_fill(~is_item, float("-inf")).argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(w, device=conf.device).expand(B, w))
    return (rank < count[:, None]) & is_item


def ranked_items(logits: torch.Tensor, items: torch.Tensor, k_sample: int,
                 exclude_original: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-ranked and the k_sample-th ranked item ids per position (logits: (n, n_items)).

    With `exclude_original` the position's own item is not a candidate, so the positive view
    always changes the sequence there (a restored original would make it a copy); it is masked
    in `logits` itself, which the caller no longer needs.
    """
    if exclude_original:
        logits.scatter_(1, (items - 1)[:, None], float("-inf"))
    ranked = logits.topk(k_sample, dim=1).indices + 1
    return ranked[:, 0], ranked[:, -1]


def _init(module: nn.Module) -> None:
    """Normal(0, 0.02) weights as in RecBole's SASRec; the padding row stays zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
