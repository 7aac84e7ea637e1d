"""Conversions are checked against the original layer's output, not just shapes."""

import copy

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

import decompositions as D
import ranks
from conftest import decompose


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# (in, out, kernel, stride, padding, dilation, bias, padding_mode, input HxW)
CONV_CONFIGS = [
    (3, 8, 3, 1, 1, 1, True, "zeros", (12, 12)),
    (6, 10, (3, 5), (2, 1), (1, 2), (1, 2), False, "zeros", (13, 17)),
    (5, 7, (5, 3), 2, "valid", 1, True, "zeros", (15, 11)),
    (4, 6, (4, 2), 1, "same", (2, 1), True, "zeros", (10, 9)),
    (8, 8, 3, 1, 1, 1, True, "reflect", (9, 9)),
    (7, 5, (3, 1), (1, 3), (2, 0), (2, 1), True, "replicate", (11, 12)),
    (8, 12, 1, 1, 0, 1, False, "zeros", (6, 6)),
    (6, 9, (2, 3), (2, 2), (0, 1), 1, True, "circular", (10, 10)),
]


def _conv(cfg, dtype=torch.float32):
    cin, cout, k, s, p, d, bias, mode, _ = cfg
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode, dtype=dtype)


def _input(cfg, batch=2, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(batch, cfg[0], *cfg[-1], dtype=dtype)


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-{c[7]}")
def test_tucker_full_rank_reproduces_conv(cfg):
    conv = _conv(cfg)
    x = _input(cfg)
    dec = D.tucker_decompose_conv(conv, (conv.out_channels, conv.in_channels))
    assert isinstance(dec, nn.Sequential) and len(dec) == 3
    assert (dec[2].bias is None) == (conv.bias is None)
    with torch.no_grad():
        assert _rel(dec(x), conv(x)) < 1e-4


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}-{c[7]}")
def test_cp_exact_on_rank_r_weight(cfg):
    conv = _conv(cfg, dtype=torch.float64)
    rank = 3
    g = torch.Generator().manual_seed(2)
    t, s, kh, kw = conv.weight.shape
    a, b, c, d = (torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (t, s, kh, kw))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("tr,sr,hr,wr->tshw", a, b, c, d))
    dec = D.cp_decompose_conv(conv, rank, max_iter=500, tol=1e-14)
    assert len(dec) == 4
    # Each depthwise conv carries only its own axis's geometry.
    vert, horiz = dec[1], dec[2]
    assert vert.kernel_size == (kh, 1) and horiz.kernel_size == (1, kw)
    assert vert.stride == (conv.stride[0], 1) and horiz.stride == (1, conv.stride[1])
    assert vert.dilation == (conv.dilation[0], 1) and horiz.dilation == (1, conv.dilation[1])
    if not isinstance(conv.padding, str):
        assert vert.padding == (conv.padding[0], 0) and horiz.padding == (0, conv.padding[1])
    assert vert.groups == rank and horiz.groups == rank
    x = _input(cfg, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(dec(x), conv(x)) < 1e-3


def test_cp_horizontal_padding_is_not_the_vertical_one():
    # The widely copied bug: horizontal conv padded with the vertical padding.
    conv = nn.Conv2d(4, 4, (3, 1), padding=(1, 0))
    dec = D.cp_decompose_conv(conv, 2)
    assert dec[1].padding == (1, 0) and dec[2].padding == (0, 0)
    x = torch.randn(1, 4, 8, 8)
    assert dec(x).shape == conv(x).shape


def test_tucker_keeps_dtype_and_device():
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    dec = D.tucker_decompose_conv(conv, (3, 2))
    assert all(p.dtype == torch.float64 and p.device == conv.weight.device for p in dec.parameters())
    half = nn.Conv2d(4, 6, 3, padding=1).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in D.cp_decompose_conv(half, 2).parameters())


