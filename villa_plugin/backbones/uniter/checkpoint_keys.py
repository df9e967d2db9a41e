"""Load official UNITER/VILLA and MMF-UNITER weights into the plugin's models; export safetensors.

Every variant of uniter-architecture.md §5/§7 loads without conversion:

- wrappers ``{"model_state": ...}`` (UNITER ``ModelSaver``), ``{"model": ...}`` (MMF ``.ckpt``),
  ``{"state_dict": ...}``; a DDP ``module.`` prefix;
- TF-style LayerNorm names ``gamma`` / ``beta`` -> ``weight`` / ``bias``;
- ``bert.`` keys (the VILLA scripts' substring rename ``'bert' -> 'uniter'``), bare trunk keys
  (``embeddings.*`` without ``uniter.``);
- fp16 tensors (apex O2 fine-tuned files), cast to the parameter dtype;
- MMF's layout (``uniter.uniter.text_embeddings.*``, ``img_embeddings.final_layer_norm``,
  ``heads.<task>.classifier.{1.dense,1.LayerNorm,2}``), detected by prefix.

The load is non-strict like the reference: missing and unexpected keys are logged and returned
**by name** in a :class:`LoadReport`. A shape mismatch is a :class:`CheckpointError` naming the
file, the key and both shapes; a file none of whose keys fit the model is an error too (MMF's
``strict=False`` silently leaves such models random).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import struct
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from villa_plugin.common.errors import CheckpointError

logger = logging.getLogger(__name__)

TRUNK_PARTS = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")
WRAPPER_KEYS = ("model_state", "model", "state_dict")
HF_BUFFERS = ("position_ids", "token_type_ids")
# MMF MLP head -> official Sequential indices (classifier.0 is a parameter-free Dropout)
MMF_HEAD_MAP = (("classifier.1.dense.", "0."), ("classifier.1.LayerNorm.", "2."), ("classifier.2.", "3."))

StateDict = Dict[str, torch.Tensor]


@dataclasses.dataclass
class LoadReport:
    """What a load did. Key lists use the model's names (``unexpected``: names after mapping)."""

    source: str
    layout: str  # "official" | "mmf"
    loaded: List[str] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    unexpected: List[str] = dataclasses.field(default_factory=list)
    ignored: List[str] = dataclasses.field(default_factory=list)  # dropped on purpose, by file name
    renamed: Dict[str, str] = dataclasses.field(default_factory=dict)  # file key -> model key
    cast: List[str] = dataclasses.field(default_factory=list)  # keys whose dtype was converted
    notes: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source} ({self.layout} layout): {len(self.loaded)} loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored, {len(self.cast)} cast"
        )


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    try:  # safetensors: little-endian u64 header size, then a JSON header starting with "{"
        with open(path, "rb") as handle:
            head = handle.read(9)
        return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)
    except OSError:
        return False


def read_checkpoint_file(path: str) -> Any:
    """Raw contents of a ``.pt``/``.pth``/``.ckpt`` file (``torch.load(weights_only=True)``, on the CPU)
    or of a ``.safetensors`` file (recognised by extension or header)."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint file not found: {path}. Check model_config.<model>.pretrained_checkpoint (or the path "
            f"you passed); official files are uniter-base.pt, villa-base.pt, ... from VILLA's download_pretrained.sh."
        )
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"Cannot read safetensors file {path}: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors and plain containers, so it cannot be loaded "
            f"safely (weights_only=True). MMF .ckpt files pickle their OmegaConf config: load the file once in "
            f"a trusted environment and save only its 'model' state dict, e.g. "
            f"torch.save(torch.load(p, weights_only=False)['model'], 'weights.pth'). Details: {err}"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"Cannot read checkpoint {path} (corrupt or not a torch file?): {err}") from err


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> Dict[str, Any]:
    """The state dict inside ``obj``: follows ``model_state`` / ``model`` / ``state_dict`` wrappers."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{source} holds no state dict of tensors (top-level: {keys}). Expected a state dict, or one "
            f"wrapped under one of {list(WRAPPER_KEYS)}."
        )
    return dict(obj)


