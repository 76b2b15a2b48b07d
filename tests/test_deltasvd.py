"""The maths: the paper's rank rule, and the fast Gram path against the plain full SVD."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsreg import deltasvd, encodings


def test_energy_is_the_sum_of_singular_values_not_squares():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative share 0.4, 0.7, 0.9, 1.0
    assert deltasvd.energy_rank(s, 0.4) == 1
    assert deltasvd.energy_rank(s, 0.5) == 2
    assert deltasvd.energy_rank(s, 0.7) == 2
    assert deltasvd.energy_rank(s, 0.71) == 3
    assert deltasvd.energy_rank(s, 1.0) == 4
    # With squares (16, 9, 4, 1 -> 0.53 at t=1) tau=0.5 would keep one; the paper's rule keeps two.


def test_energy_rank_rejects_out_of_range_tau():
    with pytest.raises(ValueError):
        deltasvd.energy_rank(torch.ones(3), 0.0)
    with pytest.raises(ValueError):
        deltasvd.energy_rank(torch.ones(3), 1.5)


def test_zero_delta_has_rank_zero():
    lr = deltasvd.decompose(torch.zeros(8, 5), 0.5)
    assert lr.rank == 0 and lr.rel_error == 0.0


def _real_deltas(models):
    return {k: models.ft_sd[k] - models.base_sd[k] for k in models.ft_sd if models.ft_sd[k].dim() >= 2 and not torch.equal(models.ft_sd[k], models.base_sd[k])}


@pytest.mark.parametrize("tau", [0.06, 0.2, 0.5, 0.8])
def test_gram_and_svd_choose_the_same_ranks_on_a_real_finetune(models, tau):
    for key, delta in _real_deltas(models).items():
        fast = deltasvd.decompose(delta, tau, method="gram", factor_dtype=torch.float32)
        exact = deltasvd.decompose(delta, tau, method="svd", factor_dtype=torch.float32)
        assert abs(fast.rank - exact.rank) <= 1, key  # a tie at the threshold may differ by one
        if fast.rank == exact.rank:
            a = deltasvd.product(fast.a, fast.b)
            b = deltasvd.product(exact.a, exact.b)
            assert torch.linalg.matrix_norm(a - b) <= 1e-4 * torch.linalg.matrix_norm(deltasvd.as_matrix(delta)) + 1e-12, key
            assert fast.rel_error == pytest.approx(exact.rel_error, abs=1e-5), key


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "int8", "mixed"])
def test_stored_error_from_the_spectrum_matches_the_measured_residual(models, encoding, monkeypatch):
    """What a push records, mostly without forming the residual, against the residual itself."""
    measure, residuals = deltasvd.relative_error, []
    monkeypatch.setattr(deltasvd, "relative_error", lambda *args: residuals.append(1) or measure(*args))
    cases = 0
    for key, delta in _real_deltas(models).items():
        for method in deltasvd.METHODS:
            spectrum = deltasvd.Spectrum(delta, method)
            for tau in (0.2, 0.5, 0.9, 1.0):
                a, b = spectrum.factors(deltasvd.energy_rank(spectrum.s, tau))
                qa, qb = encodings.decode_factors(encodings.encode_factors(a, b, spectrum.s, encoding))
                recorded = spectrum.stored_error(a, b, qa, qb)
                assert recorded == pytest.approx(measure(spectrum.matrix, qa, qb), rel=1.5e-5, abs=1e-7), (key, method, tau)
                cases += 1
    # With fp16 factors (the default) the truncation dominates below τ 1, and most answers come
    # from the spectrum; coarser encodings round too much beside it to be certain at 1e-5, and measure.
    if encoding == "fp16":
        assert len(residuals) < cases / 2


def test_conv_kernels_are_reshaped_out_by_in_kh_kw(models):
    delta = models.ft_sd["conv_in.weight"] - models.base_sd["conv_in.weight"]
    assert delta.dim() == 4
    lr = deltasvd.decompose(delta, 1.0, factor_dtype=torch.float32)
    out, cin, kh, kw = delta.shape
    assert lr.a.shape == (out, lr.rank) and lr.b.shape == (lr.rank, cin * kh * kw)
    assert lr.full_rank == min(out, cin * kh * kw)


def test_tau_one_rebuilds_to_fp32_roundoff(models):
    for key, delta in _real_deltas(models).items():
        for method in deltasvd.METHODS:
            lr = deltasvd.decompose(delta, 1.0, method=method, factor_dtype=torch.float32)
            assert lr.rel_error < 1e-5, (key, method, lr.rel_error)


@pytest.mark.parametrize("shape", [(64, 64), (48, 200), (200, 48)])
def test_a_tail_below_the_grams_resolution_is_resolved_by_an_exact_svd(shape):
    """σ_min 6.3e-11 beside σ_max 0.33 (a real layer's): its square is below fp64 rounding next to
    σ_max², so the Gram reports 0 there, and τ 1 would keep one direction too few."""
    g = torch.Generator().manual_seed(11)
    n = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g, dtype=torch.float64))
    sigma = torch.logspace(torch.log10(torch.tensor(0.33)), torch.log10(torch.tensor(6.3e-11)), n, dtype=torch.float64)
    delta = ((u * sigma) @ v.T).float()
    exact = int((torch.linalg.svdvals(delta.double()) > 0).sum())
    spectrum = deltasvd.Spectrum(delta, "gram")
    assert float(spectrum.s_low[-1]) == 0.0 and spectrum.method == "gram"
    assert spectrum.rank("energy", 1.0) == exact == n
    assert spectrum.method == "svd"  # the open choice was settled by the fp64 SVD
    lr = deltasvd.decompose(delta, 1.0, factor_dtype=torch.float32)
    assert lr.rank == n and lr.rel_error < 1e-6


def test_an_exactly_rank_deficient_delta_keeps_its_rank_at_tau_one():
    """Small integer factors: the fp32 product is exact, so the delta has rank 7 exactly, and the
    Gram's rounding of its 53 zeros must not make τ 1 keep them."""
    g = torch.Generator().manual_seed(12)
    delta = (torch.randint(-4, 5, (60, 7), generator=g) @ torch.randint(-4, 5, (7, 90), generator=g)).float()
    spectrum = deltasvd.Spectrum(delta, "gram")
    assert spectrum.rank("energy", 1.0) == 7
    assert deltasvd.decompose(delta, 1.0, factor_dtype=torch.float32).rel_error < 1e-6


def test_ranks_below_tau_one_need_no_fallback_on_a_real_finetune(models):
    for tau in (0.06, 0.2, 0.5, 0.8):
        for key, delta in _real_deltas(models).items():
            spectrum = deltasvd.Spectrum(delta, "gram")
            exact = deltasvd.energy_rank(torch.linalg.svdvals(deltasvd.as_matrix(delta).double()), tau)
            assert spectrum.rank("energy", tau) == exact, (key, tau)
            assert spectrum.method == "gram", (key, tau)


def test_error_falls_as_tau_rises(models):
    delta = models.ft_sd["mid.conv1.weight"] - models.base_sd["mid.conv1.weight"]
    errors = [deltasvd.decompose(delta, tau).rel_error for tau in (0.06, 0.2, 0.5, 0.8, 1.0)]
    ranks = [deltasvd.decompose(delta, tau).rank for tau in (0.06, 0.2, 0.5, 0.8, 1.0)]
    assert errors == sorted(errors, reverse=True)
    assert ranks == sorted(ranks)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 40),
    k=st.integers(1, 40),
    true_rank=st.integers(1, 12),
    tau=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fast_path_matches_exact_on_any_shape(d, k, true_rank, tau, seed):
    g = torch.Generator().manual_seed(seed)
    r = min(true_rank, d, k)
    delta = torch.randn(d, r, generator=g) @ torch.randn(r, k, generator=g) + 1e-3 * torch.randn(d, k, generator=g)
    fast = deltasvd.decompose(delta, tau, method="gram", factor_dtype=torch.float32)
    exact = deltasvd.decompose(delta, tau, method="svd", factor_dtype=torch.float32)
    assert abs(fast.rank - exact.rank) <= 1
    if fast.rank == exact.rank:
        assert fast.rel_error == pytest.approx(exact.rel_error, abs=1e-4)
    s = deltasvd.singular_values(deltasvd.as_matrix(delta), "svd").double()
    share = float(s[: exact.rank].sum() / s.sum())
    assert share >= tau - 1e-5


