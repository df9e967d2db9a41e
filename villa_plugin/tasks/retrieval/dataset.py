"""Image-text retrieval splits: the corpus (texts, images, gt links), training queries with sampled
negatives, and the all-pairs evaluation set. The builder (``builders/retrieval.py``) reads files.

Training batches (:class:`RetrievalTrainDataset`) hold *queries*: example ``i`` is a text query
(text ``i``, whose gt image is the positive) and/or an image query (image ``i mod n``, with one of
its texts drawn as the positive). Per batch and direction one pool of candidates is sampled and
each query takes the first ``negative_size`` pool members that are not its positives (so all
queries of a batch share most negatives, which keeps the number of distinct images loaded per
batch near ``negative_size`` instead of ``Q x negative_size``). The batch carries

- the top-level UNITER rows: the positive pair of every query (text queries first), ``targets``
  (zeros: the positive is column 0 of the head's scores) and ``query_dir`` (0 text, 1 image);
- banks: ``txt_bank_ids [Tb, Lt]`` ([CLS] ids [SEP]), ``txt_bank_lens [Tb]``, ``img_bank_feat
  [Ib, Nb, 2048]``, ``img_bank_pos [Ib, Nb, 7]``, ``img_bank_nbb [Ib]``;
- ``neg_txt`` / ``neg_img`` ``[Q, N]``: each query's candidate negatives as bank indices, and
  ``pos_txt`` / ``pos_img`` ``[Q]`` (the positives' bank indices);
- ``hard_neg_size``, ``mining_chunk_size``, ``batch_token`` (a per-batch id for the head's cache).

Evaluation batches (:class:`RetrievalEvalDataset`) are pairs: example ``i`` is (image ``i //
n_texts``, text ``i mod n_texts``), so consecutive pairs share an image and a small feature cache
serves them; fields ``txt_index``, ``img_index``, ``txt_gt_img`` [B] and ``n_texts`` / ``n_images``.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.collate import collate_rows, pad_ids, pad_tensors
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_common import make_row, write_json_atomic
from villa_plugin.datasets.text import TxtDB
from villa_plugin.tasks.retrieval.metrics import retrieval_recalls

logger = logging.getLogger(__name__)

TEXT_QUERY, IMAGE_QUERY = 0, 1
PREDICTION_FORMAT = "villa_plugin.retrieval/v1"


@dataclasses.dataclass
class RetrievalCorpus:
    """Texts and images of one split and which image each text describes.

    Text tokens (without [CLS]/[SEP]) are either in memory (``input_ids``) or read per use from
    ``txt_dbs[text_db_index[t]][text_ids[t]]``.
    """

    text_ids: List[Any]
    text_img: np.ndarray
    text_lens: np.ndarray
    image_ids: List[Any]
    image_keys: List[str]
    image_db: np.ndarray
    img_dbs: List[ImgFeatDB]
    cls_id: int
    sep_id: int
    input_ids: Optional[List[List[int]]] = None
    txt_dbs: Optional[List[TxtDB]] = None
    text_db_index: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.text_img = np.asarray(self.text_img, dtype=np.int64)
        self.text_lens = np.asarray(self.text_lens, dtype=np.int64)
        self.image_db = np.asarray(self.image_db, dtype=np.int64)
        order = np.argsort(self.text_img, kind="stable")
        bounds = np.searchsorted(self.text_img[order], np.arange(self.n_images + 1))
        self.image_texts = [order[bounds[j]: bounds[j + 1]] for j in range(self.n_images)]

    def __len__(self) -> int:
        return self.n_texts

    @property
    def n_texts(self) -> int:
        return len(self.text_ids)

    @property
    def n_images(self) -> int:
        return len(self.image_keys)

    def tokens(self, t: int) -> List[int]:
        """Token ids of text ``t`` (no [CLS]/[SEP])."""
        if self.input_ids is not None:
            return self.input_ids[t]
        return [int(x) for x in self.txt_dbs[self.text_db_index[t]][self.text_ids[t]]["input_ids"]]

    def row_ids(self, t: int) -> List[int]:
        return [self.cls_id, *self.tokens(t), self.sep_id]

    def image(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.img_dbs[self.image_db[j]][self.image_keys[j]]

    def nbb(self, j: int) -> int:
        return self.img_dbs[self.image_db[j]].nbb(self.image_keys[j])

    def preload_texts(self) -> None:
        """Read every text's tokens into memory (evaluation reads each text once per image)."""
        if self.input_ids is None:
            self.input_ids = [self.tokens(t) for t in range(self.n_texts)]