def test_truncated_tucker_error_matches_tensorly_hooi():
    torch.manual_seed(3)
    # A weight with decaying spectra on both channel modes, like a trained layer.
    w = torch.einsum("ai,bj,ijhw->abhw", torch.randn(32, 32) * torch.logspace(0, -2, 32),
                     torch.randn(24, 24) * torch.logspace(0, -2, 24), torch.randn(32, 24, 3, 3))
    ranks = (10, 8)
    core, u_out, u_in = D.tucker2(w, ranks)
    ours = _rel(torch.einsum("oihw,to,si->tshw", core, u_out, u_in), w)
    (tl_core, (f0, f1)), _ = partial_tucker(w.numpy().astype(np.float64), rank=list(ranks), modes=[0, 1],
                                             n_iter_max=100, tol=1e-8)
    ref = np.linalg.norm(tl.tenalg.multi_mode_dot(tl_core, [f0, f1], modes=[0, 1]) - w.numpy()) / np.linalg.norm(w)
    assert ours <= ref * 1.01 + 1e-6
    # Orthonormal factors.
    assert torch.allclose(u_out.T @ u_out, torch.eye(ranks[0]), atol=1e-5)


def test_cp_error_no_worse_than_tensorly_parafac():
    torch.manual_seed(4)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    rank = 6
    conv = nn.Conv2d(12, 16, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w)
    dec = D.cp_decompose_conv(conv, rank, max_iter=100, tol=0)
    ours = _rel(D.dense_weight(dec), w)
    cp = parafac(w.numpy(), rank, n_iter_max=100, init="svd", tol=0)
    ref = np.linalg.norm(tl.cp_to_tensor(cp) - w.numpy()) / np.linalg.norm(w.numpy())
    assert ours <= ref * 1.01


def test_cp_degeneracy_is_detected(monkeypatch):
    monkeypatch.setattr(D, "CP_DEGENERACY_RATIO", 1e-3)
    conv = nn.Conv2d(6, 8, 3)
    with pytest.raises(D.CPDiverged, match="degenerate"):
        D.cp_decompose_conv(conv, 4)


def test_cp_failure_retries_then_falls_back_to_tucker(monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(kwargs.get("init"))
        raise D.CPDiverged("non-finite CP factors")

    monkeypatch.setattr(D, "cp_als", failing)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    with pytest.warns(RuntimeWarning, match="fell back to Tucker-2"):
        rows = decompose(model, (3, 8, 8), conv="cp", rank_ratio=0.25)
    assert calls == ["svd"] + ["random"] * D.CP_RETRIES + ["svd"] + ["random"] * D.CP_RETRIES
    row = rows[1]
    assert not row.skipped and row.method == "tucker" and "fell back" in row.reason
    assert isinstance(model[2], D.TuckerConv2d)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grouped_conv_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3, groups=2))
    rows = decompose(model, (8, 9, 9), rank_ratio=0.5)
    assert all(r.skipped and "grouped" in r.reason for r in rows)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.Conv2d)
    with pytest.raises(ValueError, match="grouped"):
        D.tucker_decompose_conv(model[0], (2, 2))


def _planted_conv(t, s, r_out, r_in, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, generator=g)
    u = torch.linalg.qr(torch.randn(t, r_out, generator=g))[0]
    v = torch.linalg.qr(torch.randn(s, r_in, generator=g))[0]
    w = torch.einsum("oihw,to,si->tshw", core, u, v) + noise * torch.randn(t, s, 3, 3, generator=g)
    conv = nn.Conv2d(s, t, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def test_vbmf_ranks_recover_planted_tucker_ranks():
    conv = _planted_conv(64, 48, 12, 7, noise=0.01)
    assert ranks.estimate_tucker_ranks(conv) == (12, 7)
    assert ranks.estimate_cp_rank(conv) == 12
    model = nn.Sequential(conv)
    plan = ranks.plan_decomposition(model, ranks.Policy(), (48, 8, 8))
    assert plan == {"0": {"method": "tucker", "ranks": [12, 7], "why": "VBMF"}}
    D.decompose_model(model, plan, input_size=(48, 8, 8), rescale=False)
    dec = model[0]
    assert dec.ranks == (12, 7)
    x = torch.randn(2, 48, 8, 8)
    # The planted noise is 6% of the weight's norm; the rest is reproduced.
    noise = 0.01 * (64 * 48 * 9) ** 0.5 / conv.weight.norm()
    with torch.no_grad():
        assert _rel(dec(x), conv(x)) < 1.5 * noise


def test_noise_only_layer_is_kept_and_reported():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(32, 64, 3))  # random init: no structure
    rows = decompose(model, (32, 8, 8))
    assert rows[0].skipped and "only noise" in rows[0].reason
    assert type(model[0]) is nn.Conv2d


