"""One weight view over SAELens SAEs, threshold folding (Eq. 4), loading, and the SAE-set registry.

featmatch never re-implements an SAE. It reads the parameters of SAELens SAE objects
(:class:`sae_lens.StandardSAE`, :class:`sae_lens.JumpReLUSAE`, :class:`sae_lens.TopKSAE`)
into a frozen :class:`SAEWeights` view, and :func:`fold` returns a *new* SAELens SAE.

Conventions (SAELens): ``W_enc`` is ``(d_in, d_sae)``, ``W_dec`` is ``(d_sae, d_in)``, and
the encoder computes

.. math::

    f(x) = \\sigma\\big((x - b_{dec}\\,[\\text{apply\\_b\\_dec\\_to\\_input}])\\,W_{enc} + b_{enc}\\big),
    \\qquad \\hat x = f\\,W_{dec} + b_{dec},

with :math:`\\sigma(z) = z\\,H(z - \\theta)` for JumpReLU (Balagansky et al. 2025, Eq. 2).

References
----------
.. [1] N. Balagansky, I. Maksimov, D. Gavrilov. "Mechanistic Permutability: Match Features
   Across Layers." ICLR 2025, arXiv:2410.07656.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featmatch._dask import Source
from featmatch._io import check_finite

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = [
    "SAEWeights",
    "SAESet",
    "HubUnreachableError",
    "SUPPORTED_ARCHITECTURES",
    "weights",
    "fold",
    "load_sae",
    "sae_set",
    "sae_sets",
    "load_layer_sae",
    "check_same_d_in",
]

#: Architectures featmatch reads. Only ``jumprelu`` carries a threshold to fold.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")

#: Release names with this prefix are resolved by :func:`featmatch.saes.zoo.sae_path`.
ZOO_PREFIX = "featmatch-"


class HubUnreachableError(ConnectionError):
    """The Hugging Face hub could not be reached (or is disabled) and the files are not cached."""


# --------------------------------------------------------------------------------------
# Weight view
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEWeights:
    """Read-only float32 CPU copy of an SAE's parameters in SAELens layout.

    Attributes
    ----------
    W_enc : (d_in, d_sae) torch.Tensor
    b_enc : (d_sae,) torch.Tensor
        The stored encoder bias (not shifted by ``b_dec``; see :attr:`b_enc_effective`).
    W_dec : (d_sae, d_in) torch.Tensor
    b_dec : (d_in,) torch.Tensor
    threshold : (d_sae,) torch.Tensor or None
        JumpReLU thresholds :math:`\\theta`; ``None`` for architectures without one.
    architecture : str
        SAELens architecture name (``"jumprelu"``, ``"standard"``, ``"topk"``).
    hook_name : str or None
        The hook the SAE was trained on, from ``sae.cfg.metadata.hook_name``.
    apply_b_dec_to_input : bool
        Whether the SAE subtracts ``b_dec`` from its input before encoding (SAELens
        ``cfg.apply_b_dec_to_input``). An addition to the contract, with a default.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    architecture: str
    hook_name: str | None
    apply_b_dec_to_input: bool = False

    @property
    def d_in(self) -> int:
        """Input (hidden-state) dimension ``d``."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features ``F``."""
        return int(self.W_enc.shape[1])

    @property
    def b_enc_effective(self) -> torch.Tensor:
        """The pre-activation bias as a function of the raw input ``x``.

        .. math:: b_{enc}^{eff} = b_{enc} - b_{dec} W_{enc}\\quad\\text{if apply\\_b\\_dec\\_to\\_input,
           else } b_{enc},

        so that :math:`\\text{pre}(x) = x W_{enc} + b_{enc}^{eff}` for every SAE. featmatch
        compares this bias (not the stored one) when matching with ``include_b_enc=True``,
        so SAEs trained with and without the ``b_dec`` input shift are comparable.
        """
        if self.apply_b_dec_to_input:
            return (self.b_enc.double() - self.b_dec.double() @ self.W_enc.double()).float()
        return self.b_enc

    def validate(self, side: str | None = None, fold: bool = True) -> SAEWeights:
        """Check shapes, finiteness and :math:`\\theta > 0`; raise ``ValueError`` naming the problem.

        Parameters
        ----------
        side : str, optional
            Which SAE this is (``"A"``, ``"B"``, ``"A (path)"``); the messages name it.
        fold : bool, default True
            Whether the caller folds thresholds; only changes the :math:`\\theta \\le 0`
            message (a JumpReLU threshold must be positive either way).
        """
        who = f"SAE {side}" if side else "SAE"
        d, f = self.W_enc.shape
        expected = {"b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
        if self.threshold is not None:
            expected["threshold"] = (f,)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"{who} parameter {name} has shape {got}, expected {shape} (W_enc is {(d, f)})"
                )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                check_finite(f"{who} parameter {name}", value)
        if self.threshold is not None:
            bad = self.threshold <= 0
            if bool(bad.any()):
                why = (
                    "folding divides by theta, so every JumpReLU threshold must be > 0"
                    if fold
                    else "a JumpReLU threshold must be > 0 (such a feature fires on negative pre-activations)"
                )
                raise ValueError(
                    f"{who} threshold (theta) has {int(bad.sum())} values <= 0 "
                    f"(min {float(self.threshold.min()):.4g}); {why}"
                )
        return self


