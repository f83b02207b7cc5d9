from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simdiffrec.config import SIMDIFFREC_ONLY, Config
from simdiffrec.diffusion import coefficients, q_sample, restore, restore_times
from simdiffrec.model import HEALTH, SimDiffRec, attention, dropout, ranked_items, sample_negatives, select_positions
from simdiffrec.train import alpha_factor, plan_epoch


def make_model(n_items: int = 40, max_len: int = 8, **overrides) -> SimDiffRec:
    torch.manual_seed(0)
    cfg = Config(**{"max_len": max_len, "hidden": 16, "inner": 32, "dropout": 0.0, "attn_dropout": 0.0, "steps": 50,
                    **overrides})
    model = SimDiffRec(cfg, n_items, max_len)
    with torch.no_grad():  # a spread-out table, so similarities are distinct
        model.encoder.items.weight[1:].normal_()
    return model


def batch(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, width) ids and the flat indices of their item_pos positions."""
    seq = torch.zeros(len(rows), width, dtype=torch.long)
    for r, items in enumerate(rows):
        seq[r, width - len(items):] = torch.tensor(items)
    return seq, (seq.reshape(-1) > 0).nonzero().squeeze(1)


def test_shapes_and_finite_losses():
    model = make_model()
    seq, item_pos = batch([[1, 2, 3], [4, 5, 6, 7, 8], [9]], width=5)
    target = seq.roll(-1, 1) * (seq > 0)
    target[:, -1] = torch.tensor([4, 9, 10])
    assert model.encoder(seq).shape == (3, 5, 16)
    assert model.score(seq).shape == (3, 40)
    losses = model.losses(seq, target, item_pos, tau=0.5)
    assert set(losses) == {"sr", "d", "cl", *HEALTH}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert set(make_model(alpha=0.0, beta=0.0).losses(seq, target, item_pos, 0.5)) == {"sr"}


def test_representation_is_the_last_position_of_the_full_encoder():
    model = make_model().eval()
    seq, _ = batch([[3, 4, 5], [6, 7], [1, 2, 3, 4, 5, 6, 7, 8]], width=8)
    assert torch.allclose(model.represent(seq), model.encoder(seq)[:, -1], atol=1e-6)


def test_left_trimming_keeps_positions():
    """Trimming padding columns must not change what the encoder computes for item_pos items."""
    model = make_model().eval()
    seq, _ = batch([[3, 4, 5], [6, 7]], width=8)
    assert torch.allclose(model.encoder(seq)[:, -3:], model.encoder(seq[:, -3:]), atol=1e-5)


def test_similarity_noise_is_brute_force_topk_mean_without_self():
    model = make_model(k_noise=3)
    seq, item_pos = batch([[1, 2, 3, 4], [5, 6], [2, 5, 2]], width=4)  # items recur: found once, used everywhere
    z0 = model.encoder.items(seq)
    noise = model.noise(z0, seq.reshape(-1)[item_pos], item_pos)
    table = model.encoder.items.weight.detach()
    for b in range(seq.shape[0]):
        for p in range(seq.shape[1]):
            item = int(seq[b, p])
            if item == 0:
                assert torch.all(noise[b, p] == 0)
                continue
            sims = {j: float(table[item] @ table[j]) for j in range(1, 41) if j != item}
            top = sorted(sims, key=sims.get, reverse=True)[:3]
            assert item not in top
            assert torch.allclose(noise[b, p], table[top].mean(0), atol=1e-6)


def test_similarity_noise_gradient_reaches_each_neighbour_once_per_position():
    model = make_model(k_noise=2)
    seq, item_pos = batch([[3, 3, 7], [3, 9]], width=3)
    items = seq.reshape(-1)[item_pos]
    model.noise(model.encoder.items(seq).detach(), items, item_pos).sum().backward()
    table = model.encoder.items.weight.detach()
    expected = torch.zeros(table.shape[0])
    for item in items.tolist():  # the brute force: each position's own top-2 neighbours, weight 1/2
        sims = table[1:] @ table[item]
        sims[item - 1] = float("-inf")
        expected[sims.topk(2).indices + 1] += 0.5
    assert torch.allclose(model.encoder.items.weight.grad, expected[:, None].expand_as(table), atol=1e-6)


def test_choices_in_augmentation_read_fp32_scores_under_autocast():
    model = make_model()
    h = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, exact = model.item_logits(h), model.item_logits(h, fp32=True)
    assert low.dtype == torch.bfloat16 and exact.dtype == torch.float32
    assert torch.equal(exact, h @ model.item_table().T)


def test_gaussian_noise_ablation_has_embedding_scale():
    model = make_model(noise_type="gaussian")
    seq, item_pos = batch([[1, 2, 3, 4]] * 64, width=4)
    noise = model.noise(model.encoder.items(seq), seq.reshape(-1)[item_pos], item_pos).detach()
    rms = model.item_table().detach().pow(2).mean().sqrt()
    assert math.isclose(float(noise.pow(2).mean().sqrt()), float(rms), rel_tol=0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "sqrt"])
@pytest.mark.parametrize("mix", ["convex", "vp"])
def test_forward_process_matches_closed_form(schedule, mix):
    """Iterating Eq. 8 step by step gives Eq. 9's closed form at every t; z_T is the noise."""
    steps = 1000
    a, b = coefficients(steps, schedule, mix)
    alpha = a[1:] / a[:-1].clamp(min=torch.finfo(a.dtype).tiny)  # Eq. 8's per-step α_t, β_t
    beta = b[1:] - alpha * b[:-1]
    assert a[0] == 1 and b[0] == 0 and a[-1] == 0 and b[-1] == 1
    assert torch.all(a[1:] <= a[:-1]) and torch.all(b[1:] >= b[:-1])
    z0, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    z = z0.clone()
    for t in range(1, steps + 1):
        z = alpha[t - 1] * z + beta[t - 1] * noise
        if t in (1, 10, 500, 999, 1000):
            closed = q_sample(z0, noise, torch.tensor([t, t]), a, b)
            assert torch.allclose(z, closed, atol=1e-9), t
    assert torch.allclose(z, noise, atol=1e-9)