def test_rank_that_would_not_shrink_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 16, 3))
    rows = decompose(model, (3, 8, 8), rank_ratio=1.0)
    assert rows[0].skipped and "would not shrink" in rows[0].reason
    assert rows[0].params_after == rows[0].params_before
    assert type(model[0]) is nn.Conv2d


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                                        nn.Conv2d(32, 32, (3, 5), stride=2, padding=(1, 2)))})
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.head(self.blocks["a"](self.stem(x)))


@pytest.mark.parametrize("method", ["tucker", "cp"])
@pytest.mark.parametrize("fc_method", ["none", "svd", "diagonal"])
def test_decompose_model_any_nesting(method, fc_method):
    torch.manual_seed(6)
    model = Nested()
    x = torch.randn(2, 3, 8, 8)
    # rescale=False: the plain best approximation, whose relative error is below 1 (the filter-norm
    # correction may trade a larger weight error on these random weights for the original norms).
    rows = decompose(model, (3, 8, 8), conv=method, fc=fc_method, rank_ratio=0.5,
                     fc_rank_ratio=0.25 if fc_method == "svd" else None, rescale=False)
    names = [r.name for r in rows]
    assert names[:3] == ["stem.0", "blocks.a.0", "blocks.a.2"]
    done = {r.name: r for r in rows if not r.skipped}
    assert "blocks.a.0" in done and "blocks.a.2" in done
    assert isinstance(model.blocks["a"][2], D.TuckerConv2d if method == "tucker" else D.CPConv2d)
    for r in done.values():
        assert r.params_after < r.params_before and r.macs_after < r.macs_before
        assert 0 <= r.error < 1 and r.ranks
    if fc_method == "none":
        assert all(r.kind == "conv" for r in rows)
    else:
        assert rows[-1].name == "head.3" and rows[-1].skipped and "classifier" in rows[-1].reason
        assert not done["head.1"].skipped and done["head.1"].method == fc_method
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Nothing left: a second pass decomposes nothing more.
    again = decompose(model, (3, 8, 8), conv=method, fc=fc_method, rank_ratio=0.5)
    assert not [r for r in again if not r.skipped]


def test_plan_round_trip_rebuilds_identical_model():
    torch.manual_seed(7)
    model = Nested()
    decompose(model, (3, 8, 8), fc="svd", rank_ratio=0.5, fc_rank=8)
    decompose(model, (3, 8, 8), conv="cp", fc="diagonal", rank_ratio=0.5, keep_last_linear=False)
    plan = D.model_plan(model)
    assert {e["method"] for e in plan.values()} >= {"tucker", "svd", "diagonal"}
    fresh = D.apply_plan(Nested(), plan)
    fresh.load_state_dict(model.state_dict())  # strict
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


BAD_PLANS = [
    ({"nope.0": {"method": "tucker", "ranks": [2, 2]}}, "'nope.0' is not in the model"),
    ({"head.1": {"method": "tucker", "ranks": [2, 2]}}, "tucker applies to Conv2d"),
    ({"stem.0": {"method": "svd", "rank": 2}}, "svd applies to Linear"),
    ({"stem.0": {"method": "tucker"}}, "missing 'ranks'"),
    ({"stem.0": {"method": "tucker", "ranks": [2, 2], "rnak": 3}}, "unknown key 'rnak'"),
    ({"stem.0": {"method": "tucker", "ranks": [2]}}, "two integers"),
    ({"stem.0": {"method": "tucker", "ranks": [2, True]}}, "two integers"),
    ({"stem.0": {"method": "tucker", "ranks": [17, 2]}}, r"exceed the layer's channels \[16, 3\]"),
    ({"stem.0": {"method": "cp", "rank": 0}}, "integer >= 1"),
    ({"head.1": {"method": "svd", "rank": 65}}, "exceeds min"),
    ({"head.1": {"method": "diagonal", "bandwidth": 1000}},
     "stores at least as many weights as the dense|exceeds the layer's 512 inputs"),
    ({"stem.0": {"method": "prune"}}, "method must be one of"),
    ({"stem.0": ["tucker", 2, 2]}, "must be an object"),
    ({"stem": {"method": "none"}}, "not a Conv2d or Linear"),
    ({"blocks.a.0": {"method": "cp", "rank": 10 ** 30}}, "exceeds 86, beyond which a CP layer is larger"),
    ([("stem.0", {"method": "none"})], "must map layer names"),
]


