"""WordPiece tokenisation from a local vocab.txt and UNITER's ``txt_db`` (data-formats.md §3).

A txt_db directory holds an LMDB (values ``lz4.frame(msgpack(example))`` keyed by example id) and
the side files ``meta.json``, ``id2len.json``, ``txt2img.json``, ``img2txts.json``. Stored
``input_ids`` carry no [CLS]/[SEP]; datasets add them with :meth:`TxtDB.combine_inputs`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import lz4.frame
import msgpack

from villa_plugin.common.errors import DataError
from villa_plugin.datasets.lmdb_utils import LazyLmdb, write_lmdb

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[UNK]")


class WordPieceTokenizer:
    """UNITER's ``bert_tokenize`` on top of ``tokenizers.BertWordPieceTokenizer`` (no downloads).

    Text is split on whitespace and punctuation, optionally lower-cased (and accent-stripped, as BERT
    uncased does), and WordPiece-tokenised; words that yield no pieces (e.g. only control
    characters) are dropped; unknown words become [UNK]. ``encode`` adds no special tokens.
    """

    def __init__(self, vocab_path: str, lowercase: bool):
        from tokenizers import BertWordPieceTokenizer

        self.vocab_path = str(vocab_path)
        self.lowercase = bool(lowercase)
        if not os.path.isfile(self.vocab_path):
            raise DataError(
                f"WordPiece vocabulary not found: {self.vocab_path}. Point the dataset's `vocab` key at a "
                f"local BERT vocab.txt (UNITER uses bert-base-cased with lowercase=false; nothing is "
                f"downloaded)."
            )
        try:
            with open(self.vocab_path, "r", encoding="utf-8") as fh:
                tokens = {line.rstrip("\n") for line in fh}
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"Cannot read vocabulary {self.vocab_path}: {err}") from err
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise DataError(f"Vocabulary {self.vocab_path} lacks the special tokens {missing}; it is not a BERT vocab.txt")
        self._tok = BertWordPieceTokenizer(self.vocab_path, lowercase=self.lowercase)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without [CLS]/[SEP]."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> List[str]:
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def meta(self, name: str) -> Dict[str, Any]:
        """txt_db ``meta.json`` content for this tokenizer; ``name`` goes under ``'bert'``."""
        bang = self.token_to_id("!")
        return {
            "bert": name,
            "lowercase": self.lowercase,
            "UNK": self.token_to_id("[UNK]"),
            "CLS": self.token_to_id("[CLS]"),
            "SEP": self.token_to_id("[SEP]"),
            "MASK": self.token_to_id("[MASK]"),
            "v_range": [bang if bang is not None else 0, self.vocab_size],
        }


def _read_json(path: str, what: str, hint: str = "") -> Any:
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}.{(' ' + hint) if hint else ''}")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:
        raise DataError(f"{what} {path} is not valid JSON: {err}") from err


TXT_DB_HINT = ("Download UNITER's txt_db (download_vqa.sh etc.) or build one from VQA JSON with "
               "villa_plugin.datasets.convert.build_vqa_txt_db.")


def encode_example(example: Mapping[str, Any]) -> bytes:
    return lz4.frame.compress(msgpack.packb(dict(example), use_bin_type=True))


def decode_example(value: bytes) -> Dict[str, Any]:
    return msgpack.unpackb(lz4.frame.decompress(value), raw=False, strict_map_key=False)


class TxtDB:
    """Reader of a UNITER txt_db directory.

    ``max_txt_len >= 0`` keeps only ids with ``len(input_ids) <= max_txt_len`` (training; the number
    dropped is ``num_dropped`` and is logged); ``-1`` keeps everything (evaluation).
    """

    def __init__(self, db_dir: str, max_txt_len: int = -1):
        self.db_dir = str(db_dir)
        if not os.path.isdir(self.db_dir):
            raise DataError(f"txt_db directory not found: {self.db_dir}. {TXT_DB_HINT}")
        self.meta = _read_json(os.path.join(self.db_dir, "meta.json"), "txt_db meta.json", TXT_DB_HINT)
        for key in ("CLS", "SEP"):
            if key not in self.meta:
                raise DataError(f"{self.db_dir}/meta.json has no '{key}' id")
        all_lens = _read_json(os.path.join(self.db_dir, "id2len.json"), "txt_db id2len.json", TXT_DB_HINT)
        if max_txt_len is None or max_txt_len < 0:
            self.id2len = {k: int(v) for k, v in all_lens.items()}
        else:
            self.id2len = {k: int(v) for k, v in all_lens.items() if v <= max_txt_len}
        self.num_dropped = len(all_lens) - len(self.id2len)
        if self.num_dropped:
            logger.info("txt_db %s: dropped %d of %d examples longer than max_txt_len=%d tokens",
                        self.db_dir, self.num_dropped, len(all_lens), max_txt_len)
        t2i = os.path.join(self.db_dir, "txt2img.json")
        self.txt2img: Dict[str, Any] = _read_json(t2i, "txt_db txt2img.json") if os.path.isfile(t2i) else {}
        self.db = LazyLmdb(self.db_dir, what="txt_db LMDB", how_to_get=TXT_DB_HINT)
        self.cls_ = int(self.meta["CLS"])
        self.sep = int(self.meta["SEP"])
        self.mask = self.meta.get("MASK")
        self.v_range = self.meta.get("v_range")

    @property
    def ids(self) -> List[str]:
        return list(self.id2len)

    @property
    def img2txts(self) -> Dict[str, List[str]]:
        return _read_json(os.path.join(self.db_dir, "img2txts.json"), "txt_db img2txts.json")

    def __getitem__(self, id_: str) -> Dict[str, Any]:
        value = self.db.get(str(id_))
        if value is None:
            raise DataError(f'Example "{id_}" is not in txt_db {self.db_dir} (id2len.json lists ids the LMDB lacks).')
        try:
            return decode_example(value)
        except Exception as err:
            raise DataError(f'Corrupt record "{id_}" in txt_db {self.db_dir}: {err}') from err

    def combine_inputs(self, *inputs: Sequence[int]) -> List[int]:
        """``[CLS] ids_1 [SEP] ids_2 [SEP] ...``"""
        out = [self.cls_]
        for ids in inputs:
            out.extend(int(i) for i in ids)
            out.append(self.sep)
        return out


def write_txt_db(db_dir: str, examples: Iterable[Tuple[str, Mapping[str, Any]]], meta: Mapping[str, Any]) -> Dict[str, int]:
    """Write ``(id, example)`` pairs (each with ``input_ids`` and ``img_fname``) as a txt_db with its
    side files; returns id2len. ``img_fname`` may be a string or a list (NLVR2 pairs)."""
    if os.path.exists(os.path.join(db_dir, "data.mdb")):
        raise DataError(f"{db_dir} already holds an LMDB; remove it or write elsewhere.")
    id2len: Dict[str, int] = {}
    txt2img: Dict[str, Any] = {}
    img2txts: Dict[str, List[str]] = {}

    def items():
        for id_, ex in examples:
            id_ = str(id_)
            if "input_ids" not in ex:
                raise DataError(f"txt_db example {id_} has no input_ids")
            id2len[id_] = len(ex["input_ids"])
            if "img_fname" in ex:
                fname = ex["img_fname"]
                txt2img[id_] = fname
                for f in (fname if isinstance(fname, (list, tuple)) else [fname]):
                    img2txts.setdefault(f, []).append(id_)
            yield id_, encode_example(ex)

    write_lmdb(db_dir, items())
    for name, obj in (("meta.json", dict(meta)), ("id2len.json", id2len), ("txt2img.json", txt2img),
                      ("img2txts.json", img2txts)):
        with open(os.path.join(db_dir, name), "w", encoding="utf-8") as fh:
            json.dump(obj, fh)
    return id2len