def _architecture(sae: Any) -> str:
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(cfg, "architecture"):
        raise TypeError(f"expected a SAELens SAE or SAEWeights, got {type(sae).__name__}")
    arch = cfg.architecture()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"SAE architecture {arch!r} is not supported; featmatch reads {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).clone()


def weights(sae: SAE | SAEWeights, *, side: str | None = None, fold: bool = True) -> SAEWeights:
    """The parameters of a SAELens SAE as a validated :class:`SAEWeights` (float32, CPU).

    Parameters
    ----------
    sae : sae_lens.SAE or SAEWeights
        A Standard (ReLU), JumpReLU or TopK SAE. An :class:`SAEWeights` is validated and
        returned as is.
    side, fold
        Passed to :meth:`SAEWeights.validate` (they only change error messages).

    Returns
    -------
    SAEWeights

    Raises
    ------
    ValueError
        On NaN/Inf in any parameter, a threshold :math:`\\theta \\le 0`, inconsistent
        shapes, or an unsupported architecture.
    """
    if isinstance(sae, SAEWeights):
        return sae.validate(side, fold)
    arch = _architecture(sae)
    threshold = getattr(sae, "threshold", None) if arch == "jumprelu" else None
    w = SAEWeights(
        W_enc=_cpu32(sae.W_enc),
        b_enc=_cpu32(sae.b_enc),
        W_dec=_cpu32(sae.W_dec),
        b_dec=_cpu32(sae.b_dec),
        threshold=None if threshold is None else _cpu32(threshold),
        architecture=arch,
        hook_name=getattr(sae.cfg.metadata, "hook_name", None),
        apply_b_dec_to_input=bool(getattr(sae.cfg, "apply_b_dec_to_input", False)),
    )
    return w.validate(side, fold)


def check_same_d_in(a: SAEWeights, b: SAEWeights) -> None:
    """Raise ``ValueError`` if two SAEs read hidden states of different widths."""
    if a.d_in != b.d_in:
        raise ValueError(
            f"d_in mismatch: SAE A reads d_in={a.d_in} (hook {a.hook_name}) but SAE B reads "
            f"d_in={b.d_in} (hook {b.hook_name}); features can only be matched within one model width"
        )


# --------------------------------------------------------------------------------------
# Folding (Eq. 4)
# --------------------------------------------------------------------------------------