# ----------------------------------------------------------------------------------------------
# Key normalisation
# ----------------------------------------------------------------------------------------------
def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _rename_tf_layernorm(key: str) -> str:
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def _apply_prefix_mapping(key: str, mapping: Optional[Mapping[str, str]]) -> str:
    """Longest matching ``{prefix in file: prefix in model}`` entry wins."""
    if not mapping:
        return key
    matches = [p for p in mapping if key.startswith(p)]
    if not matches:
        return key
    prefix = max(matches, key=len)
    return mapping[prefix] + key[len(prefix):]


def _mmf_prefix(keys) -> Optional[str]:
    """``uniter.uniter.`` (MMF BaseModel state) or ``uniter.`` (UNITERForClassification state), else None."""
    for prefix in ("uniter.uniter.", "uniter.", ""):
        if any(k.startswith(prefix + "text_embeddings.") for k in keys):
            return prefix
    return None


def _map_mmf_trunk_key(rest: str) -> Optional[str]:
    """Official ``uniter.*`` name for an MMF trunk key (after its prefix); None if not a trunk key."""
    if rest.startswith("text_embeddings."):
        return "uniter.embeddings." + rest[len("text_embeddings."):]
    if rest.startswith("img_embeddings.final_layer_norm."):
        return "uniter.img_embeddings.LayerNorm." + rest[len("img_embeddings.final_layer_norm."):]
    if rest.startswith(("img_embeddings.", "encoder.", "pooler.")):
        return "uniter." + rest
    return None


def normalize_state_dict(
    state: Mapping[str, Any],
    model_keys,
    *,
    mapping: Optional[Mapping[str, str]] = None,
    head_module: str = "vqa_output",
    mmf_head: Optional[str] = None,
    use_mmf_head_pooler: bool = False,
) -> Tuple[StateDict, LoadReport]:
    """Rename the keys of ``state`` to the model's names (see the module docstring).

    ``model_keys`` are the target model's state-dict keys (decides ``uniter.`` vs bare trunk names
    and whether the ``bert`` rename applies). ``mapping``: extra ``{prefix in file: prefix in model}``
    applied after the ``module.`` strip. MMF options: ``mmf_head`` picks the ``heads.<task>`` to map
    onto ``head_module`` (default: the only one present); ``use_mmf_head_pooler`` loads the MMF
    head's own pooler into ``uniter.pooler`` instead of the (unused in MMF) trunk pooler.
    Returns the renamed tensors and a report with ``layout``, ``renamed``, ``ignored`` and ``notes``.
    """
    model_keys = set(model_keys)
    report = LoadReport(source="", layout="official")
    # original key -> staged key (DDP prefix, user mapping, TF LayerNorm names)
    staged_names = {key: _rename_tf_layernorm(_apply_prefix_mapping(_strip_module(key), mapping)) for key in state}
    staged = {staged_names[key]: state[key] for key in state}

    prefix = _mmf_prefix(staged)
    if prefix is not None:
        report.layout = "mmf"
        final_names = _map_mmf_keys(staged, prefix, head_module, mmf_head, use_mmf_head_pooler, report)
    else:
        final_names = _map_official_keys(staged, model_keys, report)

    # Canonical names are ``uniter.<part>``; a bare UniterModel has no ``uniter.`` prefix.
    strip_trunk_prefix = not any(k.startswith("uniter.") for k in model_keys)
    out: StateDict = {}
    for original, staged_key in staged_names.items():
        if staged_key not in final_names:  # dropped on purpose (listed in report.ignored)
            continue
        new = final_names[staged_key]
        if strip_trunk_prefix and new.startswith("uniter.") and new[len("uniter."):].startswith(TRUNK_PARTS):
            new = new[len("uniter."):]
        if new in out:
            raise CheckpointError(f"Two checkpoint keys map to the model key '{new}' (one of them is '{original}').")
        out[new] = state[original]
        if new != original:
            report.renamed[original] = new
    return out, report


def _map_official_keys(staged: Mapping[str, Any], model_keys, report: LoadReport) -> Dict[str, str]:
    """staged key -> model key for the official layout (``bert`` rename, bare trunk keys)."""
    bert_rename = not any("bert" in k for k in model_keys) and any("bert" in k for k in staged)
    if bert_rename:
        report.notes.append("renamed 'bert' -> 'uniter' in key names (as the VILLA fine-tuning scripts do)")
    result = {}
    for key in staged:
        new = key.replace("bert", "uniter") if bert_rename else key
        if new.startswith(TRUNK_PARTS):
            new = "uniter." + new
        result[key] = new
    return result