@pytest.mark.parametrize("plan,message", BAD_PLANS, ids=[m for _, m in BAD_PLANS])
def test_bad_plans_are_refused_before_anything_changes(plan, message):
    model = Nested()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        D.apply_plan(model, plan)
    with pytest.raises(ValueError, match=message):
        D.decompose_model(model, plan, input_size=(3, 8, 8))
    assert [type(m) for m in model.modules()] == [type(m) for m in Nested().modules()]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("entry", [{"method": "none"}, {"method": "tucker", "ranks": [2, 2]}])
@pytest.mark.parametrize("name", ["blocks.a.0", "blocks.a.0.1"])
def test_plans_cannot_touch_decomposed_layers_or_their_factors(name, entry):
    model = Nested()
    D.decompose_model(model, {"blocks.a.0": {"method": "tucker", "ranks": [4, 4]}}, input_size=(3, 8, 8))
    message = "is already decomposed" if name == "blocks.a.0" else "is part of an already decomposed layer"
    with pytest.raises(ValueError, match=message):
        D.decompose_model(model, {name: entry}, input_size=(3, 8, 8))
    assert D.model_plan(model) == {"blocks.a.0": {"method": "tucker", "ranks": [4, 4]}}


@pytest.mark.parametrize("rank", [1, 3, 8, 40])
def test_cp_fallback_is_no_larger_than_the_cp_layer(rank):
    conv = nn.Conv2d(24, 40, 3)
    r_out, r_in = D.cp_fallback_ranks(conv, rank)
    tucker = 24 * r_in + r_in * r_out * 9 + r_out * 40
    assert 1 <= r_out <= 40 and 1 <= r_in <= 24
    assert tucker <= max(rank * (24 + 6 + 40), 24 + 9 + 40)  # rank 1 Tucker when CP is tinier still
    assert D.cp_fallback_ranks(conv, rank + 20)[0] >= r_out  # more CP weights, no fewer Tucker ranks


def test_decompose_model_applies_a_plan_and_reports_every_entry():
    torch.manual_seed(3)
    model = Nested()
    plan = {"stem.0": {"method": "none", "reason": "kept on purpose"},
            "blocks.a.2": {"method": "cp", "rank": 4, "why": "by hand"},
            "blocks.a.0": {"method": "tucker", "ranks": [5, 3]},
            "head.1": {"method": "svd", "rank": 6}}
    rows = D.decompose_model(model, plan, input_size=(3, 8, 8))
    # Rows in model order, whatever the plan's order; layers outside the plan untouched.
    assert [r.name for r in rows] == ["stem.0", "blocks.a.0", "blocks.a.2", "head.1"]
    assert rows[0].skipped and rows[0].reason == "kept on purpose" and type(model.stem[0]) is nn.Conv2d
    assert rows[2].why == "by hand" and rows[2].ranks == (4,)
    assert model.blocks["a"][0].ranks == (5, 3) and model.head[1].rank == 6
    assert type(model.head[3]) is nn.Linear
    assert D.model_plan(model) == {"blocks.a.0": {"method": "tucker", "ranks": [5, 3]},
                                   "blocks.a.2": {"method": "cp", "rank": 4}, "head.1": {"method": "svd", "rank": 6}}


# ---------------------------------------------------------------------------- Linear
def test_svd_linear_exact_at_full_rank():
    torch.manual_seed(8)
    lin = nn.Linear(20, 12)
    dec = D.svd_decompose_linear(lin, 12)
    assert dec[0].bias is None and dec[1].bias is not None
    x = torch.randn(5, 20)
    with torch.no_grad():
        assert _rel(dec(x), lin(x)) < 1e-5


