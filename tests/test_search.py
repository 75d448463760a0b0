"""search.py: the budget-aware DP, the Alg. 1 supernet with straight-through Gumbel-top-k routers, Eq. 10."""
import random

import pytest
import torch
import torch.nn as nn

import chunk_step
import dit
import search
from search import SuperNet, all_layouts, dp_cheapest, layout_latency


def randomise(model, std=0.1, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=std)
    return model


def brute_force(n, table, budget):
    best = None
    for lay in all_layouts(n):
        c = layout_latency(lay, table)
        k = sum(lay[1:-1])
        if c <= budget + 1e-9 and (best is None or (k, -c) > (best[0], -best[1])):
            best = (k, c)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    table = {"lcha_group_ms": rng.uniform(1, 5), "ssa_group_ms": rng.uniform(0.5, 3), "switch_ms": rng.uniform(0, 2)}
    costs = sorted(layout_latency(lay, table) for lay in all_layouts(n))
    for budget in (costs[0], costs[len(costs) // 3], costs[len(costs) // 2], costs[-1] + 1):
        k, (c, lay) = search.choose_k(n, table, budget)
        bk, bc = brute_force(n, table, budget)
        assert (k, pytest.approx(c)) == (bk, pytest.approx(bc))
        assert abs(layout_latency(lay, table) - c) < 1e-9 and sum(lay[1:-1]) == k
    # and for every k, the DP's cheapest layout is the enumerated minimum
    for k, (c, lay) in dp_cheapest(n, table["lcha_group_ms"], table["ssa_group_ms"], table["switch_ms"]).items():
        assert c == pytest.approx(min(layout_latency(l, table) for l in all_layouts(n, k)))


def test_memory_dp_uses_max():
    best = dp_cheapest(5, 3.0, 1.0, 0.0, agg="max")
    assert best[0][0] == 3.0 and best[3][0] == 3.0   # peak, not sum


def test_budget_no_layout_meets_is_clear_error():
    table = {"lcha_group_ms": 2.0, "ssa_group_ms": 1.0, "switch_ms": 0.5}
    cheapest = min(layout_latency(l, table) for l in all_layouts(5))
    with pytest.raises(ValueError, match=f"cheapest layout .* costs {cheapest:.2f} ms"):
        search.choose_k(5, table, cheapest - 0.01)


def test_search_space_reduction_numbers():
    s = search.search_space(8, 3)
    assert list(s.values()) == [2 ** 16, 2 ** 8, 2 ** 6, 20]


def tiny_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cfg.in_channels, 3, 4, 4, generator=g), torch.rand(2, 3, generator=g),
            torch.randn(2, 4, cfg.text_dim, generator=g), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("layout", [(1, 0, 0, 0, 1), (1, 0, 1, 0, 1), (1, 1, 0, 1, 1), (1, 1, 1, 1, 1)])
def test_hard_routers_equal_the_sandwich(layout):
    cfg = dit.get_config("tiny", depth=10)
    sup = randomise(SuperNet(cfg)).eval()
    x, t, text, mask = tiny_inputs(cfg)
    sup.m = torch.tensor(layout, dtype=torch.float32)
    with torch.no_grad():
        a = sup(x, t, text, mask)
        b = sup.extract(layout)(x, t, text, mask)
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_ste_gradients_reach_router_and_count_constraint_holds():
    cfg = dit.get_config("tiny", depth=10)
    sup = randomise(SuperNet(cfg))
    base = randomise(dit.DiT(cfg), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([sup.router], lr=0.2)
    for step in range(4):
        sup.m = search.sample_routers(sup, k=2, tau=0.5, generator=g)
        assert sup.m[0] == 1 and sup.m[-1] == 1 and sup.m[1:-1].sum().item() == 2     # exactly k in the middle
        assert set(sup.m.detach().tolist()) <= {0.0, 1.0}                           # hard in the forward
        x, t, text, mask = tiny_inputs(cfg, step)
        loss = search.eq10_loss(sup, base, x, text, mask, g)
        opt.zero_grad()
        loss.backward()
        assert sup.router.grad is not None and sup.router.grad.abs().sum() > 0
        opt.step()
    assert sum(sup.layout(2)[1:-1]) == 2


def test_inherit_copies_base_blocks_into_both_branches():
    cfg = dit.get_config("tiny")
    base = randomise(dit.DiT(cfg))
    sup = SuperNet(cfg)
    rep = sup.inherit(base)
    assert torch.equal(sup.lcha[1][1].attn.qkv.weight, base.blocks[3].attn.qkv.weight)
    assert torch.equal(sup.ssa[2][0].attn.qkv.weight, base.blocks[4].attn.qkv.weight)
    assert "router" in rep["fresh"]


def test_search_finds_a_planted_layout():
    """The teacher is itself a sandwich of a known layout built from the supernet's own branches:
    that layout has Eq. 10 loss 0 and the routers must find it."""
    cfg = dit.get_config("tiny", depth=10)
    planted = (1, 0, 1, 0, 1)
    sup = randomise(SuperNet(cfg))
    teacher = sup.extract(planted).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    batch = lambda step: (tiny_inputs(cfg, 100 + step)[0], tiny_inputs(cfg, 100 + step)[2],
                          torch.ones(2, 4, dtype=torch.bool))
    found, hist = search.run_search(sup, teacher, batch, 1, search.SearchConfig(steps=30, router_lr=0.1),
                                    progress=False, train_weights=False)
    assert found == planted


@pytest.mark.parametrize("patch", [(1, 2, 2), (1, 4, 4)])
def test_alg1_three_forms_agree(patch):
    """Alg. 1 is written out three times (sandwich.py says why): the supernet with hard routers, the
    S2DiT it extracts, and the traced chunk step deploy.py converts. On the same weights and one chunk
    they give the same velocity (the chunk step returns x0 = x - t v), for both DiT patch sizes."""
    cfg = dit.get_config("tiny", patch=patch)
    layout = (1, 0, 0, 1)
    sup = randomise(SuperNet(cfg)).eval()
    model = sup.extract(layout).eval()
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, cfg.in_channels, cfg.chunk, 8, 8, generator=g), 0.7
    text, mask = torch.randn(1, 5, cfg.text_dim, generator=g), torch.ones(1, 5, dtype=torch.bool)
    sup.m = torch.tensor(layout, dtype=torch.float32)
    step = chunk_step.ChunkStep(model, 8).eval()
    with torch.no_grad():
        v_sup = sup(x, torch.full((1, cfg.chunk), t), text, mask)
        v = model(x, torch.full((1, cfg.chunk), t), text, mask)
        x0, _ = step(x, torch.tensor([t]), text, mask.int(), *step.empty_caches())
    assert torch.allclose(v_sup, v, atol=1e-6), (v_sup - v).abs().max()
    assert torch.allclose(x0, x - t * v, atol=1e-5), (x0 - (x - t * v)).abs().max()
