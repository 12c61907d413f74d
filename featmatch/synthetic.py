"""Planted SAE pairs and chains, shared by tests and benchmarks.

Synthetic data with a known ground-truth matching, seeded (the same seed gives the same
arrays, bit for bit). Two kinds:

**Planted SAEs** (:func:`planted_pair`, :func:`planted_chain`,
:func:`planted_scale_families`). Each SAE is built from *folded* parameters (encoder
columns ``E``, encoder bias ``b``, decoder rows ``D``; threshold 1) and then "unfolded" with
its own per-feature thresholds :math:`\\theta` (log-uniform in ``theta_base * [0.5, 2]``):

.. math::

    W_{enc} = E\\,\\mathrm{diag}(\\theta),\\quad b_{enc} = b\\,\\theta,\\quad
    W_{dec} = \\mathrm{diag}(\\theta)^{-1} D,\\quad \\text{threshold} = \\theta .

This is a function-preserving reparametrisation (Eq. 4 of SAE Match read backwards):
folding the SAE returns ``E, b, D`` exactly. SAE B takes a random permutation of a subset
of A's folded features plus Gaussian noise, and adds features of its own; A also keeps
features with no partner. Matched features therefore compute the same thing in both SAEs,
while their raw (unfolded) parameters differ by the independent scales
:math:`\\theta_A/\\theta_B`, which is the situation folding addresses (the decoder norms
carry the scale). Parameters are drawn with numpy (``np.random.default_rng(seed)``).

**Planted feature vectors** (:func:`planted_vectors`, :func:`planted_weights_chain`,
:func:`permuted_vectors`): ``(F, d)`` float32 rows of the kind SAE Match compares, for the
solver's tests and benchmarks at real widths, drawn with torch (``torch.Generator``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from featmatch.saes import SAEWeights

if TYPE_CHECKING:
    from sae_lens import JumpReLUSAE

__all__ = [
    "Folded",
    "Planted",
    "random_folded",
    "thetas",
    "unfolded_sae",
    "successor",
    "planted_pair",
    "planted_chain",
    "planted_scale_families",
    "recovery",
    "planted_vectors",
    "planted_weights_chain",
    "permuted_vectors",
]


# --------------------------------------------------------------------------------------
# Planted SAEs (numpy-seeded)
# --------------------------------------------------------------------------------------


@dataclass
class Folded:
    """Folded parameters of one SAE (float64 numpy).

    Attributes
    ----------
    E : (d, F) np.ndarray
        Encoder columns.
    b : (F,) np.ndarray
        Encoder bias.
    D : (F, d) np.ndarray
        Decoder rows.
    b_dec : (d,) np.ndarray
        Decoder bias.
    """

    E: np.ndarray
    b: np.ndarray
    D: np.ndarray
    b_dec: np.ndarray


@dataclass
class Planted:
    """A planted pair of SAEs with its ground truth.

    Attributes
    ----------
    sae_a, sae_b : sae_lens.JumpReLUSAE
    truth : (F_A,) np.ndarray of int64
        ``truth[i]`` is the feature of B planted as the partner of A's feature *i*, or -1.
    folded_a, folded_b : Folded
        The folded parameters the SAEs were built from.
    """

    sae_a: JumpReLUSAE
    sae_b: JumpReLUSAE
    truth: np.ndarray
    folded_a: Folded
    folded_b: Folded

    @property
    def has_partner_a(self) -> np.ndarray:
        """(F_A,) bool: features of A with a planted partner."""
        return self.truth >= 0

    @property
    def no_partner_b(self) -> np.ndarray:
        """(F_B,) bool: features of B that are nobody's partner."""
        mask = np.ones(self.sae_b.cfg.d_sae, dtype=bool)
        mask[self.truth[self.truth >= 0]] = False
        return mask