def test_svd_retries_in_fp64_where_fp32_does_not_converge(monkeypatch):
    """LAPACK's fp32 gesdd fails to converge on some rank-deficient SD1.5-size deltas."""
    real = torch.linalg.svd

    def fp32_fails(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    m = torch.randn(40, 12, generator=torch.Generator().manual_seed(3)) @ torch.randn(12, 90, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(torch.linalg, "svd", fp32_fails)
    u, s, vh = deltasvd.svd(m)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.allclose((u * s) @ vh, m, atol=1e-4)
    assert deltasvd.Spectrum(m, "svd").full_rank == 40


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 9), (9, 5), (300, 1000), (1000, 300), (257, 2049)])
def test_gram_lower_triangle_equals_the_full_product_in_fp64(monkeypatch, shape):
    """Row blocks and fp64 column chunks (forced small here) give the full product's lower triangle."""
    monkeypatch.setattr(deltasvd, "GRAM_CHUNK", 1000)
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    m64 = m.double()
    full = m64 @ m64.T if shape[0] <= shape[1] else m64.T @ m64
    gram = deltasvd._gram(m)
    assert gram.dtype == torch.float64 and gram.shape == full.shape
    assert torch.allclose(torch.tril(gram), torch.tril(full), rtol=1e-12, atol=1e-9 * float(full.abs().max()))