class _FeatureCache:
    """A small LRU of image features (per process; consecutive evaluation pairs share an image)."""

    def __init__(self, corpus: RetrievalCorpus, size: int):
        self.corpus, self.size = corpus, max(int(size), 1)
        self._items: "OrderedDict[int, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def __call__(self, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if j in self._items:
            self._items.move_to_end(j)
            return self._items[j]
        value = self.corpus.image(j)
        self._items[j] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


# ----------------------------------------------------------------------------------------------
# Training: queries with sampled negatives
# ----------------------------------------------------------------------------------------------
class RetrievalTrainDataset(BaseDataset):
    """Queries for hard-negative training (see the module docstring for the batch layout)."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, corpus: RetrievalCorpus, *,
                 directions: Sequence[str] = ("text", "image"), negative_size: int = 399, hard_neg_size: int = 31,
                 mining_chunk_size: int = 400, mining_warmup_batches: int = 0, num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        unknown = set(directions) - {"text", "image"}
        if unknown or not directions:
            raise DataError(f"{dataset_name}: directions must be a non-empty subset of [text, image], got {list(directions)}")
        self.corpus = corpus
        self.directions = list(directions)
        self.negative_size, self.hard_neg_size = int(negative_size), int(hard_neg_size)
        self.mining_chunk_size = int(mining_chunk_size)
        self.mining_warmup_batches = int(mining_warmup_batches)
        self.batches_collated = 0  # in this process (each loader worker counts its own)
        self.num_dropped = int(num_dropped)
        self.text_queries = np.arange(corpus.n_texts) if "text" in self.directions else np.zeros(0, np.int64)
        with_text = np.asarray([j for j in range(corpus.n_images) if len(corpus.image_texts[j])], dtype=np.int64)
        self.image_queries = with_text if "image" in self.directions else np.zeros(0, np.int64)
        if corpus.n_images < 2:
            raise DataError(f"{dataset_name} {dataset_type}: retrieval training needs at least 2 images, got {corpus.n_images}")

    def __len__(self) -> int:
        return max(len(self.text_queries), len(self.image_queries))

    def lengths(self) -> List[int]:
        """Tokens of each example's positive pair(s) (text + 2 + regions); a rough bucketing key."""
        c = self.corpus
        out = []
        for i in range(len(self)):
            n = 0
            if len(self.text_queries):
                t = int(self.text_queries[i % len(self.text_queries)])
                n += int(c.text_lens[t]) + 2 + c.nbb(int(c.text_img[t]))
            if len(self.image_queries):
                j = int(self.image_queries[i % len(self.image_queries)])
                n += int(c.text_lens[c.image_texts[j][0]]) + 2 + c.nbb(j)
            out.append(n)
        return out

    def __getitem__(self, i: int) -> Dict[str, Any]:
        t = int(self.text_queries[i % len(self.text_queries)]) if len(self.text_queries) else None
        j = int(self.image_queries[i % len(self.image_queries)]) if len(self.image_queries) else None
        return {"id": i, "text_query": t, "image_query": j}

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        c = self.corpus
        text_q = [e["text_query"] for e in examples if e["text_query"] is not None]
        image_q = [e["image_query"] for e in examples if e["image_query"] is not None]
        positives: List[Tuple[int, int]] = [(t, int(c.text_img[t])) for t in text_q]
        for j in image_q:
            texts = c.image_texts[j]
            positives.append((int(texts[int(torch.randint(len(texts), ()))]), j))
        negatives = self._sample_text_query_negatives(text_q) + self._sample_image_query_negatives(image_q)
        n_neg = min(self.negative_size, min(len(n) for n in negatives))
        if self.batches_collated < self.mining_warmup_batches:
            n_neg = min(n_neg, self.hard_neg_size)  # warm-up: random negatives only, nothing to mine
        self.batches_collated += 1
        if n_neg < 1:
            raise DataError(f"{self.dataset_name} train: a query has no negative candidate (too few images or texts)")
        negatives = [n[:n_neg] for n in negatives]

        txt_bank: Dict[int, int] = {}
        img_bank: Dict[int, int] = {}
        for t, j in positives:
            txt_bank.setdefault(t, len(txt_bank))
            img_bank.setdefault(j, len(img_bank))
        neg_txt, neg_img = [], []
        for q, cands in enumerate(negatives):
            t_pos, j_pos = positives[q]
            if q < len(text_q):  # text query: same text, negative images
                neg_txt.append([txt_bank[t_pos]] * n_neg)
                neg_img.append([img_bank.setdefault(j, len(img_bank)) for j in cands])
            else:  # image query: negative texts, same image
                neg_txt.append([txt_bank.setdefault(t, len(txt_bank)) for t in cands])
                neg_img.append([img_bank[j_pos]] * n_neg)

        images = [c.image(j) for j in img_bank]  # dict order = bank index order
        texts = [c.row_ids(t) for t in txt_bank]
        rows = [make_row(c.cls_id, c.sep_id, [texts[txt_bank[t]][1:-1]], *images[img_bank[j]], row_id=f"q{q}")
                for q, (t, j) in enumerate(positives)]
        batch: Dict[str, Any] = dict(collate_rows(rows))
        nbbs = [int(f.size(0)) for f, _ in images]
        batch.update(
            targets=torch.zeros(len(positives), dtype=torch.long),
            query_dir=torch.as_tensor([TEXT_QUERY] * len(text_q) + [IMAGE_QUERY] * len(image_q), dtype=torch.long),
            pos_txt=torch.as_tensor([txt_bank[t] for t, _ in positives], dtype=torch.long),
            pos_img=torch.as_tensor([img_bank[j] for _, j in positives], dtype=torch.long),
            neg_txt=torch.as_tensor(neg_txt, dtype=torch.long),
            neg_img=torch.as_tensor(neg_img, dtype=torch.long),
            txt_bank_ids=pad_ids(texts),
            txt_bank_lens=torch.as_tensor([len(x) for x in texts], dtype=torch.long),
            img_bank_feat=pad_tensors([f for f, _ in images], nbbs),
            img_bank_pos=pad_tensors([p for _, p in images], nbbs),
            img_bank_nbb=torch.as_tensor(nbbs, dtype=torch.long),
            hard_neg_size=self.hard_neg_size,
            mining_chunk_size=self.mining_chunk_size,
            batch_token=secrets.randbits(62),
            query_ids=[c.text_ids[t] for t in text_q] + [c.image_ids[j] for j in image_q],
            dataset_name=self.dataset_name,
            dataset_type=self.dataset_type,
        )
        return SampleList(batch)

    def _pool(self, population: int, size: int) -> List[int]:
        return torch.randperm(population)[: min(population, size)].tolist()

    def _sample_text_query_negatives(self, text_q: Sequence[int]) -> List[List[int]]:
        """Per text query: images of a shared pool that are not its gt image."""
        if not text_q:
            return []
        c = self.corpus
        pool = self._pool(c.n_images, self.negative_size + len(text_q))
        return [[j for j in pool if j != int(c.text_img[t])][: self.negative_size] for t in text_q]

    def _sample_image_query_negatives(self, image_q: Sequence[int]) -> List[List[int]]:
        """Per image query: texts of a shared pool that do not describe the image."""
        if not image_q:
            return []
        c = self.corpus
        extra = sum(len(c.image_texts[j]) for j in image_q)
        pool = self._pool(c.n_texts, self.negative_size + extra)
        return [[t for t in pool if int(c.text_img[t]) != j][: self.negative_size] for j in image_q]


