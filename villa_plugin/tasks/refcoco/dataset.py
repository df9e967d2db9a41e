"""One split of a referring-expression dataset (RefCOCO / RefCOCO+ / RefCOCOg): an expression, the
regions of its image (gt boxes or detected boxes) and the referred object's box.

``__getitem__`` -> ``{id, input_ids ([CLS] expr [SEP]), img_feat, img_pos_feat, target, gt_box,
image_size}``; ``collate`` -> the UNITER fields plus ``targets [B]`` (the referred region's index,
-100 where none is usable), ``gt_boxes [B, 4]`` (pixel x, y, w, h), ``image_sizes [B, 2]`` (W, H),
``sent_ids``, ``ref_ids``, ``image_ids``.

The target region (training loss) is resolved per example, when its regions are read:

1. an explicit ``target`` field of the txt_db example (checked against the number of regions);
2. else the position of the referred ``ann_id`` in its image's ``ann_ids`` (UNITER's ``images.json``
   for the gt-box store, whose regions are the image's annotations in that order) when the counts
   agree;
3. else the region with the highest IoU with the gt box, if that IoU reaches ``target_min_iou``;
   otherwise -100 (ignored by the losses), counted in ``num_unmatched`` and warned about once.

Accuracy (``refcoco_accuracy``) does not use the target: the arg-max region's box must have IoU >
0.5 with ``gt_box``, so detected-box stores are evaluated the same way.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from villa_plugin.common.errors import DataError
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.base import BaseDataset
from villa_plugin.datasets.collate import collate_rows
from villa_plugin.datasets.features import ImgFeatDB
from villa_plugin.datasets.task_builder import ExampleRecords
from villa_plugin.datasets.task_common import make_row, write_json_atomic
from villa_plugin.tasks.refcoco.metrics import box_iou_xywh, region_boxes_xywh

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PREDICTION_FORMAT = "villa_plugin.refcoco/v1"


@dataclasses.dataclass
class RefcocoRecords(ExampleRecords):
    """Expressions (``ids`` = sent_ids) with their ref, referred annotation, image, gt box [x, y, w, h]
    and image size (W, H); ``image_ann_ids`` gives the gt-box store's region order per image."""

    ref_ids: List[Any] = dataclasses.field(default_factory=list)
    ann_ids: List[Any] = dataclasses.field(default_factory=list)
    image_ids: List[Any] = dataclasses.field(default_factory=list)
    gt_boxes: List[List[float]] = dataclasses.field(default_factory=list)
    image_sizes: List[List[float]] = dataclasses.field(default_factory=list)
    image_ann_ids: Dict[Any, List[Any]] = dataclasses.field(default_factory=dict)

    def add_expression(self, sent_id: Any, ref_id: Any, ann_id: Any, image_id: Any, bbox: Sequence[float],
                       size: Sequence[float], txt_len: int, img_key: str, **text: Any) -> None:
        self.add(sent_id, txt_len, img_key, 0, **text)
        self.ref_ids.append(ref_id)
        self.ann_ids.append(ann_id)
        self.image_ids.append(image_id)
        self.gt_boxes.append([float(x) for x in bbox])
        self.image_sizes.append(list(size))