def fold(sae: SAE) -> SAE:
    """Fold the JumpReLU thresholds into the weights (Balagansky et al. 2025, Eq. 4).

    .. math::

        W_{enc}' = W_{enc}\\,\\mathrm{diag}(1/\\theta),\\quad
        b_{enc}' = b_{enc} \\odot 1/\\theta,\\quad
        W_{dec}' = \\mathrm{diag}(\\theta)\\,W_{dec},\\quad \\theta' = 1.

    Since :math:`\\theta > 0`, the pre-activation is divided feature-wise by :math:`\\theta`,
    so :math:`z > \\theta \\iff z/\\theta > 1` and the folded SAE fires on exactly the same
    inputs with activations :math:`f' = f/\\theta`; the decoder multiplies them back,
    :math:`f' W_{dec}' = f W_{dec}`, so the reconstruction :math:`\\hat x` is unchanged.
    The ``b_dec`` input shift (SAELens ``apply_b_dec_to_input``) happens before
    :math:`W_{enc}` and is divided along with everything else, so it needs no change; the
    same holds for SAELens's input/output activation normalisation.

    Parameters
    ----------
    sae : sae_lens.SAE
        A JumpReLU, Standard (ReLU) or TopK SAE. The input is not modified.

    Returns
    -------
    sae_lens.SAE
        A new SAE of the same class and config. For architectures without a threshold
        (Standard/ReLU, TopK) there is nothing to fold (the case :math:`\\theta = 1`) and an
        equivalent independent copy is returned.

    Raises
    ------
    ValueError
        If a parameter is non-finite, a threshold is :math:`\\le 0`, or the architecture is
        unsupported.
    """
    w = weights(sae)  # validates
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    if w.threshold is not None:
        # at least float32 (half-precision SAEs are folded in float32, then cast back)
        work = torch.promote_types(sae.W_enc.dtype, torch.float32)
        theta = sae.threshold.detach().to(work)
        state["W_enc"] = (sae.W_enc.detach().to(work) / theta[None, :]).to(sae.W_enc.dtype)
        state["b_enc"] = (sae.b_enc.detach().to(work) / theta).to(sae.b_enc.dtype)
        state["W_dec"] = (sae.W_dec.detach().to(work) * theta[:, None]).to(sae.W_dec.dtype)
        state["threshold"] = torch.ones_like(sae.threshold.detach())
    cfg = copy.deepcopy(sae.cfg)
    cfg.device = str(sae.W_enc.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SAELens warns about model kwargs on init
        new = type(sae)(cfg, use_error_term=bool(getattr(sae, "use_error_term", False)))
    new.load_state_dict(state, strict=True)
    new.to(device=sae.W_enc.device)
    new.train(sae.training)
    return new


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _hub_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    try:
        from huggingface_hub import errors as hf_errors

        for name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            if hasattr(hf_errors, name):
                types.append(getattr(hf_errors, name))
    except ImportError:  # pragma: no cover - huggingface_hub.errors is recent; older releases lack it
        pass
    # both are dependencies (pyproject.toml): the hub client raises either, by version
    import httpx
    import requests

    types += [requests.exceptions.ConnectionError, httpx.ConnectError]
    return tuple(types)


def _offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_pretrained(release: str, sae_id: str, device: str) -> SAE:
    from sae_lens import SAE

    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except ValueError as exc:  # unknown release or id: SAELens's message lists valid ids
        raise ValueError(f"cannot load SAE {release}:{sae_id}: {exc}") from exc
    except _hub_error_types() as exc:
        state = "HF_HUB_OFFLINE=1 is set" if _offline_flag() else "HF_HUB_OFFLINE is not set"
        raise HubUnreachableError(
            f"cannot load SAE {release}:{sae_id}: the Hugging Face hub is unreachable ({state}) and its "
            f"files are not in the local cache; use a disk folder or a featmatch zoo release "
            f"('featmatch-smollm2-quick:blocks.5.hook_resid_post') instead [{type(exc).__name__}]"
        ) from exc


def _from_zoo(release: str, sae_id: str, device: str) -> SAE:
    from featmatch.saes import zoo

    return _from_disk(zoo.sae_path(release, sae_id), device)


def _from_disk(path: Path, device: str) -> SAE:
    if not path.exists():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    if not path.is_dir():
        raise ValueError(
            f"SAE source {str(path)!r} is a file; pass the folder holding cfg.json and the weights"
        )
    cfg_file = path / "cfg.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"SAE folder {path} has no cfg.json (not a SAELens SAE folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_file} is corrupt (truncated or not JSON: {exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a SAELens config (a JSON object)")
    from sae_lens import SAE  # imported only once the folder is known to exist (a slow import)
    from safetensors import SafetensorError

    try:
        return SAE.load_from_disk(path, device=device)
    except SafetensorError as exc:  # a bare Rust error otherwise, naming no file
        files = ", ".join(str(f) for f in sorted(path.glob("*.safetensors"))) or f"{path}/*.safetensors"
        raise ValueError(f"{files}: corrupt or truncated safetensors file ({exc})") from exc


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "~", "/"))
        or os.sep in source
        or (os.altsep is not None and os.altsep in source)
    )


