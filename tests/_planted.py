"""Planted synthetic SAE pairs and chains with a known ground-truth matching.

Model. Each SAE is built from *folded* parameters (encoder columns ``E``, encoder bias
``b``, decoder rows ``D``; threshold 1) and then "unfolded" with its own per-feature
thresholds theta (log-uniform in ``theta_base * [0.5, 2]``):

    W_enc = E diag(theta),  b_enc = b * theta,  W_dec = diag(theta)^-1 D,  threshold = theta.

This is a function-preserving reparametrisation (Eq. 4 read backwards): folding the SAE
returns ``E, b, D`` exactly. SAE B takes a random permutation of a subset of A's folded
features plus Gaussian noise, and adds features of its own; A also keeps features with no
partner. Matched features therefore compute the same thing in both SAEs, while their raw
(unfolded) parameters differ by the independent scales theta_A / theta_B, which is the
situation the paper's folding addresses (the decoder norms carry the scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig


@dataclass
class Folded:
    """Folded parameters of one SAE (float64 numpy)."""

    E: np.ndarray  # (d, F)
    b: np.ndarray  # (F,)
    D: np.ndarray  # (F, d)
    b_dec: np.ndarray  # (d,)


@dataclass
class Planted:
    """A planted pair: ``truth[i]`` is the feature of B planted as the partner of A's feature i, or -1."""

    sae_a: JumpReLUSAE
    sae_b: JumpReLUSAE
    truth: np.ndarray
    folded_a: Folded
    folded_b: Folded

    @property
    def has_partner_a(self) -> np.ndarray:
        return self.truth >= 0

    @property
    def no_partner_b(self) -> np.ndarray:
        mask = np.ones(self.sae_b.cfg.d_sae, dtype=bool)
        mask[self.truth[self.truth >= 0]] = False
        return mask


def random_folded(d: int, f: int, rng: np.random.Generator) -> Folded:
    """Random folded SAE parameters: unit-ish feature directions with norms spread 0.5-2."""
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
    """Per-feature thresholds, log-uniform in ``base * [0.5, 2]``."""
    return base * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=f))


def unfolded_sae(p: Folded, theta: np.ndarray, hook_name: str = "blocks.0.hook_resid_post") -> JumpReLUSAE:
    """A SAELens JumpReLUSAE whose fold is ``p`` (threshold ``theta``)."""
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

    ``noise`` is the noise standard deviation relative to the RMS entry of each parameter.
    Returns the new parameters and ``truth`` ((F_A,) index into the new SAE, or -1).
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
    """A planted pair sharing ``n_shared`` features (default: ``1 - no_partner`` of the smaller SAE).

    Thresholds are independent per feature in both SAEs, log-uniform in
    ``theta_base[k] * [0.5, 2]`` (B's base is larger, as hidden-state norms grow with depth).
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
    """SAEs at ``n_layers`` layers, each a noisy permuted successor of the previous one.

    Returns the SAEs and the ``n_layers - 1`` ground-truth maps (``truth[k]``: layer k → k+1).
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


def recovery(perm: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of planted pairs (``truth >= 0``) that ``perm`` recovers."""
    has = truth >= 0
    return float((perm[has] == truth[has]).mean())


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
    unit-norm decoder rows, i.e. ``theta_i = ||D_i||``, so the unfolded decoders carry no
    scale at all and the scale lives only in theta (the paper's Fig. 2). B is a noisy
    permutation of A (every feature has a partner).
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
