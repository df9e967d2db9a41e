"""What the downstream tasks share: config paths, annotation readers, row building and collation
of several rows per example, example filtering with counted reasons, prediction writers.

A task example becomes one or more UNITER *rows* (one text + one image each): NLVR2 makes two per
example (one per image), VCR one per (question, candidate), retrieval one per (text, image)
candidate. :func:`make_row` builds a row, :func:`candidate_rows` expands a prefix over candidates,
:func:`collate_example_rows` flattens the rows of a batch and collates them with
:func:`villa_plugin.datasets.collate.collate_rows`.

Keep this module task-agnostic: task specifics live in ``tasks/<task>/``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.datasets.collate import collate_rows, pad_ids, packed_positions
from villa_plugin.datasets.features import ImgFeatDB

logger = logging.getLogger(__name__)

FEATURE_KEYS = (("conf_th", 0.2), ("max_bb", 100), ("min_bb", 10), ("num_bb", 36))  # img_db settings, defaults
IMG_DB_KEYS = tuple(name for name, _ in FEATURE_KEYS) + ("compressed",)  # every key that names an img_db variant
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------
def as_plain_dict(config: Any) -> Dict[str, Any]:
    """A dataset config (OmegaConf node, dict or None) as a plain, resolved dict."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


def resolve_path(cfg: Mapping[str, Any], path: Any, dataset: str, key: str) -> str:
    """``path`` made absolute against ``cfg['data_dir']`` (``~`` expanded); ConfigError when unset."""
    if not path:
        raise ConfigError(f"dataset_config.{dataset}.{key} is not set")
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.expanduser(str(cfg.get("data_dir") or "")), path)


def split_paths(cfg: Mapping[str, Any], key: str, split: str, dataset: str) -> List[str]:
    """The resolved list ``cfg[key][split]`` (a string is a one-item list; missing is empty)."""
    per_split = cfg.get(key) or {}
    if not isinstance(per_split, Mapping):
        raise ConfigError(f"dataset_config.{dataset}.{key} must map each split to a list of paths, got {per_split!r}")
    value = per_split.get(split) or []
    value = [value] if isinstance(value, str) else list(value)
    return [resolve_path(cfg, p, dataset, f"{key}.{split}") for p in value]


def check_split(split: str, dataset: str, splits: Sequence[str] = SPLITS) -> None:
    if split not in splits:
        raise ConfigError(f'{dataset} has splits {", ".join(splits)}; got "{split}"')


def open_img_db(path: str, cfg: Mapping[str, Any], prefix: str = "") -> ImgFeatDB:
    """An :class:`ImgFeatDB` with the feature settings ``{prefix}conf_th`` / ``max_bb`` / ``min_bb`` /
    ``num_bb`` / ``compressed`` of ``cfg`` (a prefix such as ``gt_`` selects a second store's keys;
    missing prefixed keys fall back to the plain ones)."""
    def get(name: str, default: Any) -> Any:
        value = cfg.get(prefix + name) if prefix else None
        return cfg.get(name, default) if value is None else value

    settings = {name: get(name, default) for name, default in FEATURE_KEYS}
    return ImgFeatDB(path, compressed=bool(get("compressed", False)), **settings)