def random_folded(d: int, f: int, rng: np.random.Generator) -> Folded:
    """Random folded SAE parameters: unit-ish feature directions with norms spread 0.5-2.

    Parameters
    ----------
    d : int
        Hidden width.
    f : int
        Number of features.
    rng : numpy.random.Generator

    Returns
    -------
    Folded
    """
    u = rng.standard_normal((f, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    dec_norm = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=f))
    D = u * dec_norm[:, None]
    e = u + 0.5 * rng.standard_normal((f, d)) / np.sqrt(d)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    E = (e * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=f))[:, None]).T
    b = -np.abs(rng.normal(0.5, 0.2, size=f))
    b_dec = 0.1 * rng.standard_normal(d)
    return Folded(E=E, b=b, D=D, b_dec=b_dec)


def thetas(f: int, rng: np.random.Generator, base: float = 1.0) -> np.ndarray:
    """Per-feature thresholds, log-uniform in ``base * [0.5, 2]``.

    Parameters
    ----------
    f : int
    rng : numpy.random.Generator
    base : float

    Returns
    -------
    (f,) np.ndarray of float64
    """
    return base * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=f))


def unfolded_sae(p: Folded, theta: np.ndarray, hook_name: str = "blocks.0.hook_resid_post") -> JumpReLUSAE:
    """A SAELens JumpReLUSAE whose fold is ``p`` (threshold ``theta``).

    Parameters
    ----------
    p : Folded
    theta : (F,) np.ndarray
        Positive thresholds.
    hook_name : str
        Stored in ``cfg.metadata.hook_name``.

    Returns
    -------
    sae_lens.JumpReLUSAE
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    d, f = p.E.shape
    cfg = JumpReLUSAEConfig(d_in=d, d_sae=f)
    cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(p.E * theta[None, :]))
        sae.b_enc.copy_(torch.from_numpy(p.b * theta))
        sae.W_dec.copy_(torch.from_numpy(p.D / theta[:, None]))
        sae.b_dec.copy_(torch.from_numpy(p.b_dec))
        sae.threshold.copy_(torch.from_numpy(theta))
    return sae


def successor(
    p: Folded, f_b: int, n_shared: int, noise: float, rng: np.random.Generator
) -> tuple[Folded, np.ndarray]:
    """Folded parameters of a "next layer" SAE sharing ``n_shared`` of ``p``'s features.

    Parameters
    ----------
    p : Folded
        The previous layer's parameters.
    f_b : int
        Features of the new SAE.
    n_shared : int
        Features of ``p`` carried over (at random slots, with noise).
    noise : float
        Noise standard deviation relative to the RMS entry of each parameter.
    rng : numpy.random.Generator

    Returns
    -------
    Folded
        The new parameters.
    truth : (F_A,) np.ndarray of int64
        Index of each feature of ``p`` in the new SAE, or -1.
    """
    d, f_a = p.E.shape
    if not 0 <= n_shared <= min(f_a, f_b):
        raise ValueError("n_shared must be at most min(F_A, F_B)")
    fresh = random_folded(d, f_b, rng)
    shared_a = rng.choice(f_a, size=n_shared, replace=False)
    slots_b = rng.choice(f_b, size=n_shared, replace=False)
    E, b, D = fresh.E.copy(), fresh.b.copy(), fresh.D.copy()
    s_e, s_d, s_b = np.sqrt((p.E**2).mean()), np.sqrt((p.D**2).mean()), np.sqrt((p.b**2).mean())
    E[:, slots_b] = p.E[:, shared_a] + noise * s_e * rng.standard_normal((d, n_shared))
    D[slots_b] = p.D[shared_a] + noise * s_d * rng.standard_normal((n_shared, d))
    b[slots_b] = p.b[shared_a] + noise * s_b * rng.standard_normal(n_shared)
    truth = np.full(f_a, -1, dtype=np.int64)
    truth[shared_a] = slots_b
    return Folded(E=E, b=b, D=D, b_dec=p.b_dec + noise * 0.1 * rng.standard_normal(d)), truth


def planted_pair(
    d: int = 16,
    f_a: int = 120,
    f_b: int | None = None,
    no_partner: float = 0.15,
    noise: float = 0.02,
    seed: int = 0,
    theta_base: tuple[float, float] = (1.0, 1.5),
    n_shared: int | None = None,
) -> Planted:
    """A planted pair of JumpReLU SAEs (layers 0 and 1) with independent thresholds.

    Thresholds are independent per feature in both SAEs, log-uniform in
    ``theta_base[k] * [0.5, 2]`` (B's base is larger, as hidden-state norms grow with depth).

    Parameters
    ----------
    d : int
        Hidden width.
    f_a, f_b : int
        Features of A and B (``f_b`` defaults to ``f_a``).
    no_partner : float
        Share of the smaller SAE without a partner (when ``n_shared`` is not given).
    noise : float
        Relative noise of the shared features (see :func:`successor`).
    seed : int
    theta_base : (float, float)
        Threshold scales of A and B.
    n_shared : int, optional
        Shared features; default ``round((1 - no_partner) * min(f_a, f_b))``.

    Returns
    -------
    Planted
    """
    rng = np.random.default_rng(seed)
    f_b = f_a if f_b is None else f_b
    if n_shared is None:
        n_shared = int(round((1 - no_partner) * min(f_a, f_b)))
    pa = random_folded(d, f_a, rng)
    pb, truth = successor(pa, f_b, n_shared, noise, rng)
    sae_a = unfolded_sae(pa, thetas(f_a, rng, theta_base[0]), "blocks.0.hook_resid_post")
    sae_b = unfolded_sae(pb, thetas(f_b, rng, theta_base[1]), "blocks.1.hook_resid_post")
    return Planted(sae_a=sae_a, sae_b=sae_b, truth=truth, folded_a=pa, folded_b=pb)


def planted_chain(
    n_layers: int = 3, d: int = 16, f: int = 80, no_partner: float = 0.1, noise: float = 0.01, seed: int = 0
) -> tuple[list[JumpReLUSAE], list[np.ndarray]]:
    """JumpReLU SAEs at ``n_layers`` layers, each a noisy permuted successor of the previous one.

    Parameters
    ----------
    n_layers : int
    d : int
        Hidden width.
    f : int
        Features per SAE.
    no_partner : float
        Share of each SAE's features not carried to the next layer.
    noise : float
        Relative noise per step (see :func:`successor`).
    seed : int

    Returns
    -------
    saes : list of sae_lens.JumpReLUSAE
        Hooks ``blocks.{k}.hook_resid_post``; layer k's threshold base is ``1 + 0.5 k``.
    truths : list of np.ndarray
        The ``n_layers - 1`` ground-truth maps (``truths[k]``: layer k → k+1, -1 if none).
    """
    rng = np.random.default_rng(seed)
    n_shared = int(round((1 - no_partner) * f))
    p = random_folded(d, f, rng)
    saes = [unfolded_sae(p, thetas(f, rng, 1.0), "blocks.0.hook_resid_post")]
    truths = []
    for k in range(1, n_layers):
        p, truth = successor(p, f, n_shared, noise, rng)
        saes.append(unfolded_sae(p, thetas(f, rng, 1.0 + 0.5 * k), f"blocks.{k}.hook_resid_post"))
        truths.append(truth)
    return saes, truths


def planted_scale_families(
    d: int = 32,
    n_dirs: int = 40,
    magnitudes: tuple[float, ...] = (1.0, 2.5),
    jitter: float = 0.05,
    noise: float = 0.01,
    seed: int = 0,
) -> Planted:
    """A pair in which features are told apart by their *scale*, stored in unit-norm-decoder form.

    Each of ``n_dirs`` random directions carries one feature per entry of ``magnitudes``
    (folded decoder norm = magnitude; a small direction ``jitter`` per feature), like a
    feature split by intensity. Both SAEs are stored in the gauge SAELens training uses:
    unit-norm decoder rows, i.e. :math:`\\theta_i = \\|D_i\\|`, so the unfolded decoders carry
    no scale at all and the scale lives only in :math:`\\theta` (the paper's Fig. 2). B is a
    noisy permutation of A (every feature has a partner).

    Parameters
    ----------
    d : int
    n_dirs : int
    magnitudes : tuple of float
    jitter : float
        Direction noise per feature, relative to the unit direction.
    noise : float
        Relative noise of B (see :func:`successor`).
    seed : int

    Returns
    -------
    Planted
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_dirs, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    rows, mags = [], []
    for m in magnitudes:
        v = u + jitter * rng.standard_normal((n_dirs, d)) / np.sqrt(d)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        rows.append(v)
        mags.append(np.full(n_dirs, m))
    dirs = np.concatenate(rows)
    mag = np.concatenate(mags)
    f = dirs.shape[0]
    pa = Folded(E=(dirs / mag[:, None]).T.copy(), b=-0.5 / mag, D=dirs * mag[:, None], b_dec=np.zeros(d))
    pb, truth = successor(pa, f, f, noise, rng)
    sae_a = unfolded_sae(pa, np.linalg.norm(pa.D, axis=1), "blocks.0.hook_resid_post")
    sae_b = unfolded_sae(pb, np.linalg.norm(pb.D, axis=1), "blocks.1.hook_resid_post")
    return Planted(sae_a=sae_a, sae_b=sae_b, truth=truth, folded_a=pa, folded_b=pb)


def recovery(perm: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of planted pairs (``truth >= 0``) that ``perm`` recovers.

    Parameters
    ----------
    perm : (F_A,) array of int
        A matching's map (-1 = unmatched).
    truth : (F_A,) array of int
        The planted map (-1 = no partner).

    Returns
    -------
    float
    """
    has = truth >= 0
    return float((perm[has] == truth[has]).mean())


# --------------------------------------------------------------------------------------
# Planted feature vectors (torch-seeded), for the solver at real widths
# --------------------------------------------------------------------------------------


def planted_vectors(
    f: int, d: int, seed: int = 0, *, unmatched: float = 0.10, noise: float = 0.30, unit: bool = False
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A planted pair of decoder-like feature matrices, with its ground truth.

    A has unit directions with norms log-uniform in [0.5, 2]; B holds a random permutation
    of ``1 - unmatched`` of A's features, each rescaled by a factor log-uniform in
    [0.8, 1.25] plus Gaussian noise of ``noise`` times its norm, and fresh features of its
    own in the other slots (so ``unmatched`` of each side has no partner). This is the
    benchmark's data (``benchmarks/bench_matching.py``).

    With ``unit=True`` every vector of A and every fresh vector of B has norm 1 and partners
    are not rescaled: B's partner of ``a`` is ``a`` plus Gaussian noise of norm ``noise``
    (``noise / sqrt(d)`` per coordinate), the "decoder-like unit vectors" of issue 18. The
    ``mse`` cost is then 2 - 2 cos, so chance pairs cost about 2 and the cost
    separates partners from chance; with the norm spread (default) small-norm features are
    cheap to pair with anything (two norm-0.5 vectors cost about 0.5 whatever their angle).

    Parameters
    ----------
    f : int
        Features per side.
    d : int
        Vector width.
    seed : int
    unmatched : float
        Share of each side without a partner.
    noise : float
        Noise norm relative to the partner's norm.
    unit : bool
        Unit-norm vectors and unscaled partners (see above).

    Returns
    -------
    x_a, x_b : (f, d) torch.Tensor, float32, contiguous
    truth : (f,) np.ndarray of int64
        ``truth[i]`` is A's feature *i*'s partner in B, or -1.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0.0, 0.0) if unit else (np.log(0.5), np.log(2.0))  # log-norm range
    a = torch.randn(f, d, generator=g)
    a /= a.norm(dim=1, keepdim=True)
    a *= torch.exp(torch.empty(f, 1).uniform_(lo, hi, generator=g))
    b = torch.randn(f, d, generator=g)  # starts as fresh features, partners overwritten below
    b /= b.norm(dim=1, keepdim=True)
    b *= torch.exp(torch.empty(f, 1).uniform_(lo, hi, generator=g))
    n_pair = int(round((1 - unmatched) * f))
    src = torch.randperm(f, generator=g)[:n_pair]  # A features with a partner
    dst = torch.randperm(f, generator=g)[:n_pair]  # where they land in B
    s_lo, s_hi = (0.0, 0.0) if unit else (np.log(0.8), np.log(1.25))  # partner rescale range
    for s in range(0, n_pair, 4096):
        i, j = src[s : s + 4096], dst[s : s + 4096]
        x = a[i] * torch.exp(torch.empty(len(i), 1).uniform_(s_lo, s_hi, generator=g))
        eps = torch.randn(len(i), d, generator=g)
        eps *= noise * x.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True)
        b[j] = x + eps
    truth = np.full(f, -1, dtype=np.int64)
    truth[src.numpy()] = dst.numpy()
    return a.contiguous(), b.contiguous(), truth


def planted_weights_chain(
    n_layers: int, f: int, d: int, seed: int = 0, *, unmatched: float = 0.10, noise: float = 0.30
) -> Iterator[SAEWeights]:
    """Yield ``n_layers`` :class:`~featmatch.saes.SAEWeights`, each a planted successor of the previous.

    Each layer's feature vectors are built as in :func:`planted_vectors` from the previous
    layer's, and stored as both decoder rows and encoder columns of a ReLU ("standard") SAE
    with zero biases and hook ``blocks.{layer}.hook_resid_post``. Lazily generated, so a
    long stack at real widths holds one or two layers at a time (the ``match_stack``
    benchmark).

    Parameters
    ----------
    n_layers : int
    f : int
        Features per layer.
    d : int
        Hidden width.
    seed : int
    unmatched, noise : float
        As in :func:`planted_vectors`.

    Yields
    ------
    SAEWeights
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(f, d, generator=g)
    x /= x.norm(dim=1, keepdim=True)
    x *= torch.exp(torch.empty(f, 1).uniform_(np.log(0.5), np.log(2.0), generator=g))
    n_pair = int(round((1 - unmatched) * f))
    for layer in range(n_layers):
        yield SAEWeights(
            W_enc=x.T,
            b_enc=torch.zeros(f),
            W_dec=x,
            b_dec=torch.zeros(d),
            threshold=None,
            architecture="standard",
            hook_name=f"blocks.{layer}.hook_resid_post",
        )
        y = torch.randn(f, d, generator=g)
        y /= y.norm(dim=1, keepdim=True)
        y *= torch.exp(torch.empty(f, 1).uniform_(np.log(0.5), np.log(2.0), generator=g))
        src = torch.randperm(f, generator=g)[:n_pair]
        dst = torch.randperm(f, generator=g)[:n_pair]
        z = x[src] * torch.exp(torch.empty(n_pair, 1).uniform_(np.log(0.8), np.log(1.25), generator=g))
        eps = torch.randn(n_pair, d, generator=g)
        eps *= noise * z.norm(dim=1, keepdim=True) / eps.norm(dim=1, keepdim=True)
        y[dst] = z + eps
        del z, eps
        x = y


def permuted_vectors(n: int, d: int, seed: int, unmatched: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation of ``n`` feature vectors with noise, and some fresh rows.

    A's rows are random directions with norms :math:`e^{U(-0.7, 0.7)}`; B is A permuted,
    each row rescaled by :math:`e^{U(-0.2, 0.2)}` plus Gaussian noise (30% of its norm in
    expectation); then B's first ``int(unmatched * n)`` rows are replaced by fresh unit
    vectors. The solver's tests use it for cases with a clear but not trivial optimum.

    Parameters
    ----------
    n : int
        Rows per side.
    d : int
        Vector width.
    seed : int
    unmatched : float
        Share of B's rows replaced by fresh ones.

    Returns
    -------
    x_a, x_b : (n, d) torch.Tensor, float32, contiguous
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    a *= torch.exp(torch.empty(n, 1).uniform_(-0.7, 0.7, generator=g)) / a.norm(dim=1, keepdim=True)
    perm = torch.randperm(n, generator=g)
    b = a[perm] * torch.exp(torch.empty(n, 1).uniform_(-0.2, 0.2, generator=g))
    b += 0.3 * torch.randn(n, d, generator=g) * b.norm(dim=1, keepdim=True) / d**0.5
    n_new = int(unmatched * n)
    fresh = torch.randn(n_new, d, generator=g)
    b[:n_new] = fresh / fresh.norm(dim=1, keepdim=True)
    return a.contiguous(), b.contiguous()