def load_sae(source: str | os.PathLike, sae_id: str | None = None, device: str = "cpu") -> SAE:
    """Load a SAELens SAE from a disk folder, the SAELens hub catalogue, or the featmatch zoo.

    Parameters
    ----------
    source : str or path
        One of

        * a folder written by ``sae.save_model`` (loaded with ``SAE.load_from_disk``);
        * ``"release:sae_id"``, e.g. ``"gpt2-small-res-jb:blocks.5.hook_resid_pre"``, loaded
          with ``SAE.from_pretrained`` (hub; needs a network or a filled HF cache);
        * a featmatch zoo release, ``"featmatch-smollm2-quick:blocks.5.hook_resid_post"``,
          resolved to a checksummed folder by ``featmatch.saes.zoo.sae_path``.

        With ``sae_id`` given, ``source`` is the release name alone.
    sae_id : str, optional
        The SAE id within the release.
    device : str
        Torch device for the loaded SAE.

    Returns
    -------
    sae_lens.SAE
        With ``featmatch_source`` set to a :class:`featmatch._dask.Source` of the canonical
        source (an absolute folder path or ``release:sae_id``): the distributed engine
        reloads the SAE on a worker from it instead of sending its weights.

    Raises
    ------
    ValueError
        For a string that is neither an existing folder nor ``release:sae_id`` (or has an
        empty part), or an unknown SAELens release / id.
    FileNotFoundError
        For a path-like source that does not exist.
    HubUnreachableError
        When the hub cannot be reached (e.g. ``HF_HUB_OFFLINE=1``) and the files are not cached.
    """
    sae, where = _load(source, sae_id, device)
    sae.featmatch_source = Source(load_sae, where)  # a Dask worker reloads it from this (featmatch._dask)
    return sae


def _load(source: str | os.PathLike, sae_id: str | None, device: str) -> tuple[SAE, str]:
    """The SAE and the canonical source string it was loaded from."""
    if isinstance(source, os.PathLike):
        if sae_id is not None:
            raise ValueError("sae_id is only meaningful with a release name, not with a folder path")
        return _from_disk(Path(source), device), str(Path(source).expanduser().resolve())
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"SAE source must be a non-empty string or path, got {source!r}")
    source = source.strip()
    if sae_id is None:
        folder = Path(source).expanduser()
        if folder.is_dir():
            return _from_disk(folder, device), str(folder.resolve())
        if ":" in source and not _looks_like_path(source.split(":", 1)[0]):
            release, sae_id = source.split(":", 1)
        elif _looks_like_path(source) or folder.exists():
            return _from_disk(folder, device), str(folder.resolve())
        else:
            raise ValueError(
                f"unknown SAE source {source!r}: expected an existing SAE folder, 'release:sae_id' "
                "(e.g. 'gpt2-small-res-jb:blocks.5.hook_resid_pre') or a featmatch zoo release "
                "(e.g. 'featmatch-smollm2-quick:blocks.5.hook_resid_post')"
            )
    else:
        release = source
    release, sae_id = release.strip(), sae_id.strip()
    if not release or not sae_id:
        raise ValueError(f"SAE source {source!r} must be 'release:sae_id' with both parts non-empty")
    if release.startswith(ZOO_PREFIX):
        return _from_zoo(release, sae_id, device), f"{release}:{sae_id}"
    return _from_pretrained(release, sae_id, device), f"{release}:{sae_id}"