def test_restore_with_an_oracle_denoiser_returns_z0_in_any_number_of_steps():
    a, b = (c.float() for c in coefficients(1000, "cosine", "convex"))
    z0, noise = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    seen = []

    def oracle(z, t):
        seen.append(int(t[0]))
        return z0

    for n in (1, 3, 7):
        seen.clear()
        z_T = q_sample(z0, noise, torch.tensor([1000, 1000]), a, b)
        assert torch.allclose(restore(oracle, z_T, a, b, n), z0)
        assert seen == restore_times(1000, n) and seen[0] == 1000 and len(seen) == n


def test_select_positions_never_picks_padding_and_takes_the_most_confident():
    torch.manual_seed(1)
    seq, _ = batch([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3], [4, 5, 6, 7, 8]], width=10)
    is_item = seq > 0
    conf = torch.rand(3, 10)
    conf[~is_item] = 2.0  # padding looks most confident: it must still never be chosen
    chosen = select_positions(conf, is_item, ratio=0.3)
    assert not torch.any(chosen & ~is_item)
    assert chosen.sum(1).tolist() == [3, 1, 1]  # floor(0.3 * length), at least one
    for r in range(3):
        real_conf = conf[r][is_item[r]]
        assert torch.equal(conf[r][chosen[r]].sort().values, real_conf.topk(int(chosen[r].sum())).values.sort().values)


@pytest.mark.parametrize("exclude", [True, False])
def test_hard_negative_is_the_k_sample_th_ranked_item(exclude):
    torch.manual_seed(2)
    logits = torch.randn(6, 30)
    items = torch.tensor([1, 5, 9, 13, 17, 30])
    logits[torch.arange(6), items - 1] = 10.0  # the original item ranks first
    best, kth = ranked_items(logits.clone(), items, k_sample=4, exclude_original=exclude)
    for r in range(6):
        order = [int(i) + 1 for i in logits[r].argsort(descending=True)]
        if exclude:
            order.remove(int(items[r]))
        assert int(best[r]) == order[0] and int(kth[r]) == order[3]
        assert (int(best[r]) == int(items[r])) != exclude


def test_views_differ_from_the_original_only_at_chosen_positions():
    model = make_model(aug_ratio=0.5, k_sample=3)
    seq, item_pos = batch([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]], width=6)
    items = seq.reshape(-1)[item_pos]
    z0 = model.encoder.items(seq)
    positive, negative = model.augment(seq, z0, model.noise(z0, items, item_pos), items, item_pos)
    for view in (positive, negative):
        assert torch.equal(view == 0, seq == 0)  # padding untouched
        changed = (view != seq).sum(1)
        assert changed.tolist() == [3, 1, 1]  # exclude_original: every chosen position changes
    assert torch.all((positive != seq) == (negative != seq))


