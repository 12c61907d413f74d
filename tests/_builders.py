"""Tiny, seeded builders for SAELens SAEs and TransformerLens models (as SAELens's tests do)."""

from __future__ import annotations

import numpy as np
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig


def jumprelu_sae(
    d_in: int = 16,
    d_sae: int = 32,
    seed: int = 0,
    theta_range: tuple[float, float] = (0.5, 2.0),
    hook_name: str = "blocks.0.hook_resid_post",
) -> JumpReLUSAE:
    """A JumpReLU SAE with random weights and per-feature thresholds in ``theta_range``."""
    g = torch.Generator().manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        lo, hi = theta_range
        sae.threshold.copy_(lo + (hi - lo) * torch.rand(d_sae, generator=g))
    return sae


def standard_sae(
    d_in: int = 16, d_sae: int = 32, seed: int = 0, hook_name: str = "blocks.0.hook_resid_post"
) -> StandardSAE:
    """A ReLU SAE with random weights."""
    g = torch.Generator().manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
    return sae


def tiny_model(n_layers: int = 3, d_model: int = 16, d_vocab: int = 50, n_ctx: int = 32, seed: int = 0):
    """A random TransformerLens HookedTransformer small enough for unit tests."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=4,
        n_heads=d_model // 4,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )
    return HookedTransformer(cfg)


def tiny_tokens(
    n_seq: int = 8, seq_len: int = 16, d_vocab: int = 50, seed: int = 0, bos: int = 0
) -> torch.Tensor:
    """Random tokens (n_seq, seq_len) with a BOS token at position 0."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, d_vocab, size=(n_seq, seq_len))
    toks[:, 0] = bos
    return torch.as_tensor(toks, dtype=torch.long)


def tiny_notebook(folder, name: str = "01_tiny", figure: bool = False, fail: bool = False):
    """Write a 3-4 cell notebook ``folder/name.ipynb`` for the papermill runner; return its path.

    Cells: a ``parameters`` cell (``GREETING``, ``N``, ``OUT_DIR``), a cell printing
    ``"{GREETING * N}|{type(N).__name__}|{OUT_DIR}"``, then optionally a cell that draws a
    figure and calls ``plt.show()`` (``figure``) or one that raises
    ``ValueError("planted failure")`` followed by a cell that must never run (``fail``).
    """
    from pathlib import Path

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell('GREETING = "hello"\nN = 1\nOUT_DIR = None')
    params.metadata["tags"] = ["parameters"]
    cells = [params, new_code_cell('print(f"{GREETING * N}|{type(N).__name__}|{OUT_DIR}")')]
    if figure:
        cells.append(
            new_code_cell(
                "import matplotlib.pyplot as plt\n"
                "fig, ax = plt.subplots(figsize=(2, 2))\n"
                "ax.plot([0, 1], [0, 1])\n"
                "plt.show()"
            )
        )
    if fail:
        cells += [
            new_code_cell('raise ValueError("planted failure")'),
            new_code_cell('print("never printed")'),
        ]
    nb = new_notebook(
        cells=cells,
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    path = Path(folder) / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def permuted_sae(sae, perm, hook_name: str | None = None):
    """A copy of JumpReLU ``sae`` whose feature ``perm[i]`` is feature ``i`` of ``sae``.

    Read at ``hook_name`` (default: the same hook as ``sae``). The planted ground truth of
    matching tests: matching ``sae`` to the copy must give ``perm``.
    """
    hook = hook_name or sae.cfg.metadata.hook_name
    out = jumprelu_sae(d_in=int(sae.cfg.d_in), d_sae=int(sae.cfg.d_sae), hook_name=hook)
    inv = torch.as_tensor(np.argsort(np.asarray(perm)))  # feature j of the copy is feature inv[j]
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, inv])
        out.W_dec.copy_(sae.W_dec[inv])
        out.b_enc.copy_(sae.b_enc[inv])
        out.b_dec.copy_(sae.b_dec)
        out.threshold.copy_(sae.threshold[inv])
    return out


def largest_duals_reference(E: np.ndarray, pc: np.ndarray) -> np.ndarray:
    """Largest v <= 0 with v_j <= v_pc(i) + E_ij - E_i,pc(i) on a dense block, by plain
    Bellman-Ford sweeps (the reference for the sparse matcher's dual computations)."""
    e = E[np.arange(E.shape[0]), pc]
    v = np.zeros(E.shape[1])
    for _ in range(E.shape[1] + 2):
        new = np.minimum(v, (E - e[:, None] + v[pc][:, None]).min(0))
        if np.array_equal(new, v):
            return v
        v = new
    raise AssertionError("no fixpoint")