def _map_mmf_keys(staged, prefix, head_module, mmf_head, use_mmf_head_pooler, report) -> Dict[str, str]:
    """staged key -> model key for MMF's layout; dropped keys go to ``report.ignored``."""
    heads_prefix = prefix[: -len("uniter.")] + "heads." if prefix else "heads."
    tasks = sorted({k[len(heads_prefix):].split(".", 1)[0] for k in staged if k.startswith(heads_prefix)})
    if mmf_head is None and len(tasks) == 1:
        mmf_head = tasks[0]
    if tasks and mmf_head not in tasks:
        report.notes.append(
            f"MMF heads {tasks} present but none selected (pass mmf_head=<task>); their keys are unexpected"
        )
    if use_mmf_head_pooler and not any(k.startswith(f"{heads_prefix}{mmf_head}.pooler.") for k in staged):
        report.notes.append("use_mmf_head_pooler: the file has no MMF head pooler; the trunk pooler is loaded")
        use_mmf_head_pooler = False
    result = {}
    for key in staged:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("text_embeddings.") and rest.rsplit(".", 1)[-1] in HF_BUFFERS:
                report.ignored.append(key)  # HF BertEmbeddings buffer, not a weight
                continue
            if rest.startswith("pooler.") and use_mmf_head_pooler:
                report.ignored.append(key)
                continue
            mapped = _map_mmf_trunk_key(rest)
            if mapped is not None:
                result[key] = mapped
                continue
        if mmf_head is not None and key.startswith(f"{heads_prefix}{mmf_head}."):
            rest = key[len(f"{heads_prefix}{mmf_head}."):]
            if rest.startswith("pooler."):
                if use_mmf_head_pooler:
                    result[key] = "uniter." + rest
                else:
                    report.ignored.append(key)
                continue
            for mmf_part, index in MMF_HEAD_MAP:
                if rest.startswith(mmf_part):
                    result[key] = f"{head_module}.{index}{rest[len(mmf_part):]}"
                    break
            else:
                result[key] = key
            continue
        result[key] = key
    if any(k.startswith(f"{heads_prefix}{mmf_head}.pooler.") for k in report.ignored):
        report.notes.append(
            f"MMF head '{mmf_head}' has its own pooler (ignored; the official head reuses uniter.pooler). "
            f"Pass use_mmf_head_pooler=True to load it as uniter.pooler, which reproduces an MMF-fine-tuned head."
        )
    report.notes.append(
        "MMF layout: MMF's head also has dropout 0.1 and LayerNorm eps 1e-6 and its image embeddings dropout 0; "
        "this model uses the official head (no dropout, eps 1e-12)"
    )
    return result


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / ShardedDDP-style ``.module`` wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def load_uniter_checkpoint(
    model: nn.Module,
    path_or_state: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    mapping: Optional[Mapping[str, str]] = None,
    head_module: Optional[str] = None,
    mmf_head: Optional[str] = None,
    use_mmf_head_pooler: bool = False,
    source: Optional[str] = None,
) -> LoadReport:
    """Load official UNITER/VILLA, MMF-UNITER or exported safetensors weights into ``model`` (non-strict).

    ``path_or_state``: a file path or an in-memory (possibly wrapped) state dict. ``head_module``
    defaults to ``model.head_module_name`` (``vqa_output`` otherwise). Tensors are cast to the
    dtype of the model's tensors. Returns a :class:`LoadReport`; missing / unexpected keys are also
    logged by name. Raises :class:`CheckpointError` on a missing/unreadable file, any shape mismatch,
    or a file of which no key fits the model.
    """
    head_module = head_module or getattr(_unwrap_model(model), "head_module_name", None) or "vqa_output"

    def rename(state: StateDict, model_keys: Iterable[str], src: str) -> Tuple[StateDict, LoadReport]:
        return normalize_state_dict(state, model_keys, mapping=mapping, head_module=head_module,
                                    mmf_head=mmf_head, use_mmf_head_pooler=use_mmf_head_pooler)

    return load_mapped_checkpoint(
        model, path_or_state, rename, source=source, model_name="model",
        fit_hint=("Check uniter_config (base vs large), img_dim (img_linear's input width) and num_labels; NLVR2/VCR "
                  "must grow their embeddings (grow_type_embeddings / grow_word_embeddings) before loading "
                  "fine-tuned or 2nd-stage checkpoints."),
        no_match_hint=("Pass a prefix mapping (checkpoint.pretrained_state_mapping / mapping=) if the file uses "
                       "other names."),
    )


