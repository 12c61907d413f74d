"""The embedded SAE zoo: JumpReLU SAEs on every residual layer of SmolLM2, trained with sae-lens.

A *profile* (data, in ``zoo_profiles.yaml``) fixes the model, layers, corpus slice, SAE
width, sparsity target and trainer settings. :func:`build_zoo` then

1. tokenises ``n_tokens`` of the corpus train split and ``eval_tokens`` of its eval split
   (:mod:`featmatch.lm.corpus`);
2. runs ONE forward pass per split that gathers ``blocks.{L}.hook_resid_post`` for every
   layer still to build (``stop_at_layer`` skips the unembedding), dropping position 0
   (the attention sink) and storing float16 activations in memory or in a disk memmap;
3. for each layer, drops norm outliers (``outlier_factor`` x the median norm) and trains a
   ``JumpReLUTrainingSAE`` with sae-lens's ``SAETrainer`` (``quadratic`` sparsity mode
   around ``target_l0``) on an endless shuffled iterator over those activations;
4. measures L0, explained variance and the dead fraction on the held-out activations,
   saves the inference SAE with ``save_model`` (SAELens's own disk format, so
   ``SAE.load_from_disk`` loads it, with ``hook_name`` in its metadata) and records its
   checksums in the profile's manifest, which is rewritten atomically after every layer.

A re-run skips every layer whose entry and files verify, so an interrupted build resumes
where it stopped; a file whose checksum no longer matches is reported and retrained,
never loaded. Everything lives under ``cache_dir("zoo", profile)``::

    manifest.json
    featmatch-smollm2-quick/blocks.5.hook_resid_post/{cfg.json,sae_weights.safetensors}
    featmatch-smollm2-quick-l0b/blocks.15.hook_resid_post/...
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from featmatch._io import atomic_save, atomic_write_json, cache_dir, sha256_file
from featmatch._threads import fitted_threads
from featmatch.lm import corpus

__all__ = [
    "ZooProfile",
    "ZooIntegrityError",
    "PROFILES",
    "VARIANTS",
    "get_profile",
    "make_profile",
    "build_zoo",
    "manifest",
    "manifest_path",
    "verify",
    "zoo_dir",
    "sae_path",
    "sae_id",
    "load_zoo_sae",
    "quality_table",
]

#: The two SAE sets of a profile: the main one (every layer) and the second target L0.
VARIANTS: tuple[str, ...] = ("main", "l0b", "seed2")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SAE_FILES = ("sae_weights.safetensors", "cfg.json")


class ZooIntegrityError(RuntimeError):
    """A zoo file is missing or its checksum differs from the manifest."""


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ZooProfile:
    """One zoo profile (see ``zoo_profiles.yaml``).

    Attributes
    ----------
    name : str
        Profile name (``"tiny"``, ``"quick"``, ``"full"`` or a custom one in tests).
    model : str
        Model registry name for :func:`featmatch.lm.models.load_model`.
    release : str
        Release name of the main set (``{profile}`` is filled in).
    hook : str
        Hook-name template with ``{layer}``.
    layers : list of int or "all"
        Layers of the main set.
    source, seq_len, seed, n_tokens, eval_tokens
        Corpus slice (see :func:`featmatch.lm.corpus.token_batches`).
    forward_batch_size : int
        Rows per forward pass while gathering activations.
    storage : {"memory", "memmap"}
        Where the float16 training activations live.
    outlier_factor : float
        Activation vectors with a norm above this multiple of the layer's median norm are
        left out of training and metrics.
    sae : dict
        ``JumpReLUTrainingSAEConfig`` fields.
    trainer : dict
        ``SAETrainerConfig`` fields, plus ``epochs``.
    l0b : dict
        ``layers`` and ``sae`` overrides of the second set.
    seed2 : dict
        ``layers`` of the same-layer control: SAEs with the main set's settings and another
        seed (release ``<release>-seed2``). How well two seeds of one layer match is the
        ceiling that adjacent-layer matching is read against.
    """

    name: str
    model: str
    release: str
    hook: str
    layers: Any
    source: str
    seq_len: int
    seed: int
    n_tokens: int
    eval_tokens: int
    forward_batch_size: int
    storage: str
    outlier_factor: float
    sae: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    l0b: dict = field(default_factory=dict)
    seed2: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ZooProfile:
        """Build a profile from a (merged) YAML mapping, checking its keys."""
        data = dict(data)
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"zoo profile {name!r}: unknown keys {sorted(unknown)}")
        missing = known - set(data)
        if missing:
            raise ValueError(f"zoo profile {name!r}: missing keys {sorted(missing)}")
        data["release"] = str(data["release"]).format(profile=name)
        if data["storage"] not in ("memory", "memmap"):
            raise ValueError(f"zoo profile {name!r}: storage must be 'memory' or 'memmap'")
        return cls(name=name, **data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the profile."""
        return {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__}

    def release_of(self, variant: str = "main") -> str:
        """Release name of ``variant`` (``"main"``, ``"l0b"`` or ``"seed2"``)."""
        _check_variant(variant)
        return self.release if variant == "main" else f"{self.release}-{variant}"

    def layers_for(self, n_layers: int) -> list[int]:
        """The main set's layers for a model with ``n_layers`` blocks."""
        layers = list(range(n_layers)) if self.layers == "all" else [int(x) for x in self.layers]
        _check_layers(self.name, "layers", layers, n_layers)
        return layers

    def l0b_layers_for(self, n_layers: int) -> list[int]:
        """The second set's layers (those beyond the model's depth are an error)."""
        layers = [int(x) for x in (self.l0b or {}).get("layers", [])]
        _check_layers(self.name, "l0b.layers", layers, n_layers)
        return layers

    def seed2_layers_for(self, n_layers: int) -> list[int]:
        """Layers of the same-layer control: the main set's SAE retrained with another seed."""
        layers = [int(x) for x in (self.seed2 or {}).get("layers", [])]
        _check_layers(self.name, "seed2.layers", layers, n_layers)
        return layers

    def sae_config(self, variant: str = "main") -> dict[str, Any]:
        """SAE config fields of ``variant``."""
        _check_variant(variant)
        cfg = dict(self.sae)
        if variant == "l0b":
            cfg.update((self.l0b or {}).get("sae", {}))
        return cfg

    def fingerprint(self) -> str:
        """SHA-256 of the profile's settings (the name excluded)."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown zoo variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _check_layers(name: str, key: str, layers: list[int], n_layers: int) -> None:
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"zoo profile {name!r}: {key} {bad} outside the model's 0..{n_layers - 1}")


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _raw_profiles() -> dict[str, dict[str, Any]]:
    """Merged (defaults + entry) raw mappings of the YAML profiles."""
    text = resources.files("featmatch.saes").joinpath("zoo_profiles.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    defaults = data.get("defaults", {})
    return {name: _deep_merge(defaults, over or {}) for name, over in data["profiles"].items()}


_RAW_PROFILES = _raw_profiles()

#: Profiles by name, from ``zoo_profiles.yaml``.
PROFILES: dict[str, ZooProfile] = {
    name: ZooProfile.from_dict(name, raw) for name, raw in _RAW_PROFILES.items()
}


def make_profile(name: str, base: str = "tiny", **overrides: Any) -> ZooProfile:
    """A custom profile: a YAML profile deep-merged with ``overrides`` under a new name.

    Its release becomes ``featmatch-smollm2-{name}`` (unless ``release`` is overridden),
    so it never collides with the shipped profiles. Used by tests and for experiments.

    Parameters
    ----------
    name : str
        New profile name (also the cache folder).
    base : str, default "tiny"
        Profile to start from.
    **overrides
        Top-level keys; dict values are merged into the base's dicts (``sae``, ...).

    Returns
    -------
    ZooProfile
    """
    if base not in _RAW_PROFILES:
        raise ValueError(f"unknown zoo profile {base!r}; known profiles: {', '.join(PROFILES)}")
    return ZooProfile.from_dict(name, _deep_merge(_RAW_PROFILES[base], overrides))


def get_profile(profile: str | ZooProfile) -> ZooProfile:
    """Return a profile by name (or pass a :class:`ZooProfile` through).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    if isinstance(profile, ZooProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown zoo profile {profile!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[profile]


def sae_id(profile: str | ZooProfile, layer: int) -> str:
    """The SAE id of ``layer`` in a profile (its hook name, e.g. ``blocks.5.hook_resid_post``)."""
    return get_profile(profile).hook.format(layer=int(layer))


# --------------------------------------------------------------------------- paths


def zoo_dir(profile: str | ZooProfile, create: bool = True) -> Path:
    """Folder of a profile's zoo, ``cache_dir("zoo", name)``."""
    return cache_dir("zoo", get_profile(profile).name, create=create)


def manifest_path(profile: str | ZooProfile) -> Path:
    """Path of a profile's manifest (it may not exist yet)."""
    return zoo_dir(profile, create=False) / MANIFEST_NAME


def _build_hint(name: str) -> str:
    return f"run `featmatch zoo build --profile {name}`"


def manifest(profile: str | ZooProfile) -> dict[str, Any]:
    """Read a profile's manifest.

    Parameters
    ----------
    profile : str or ZooProfile

    Returns
    -------
    dict
        Config, corpus hash, library versions, per-SAE quality, checksums and timings.

    Raises
    ------
    ValueError
        Unknown profile.
    FileNotFoundError
        The zoo was not built; the message says how to build it.
    """
    prof = get_profile(profile)
    path = manifest_path(prof)
    if not path.is_file():
        raise FileNotFoundError(f"no {prof.name!r} zoo under {path.parent}; {_build_hint(prof.name)}")
    return _read_manifest(path, prof.name)


def _read_manifest(path: Path, name: str) -> dict[str, Any]:
    """Parse a manifest; a truncated or garbled one is a :class:`ZooIntegrityError` naming ``path``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooIntegrityError(
            f"zoo manifest {path} is corrupt (truncated or not JSON: {exc}); {_build_hint(name)} to rebuild it"
        ) from exc
    if not isinstance(data, dict):
        raise ZooIntegrityError(
            f"zoo manifest {path} is not a JSON object; {_build_hint(name)} to rebuild it"
        )
    return data


def verify(profile: str | ZooProfile) -> dict[str, str]:
    """Check every file a profile's manifest records against its SHA-256.

    Reads each recorded file of every built SAE (both variants) and compares it with the
    checksum written at build time (``files`` of each manifest entry).

    Parameters
    ----------
    profile : str or ZooProfile

    Returns
    -------
    dict
        ``{path: problem}`` for each bad file (missing, checksum differs, no checksum
        recorded); empty when everything verifies.

    Raises
    ------
    FileNotFoundError
        The zoo was not built.
    ZooIntegrityError
        The manifest itself is corrupt.
    """
    prof = get_profile(profile)
    man = manifest(prof)
    root = manifest_path(prof).parent
    bad: dict[str, str] = {}
    for entries in (man.get("saes") or {}).values():
        for entry in (entries or {}).values():
            sae_dir = root / str(entry.get("path", ""))
            files = entry.get("files") or {}
            if not files:
                bad[str(sae_dir)] = "no checksums recorded"
            for fname, digest in files.items():
                path = sae_dir / fname
                if not path.is_file():
                    bad[str(path)] = "missing"
                elif sha256_file(path) != digest:
                    bad[str(path)] = "sha256 differs from the manifest (corrupt or replaced)"
    return bad


def _profile_of_release(release: str) -> tuple[str, str]:
    """Map a release name to (profile name, variant), from the profiles or built manifests."""
    for name, prof in PROFILES.items():
        for variant in VARIANTS:
            if prof.release_of(variant) == release:
                return name, variant
    root = cache_dir("zoo", create=False)
    if root.is_dir():
        for man in sorted(root.glob(f"*/{MANIFEST_NAME}")):
            try:
                data = json.loads(man.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            for variant, rel in data.get("releases", {}).items():
                if rel == release:
                    return data["profile"], variant
    known = [p.release_of(v) for p in PROFILES.values() for v in VARIANTS]
    raise ValueError(f"unknown zoo release {release!r}; known releases: {', '.join(known)}")


def _verify_files(sae_dir: Path, files: Mapping[str, str]) -> str | None:
    """Return None when every file exists with its checksum, else a reason."""
    if not files:
        return "no checksums recorded"
    for fname, digest in files.items():
        path = sae_dir / fname
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} does not match its recorded sha256 checksum"
    return None


def sae_path(release: str, sae_id: str) -> Path:
    """Folder of a zoo SAE in SAELens's disk format, after verifying its checksums.

    Parameters
    ----------
    release : str
        E.g. ``"featmatch-smollm2-quick"`` or ``"featmatch-smollm2-quick-l0b"``.
    sae_id : str
        E.g. ``"blocks.5.hook_resid_post"``.

    Returns
    -------
    pathlib.Path
        A folder for ``sae_lens.SAE.load_from_disk``.

    Raises
    ------
    ValueError
        Unknown release, or an id that the release does not hold.
    FileNotFoundError
        The zoo (or that SAE) was not built yet.
    ZooIntegrityError
        A file is missing or corrupted (checksum mismatch).
    """
    name, variant = _profile_of_release(release)
    path = cache_dir("zoo", name, create=False) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"zoo release {release!r} is not built; {_build_hint(name)}")
    man = _read_manifest(path, name)
    entries = man.get("saes", {}).get(variant, {})
    entry = next((e for e in entries.values() if e.get("sae_id") == sae_id), None)
    if entry is None:
        planned = man.get("planned", {}).get(variant, [])
        if sae_id in planned:
            raise FileNotFoundError(
                f"{sae_id!r} of {release!r} is not built yet (interrupted build?); {_build_hint(name)}"
            )
        ids = sorted((e["sae_id"] for e in entries.values()), key=_layer_key)
        raise ValueError(f"zoo release {release!r} has no SAE {sae_id!r}; it holds: {', '.join(ids)}")
    sae_dir = path.parent / entry["path"]
    problem = _verify_files(sae_dir, entry.get("files", {}))
    if problem:
        raise ZooIntegrityError(
            f"zoo SAE {release}:{sae_id} failed verification ({problem}); {_build_hint(name)} to rebuild it"
        )
    return sae_dir


def _layer_key(sid: str) -> tuple[int, str]:
    digits = "".join(ch if ch.isdigit() else " " for ch in sid).split()
    return (int(digits[0]) if digits else -1, sid)


def load_zoo_sae(profile: str | ZooProfile, layer: int, variant: str = "main", device: str = "cpu"):
    """Load one zoo SAE (checksums verified) as a SAELens ``SAE``.

    Parameters
    ----------
    profile : str or ZooProfile
    layer : int
    variant : {"main", "l0b"}
    device : str

    Returns
    -------
    sae_lens.SAE
        With ``featmatch_source`` (``release:sae_id``), from which a Dask worker reloads it.
    """
    prof = get_profile(profile)
    _check_variant(variant)
    return _load_release_sae(f"{prof.release_of(variant)}:{sae_id(prof, layer)}", device=device)


def _load_release_sae(source: str, device: str = "cpu"):
    """Load the zoo SAE ``release:sae_id`` and record that source on it (:mod:`featmatch._dask`)."""
    from sae_lens import SAE

    from featmatch._dask import Source

    release, sid = source.split(":", 1)
    sae = SAE.load_from_disk(sae_path(release, sid), device=device)
    sae.featmatch_source = Source(_load_release_sae, source)
    return sae


def quality_table(profile: str | ZooProfile):
    """The manifest's per-SAE quality as a ``pandas.DataFrame`` (one row per variant/layer)."""
    import pandas as pd

    man = manifest(profile)
    rows = []
    for variant, entries in man.get("saes", {}).items():
        for layer, e in entries.items():
            rows.append(
                {
                    "variant": variant,
                    "layer": int(layer),
                    **e.get("quality", {}),
                    "train_seconds": e.get("train_seconds"),
                }
            )
    return pd.DataFrame(rows).sort_values(["variant", "layer"]).reset_index(drop=True)


# --------------------------------------------------------------------------- activations


#: Seconds between two refreshes of a bar written to a log (not a terminal).
LOG_BAR_INTERVAL = 30.0


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _progress_mode(progress: bool, stdout: Any = None, stderr: Any = None) -> str:
    """How a zoo build shows progress: ``"off"``, ``"terminal"`` or ``"log"``.

    ``"terminal"`` (``progress`` and both ``stdout`` and ``stderr`` are terminals) shows
    every bar, sae-lens's per-SAE "Training SAE" and "Estimating norm scaling factor"
    included. ``"log"`` (``progress``, output redirected to a file, a pipe or a notebook)
    shows one bar per long job (each gathering pass, the loop over SAEs), refreshed at
    most every :data:`LOG_BAR_INTERVAL` seconds, and silences sae-lens's inner bars,
    which would otherwise add two bars per SAE to the log.

    Parameters
    ----------
    progress : bool
        The caller's ``progress`` flag.
    stdout, stderr : file-like, optional
        Default ``sys.stdout`` and ``sys.stderr`` (tqdm writes to the latter).

    Returns
    -------
    str
    """
    import sys

    if not progress:
        return "off"
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    return "terminal" if _is_terminal(out) and _is_terminal(err) else "log"


def _bar_kwargs(mode: str) -> dict[str, Any]:
    """tqdm keyword arguments of featmatch's own bars in progress ``mode``."""
    if mode == "off":
        return {"disable": True}
    if mode == "log":
        return {"mininterval": LOG_BAR_INTERVAL}
    return {}


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool) -> Iterator[None]:
    """Silence the tqdm bars of sae-lens's trainer and scaler while ``quiet``.

    tqdm reads ``TQDM_*`` environment overrides only at import time, so the bar factory
    of those modules is swapped for one with ``disable=True`` and restored afterwards.
    """
    if not quiet:
        yield
        return
    import functools

    from sae_lens.training import activation_scaler, sae_trainer

    mods = [m for m in (sae_trainer, activation_scaler) if hasattr(m, "tqdm")]
    saved = [m.tqdm for m in mods]
    for m, orig in zip(mods, saved, strict=True):
        m.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        for m, orig in zip(mods, saved, strict=True):
            m.tqdm = orig


def _gather(
    model: Any,
    tokens: torch.Tensor,
    layers: list[int],
    hook: str,
    batch_size: int,
    storage: Path | None,
    progress: bool | str,
    desc: str,
) -> torch.Tensor:
    """One forward pass over ``tokens`` gathering the hook of every layer, position 0 dropped.

    Returns a float16 tensor ``(len(layers), n_seq * (seq_len - 1), d_model)``, in memory or
    backed by a memmap file at ``storage``. ``progress`` is a flag or a mode of
    :func:`_progress_mode`.
    """
    mode = progress if isinstance(progress, str) else _progress_mode(progress)
    n_seq, seq_len = tokens.shape
    d = int(model.cfg.d_model)
    n = n_seq * (seq_len - 1)
    shape = (len(layers), n, d)
    if storage is None:
        buf = torch.empty(shape, dtype=torch.float16)
    else:
        storage.parent.mkdir(parents=True, exist_ok=True)
        buf = torch.from_numpy(np.lib.format.open_memmap(storage, mode="w+", dtype=np.float16, shape=shape))
    names = {hook.format(layer=layer): i for i, layer in enumerate(layers)}
    state = {"row": 0}

    def save(act: torch.Tensor, hook: Any) -> None:
        i = names[hook.name]
        a = act[:, 1:, :].reshape(-1, d)
        buf[i, state["row"] : state["row"] + a.shape[0]] = a.to(torch.float16)

    # stop right after the deepest layer; even at n_layers this skips ln_final and the unembedding
    stop_at = max(layers) + 1
    fwd_hooks = [(name, save) for name in names]
    with torch.inference_mode():
        for start in tqdm(range(0, n_seq, batch_size), desc=desc, unit="batch", **_bar_kwargs(mode)):
            batch = tokens[start : start + batch_size]
            model.run_with_hooks(batch, fwd_hooks=fwd_hooks, stop_at_layer=stop_at)
            state["row"] += batch.shape[0] * (seq_len - 1)
    return buf


def _keep_mask(x: torch.Tensor, factor: float, chunk: int = 65536) -> torch.Tensor:
    """Rows of ``x`` that are finite with a norm at most ``factor`` x the median norm."""
    norms = torch.cat([x[s : s + chunk].float().norm(dim=1) for s in range(0, x.shape[0], chunk)])
    finite = torch.isfinite(norms)
    med = norms[finite].median() if finite.any() else torch.tensor(float("inf"))
    return finite & (norms <= factor * med)


def _batches(x: torch.Tensor, keep: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled float32 batches from the kept rows of ``x`` (epoch after epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = keep[torch.randperm(keep.numel(), generator=g)]
        for s in range(0, perm.numel() - batch + 1, batch):
            yield x[perm[s : s + batch]].float()


# --------------------------------------------------------------------------- training


def _train_sae(
    prof: ZooProfile,
    variant: str,
    layer: int,
    x: torch.Tensor,
    keep: torch.Tensor,
    d_model: int,
    seed: int,
):
    """Train one JumpReLU SAE with sae-lens's ``SAETrainer``; returns the inference SAE."""
    from sae_lens import SAE, JumpReLUTrainingSAEConfig, LoggingConfig, SAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    sae_cfg = prof.sae_config(variant)
    trainer_kw = dict(prof.trainer)
    epochs = float(trainer_kw.pop("epochs"))
    n_keep = int(keep.numel())
    batch = min(int(trainer_kw.pop("train_batch_size_samples")), n_keep)
    total = max(batch, int(epochs * n_keep) // batch * batch)
    hook_name = prof.hook.format(layer=layer)
    metadata = SAEMetadata(
        model_name=prof.model,
        hook_name=hook_name,
        hook_head_index=None,
        context_size=prof.seq_len,
        prepend_bos=True,
        seqpos_slice=(1, None),
    )
    theta_min = theta_min_of(sae_cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sae = _theta_min_sae_class()(JumpReLUTrainingSAEConfig(d_in=d_model, metadata=metadata, **sae_cfg))
        sae.theta_min = theta_min
    cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=batch,
        lr_end=trainer_kw.pop("lr_end", None) or trainer_kw.get("lr", 3e-4) / 10,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        save_final_checkpoint=False,
        **trainer_kw,
    )
    # the trainer is torch.no_grad-free and fine under the caller's RNG; fork to stay local
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trainer = _make_trainer(cfg, sae, _batches(x, keep.nonzero().squeeze(1), batch, seed))
        trained = trainer.fit()
    with torch.no_grad():  # the last optimizer step comes after the last projection
        trained.threshold.data.clamp_(min=theta_min)
    trained.cfg.metadata.hook_name = hook_name
    # the inference SAE, built from the trained weights, is what gets saved
    inf_cfg = SAEConfig.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    inference = SAE.get_sae_class_for_architecture(inf_cfg.architecture())(inf_cfg)
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    inference.load_state_dict(state)
    inference.cfg.metadata.featmatch = {
        "release": prof.release_of(variant),
        "profile": prof.name,
        "variant": variant,
        "layer": int(layer),
        "n_train_samples": total,
        "epochs": epochs,
        "train_window_l0": trained.cfg.metadata.l0,
        "train_normalize_activations": str(sae_cfg.get("normalize_activations", "none")),
        "theta_min_train": theta_min,
        "training_revision": TRAINING_REVISION,
    }
    return inference


#: Bumped whenever zoo training changes in a way the profile does not show; part of the
#: zoo fingerprint, so a changed training rebuilds the zoo. Revision 2: θ kept at or above
#: :func:`theta_min_of` during training.
TRAINING_REVISION = 2


def theta_min_of(sae_cfg: Mapping[str, Any]) -> float:
    r"""The smallest JumpReLU threshold the zoo trains with: half the STE bandwidth ε.

    sae-lens 6.x trains θ directly and projects it onto θ ≥ 0 before each step, so Adam can
    leave thresholds at exactly 0 (plain ReLU) or, after the last step, slightly below. SAE
    Match's folding divides by θ, and folded transfer scales a feature by
    :math:`\theta_B/\theta_A`, so such thresholds (the old zoo floored them to 1e-3 *after*
    training) gave transfer scales of 140–700× and decided several verdicts. Projecting onto
    :math:`\theta \ge \varepsilon/2` instead keeps the rectangle kernel of the threshold's
    pseudo-gradient, :math:`[\theta-\varepsilon/2, \theta+\varepsilon/2]`, on non-negative
    pre-activations (where it sees data: ReLU zeroes the rest), and the SAE is trained with
    the constraint rather than edited afterwards. Units are those of the (normalised) training
    pre-activations.
    """
    return 0.5 * float(sae_cfg.get("jumprelu_bandwidth", 0.001))


_THETA_MIN_CLASS: Any = None


def _theta_min_sae_class() -> Any:
    """sae-lens's ``JumpReLUTrainingSAE`` with the threshold projected onto ``θ ≥ theta_min``.

    A subclass because sae-lens hard-codes the projection to ``θ ≥ 0`` in
    ``training_forward_pass``; created on first use to keep sae-lens's import lazy.
    """
    global _THETA_MIN_CLASS
    if _THETA_MIN_CLASS is None:
        from sae_lens import JumpReLUTrainingSAE

        class ThetaMinJumpReLUTrainingSAE(JumpReLUTrainingSAE):  # type: ignore[misc, valid-type]
            theta_min: float = 0.0

            def training_forward_pass(self, step_input: Any) -> Any:
                with torch.no_grad():
                    self.threshold.data.clamp_(min=self.theta_min)
                return super().training_forward_pass(step_input)

        _THETA_MIN_CLASS = ThetaMinJumpReLUTrainingSAE
    return _THETA_MIN_CLASS


def _make_trainer(cfg: Any, sae: Any, data: Iterator[torch.Tensor]) -> Any:
    from sae_lens import SAETrainer

    return SAETrainer(cfg=cfg, sae=sae, data_provider=data)


@torch.no_grad()
def _quality(sae: Any, x: torch.Tensor, keep: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """L0, explained variance and dead fraction of ``sae`` on the kept rows of ``x``."""
    idx = keep.nonzero().squeeze(1)
    n = int(idx.numel())
    d_sae = int(sae.cfg.d_sae)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    l0_sum = 0.0
    sse = 0.0
    sum_x = torch.zeros(x.shape[1], dtype=torch.float64)
    sum_sq = 0.0
    for s in range(0, n, chunk):
        xb = x[idx[s : s + chunk]].float()
        f = sae.encode(xb)
        xh = sae.decode(f)
        active = f > 0
        fired |= active.any(0)
        l0_sum += float(active.sum())
        sse += float(((xb - xh).double() ** 2).sum())
        sum_x += xb.double().sum(0)
        sum_sq += float((xb.double() ** 2).sum())
    total_var = sum_sq - float((sum_x**2).sum()) / max(n, 1)
    return {
        "l0": l0_sum / max(n, 1),
        "explained_variance": 1.0 - sse / total_var if total_var > 0 else float("nan"),
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "n_eval_tokens": n,
    }


THRESHOLD_FLOOR = 1e-3
"""Smallest JumpReLU threshold a zoo SAE is saved with (see :func:`_floor_thresholds`)."""


def _floor_thresholds(sae: Any) -> int:
    """Raise JumpReLU thresholds that training left at or below 0 to :data:`THRESHOLD_FLOOR`.

    A safety net for SAEs saved by zoo builds before training revision 2, whose sae-lens
    training could leave thresholds at 0 or slightly below (70 of 30,720 main-set features of
    the old quick zoo). Such a feature is a plain ReLU feature (sae-lens applies ReLU before
    the threshold mask, so θ ≤ 0 does not let negative pre-activations through), and SAE
    Match's folding (Eq. 4, division by θ) is undefined for it, so featmatch rejects θ ≤ 0
    everywhere. Training now keeps θ ≥ :func:`theta_min_of` (see there), so this raises
    nothing on a current build; the count is recorded in the manifest.

    Returns
    -------
    int
        How many thresholds were raised.
    """
    th = getattr(sae, "threshold", None)
    if th is None:
        return 0
    with torch.no_grad():
        bad = th <= 0
        n = int(bad.sum())
        if n:
            th[bad] = THRESHOLD_FLOOR
    return n


def _floor_saved_sae(sae_dir: Path) -> tuple[int, dict[str, str] | None]:
    """Apply :func:`_floor_thresholds` to an SAE saved by an older build; re-save if changed."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    n = _floor_thresholds(sae)
    return n, (_save_sae(sae, sae_dir) if n else None)


def _save_sae(sae: Any, sae_dir: Path) -> dict[str, str]:
    """Save with ``sae.save_model`` into a staging folder, then move each file atomically."""
    sae_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=sae_dir.parent))
    try:
        sae.save_model(staging)
        for fname in _SAE_FILES:
            src = staging / fname
            atomic_save(sae_dir / fname, lambda tmp, src=src: os.replace(src, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {fname: sha256_file(sae_dir / fname) for fname in _SAE_FILES}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("featmatch", "torch", "sae-lens", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _unknown_model(prof: ZooProfile, exc: Exception) -> ValueError:
    return ValueError(
        f"zoo profile {prof.name!r} names model {prof.model!r}, which featmatch.lm.models cannot load: {exc}"
    )


def _load_model(prof: ZooProfile) -> Any:
    from featmatch.lm import models

    try:
        return models.load_model(prof.model)
    except (KeyError, ValueError) as exc:
        raise _unknown_model(prof, exc) from exc


def _model_shape(source: ZooProfile | Any) -> tuple[int, int]:
    """``(n_layers, d_model)`` of a loaded model, or of a profile's model from the registry."""
    if not isinstance(source, ZooProfile):
        return int(source.cfg.n_layers), int(source.cfg.d_model)
    from featmatch.lm import models

    try:
        spec = models.get_spec(source.model)
    except (KeyError, ValueError) as exc:
        raise _unknown_model(source, exc) from exc
    return int(spec.n_layers), int(spec.d_model)


def _sae_seed(prof: ZooProfile, variant: str, layer: int) -> int:
    return int(prof.seed) * 100_003 + int(layer) * 17 + {"main": 0, "l0b": 7919, "seed2": 104_729}[variant]


def _build_zoo_unlocked(
    profile: str | ZooProfile = "quick",
    force: bool = False,
    progress: bool = True,
    model: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Build (or finish building) a profile's SAE zoo and return its manifest path.

    Parameters
    ----------
    profile : str or ZooProfile, default "quick"
        A profile name from :data:`PROFILES`, or a profile object (tests).
    force : bool, default False
        Retrain every SAE even when a verified one exists.
    progress : bool, default True
        Show tqdm progress bars. On a terminal: the gathering passes, the loop over SAEs
        and sae-lens's bars inside each SAE's training; otherwise (a log, a pipe, a
        notebook) only the first two, refreshed every :data:`LOG_BAR_INTERVAL` seconds
        (see :func:`_progress_mode`).
    model : HookedTransformer, optional
        The model; defaults to ``featmatch.lm.models.load_model(profile.model)``.
    tokenizer : optional
        Defaults to ``model.tokenizer``.

    Returns
    -------
    pathlib.Path
        The manifest (JSON).

    Raises
    ------
    ValueError
        Unknown profile, unknown model, or layers outside the model.
    """
    t_start = time.perf_counter()
    prof = get_profile(profile)
    mode = _progress_mode(progress)
    # the model's shape comes from the registry, so a zoo that verifies needs no weights
    n_layers, d_model = _model_shape(model if model is not None else prof)
    tasks = [("main", layer) for layer in prof.layers_for(n_layers)]
    tasks += [("l0b", layer) for layer in prof.l0b_layers_for(n_layers)]
    tasks += [("seed2", layer) for layer in prof.seed2_layers_for(n_layers)]

    root = zoo_dir(prof)
    man_file = root / MANIFEST_NAME
    corpus_sha = corpus.corpus_hash(prof.source)
    fingerprint = hashlib.sha256(
        f"{prof.fingerprint()}|{corpus_sha}|d_model={d_model}|n_layers={n_layers}|training={TRAINING_REVISION}".encode()
    ).hexdigest()
    old: dict[str, Any] = {}
    if man_file.is_file() and not force:
        try:
            old = json.loads(man_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"unreadable zoo manifest {man_file}; rebuilding every SAE", stacklevel=2)
            old = {}
        if old and old.get("fingerprint") != fingerprint:
            warnings.warn(
                f"zoo {prof.name!r}: the profile, corpus or model changed since the last build; "
                "rebuilding every SAE",
                stacklevel=2,
            )
            old = {}
    man: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "profile": prof.name,
        "releases": {v: prof.release_of(v) for v in VARIANTS},
        "model": prof.model,
        "d_model": d_model,
        "n_layers": n_layers,
        "config": prof.to_dict(),
        "fingerprint": fingerprint,
        "corpus": {"source": prof.source, "hash": corpus_sha, "version": corpus.CORPUS_VERSION},
        "versions": _versions(),
        "planned": {v: [sae_id(prof, layer) for vv, layer in tasks if vv == v] for v in VARIANTS},
        "saes": {v: {} for v in VARIANTS},
        "timings": dict(old.get("timings", {})),
        "complete": False,
    }

    pending: list[tuple[str, int]] = []
    for variant, layer in tasks:
        entry = old.get("saes", {}).get(variant, {}).get(str(layer))
        if entry is not None:
            problem = _verify_files(root / entry["path"], entry.get("files", {}))
            if problem is None:
                if "n_threshold_floored" not in entry:  # built before the floor existed
                    n_floored, files = _floor_saved_sae(root / entry["path"])
                    entry = {**entry, "n_threshold_floored": n_floored}
                    if files is not None:
                        entry["files"] = files
                man["saes"][variant][str(layer)] = entry
                continue
            warnings.warn(
                f"zoo {prof.name!r} {variant} layer {layer}: {problem}; rebuilding it", stacklevel=2
            )
        pending.append((variant, layer))

    if pending:
        if model is None:
            model = _load_model(prof)
            if _model_shape(model) != (n_layers, d_model):
                raise ValueError(
                    f"zoo profile {prof.name!r}: model {prof.model!r} has (n_layers, d_model) = "
                    f"{_model_shape(model)} but the model registry says {(n_layers, d_model)}"
                )
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer; pass tokenizer=... to build_zoo")
        atomic_write_json(man_file, man)
        layers = sorted({layer for _, layer in pending})
        t0 = time.perf_counter()
        train_tokens = corpus.token_batches(
            tokenizer, prof.n_tokens, prof.seq_len, prof.source, "train", prof.seed
        )
        eval_tokens = corpus.token_batches(
            tokenizer, prof.eval_tokens, prof.seq_len, prof.source, "eval", prof.seed
        )
        man["timings"]["tokenize_seconds"] = time.perf_counter() - t0
        storage = root / "activations" / "train.npy" if prof.storage == "memmap" else None
        try:
            t0 = time.perf_counter()
            x_train = _gather(
                model,
                train_tokens,
                layers,
                prof.hook,
                prof.forward_batch_size,
                storage,
                mode,
                "gathering train activations",
            )
            x_eval = _gather(
                model,
                eval_tokens,
                layers,
                prof.hook,
                prof.forward_batch_size,
                None,
                mode,
                "gathering eval activations",
            )
            man["timings"]["gather_seconds"] = time.perf_counter() - t0
            man["timings"]["gather_tokens"] = int(train_tokens.numel() + eval_tokens.numel())
            man["timings"]["gather_layers"] = len(layers)
            row = {layer: i for i, layer in enumerate(layers)}
            bar = tqdm(pending, desc=f"zoo {prof.name}", unit="sae", **_bar_kwargs(mode))
            for variant, layer in bar:
                bar.set_postfix_str(f"{variant} L{layer}")
                xl, xe = x_train[row[layer]], x_eval[row[layer]]
                keep = _keep_mask(xl, prof.outlier_factor)
                keep_eval = _keep_mask(xe, prof.outlier_factor)
                t0 = time.perf_counter()
                with _quiet_tqdm(mode != "terminal"), fitted_threads():  # threads for the free CPUs
                    sae = _train_sae(prof, variant, layer, xl, keep, d_model, _sae_seed(prof, variant, layer))
                train_s = time.perf_counter() - t0
                n_floored = _floor_thresholds(sae)
                t0 = time.perf_counter()
                quality = _quality(sae, xe, keep_eval)
                quality["n_eval_outliers"] = int((~keep_eval).sum())
                eval_s = time.perf_counter() - t0
                sid = sae_id(prof, layer)
                rel = Path(prof.release_of(variant)) / sid
                files = _save_sae(sae, root / rel)
                man["saes"][variant][str(layer)] = {
                    "layer": int(layer),
                    "sae_id": sid,
                    "release": prof.release_of(variant),
                    "path": rel.as_posix(),
                    "files": files,
                    "quality": quality,
                    "n_train_samples": int(sae.cfg.metadata.featmatch["n_train_samples"]),
                    "n_train_outliers": int((~keep).sum()),
                    "train_window_l0": sae.cfg.metadata.featmatch["train_window_l0"],
                    "target_l0": prof.sae_config(variant).get("target_l0"),
                    "d_sae": int(sae.cfg.d_sae),
                    "n_threshold_floored": n_floored,
                    "train_seconds": train_s,
                    "eval_seconds": eval_s,
                }
                atomic_write_json(man_file, man)
        finally:
            if storage is not None:
                shutil.rmtree(storage.parent, ignore_errors=True)
    man["complete"] = True
    if pending:  # a no-op call (everything verified) keeps the timings of the build that trained
        man["timings"]["last_build_seconds"] = time.perf_counter() - t_start
        man["timings"]["last_build_trained"] = len(pending)
    atomic_write_json(man_file, man)
    return man_file


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (one zoo build per profile at a time)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[featmatch] waiting for another build of {path.parent} to finish ...", flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_zoo(
    profile: str | ZooProfile = "quick",
    force: bool = False,
    progress: bool = True,
    model: Any | None = None,
    tokenizer: Any | None = None,
) -> Path:
    prof = get_profile(profile)
    # Two processes (say, two notebooks) building one profile would invalidate each
    # other's manifest; a file lock serialises them, and the second one then finds the
    # finished SAEs and skips them.
    with _build_lock(zoo_dir(prof) / ".build.lock"):
        return _build_zoo_unlocked(prof, force=force, progress=progress, model=model, tokenizer=tokenizer)


build_zoo.__doc__ = _build_zoo_unlocked.__doc__