# --------------------------------------------------------------------------------------
# SAE-set registry (data in sae_sets.yaml)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAESet:
    """A family of per-layer SAEs for one model: a release plus an ``sae_id`` template.

    Attributes
    ----------
    name : str
        Registry name (the key in ``featmatch/saes/sae_sets.yaml``).
    model : str
        featmatch model name (see ``featmatch.lm.models``).
    release : str
        SAELens release, or a featmatch zoo release (prefix ``featmatch-``).
    sae_id : str
        Template with ``{layer}``, e.g. ``"layer_{layer}/width_16k/canonical"``.
    hook : str
        Hook-name template with ``{layer}``, e.g. ``"blocks.{layer}.hook_resid_post"``.
    layers : tuple of int
        Layers at which the set has an SAE. For zoo sets these are the layers the zoo
        profile trains (``featmatch.saes.zoo.get_profile``); they exist once the zoo is built.
    description : str
    """

    name: str
    model: str
    release: str
    sae_id: str
    hook: str
    layers: tuple[int, ...]
    description: str = ""

    def sae_id_for(self, layer: int) -> str:
        """The ``sae_id`` of the SAE at ``layer``."""
        self._check_layer(layer)
        return self.sae_id.format(layer=layer)

    def hook_name(self, layer: int) -> str:
        """The model hook the SAE at ``layer`` reads."""
        self._check_layer(layer)
        return self.hook.format(layer=layer)

    def source(self, layer: int) -> str:
        """``"release:sae_id"`` for :func:`load_sae`."""
        return f"{self.release}:{self.sae_id_for(layer)}"

    @property
    def is_zoo(self) -> bool:
        """Whether the set is built locally by ``featmatch.saes.zoo``."""
        return self.release.startswith(ZOO_PREFIX)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in self.layers:
            raise ValueError(
                f"SAE set {self.name!r} has no layer {layer!r}; layers are {self.layers[0]}..{self.layers[-1]}"
            )


def _zoo_layers(name: str, profile: str, variant: str, n_layers: int) -> tuple[int, ...]:
    """Layers a zoo profile trains, from ``featmatch.saes.zoo`` (which reads ``zoo_profiles.yaml``)."""
    from featmatch.saes import zoo

    prof = zoo.get_profile(profile)
    layers = prof.layers_for(n_layers) if variant == "main" else prof.l0b_layers_for(n_layers)
    if not layers:
        raise ValueError(f"SAE set {name!r}: zoo profile {profile!r} has no {variant} layers")
    return tuple(int(x) for x in layers)


def _parse_layers(name: str, spec: Any) -> tuple[int, ...]:
    if isinstance(spec, dict) and set(spec) == {"start", "stop"}:
        return tuple(range(int(spec["start"]), int(spec["stop"])))
    if isinstance(spec, dict) and set(spec) == {"zoo_profile", "variant", "n_layers"}:
        if spec["variant"] not in ("main", "l0b"):
            raise ValueError(f"sae_sets.yaml: set {name!r} has zoo variant {spec['variant']!r} (main or l0b)")
        return _zoo_layers(name, str(spec["zoo_profile"]), str(spec["variant"]), int(spec["n_layers"]))
    if isinstance(spec, list) and spec and all(isinstance(x, int) for x in spec):
        return tuple(spec)
    raise ValueError(f"sae_sets.yaml: set {name!r} has a bad 'layers' entry {spec!r}")


@functools.lru_cache(maxsize=1)
def _raw_registry() -> dict[str, dict[str, Any]]:
    import yaml

    text = resources.files("featmatch.saes").joinpath("sae_sets.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    sets = dict(raw.get("sets", {}))
    for name, entry in sets.items():
        missing = {"model", "release", "sae_id", "hook", "layers"} - set(entry)
        if missing:
            raise ValueError(f"sae_sets.yaml: set {name!r} lacks {sorted(missing)}")
    return sets


def _build_set(name: str, entry: dict[str, Any]) -> SAESet:
    return SAESet(
        name=name,
        model=str(entry["model"]),
        release=str(entry["release"]),
        sae_id=str(entry["sae_id"]),
        hook=str(entry["hook"]),
        layers=_parse_layers(name, entry["layers"]),  # zoo layers are resolved on every lookup
        description=str(entry.get("description", "")).strip(),
    )


def sae_sets() -> list[str]:
    """Names of the registered SAE sets."""
    return sorted(_raw_registry())


def sae_set(name: str) -> SAESet:
    """Look up an SAE set by name (data in ``featmatch/saes/sae_sets.yaml``).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    reg = _raw_registry()
    if name not in reg:
        raise ValueError(f"unknown SAE set {name!r}; known sets: {', '.join(sorted(reg))}")
    return _build_set(name, reg[name])


def load_layer_sae(set_name: str, layer: int, device: str = "cpu") -> SAE:
    """Load the SAE of set ``set_name`` at ``layer`` (through :func:`load_sae`)."""
    s = sae_set(set_name)
    return load_sae(s.release, s.sae_id_for(layer), device=device)