def test_contrastive_loss_is_infonce_over_positive_and_negative_views():
    model = make_model(tau=0.5)
    seq, item_pos = batch([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], width=3)
    items, z0, noise, u = cl_inputs(model, seq, item_pos)
    torch.manual_seed(3)
    loss, _ = model.contrastive_loss(u, seq, z0, noise, items, item_pos, tau=0.5)
    torch.manual_seed(3)
    positive, negative = model.augment(seq, z0, noise, items, item_pos)
    p, n = model.represent(positive), model.represent(negative)
    expected = 0.0
    for i in range(4):
        sims = torch.stack([F.cosine_similarity(u[i], c, dim=0) for c in [*p, *n]]) / 0.5
        expected += -(sims[i] - torch.logsumexp(sims, 0)) / 4
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("batching", ["random", "tokens"])
def test_plan_epoch_covers_every_row_once_with_exact_real_positions(batching):
    torch.manual_seed(0)
    lengths = torch.randint(1, 9, (37,)).numpy()
    seen = []
    for b in plan_epoch(lengths, batch_size=8, device=torch.device("cpu"), batching=batching):
        rows = b.rows.numpy()
        seen += rows.tolist()
        assert b.width == lengths[rows].max()
        mask = torch.zeros(len(rows), b.width, dtype=torch.bool)
        for r, n in enumerate(lengths[rows]):
            mask[r, b.width - n:] = True
        assert torch.equal(b.item_pos, mask.reshape(-1).nonzero().squeeze(1))
    assert sorted(seen) == list(range(37))


def test_token_batches_respect_the_budget_and_trim_padding_away():
    torch.manual_seed(0)
    lengths = torch.randint(1, 51, (2000,)).numpy() // torch.randint(1, 10, (2000,)).numpy() + 1
    budget = 64 * lengths.mean()
    random = plan_epoch(lengths, 64, torch.device("cpu"), "random")
    tokens = plan_epoch(lengths, 64, torch.device("cpu"), "tokens")
    assert all(len(b.item_pos) <= budget for b in tokens)
    assert abs(len(tokens) - len(random)) <= 0.05 * len(random)  # about as many steps as random batching

    def padding(plan):
        return 1 - sum(len(b.item_pos) for b in plan) / sum(len(b.rows) * b.width for b in plan)

    assert padding(tokens) < 0.1 < 0.5 < padding(random)
    again = plan_epoch(lengths, 64, torch.device("cpu"), "tokens")  # another epoch: other batches
    assert [len(b.rows) for b in again] != [len(b.rows) for b in tokens]
    assert not torch.equal(torch.cat([b.rows for b in again]), torch.cat([b.rows for b in tokens]))


def test_bce_negatives_are_items_other_than_the_target():
    torch.manual_seed(0)
    targets = torch.randint(1, 4, (5000,))
    neg = sample_negatives(targets, n_items=3)
    assert torch.all(neg != targets) and neg.min() == 1 and neg.max() == 3
    for target in (1, 2, 3):  # the two others equally often (~1,700 draws per target)
        counts = torch.bincount(neg[targets == target], minlength=4).tolist()
        others = [c for item, c in enumerate(counts[1:], 1) if item != target]
        assert abs(others[0] - others[1]) < 0.1 * sum(others), (target, counts)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_sequential_loss_matches_its_definition(loss):
    model = make_model(sr_loss=loss, alpha=0.0, beta=0.0)
    seq, item_pos = batch([[1, 2, 3], [4, 5]], width=3)
    target = torch.tensor([[2, 3, 4], [0, 5, 6]])
    h = model.encoder(seq).reshape(-1, 16)[item_pos]
    t = target.reshape(-1)[item_pos]
    torch.manual_seed(5)
    value = model.losses(seq, target, item_pos, 1.0)["sr"]
    table = model.encoder.items.weight
    if loss == "ce":
        expected = F.cross_entropy(h @ table[1:].T, t - 1)
    else:
        torch.manual_seed(5)
        neg = sample_negatives(t, 40)
        expected = (-F.logsigmoid((h * table[t]).sum(-1)).mean()
                    - F.logsigmoid(-(h * table[neg]).sum(-1)).mean())
    assert torch.allclose(value, expected, atol=1e-5)


def test_cpu_attention_and_dropout_paths_match_the_fused_kernel():
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    mask = torch.rand(2, 1, 5, 5) > 0.4
    mask |= torch.eye(5, dtype=torch.bool)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask, p=1e-12), fused, atol=1e-6)
    x = torch.ones(200_000)
    dropped = dropout(x, 0.3, training=True)
    assert abs(float((dropped == 0).float().mean()) - 0.3) < 0.01
    assert abs(float(dropped.mean()) - 1.0) < 0.01
    assert dropout(x, 0.3, training=False) is x