def test_svd_linear_planted_rank():
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(200, 120)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(120, 9, generator=g) @ torch.randn(9, 200, generator=g)
                         + 0.01 * torch.randn(120, 200, generator=g))
    model = nn.Sequential(lin, nn.Linear(120, 2))
    plan = ranks.plan_decomposition(model, ranks.Policy(conv="none", fc="svd"), (200,))
    assert plan["0"]["rank"] == 9 and plan["1"]["method"] == "none"
    D.decompose_model(model, plan, input_size=(200,), rescale=False)
    dec = model[0]
    assert dec.rank == 9
    x = torch.randn(4, 200)
    with torch.no_grad():
        assert _rel(dec(x), lin(x)) < 0.01


@pytest.mark.parametrize("shape", [(300, 900), (900, 300)])
def test_svd_linear_randomized_path_is_near_optimal(shape):
    # Rank 8 of a 300-row matrix takes the randomized range finder, not the Gram eigh.
    n, m = shape
    assert 2 * (D.RANDOMIZED_POWER_ITERS + 1) * (8 + D.RANDOMIZED_OVERSAMPLE) < min(n, m)
    g = torch.Generator().manual_seed(12)
    spectrum = torch.logspace(0, -2, 40)
    u = torch.linalg.qr(torch.randn(n, 40, generator=g)).Q
    v = torch.linalg.qr(torch.randn(m, 40, generator=g)).Q
    lin = nn.Linear(m, n)
    with torch.no_grad():
        lin.weight.copy_((u * spectrum) @ v.T + 1e-3 * torch.randn(n, m, generator=g))
    dec = D.svd_decompose_linear(lin, 8)
    with torch.no_grad():
        approx = dec[1].weight @ dec[0].weight
        err = float((approx - lin.weight).norm() / lin.weight.norm())
        s = torch.linalg.svdvals(lin.weight)
        best = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())  # Eckart-Young
    assert best * (1 - 1e-5) <= err < best * 1.01


def test_svd_linear_not_smaller_is_skipped():
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 2))
    rows = decompose(model, (10,), conv="none", fc="svd", fc_rank=8)
    assert rows[0].skipped and "would not shrink" in rows[0].reason