def img_db_settings(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The :data:`IMG_DB_KEYS` entries of ``values`` (e.g. a demo's paths), as ``ImgFeatDB`` / ``write_img_db`` kwargs."""
    return {key: values[key] for key in IMG_DB_KEYS}


def choice(cfg: Mapping[str, Any], key: str, allowed: Sequence[str], dataset: str, default: str) -> str:
    """``cfg[key]`` checked against ``allowed`` (ConfigError naming the key otherwise)."""
    value = cfg.get(key, default)
    if value not in allowed:
        raise ConfigError(f"dataset_config.{dataset}.{key} must be one of {list(allowed)}, got {value!r}")
    return str(value)


# ----------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------
def read_json(path: str, hint: str = "") -> Any:
    """A JSON file, or DataError naming it (missing or invalid) and ``hint``."""
    if not os.path.isfile(path):
        raise DataError(f"File not found: {path}.{(' ' + hint) if hint else ''}")
    with open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err


def read_lxmert_records(path: str, required: Tuple[str, ...], what: str, hint: str) -> List[Dict[str, Any]]:
    """A JSON list of LXMERT ``what`` records, each checked for ``required``; DataError naming file and record."""
    items = read_json(path, hint)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of LXMERT {what} records ({list(required)}, label). {hint}")
    for n, item in enumerate(items):
        missing = [f for f in required if not isinstance(item, dict) or f not in item]
        if missing:
            raise DataError(f"{path}, record {n}: a {what} record needs {missing}. {hint}")
    return items


def read_jsonl(path: str, hint: str = "") -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line_number, object)`` for each non-empty line of a JSON-lines file (NLVR2, SNLI-VE, VCR).

    A missing file or a bad line is a DataError naming the file, the line and ``hint``.
    """
    if not os.path.isfile(path):
        raise DataError(f"File not found: {path}.{(' ' + hint) if hint else ''}")
    with open(path, "r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err}). Is it a JSON-lines file?") from err
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def require_fields(obj: Mapping[str, Any], fields: Sequence[str], where: str, hint: str = "") -> None:
    """DataError naming ``where`` when ``obj`` lacks any of ``fields``."""
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}.{(' ' + hint) if hint else ''}")


def check_label(label: Any, num_labels: int, where: str, fix: str = "") -> int:
    """``label`` as an int in ``[0, num_labels)``; DataError naming ``where`` otherwise."""
    if isinstance(label, bool) or not isinstance(label, (int,)) or not 0 <= label < num_labels:
        raise DataError(
            f"{where}: label {label!r} is outside the head's range [0, {num_labels})."
            f"{(' ' + fix) if fix else ''}"
        )
    return int(label)


# ----------------------------------------------------------------------------------------------
# Filtering with counted reasons
# ----------------------------------------------------------------------------------------------
class ExampleFilter:
    """Counts examples kept, dropped (by reason) and over the text limit, and logs one summary.

    - ``over_limit(length)``: training drops texts longer than ``max_txt_len`` (the reference's
      filter); evaluation (``max_txt_len < 0`` or ``training=False``) keeps them. Both are counted
      (``num_over_limit``); returns True when the example must be dropped.
    - ``drop(reason, detail)``: count a dropped example (e.g. ``missing_image``), remember a few details.
    """

    def __init__(self, dataset: str, split: str, max_txt_len: int = -1, training: bool = True):
        self.dataset, self.split = dataset, split
        self.max_txt_len = int(max_txt_len) if max_txt_len is not None else -1
        self.training = bool(training)
        self.dropped: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}
        self.num_over_limit = 0

    def over_limit(self, length: int) -> bool:
        if self.max_txt_len < 0 or length <= self.max_txt_len:
            return False
        self.num_over_limit += 1
        if self.training:
            self.drop("text_over_max_txt_len", None)
            return True
        return False

    def drop(self, reason: str, detail: Optional[str]) -> None:
        self.dropped[reason] += 1
        if detail is not None and len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(detail)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def log(self, kept: int) -> None:
        """One INFO line (WARNING when something other than the length filter dropped examples)."""
        parts = [f"{self.dataset} {self.split}: {kept} examples kept"]
        for reason, n in sorted(self.dropped.items()):
            shown = f" (e.g. {', '.join(self.examples[reason])})" if self.examples.get(reason) else ""
            parts.append(f"{n} dropped: {reason}{shown}")
        if self.num_over_limit and not self.training:
            parts.append(f"{self.num_over_limit} longer than max_txt_len={self.max_txt_len} kept (evaluation)")
        level = logging.WARNING if set(self.dropped) - {"text_over_max_txt_len"} else logging.INFO
        logger.log(level, "; ".join(parts))


def locate_image(img_dbs: Sequence[ImgFeatDB], key: str) -> Optional[int]:
    """Index of the first db holding ``key`` with at least one box, or None when none holds it.

    A db that holds it with zero boxes raises DataError (ImgFeatDB's zero-box check) unless another
    db has it.
    """
    empty_error = None
    for index, db in enumerate(img_dbs):
        if key in db:
            try:
                db.nbb(key)
            except DataError as err:
                empty_error = err
                continue
            return index
    if empty_error is not None:
        raise empty_error
    return None


def check_image(img_dbs: Sequence[ImgFeatDB], key: str, where: str, filt: ExampleFilter, policy: str) -> Optional[int]:
    """The db index holding image ``key`` of example ``where``; ``policy`` ``error`` raises a
    DataError naming both, ``skip`` counts the example in ``filt`` (reasons ``missing_image`` /
    ``image_without_boxes``) and returns None."""
    try:
        index = locate_image(img_dbs, key)
    except DataError as err:
        if policy == "skip":
            filt.drop("image_without_boxes", f"{where}: {key}")
            return None
        raise DataError(f"{where}: {err} Or set missing_images=skip to drop such examples (counted, logged).") from err
    if index is None:
        if policy == "skip":
            filt.drop("missing_image", f"{where}: {key}")
            return None
        raise DataError(
            f'{where}: image "{key}" is in none of the img_dbs {[db.db_path for db in img_dbs]}. Pair the '
            f"annotations with the image db of the same split (and check the image key format), or set "
            f"missing_images=skip to drop such examples (counted, logged)."
        )
    return index


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def make_row(
    cls_id: int,
    sep_id: int,
    segments: Sequence[Sequence[int]],
    img_feat: torch.Tensor,
    img_pos_feat: torch.Tensor,
    segment_types: Optional[Sequence[int]] = None,
    img_type: Optional[int] = None,
    row_id: Any = None,
) -> Dict[str, Any]:
    """One UNITER row: ``[CLS] seg_1 [SEP] seg_2 [SEP] ...`` with the image's regions.

    ``segment_types`` (one per segment) adds ``txt_type_ids``: [CLS] takes the first segment's type,
    each segment's tokens its own, and each [SEP] the type of the segment *after* it (the last
    [SEP] the last segment's), which is UNITER's VCR layout (``[CLS] q [SEP] a [SEP]`` -> types
    0, q:0, 2, a:2, 2). ``img_type`` adds ``img_type_ids`` (NLVR2's 1 / 2).
    """
    input_ids = [int(cls_id)]
    for segment in segments:
        input_ids.extend(int(t) for t in segment)
        input_ids.append(int(sep_id))
    row: Dict[str, Any] = {"id": row_id, "input_ids": input_ids, "img_feat": img_feat, "img_pos_feat": img_pos_feat}
    if segment_types is not None:
        if len(segment_types) != len(segments):
            raise ValueError(f"{len(segments)} segments but {len(segment_types)} segment types")
        types = [int(segment_types[0])]
        for i, segment in enumerate(segments):
            types.extend([int(segment_types[i])] * len(segment))
            types.append(int(segment_types[min(i + 1, len(segments) - 1)]))
        row["txt_type_ids"] = types
    if img_type is not None:
        row["img_type_ids"] = [int(img_type)] * int(img_feat.size(0))
    return row


def candidate_rows(
    cls_id: int,
    sep_id: int,
    prefix: Sequence[Sequence[int]],
    prefix_types: Optional[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    candidate_type: Optional[int],
    img_feat: torch.Tensor,
    img_pos_feat: torch.Tensor,
    row_id: Any = None,
) -> List[Dict[str, Any]]:
    """One row per text candidate: ``[CLS] prefix... [SEP] candidate [SEP]`` (VCR answers/rationales)."""
    types = None if prefix_types is None else list(prefix_types) + [candidate_type]
    return [
        make_row(cls_id, sep_id, [*prefix, cand], img_feat, img_pos_feat, types, row_id=row_id)
        for cand in candidates
    ]


def collate_example_rows(examples: Sequence[Mapping[str, Any]], rows_key: str = "rows") -> Dict[str, Any]:
    """Flatten ``example[rows_key]`` (a list of rows) over the batch and collate them.

    Returns :func:`collate_rows`'s fields for all rows (example order, then row order) plus
    ``img_type_ids [rows, max_nbb]`` (0-padded) when every row has it, ``rows_per_example`` (list)
    and ``row_example_index`` (LongTensor [rows]: the example each row belongs to).
    """
    if not examples:
        raise DataError("collate got an empty list of examples")
    rows: List[Mapping[str, Any]] = []
    owner: List[int] = []
    for i, example in enumerate(examples):
        example_rows = example[rows_key]
        if not example_rows:
            raise DataError(f"Example {example.get('id', i)} has no rows to collate")
        rows.extend(example_rows)
        owner.extend([i] * len(example_rows))
    batch = collate_rows(list(rows))
    if all("img_type_ids" in r for r in rows):
        batch["img_type_ids"] = pad_ids([r["img_type_ids"] for r in rows])
    batch["rows_per_example"] = [len(e[rows_key]) for e in examples]
    batch["row_example_index"] = torch.as_tensor(owner, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------
# Prediction writers
# ----------------------------------------------------------------------------------------------
def with_extension(path: str, extension: str) -> str:
    """``path`` with a default ``.json`` suffix swapped for ``extension`` (other names kept)."""
    root, ext = os.path.splitext(path)
    return root + extension if ext == ".json" and extension != ".json" else path


def _atomic_write(path: str, write) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".predictions-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(obj: Any, path: str) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + rename); returns ``path``."""
    return _atomic_write(path, lambda fh: json.dump(obj, fh))


def write_csv_atomic(header: Optional[Sequence[str]], rows: Sequence[Sequence[Any]], path: str) -> str:
    """Write CSV ``rows`` (after ``header`` unless None) to ``path`` atomically; returns ``path``."""
    def write(fh):
        writer = csv.writer(fh, lineterminator="\n")
        if header is not None:
            writer.writerow(list(header))
        writer.writerows([list(r) for r in rows])

    return _atomic_write(path, write)


def unique_by(records: Sequence[Mapping[str, Any]], key: str) -> List[Mapping[str, Any]]:
    """Records with the first occurrence of each ``record[key]`` (distributed gathers may repeat)."""
    seen, out = set(), []
    for record in records:
        if record[key] not in seen:
            seen.add(record[key])
            out.append(record)
    return out


__all__ = [
    "as_plain_dict",
    "resolve_path",
    "split_paths",
    "check_split",
    "open_img_db",
    "img_db_settings",
    "IMG_DB_KEYS",
    "FEATURE_KEYS",
    "choice",
    "read_json",
    "read_jsonl",
    "require_fields",
    "check_label",
    "ExampleFilter",
    "locate_image",
    "check_image",
    "make_row",
    "candidate_rows",
    "collate_example_rows",
    "with_extension",
    "write_json_atomic",
    "write_csv_atomic",
    "unique_by",
]


# ----------------------------------------------------------------------------------------------
# Rows assembled on the device (candidate rows picked from per-batch banks of texts and images)
# ----------------------------------------------------------------------------------------------
def packed_layout(txt_lens: torch.Tensor, num_bbs: torch.Tensor, max_txt_len: int, max_bb: int):
    """Vectorised :func:`villa_plugin.datasets.collate.build_gather_index` on tensors, no host sync.

    Rows have their text padded to ``max_txt_len`` and their regions to ``max_bb`` (e.g. rows gathered
    from a bank by index). Returns ``(gather_index, attn_masks)``, LongTensors ``[R, max_txt_len +
    max_bb]`` on ``txt_lens``' device: row r takes text token p for p < tl_r, region p - tl_r (index
    ``max_txt_len + p - tl_r``) for tl_r <= p < tl_r + nbb_r, and the identity index after (masked).
    The width is not trimmed to ``max(tl + nbb)``: the extra positions are masked, so the outputs at
    the real positions are the same as with :func:`build_gather_index`.
    """
    return packed_positions(txt_lens, num_bbs, max_txt_len, int(max_txt_len) + int(max_bb))


__all__ += ["packed_layout"]
