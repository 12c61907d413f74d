"""What every notebook needs first: a model, its SAEs at chosen layers, and held-out tokens.

The notebooks call :func:`load_setup` with their parameters and get one :class:`Setup`.
It resolves the SAE set (the embedded zoo or a hub release, see ``featmatch/saes/sae_sets.yaml``),
builds the zoo profile on demand, tokenises the evaluation split of the offline corpus,
and hands out the streaming activation statistics (cached on disk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Setup", "load_setup", "default_profile", "chapter_defaults", "save_figure"]

CHAPTERS = ("folding", "persistence", "pruning", "semantic_ot", "compression")


def default_profile() -> str:
    """The zoo profile notebooks use by default: ``$FEATMATCH_PROFILE`` or ``quick``."""
    return os.environ.get("FEATMATCH_PROFILE", "quick")


def _profile_table() -> dict[str, dict[str, dict[str, Any]]]:
    import yaml

    text = resources.files("featmatch.chapters").joinpath("profiles.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def chapter_defaults(chapter: str, profile: str, **given: Any) -> dict[str, Any]:
    """The parameters in ``given``, each ``None`` replaced by the chapter's profile default.

    The defaults of all chapters live in one table, ``featmatch/chapters/profiles.yaml``.
    A profile the table does not list (a hub model's run, say) takes the ``quick`` values.

    Parameters
    ----------
    chapter : str
        One of :data:`CHAPTERS`.
    profile : str
        The run's zoo profile (``tiny``, ``quick``, ``full``, ...).
    **given
        Notebook parameters; ``None`` means "the default".

    Returns
    -------
    dict
        ``given`` with defaults filled in, same keys.

    Raises
    ------
    ValueError
        An unknown chapter, or a ``None`` parameter without a default.

    Examples
    --------
    >>> chapter_defaults("pruning", "tiny", N_TOKENS=None, LAYER_STEP=2)
    {'N_TOKENS': 256, 'LAYER_STEP': 2}
    """
    table = _profile_table()
    if chapter not in table:
        raise ValueError(f"unknown chapter {chapter!r}; known: {', '.join(table)}")
    base = table[chapter].get(profile, table[chapter]["quick"])
    out = {k: (base.get(k) if v is None else v) for k, v in given.items()}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ValueError(f"no default for {missing} in chapter {chapter!r}, profile {profile!r}")
    return out


@dataclass
class Setup:
    """A model, its SAEs by layer, and the evaluation tokens of one experiment."""

    model_name: str
    sae_set: str
    layers: list[int]
    model: Any
    saes: dict[int, Any]
    tokens: Any
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def client(self) -> Any:
        """The Dask client of :attr:`scheduler` (``None``: everything runs in this process).

        See :func:`featmatch._dask.get_client`; a ``"local:N"`` cluster is started once and
        reused by every call of the session.
        """
        if self.scheduler is None:
            return None
        from featmatch._dask import get_client

        return get_client(self.scheduler)

    def stats(
        self,
        pairs: Sequence[tuple[int, int]] = (),
        layers: Sequence[int] | None = None,
        tokens: Any = None,
        **kwargs: Any,
    ):
        """Streaming activation statistics over :attr:`tokens`, or over ``tokens`` (cached on disk).

        See :func:`featmatch.lm.activations.gather`. With :attr:`scheduler` set, the pass runs
        on that Dask cluster, one task per corpus shard (same statistics).
        """
        from featmatch.lm.activations import gather

        use = list(layers) if layers is not None else self.layers
        kwargs.setdefault("client", self.client)
        toks = self.tokens if tokens is None else tokens
        return gather(self.model, {layer: self.saes[layer] for layer in use}, toks, pairs=list(pairs), **kwargs)


def load_setup(
    model: str = "smollm2-135m",
    sae_set: str | None = None,
    layers: Sequence[int] | None = None,
    n_tokens: int = 16_384,
    seq_len: int = 128,
    source: str = "mixed",
    seed: int = 0,
    profile: str | None = None,
    scheduler: Any = None,
) -> Setup:
    """Load the model, the SAEs of ``sae_set`` at ``layers`` and held-out tokens.

    Parameters
    ----------
    model : str
        A name from :func:`featmatch.lm.models.available_models`.
    sae_set : str, optional
        A name from ``featmatch/saes/sae_sets.yaml``. Default: the embedded zoo of ``profile``,
        ``featmatch-smollm2-{profile}``, which is built on first use.
    layers : sequence of int, optional
        Default: every layer the set covers.
    n_tokens, seq_len, source, seed
        The evaluation slice of the offline corpus (:func:`featmatch.lm.corpus.token_batches`,
        ``split="eval"``). Hub models get the same text through their own tokenizer.
    profile : str, optional
        Zoo profile; default :func:`default_profile`.
    scheduler : dask.distributed.Client or str, optional
        Where the heavy passes run: ``None`` (this process), ``"local:N"`` or a scheduler
        address (:attr:`Setup.client`; needs ``pip install 'featmatch[distributed]'``).
    """
    from featmatch.lm.corpus import token_batches
    from featmatch.lm.models import load_model
    from featmatch.saes._sae import load_layer_sae
    from featmatch.saes._sae import sae_set as get_sae_set

    profile = profile or default_profile()
    set_name = sae_set or f"featmatch-smollm2-{profile}"
    spec = get_sae_set(set_name)
    if set_name.startswith("featmatch-"):
        from featmatch.saes.zoo import build_zoo

        build_zoo(profile=set_name.removeprefix("featmatch-smollm2-").split("-")[0], progress=True)
    use_layers = list(layers) if layers is not None else list(spec.layers)
    missing = sorted(set(use_layers) - set(spec.layers))
    if missing:
        raise ValueError(
            f"SAE set {set_name!r} has no SAEs for layers {missing}; it covers {list(spec.layers)}"
        )
    hooked = load_model(model)
    saes = {layer: load_layer_sae(set_name, layer) for layer in use_layers}
    tokens = token_batches(
        hooked.tokenizer, n_tokens=n_tokens, seq_len=seq_len, source=source, split="eval", seed=seed
    )
    return Setup(model, set_name, use_layers, hooked, saes, tokens, profile=profile, scheduler=scheduler)


def save_figure(fig: Any, out_dir: str | os.PathLike | None, name: str) -> Path | None:
    """Save ``fig`` as ``out_dir/name.png`` (atomically) when ``out_dir`` is given."""
    if not out_dir:
        return None
    from featmatch._io import atomic_save

    path = Path(out_dir) / f"{name}.png"
    atomic_save(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))
    return path