# ----------------------------------------------------------------------------------------------
# Evaluation: every (text, image) pair
# ----------------------------------------------------------------------------------------------
class RetrievalEvalDataset(BaseDataset):
    """All ``n_images x n_texts`` pairs, image-major. Use ``batching: fixed`` (``lengths()`` has
    one entry per pair)."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, corpus: RetrievalCorpus, *,
                 feature_cache_images: int = 8, corpus_name: str = "", predict_top_k: int = 10,
                 predict_score_matrix: bool = False, num_over_limit: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        corpus.preload_texts()
        self.corpus = corpus
        self.corpus_name = corpus_name
        self.predict_top_k = int(predict_top_k)
        self.predict_score_matrix = bool(predict_score_matrix)
        self.num_over_limit = int(num_over_limit)
        self._features = _FeatureCache(corpus, feature_cache_images)

    def __len__(self) -> int:
        return self.corpus.n_texts * self.corpus.n_images

    def pair(self, i: int) -> Tuple[int, int]:
        """``(text index, image index)`` of example ``i``."""
        j, t = divmod(int(i), self.corpus.n_texts)
        return t, j

    def lengths(self) -> List[int]:
        c = self.corpus
        nbb = np.asarray([c.nbb(j) for j in range(c.n_images)], dtype=np.int64)
        return (nbb[:, None] + (c.text_lens + 2)[None, :]).reshape(-1).tolist()

    def __getitem__(self, i: int) -> Dict[str, Any]:
        t, j = self.pair(i)
        feat, pos = self._features(j)
        row = make_row(self.corpus.cls_id, self.corpus.sep_id, [self.corpus.tokens(t)], feat, pos, row_id=i)
        row.update(txt_index=t, img_index=j)
        return row

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        batch: Dict[str, Any] = dict(collate_rows(examples))
        t = torch.as_tensor([e["txt_index"] for e in examples], dtype=torch.long)
        batch.update(
            txt_index=t,
            img_index=torch.as_tensor([e["img_index"] for e in examples], dtype=torch.long),
            txt_gt_img=torch.as_tensor(self.corpus.text_img[t.numpy()], dtype=torch.long),
            n_texts=self.corpus.n_texts,
            n_images=self.corpus.n_images,
            dataset_name=self.dataset_name,
            dataset_type=self.dataset_type,
        )
        return SampleList(batch)

    # -- predictions --------------------------------------------------------------------------
    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """One compact record per batch: ``{"txt_index": [...], "img_index": [...], "scores": [...]}``."""
        return [{
            "txt_index": batch["txt_index"].detach().cpu().tolist(),
            "img_index": batch["img_index"].detach().cpu().tolist(),
            "scores": output["scores"].detach().float().reshape(-1).cpu().tolist(),
        }]

    def score_matrix(self, records: Sequence[Dict[str, Any]]) -> torch.Tensor:
        """The ``[n_texts, n_images]`` matrix of the records (DataError if a pair is missing)."""
        c = self.corpus
        scores = torch.full((c.n_texts, c.n_images), float("nan"), dtype=torch.float32)
        for rec in records:
            scores[torch.as_tensor(rec["txt_index"], dtype=torch.long),
                   torch.as_tensor(rec["img_index"], dtype=torch.long)] = torch.as_tensor(rec["scores"], dtype=torch.float32)
        missing = int(torch.isnan(scores).sum())
        if missing:
            raise DataError(f"{self.dataset_name} {self.dataset_type}: {missing} of {scores.numel()} pairs have no score; "
                            f"the prediction loader must visit every pair")
        return scores

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """Write the ranked lists (and optionally the full score matrix) as JSON; see docs/tasks.md.

        ``{"format", "dataset", "corpus", "split", "text_ids", "image_ids", "text_gt_image_ids",
        "top_k", "text_to_image": [{"text_id", "image_ids", "scores"}], "image_to_text":
        [{"image_id", "text_ids", "scores"}], "metrics": {ir_r1, ..., r_mean}[, "scores": [[...]]]}``
        (ranked best first; ``scores`` rows are texts, columns images, in the id lists' order).
        """
        c = self.corpus
        scores = self.score_matrix(records)
        k_img, k_txt = min(self.predict_top_k, c.n_images), min(self.predict_top_k, c.n_texts)
        top_img = scores.topk(k_img, dim=1)
        top_txt = scores.topk(k_txt, dim=0)
        out: Dict[str, Any] = {
            "format": PREDICTION_FORMAT,
            "dataset": self.dataset_name,
            "corpus": self.corpus_name,
            "split": self.dataset_type,
            "text_ids": list(c.text_ids),
            "image_ids": list(c.image_ids),
            "text_gt_image_ids": [c.image_ids[j] for j in c.text_img.tolist()],
            "top_k": self.predict_top_k,
            "text_to_image": [
                {"text_id": c.text_ids[t], "image_ids": [c.image_ids[j] for j in top_img.indices[t].tolist()],
                 "scores": top_img.values[t].tolist()} for t in range(c.n_texts)
            ],
            "image_to_text": [
                {"image_id": c.image_ids[j], "text_ids": [c.text_ids[t] for t in top_txt.indices[:, j].tolist()],
                 "scores": top_txt.values[:, j].tolist()} for j in range(c.n_images)
            ],
            "metrics": retrieval_recalls(scores, torch.as_tensor(c.text_img)),
        }
        if self.predict_score_matrix:
            out["scores"] = scores.tolist()
        return write_json_atomic(out, path)


__all__ = ["RetrievalCorpus", "RetrievalTrainDataset", "RetrievalEvalDataset", "PREDICTION_FORMAT"]