def test_sasrec_reads_none_of_the_simdiffrec_only_settings():
    """finalize lets configurations that differ only in these share one SASRec baseline."""
    other = {"steps": 20, "schedule": "linear", "mix": "vp", "denoiser_layers": 2, "denoiser_heads": 4,
             "restore_steps": 3, "rounding": "z0", "k_noise": 3, "k_sample": 5, "tau": 0.1, "tau_end": 0.5,
             "tau_schedule": "linear", "aug_ratio": 0.5, "min_substitutions": 2, "aug_dropout": False,
             "view_dropout": False, "similarity": "dot", "shared_denoiser": True, "alpha_warmup": 3,
             "noise_type": "gaussian", "aug_positions": "random", "hard_negative": False, "exclude_original": False}
    assert set(other) == set(SIMDIFFREC_ONLY) and all(other[k] != getattr(Config(), k) for k in other)
    seq, item_pos = batch([[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]], width=5)
    target = seq.roll(-1, 1) * (seq > 0)
    target[:, -1] = torch.tensor([13, 14, 15])
    sasrec = make_model(alpha=0.0, beta=0.0, dropout=0.3, attn_dropout=0.3)
    changed = make_model(alpha=0.0, beta=0.0, dropout=0.3, attn_dropout=0.3, **other)
    changed.encoder.load_state_dict(sasrec.encoder.state_dict())
    losses = []
    for model in (sasrec, changed):
        torch.manual_seed(1)  # the same dropout masks
        losses.append(model.train().losses(seq, target, item_pos, tau=0.5))
    assert set(losses[0]) == set(losses[1]) == {"sr"} and torch.equal(losses[0]["sr"], losses[1]["sr"])
    assert torch.equal(sasrec.eval().score(seq), changed.eval().score(seq))


def test_ablation_switches_change_what_they_name():
    seq, item_pos = batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]], width=6)
    items = seq.reshape(-1)[item_pos]
    # random positions: same count per row as confidence positions, padding never touched
    model = make_model(aug_positions="random", aug_ratio=0.5)
    z0 = model.encoder.items(seq)
    noise = model.noise(z0, items, item_pos)
    picks = set()
    for seed in range(20):
        torch.manual_seed(seed)
        positive, _ = model.augment(seq, z0, noise, items, item_pos)
        assert (positive != seq).sum(1).tolist() == [3, 2] and torch.equal(positive == 0, seq == 0)
        picks.add(tuple((positive != seq).reshape(-1).tolist()))
    assert len(picks) > 1  # the positions vary from draw to draw
    # no hard negative: in-batch positives only, B x B logits
    model = make_model(hard_negative=False, tau=0.5)
    u = model.encoder(seq)[:, -1]
    torch.manual_seed(0)
    loss, _ = model.contrastive_loss(u, seq, z0, noise, items, item_pos, tau=0.5)
    torch.manual_seed(0)
    positive, _ = model.augment(seq, z0, noise, items, item_pos)
    logits = F.normalize(u, dim=-1) @ F.normalize(model.represent(positive), dim=-1).T / 0.5
    assert torch.allclose(loss, F.cross_entropy(logits, torch.arange(2)), atol=1e-5)


def cl_inputs(model: SimDiffRec, seq: torch.Tensor, item_pos: torch.Tensor):
    """What L_cl takes besides the sequence: item ids, z0, the noise, and e_u (one encoder pass)."""
    items = seq.reshape(-1)[item_pos]
    z0 = model.encoder.items(seq)
    return items, z0, model.noise(z0, items, item_pos), model.encoder(seq)[:, -1]


def views_of(model: SimDiffRec, seq: torch.Tensor, item_pos: torch.Tensor, seed: int):
    items = seq.reshape(-1)[item_pos]
    z0 = model.encoder.items(seq)
    torch.manual_seed(seed)
    return model.augment(seq, z0, model.noise(z0, items, item_pos), items, item_pos)


def test_eval_mode_augmentation_ignores_dropout():
    seq, item_pos = batch([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], width=8)
    model = make_model(dropout=0.5, attn_dropout=0.5, aug_dropout=False, aug_ratio=0.5)
    reference = views_of(model.eval(), seq, item_pos, seed=0)
    model.train()
    for seed in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(views_of(model, seq, item_pos, seed), reference))
    assert model.training and model.denoiser.training  # the mode is restored
    noisy = make_model(dropout=0.5, attn_dropout=0.5, aug_ratio=0.5).train()  # the authors' code: dropout on
    draws = {tuple(views_of(noisy, seq, item_pos, seed)[0].reshape(-1).tolist()) for seed in range(6)}
    assert len(draws) > 1