@pytest.mark.parametrize("m,n,b", [(12, 5, 1), (5, 12, 2), (8, 8, 3), (30, 7, 2)])
def test_diagonal_linear_matches_dense_masked_layer(m, n, b):
    torch.manual_seed(10)
    diag = D.DiagonalLinear(m, n, bandwidth=b)
    assert sum(p.numel() for p in diag.parameters()) == max(m, n) * b + n
    mask = diag.dense_mask()
    # Every input and every output is touched.
    assert mask.sum(0).min() >= 1 and mask.sum(1).min() >= 1
    dense = nn.Linear(m, n)
    with torch.no_grad():
        dense.weight.copy_(diag.to_dense())
        dense.bias.copy_(diag.bias)
    x = torch.randn(4, m, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = diag(x), dense(x2)
    assert torch.allclose(y, y2, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    # The weight gradient is the masked dense gradient, gathered onto the structure.
    expected = dense.weight.grad[diag.rows[:, None].expand_as(diag.cols), diag.cols]
    assert torch.allclose(diag.weight.grad, expected, atol=1e-6)
    assert torch.allclose(diag.bias.grad, dense.bias.grad)


def test_diagonal_projection_is_exact_on_structured_weight():
    torch.manual_seed(11)
    lin = nn.Linear(9, 6)
    mask = D.DiagonalLinear(9, 6, bandwidth=2).dense_mask()
    with torch.no_grad():
        lin.weight.mul_(mask)
    dec = D.diagonal_decompose_linear(lin, bandwidth=2)
    x = torch.randn(3, 9)
    with torch.no_grad():
        assert torch.allclose(dec(x), lin(x), atol=1e-6)


# ------------------------------------------------------------ filter norm correction
def _filter_norms(weight):
    return weight.detach().double().flatten(1).norm(dim=1)


@pytest.mark.parametrize("kind", ["tucker", "cp", "svd"])
def test_restore_filter_norms_restores_every_filter_and_keeps_directions(kind):
    torch.manual_seed(0)
    if kind == "svd":
        layer = nn.Linear(40, 24)
        plain = D.svd_decompose_linear(layer, 5)
    else:
        layer = nn.Conv2d(12, 16, 3, padding=1)
        plain = D.tucker_decompose_conv(layer, (5, 4)) if kind == "tucker" else D.cp_decompose_conv(layer, 6)
    before = D.dense_weight(plain).clone()
    assert (_filter_norms(before) < _filter_norms(layer.weight) - 1e-6).all()  # truncation shrinks each filter
    fixed = D.restore_filter_norms(copy.deepcopy(plain), layer.weight)
    after = D.dense_weight(fixed)
    # Each filter back at its original norm, or at twice the approximation's where it kept less than half.
    want = torch.minimum(_filter_norms(layer.weight), D.MAX_FILTER_SCALE * _filter_norms(before))
    assert (want < _filter_norms(layer.weight)).any() and (want == _filter_norms(layer.weight)).any()
    torch.testing.assert_close(_filter_norms(after), want, rtol=1e-5, atol=1e-7)
    if kind == "svd":  # rows are projections: the cap keeps every corrected row closer than the zero row
        residual = (after - layer.weight).detach().double().flatten(1).norm(dim=1)
        assert (residual <= _filter_norms(layer.weight) + 1e-6).all()
    # Same direction per filter: cosine 1 with the best approximation's filter.
    cosine = torch.nn.functional.cosine_similarity(after.flatten(1).double(), before.flatten(1).double(), dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert torch.equal(fixed[-1].bias, plain[-1].bias)


def test_decompose_model_rescales_by_default_and_is_a_no_op_at_full_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))
    plain, fixed = copy.deepcopy(model), copy.deepcopy(model)
    plan = {"2": {"method": "tucker", "ranks": [3, 3]}, "4": {"method": "svd", "rank": 4}}
    rows_plain = D.decompose_model(plain, plan, input_size=(3, 6, 6), rescale=False)
    rows_fixed = D.decompose_model(fixed, plan, input_size=(3, 6, 6))
    for name in ("2", "4"):
        original = _filter_norms(model.get_submodule(name).weight)
        kept = _filter_norms(D.dense_weight(plain.get_submodule(name)))
        assert (kept < original).all()
        want = torch.minimum(original, D.MAX_FILTER_SCALE * kept)
        torch.testing.assert_close(_filter_norms(D.dense_weight(fixed.get_submodule(name))), want)
    # The report's error is that of the weights in use: the rescaled ones are a little further away.
    pairs = [(f.error, p.error) for f, p in zip(rows_fixed, rows_plain) if not f.skipped]
    assert len(pairs) == 2 and all(f > p for f, p in pairs)
    # At full rank the correction changes nothing: the factorization still computes the original.
    conv, features = model[2], torch.randn(2, 8, 6, 6)
    full = D.restore_filter_norms(D.tucker_decompose_conv(conv, (8, 8)), conv.weight)
    with torch.no_grad():
        torch.testing.assert_close(full(features), conv(features), rtol=1e-4, atol=1e-5)


def test_a_diagonal_band_that_would_not_shrink_the_layer_is_not_decomposed():
    """A band as wide as the 512 -> 64 layer stores 512 x 64 weights and gathers, no fewer than the dense
    layer (accepted before: 679 MB and 5.5 GB on VGG16's fc6)."""
    model = Nested()
    with pytest.raises(ValueError, match="at most 63 here"):
        D.decompose_model(model, {"head.1": {"method": "diagonal", "bandwidth": 64}}, input_size=(3, 8, 8))
    assert not any(isinstance(m, D.DiagonalLinear) for m in model.modules())


def test_a_non_finite_gram_in_cp_als_is_a_divergence_not_a_lapack_error():
    """LAPACK's gelsd fails on NaN with an internal error: the ALS step says CPDiverged instead,
    which the decomposition answers with a restart from another start, then Tucker-2."""
    with pytest.raises(D.CPDiverged, match="non-finite"):
        D._solve_gram(torch.ones(4, 3), torch.full((3, 3), float("nan")))