def test_chunked_gram_keeps_the_exact_ranks_of_a_rank_deficient_delta(monkeypatch):
    """The case fp32 Gram matrices get wrong: a merged LoRA, exactly low rank, with zero singular values."""
    monkeypatch.setattr(deltasvd, "GRAM_CHUNK", 4096)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(200, 24, generator=g) @ torch.randn(24, 700, generator=g)
    s = torch.linalg.svdvals(delta.double())
    for tau in (0.2, 0.5, 0.8, 0.99):
        spectrum = deltasvd.Spectrum(delta)
        assert deltasvd.energy_rank(spectrum.s, tau) == deltasvd.energy_rank(s, tau)
        assert float(spectrum.s[24:].sum()) < 1e-6 * float(s.sum())


def test_a_kept_reduction_cuts_the_same_factors_without_the_gram(models, tmp_path, monkeypatch):
    """A budget push decomposes each layer once: the survey keeps its reduction on disk, and the
    compression cuts factors from it; they are the factors of a fresh decomposition, bit for bit."""
    key = max((k for k, v in models.ft_sd.items() if v.dim() >= 2), key=lambda k: models.ft_sd[k].numel())
    delta = models.ft_sd[key] - models.base_sd[key]
    fresh = deltasvd.Spectrum(delta)
    fresh.reduction().save(tmp_path / "r.npz")
    monkeypatch.setattr(deltasvd, "_gram", lambda *_: pytest.fail("the Gram was formed again"))
    resumed = deltasvd.Spectrum(delta, reduction=deltasvd.Reduction.load(tmp_path / "r.npz"))
    assert torch.equal(resumed.s, fresh.s) and torch.equal(resumed.s_low, fresh.s_low)
    t = fresh.rank("energy", 0.5)
    for x, y in zip(resumed.factors(t), fresh.factors(t)):
        assert torch.equal(x, y)
    assert deltasvd.Spectrum(delta, "svd").reduction() is None  # only the Gram path has one