class RefcocoDataset(BaseDataset):
    """Expressions as columns; text in memory (refer JSON) or read per item from a txt_db."""

    def __init__(self, dataset_name: str, dataset_type: str, config: Any, records: RefcocoRecords, img_db: ImgFeatDB,
                 target_min_iou: float = 0.5, variant: str = "", source_split: str = "", boxes: str = "gt",
                 num_dropped: int = 0):
        super().__init__(dataset_name, dataset_type, config)
        self.sent_ids, self.ref_ids, self.ann_ids = records.ids, records.ref_ids, records.ann_ids
        self.image_ids = records.image_ids
        self.txt_lens = np.asarray(records.txt_lens, dtype=np.int64)
        self.img_keys, self.img_db = records.img_keys, img_db
        self.gt_boxes = torch.as_tensor(np.asarray(records.gt_boxes, dtype=np.float64).reshape(-1, 4))
        self.image_sizes = torch.as_tensor(np.asarray(records.image_sizes, dtype=np.float64).reshape(-1, 2))
        self.cls_id, self.sep_id = int(records.cls_id), int(records.sep_id)
        self.image_ann_ids = records.image_ann_ids or {}
        self._input_ids, self._txt_keys = records.input_ids, records.txt_keys
        self._txt_db = records.txt_dbs[0] if records.txt_dbs else None
        self.target_min_iou = float(target_min_iou)
        self.variant, self.boxes = variant, boxes
        self.source_split = source_split or dataset_type  # the variant's split (e.g. testB for our test)
        self.num_dropped = int(num_dropped)
        self.num_unmatched = 0
        self._lengths: Optional[List[int]] = None

    def __len__(self) -> int:
        return len(self.sent_ids)

    def lengths(self) -> List[int]:
        """Tokens per example: expression + 2 ([CLS]/[SEP]) + regions (regions read on first call)."""
        if self._lengths is None:
            self._lengths = [int(t) + 2 + self.img_db.nbb(k) for t, k in zip(self.txt_lens, self.img_keys)]
        return self._lengths

    def _text(self, i: int):
        if self._input_ids is not None:
            return self._input_ids[i], None
        example = self._txt_db[self._txt_keys[i]]
        return example["input_ids"], example.get("target")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        ids, explicit = self._text(i)
        feat, pos = self.img_db.regions(self.img_keys[i])  # fp16 as stored: the collate makes float32
        row = make_row(self.cls_id, self.sep_id, [ids], feat, pos, row_id=self.sent_ids[i])
        row.update(target=self.target(i, pos, explicit), gt_box=self.gt_boxes[i], image_size=self.image_sizes[i])
        return row

    def target(self, i: int, img_pos_feat: torch.Tensor, explicit: Any = None) -> int:
        """The referred region's index among this example's regions, or -100 (see the module doc)."""
        n = int(img_pos_feat.size(0))
        if explicit is not None:
            if isinstance(explicit, bool) or not isinstance(explicit, int) or not 0 <= explicit < n:
                raise DataError(
                    f'{self._where(i)}: target region {explicit!r} is outside the image\'s {n} regions '
                    f'(img_db {self.img_db.db_path}, key "{self.img_keys[i]}"). Rebuild the txt_db against this '
                    f"img_db, or remove the 'target' field to match regions by IoU."
                )
            return int(explicit)
        order = self.image_ann_ids.get(self.image_ids[i])
        if order is not None and len(order) == n:
            if self.ann_ids[i] not in order:
                raise DataError(f"{self._where(i)}: ann_id {self.ann_ids[i]} is not among the ann_ids {order} of "
                                f"image {self.image_ids[i]}; the annotation files do not belong together.")
            return order.index(self.ann_ids[i])
        boxes = region_boxes_xywh(img_pos_feat.unsqueeze(0), self.image_sizes[i].unsqueeze(0)).squeeze(0)
        iou = box_iou_xywh(boxes, self.gt_boxes[i].unsqueeze(0).expand_as(boxes))
        best = int(iou.argmax())
        if float(iou[best]) >= self.target_min_iou:
            return best
        self.num_unmatched += 1
        if self.num_unmatched == 1:
            logger.warning("%s %s: no region of image %s reaches IoU %.2f with the gt box of %s; such examples get no "
                           "training target (counted in num_unmatched)", self.dataset_name, self.dataset_type,
                           self.image_ids[i], self.target_min_iou, self._where(i))
        return IGNORE_INDEX

    def _where(self, i: int) -> str:
        source = f"txt_db {self._txt_db.db_dir}" if self._txt_db is not None else "refs"
        return f"{self.dataset_name} {self.dataset_type} ({source}), sent_id {self.sent_ids[i]}"

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        batch: Dict[str, Any] = dict(collate_rows(examples))
        targets = [e["target"] for e in examples]
        # Rows without a usable target stay in at -100, which the losses ignore: the loss of a batch is
        # that of every row that has a target (training keeps even an all -100 batch, as before).
        if self.dataset_type == "train" or any(t >= 0 for t in targets):
            batch["targets"] = torch.as_tensor(targets, dtype=torch.long)
        batch.update(
            gt_boxes=torch.stack([e["gt_box"] for e in examples]).float(),
            image_sizes=torch.stack([e["image_size"] for e in examples]).float(),
            sent_ids=[e["id"] for e in examples],
            dataset_name=self.dataset_name,
            dataset_type=self.dataset_type,
        )
        return SampleList(batch)

    # -- predictions --------------------------------------------------------------------------
    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Per expression: the arg-max region, its box and the gt box (pixel x, y, w, h), IoU, correct."""
        best = output["scores"].detach().argmax(dim=-1)
        boxes = region_boxes_xywh(batch["img_pos_feat"].detach(), batch["image_sizes"].detach())
        pred = boxes.gather(1, best.to(boxes.device).view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        gt = batch["gt_boxes"].detach().to(pred.device)
        iou = box_iou_xywh(pred, gt)
        return [
            {"sent_id": s, "pred_region": int(r), "pred_box": [round(float(v), 2) for v in p],
             "tgt_box": [round(float(v), 2) for v in g], "iou": round(float(o), 4), "correct": bool(o > 0.5)}
            for s, r, p, g, o in zip(batch["sent_ids"], best.cpu().tolist(), pred.cpu(), gt.cpu(), iou.cpu())
        ]

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """``{"format", "dataset", "variant", "split", "variant_split", "boxes", "accuracy", "predictions":
        {sent_id: {pred_region, pred_box, tgt_box, iou, correct}}}``
        (UNITER's results file maps each sent_id to ``pred_box`` / ``tgt_box``; we add the rest)."""
        predictions = {}
        for rec in records:
            predictions.setdefault(str(rec["sent_id"]), {k: v for k, v in rec.items() if k != "sent_id"})
        correct = sum(p["correct"] for p in predictions.values())
        return write_json_atomic({
            "format": PREDICTION_FORMAT, "dataset": self.dataset_name, "variant": self.variant,
            "split": self.dataset_type, "variant_split": self.source_split, "boxes": self.boxes,
            "accuracy": correct / len(predictions) if predictions else 0.0, "predictions": predictions,
        }, path)


__all__ = ["RefcocoDataset", "IGNORE_INDEX", "PREDICTION_FORMAT"]