def load_mapped_checkpoint(
    model: nn.Module,
    path_or_state: Union[str, os.PathLike, Mapping[str, Any]],
    rename: Callable[[StateDict, Iterable[str], str], Tuple[StateDict, LoadReport]],
    *,
    source: Optional[str],
    model_name: str,
    fit_hint: str,
    no_match_hint: str = "",
) -> LoadReport:
    """A backbone's non-strict, shape-checked load: read the file (or take the state dict), name its
    keys with ``rename(state, model_keys, source) -> (renamed, report)``, cast dtypes to the model's,
    load, log and return the report. A shape mismatch is a :class:`CheckpointError` naming our key,
    the file's key and both shapes (``fit_hint`` says what to check); so is a file none of whose keys
    fits (``no_match_hint``). Shared by UNITER and LXMERT (``model_name`` names the model in errors)."""
    model = _unwrap_model(model)
    if isinstance(path_or_state, (str, os.PathLike)):
        source = source or str(path_or_state)
        raw = read_checkpoint_file(str(path_or_state))
    else:
        source = source or "<state dict>"
        raw = path_or_state
    state = unwrap_state_dict(raw, source)
    model_state = model.state_dict()
    renamed, report = rename(state, model_state.keys(), source)
    report.source = source
    original_of = {new: old for old, new in report.renamed.items()}
    to_load: StateDict = {}
    mismatches = []
    for key, value in renamed.items():
        if not isinstance(value, torch.Tensor):
            report.ignored.append(key)
            continue
        if key not in model_state:
            report.unexpected.append(key)
            continue
        target = model_state[key]
        if tuple(value.shape) != tuple(target.shape):
            where = f"'{key}'" + (f" (file key '{original_of[key]}')" if key in original_of else "")
            mismatches.append(f"{where}: checkpoint {list(value.shape)} vs model {list(target.shape)}")
            continue
        if value.dtype != target.dtype:
            value = value.to(target.dtype)
            report.cast.append(key)
        to_load[key] = value
    if mismatches:
        raise CheckpointError(
            f"Checkpoint {source} ({report.layout} layout) does not fit the {model_name}: shape mismatch for "
            f"{'; '.join(mismatches)}. {fit_hint}"
        )
    if not to_load:
        raise CheckpointError(
            f"No key of checkpoint {source} matches the {model_name} ({report.layout} layout assumed); nothing was "
            f"loaded. First file keys: {list(state)[:5]}; first model keys: {list(model_state)[:5]}. {no_match_hint}".rstrip()
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in model_state if k not in to_load]
    _log_report(report)
    return report


def _log_report(report: LoadReport) -> None:
    logger.info("Loaded %s", report.summary())
    if report.missing:
        logger.warning("Keys missing from %s (left at their initial values): %s", report.source, report.missing)
    if report.unexpected:
        logger.warning("Unexpected keys in %s (not used): %s", report.source, report.unexpected)
    if report.ignored:
        logger.info("Ignored keys of %s: %s", report.source, report.ignored)
    for note in report.notes:
        logger.info("%s: %s", report.source, note)


# ----------------------------------------------------------------------------------------------
# safetensors export
# ----------------------------------------------------------------------------------------------
def export_safetensors(
    model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None
) -> str:
    """Write ``model``'s state dict (official key names) to a ``.safetensors`` file, atomically.

    Returns the path written. Load it back with :func:`load_uniter_checkpoint` or :func:`load_safetensors`.
    """
    from safetensors.torch import save_file

    model = _unwrap_model(model)
    path = os.path.expanduser(str(path))
    tensors: StateDict = {}
    seen = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ptr in seen:  # safetensors refuses shared storage (tied weights)
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[key] = tensor
    meta = {"format": "pt", "producer": "villa_plugin", "layout": "uniter-official"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_safetensors(path: Union[str, os.PathLike]) -> StateDict:
    """The tensors of a ``.safetensors`` file, on the CPU."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors file not found: {path}")
    return unwrap_state_dict(read_checkpoint_file(path), path)


__all__ = [
    "LoadReport",
    "read_checkpoint_file",
    "unwrap_state_dict",
    "normalize_state_dict",
    "load_uniter_checkpoint",
    "export_safetensors",
    "load_safetensors",
]