def test_min_substitutions_raise_the_count_and_never_choose_padding():
    seq, item_pos = batch([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3], [4, 5, 6, 7, 8]], width=10)
    is_item = seq > 0
    conf = torch.rand(3, 10)
    conf[~is_item] = 2.0
    chosen = select_positions(conf, is_item, ratio=0.1, minimum=3)
    assert chosen.sum(1).tolist() == [3, 1, 3] and not torch.any(chosen & ~is_item)
    model = make_model(max_len=10, aug_ratio=0.1, min_substitutions=3)
    for view in views_of(model, seq, item_pos, seed=0):
        assert (view != seq).sum(1).tolist() == [3, 1, 3] and torch.equal(view == 0, seq == 0)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_denoiser_trains_the_encoders_layers_through_l_d(shared):
    model = make_model(shared_denoiser=shared, alpha=0.0)
    seq, item_pos = batch([[1, 2, 3, 4], [5, 6, 7]], width=4)
    items = seq.reshape(-1)[item_pos]
    z0 = model.encoder.items(seq)
    loss = model.diffusion_loss(z0, model.noise(z0, items, item_pos), seq > 0, items, item_pos)
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in model.encoder.blocks.parameters() if p.grad is not None)
    assert (grad > 0) == shared
    assert (model.denoiser.blocks is model.encoder.blocks) == shared
    own = sum(p.numel() for p in make_model(shared_denoiser=False).parameters())
    assert (sum(p.numel() for p in model.parameters()) < own) == shared  # no duplicated layers


def test_contrastive_similarity_and_clean_views():
    seq, item_pos = batch([[1, 2, 3], [4, 5, 6], [7, 8, 9]], width=3)
    model = make_model(similarity="dot", hard_negative=False)
    items, z0, noise, u = cl_inputs(model, seq, item_pos)
    torch.manual_seed(0)
    loss, health = model.contrastive_loss(u, seq, z0, noise, items, item_pos, tau=0.5)
    torch.manual_seed(0)
    positive, _ = model.augment(seq, z0, noise, items, item_pos)
    p = model.represent(positive)
    assert torch.allclose(loss, F.cross_entropy(u @ p.T / 0.5, torch.arange(3)), atol=1e-5)
    assert set(health) == {"cl_view_cos", "cl_substituted"}  # no negative view, no margin
    assert torch.allclose(health["cl_view_cos"], F.cosine_similarity(u, p).mean(), atol=1e-5)
    # without view dropout e_u is a dropout-free pass of its own, and the loss is deterministic
    clean = make_model(dropout=0.5, attn_dropout=0.5, view_dropout=False, aug_dropout=False).train()
    z0 = clean.encoder.items(seq)
    noise = clean.noise(z0, items, item_pos)
    values = [clean.contrastive_loss(torch.randn(3, 16), seq, z0, noise, items, item_pos, 0.5)[0]
              for _ in range(3)]
    assert torch.allclose(values[0], values[1]) and torch.allclose(values[0], values[2])


def test_health_reads_the_views():
    seq, item_pos = batch([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], width=5)
    model = make_model(aug_ratio=0.4)
    items, z0, noise, u = cl_inputs(model, seq, item_pos)
    torch.manual_seed(0)
    _, health = model.contrastive_loss(u, seq, z0, noise, items, item_pos, tau=1.0)
    torch.manual_seed(0)
    positive, negative = model.augment(seq, z0, noise, items, item_pos)
    cos_pos = F.cosine_similarity(u, model.represent(positive))
    cos_neg = F.cosine_similarity(u, model.represent(negative))
    assert health["cl_substituted"] == pytest.approx(4 / 10)  # two of five positions in each row
    assert torch.allclose(health["cl_margin"], (cos_pos - cos_neg).mean(), atol=1e-5)
    assert health["cl_pos_wins"] == pytest.approx(float((cos_pos > cos_neg).float().mean()))


def test_alpha_warmup_scales_alpha_in_the_objective():
    assert [alpha_factor(Config(alpha_warmup=4), e) for e in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert alpha_factor(Config(), 1) == 1.0
    model = make_model(alpha=0.4, beta=0.2)
    parts = {"sr": torch.tensor(1.0), "cl": torch.tensor(2.0), "d": torch.tensor(3.0)}
    assert float(model.objective(parts)) == pytest.approx(1 + 0.8 + 0.6)
    assert float(model.objective(parts, alpha_factor=0.25)) == pytest.approx(1 + 0.2 + 0.6)
