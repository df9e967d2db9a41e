"""Builder ``retrieval`` on small files in UNITER's ITM format and in the Karpathy-split JSON format:
corpus, training query batches, all-pairs evaluation, bad input and the predictions file."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets_testlib import BASE_TOKENS, region_record
from villa_plugin.common.errors import ConfigError, DataError
from villa_plugin.tasks.retrieval.builder import RetrievalBuilder, karpathy_image_key
from villa_plugin.tasks.retrieval.dataset import RetrievalEvalDataset, RetrievalTrainDataset
from villa_plugin.datasets.features import write_img_db
from villa_plugin.datasets.text import write_txt_db

META = {"bert": "test", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, len(BASE_TOKENS)]}
FEATS = {"conf_th": 0.2, "max_bb": 100, "min_bb": 2, "num_bb": 36, "compressed": False}
SENTENCES = ["what color is the dog", "the dog", "how many cats are there", "is the umbrella yes",
             "what color is the cat", "the umbrella", "how many dogs", "is the dog there"]


def write_images(img_dir, keys, boxes=None, seed=0):
    boxes = boxes or {}
    records = [(k, region_record(boxes.get(k, 3), [0.9] * boxes.get(k, 3), seed=seed + i)) for i, k in enumerate(keys)]
    write_img_db(str(img_dir), records, **FEATS)
    return str(img_dir)


def write_itm_db(db_dir, texts, long_ids=()):
    """``texts``: [(id, img_fname, n_tokens)]; token ids are arbitrary in-vocabulary ids."""
    examples = []
    for n, (tid, fname, length) in enumerate(texts):
        ids = [5 + (n + k) % (len(BASE_TOKENS) - 5) for k in range(length)]
        examples.append((tid, {"input_ids": ids, "img_fname": fname, "raw": f"text {tid}"}))
    write_txt_db(str(db_dir), examples, META)
    return str(db_dir)


def flickr_keys(n):
    return [f"flickr30k_{i:012d}.npz" for i in range(1, n + 1)]


@pytest.fixture
def uniter_files(tmp_path):
    keys = flickr_keys(5)
    write_images(tmp_path / "img_db" / "flickr30k", keys)
    train = [(f"{i}{c}", keys[i], 3 + c) for i in range(5) for c in range(2)] + [("long", keys[0], 9)]
    write_itm_db(tmp_path / "txt_db" / "itm_train.db", train)
    val = [(f"v{i}{c}", keys[i], 2 + c) for i in range(3) for c in range(2)] + [("vlong", keys[2], 9)]
    write_itm_db(tmp_path / "txt_db" / "itm_val.db", val)
    return tmp_path


def config(root, **overrides):
    cfg = {
        "corpus": "flickr30k", "source": "txt_db", "data_dir": str(root),
        "flickr30k": {"txt_db": {"train": ["txt_db/itm_train.db"], "val": ["txt_db/itm_val.db"], "test": ["txt_db/itm_val.db"]},
                      "img_db": {s: ["img_db/flickr30k"] for s in ("train", "val", "test")}},
        "max_txt_len": 6, "negative_size": 3, "hard_neg_size": 2, "mining_chunk_size": 8, **FEATS,
    }
    cfg.update(overrides)
    return cfg


def test_yaml_defaults_declare_every_key_the_builder_reads():
    conf = OmegaConf.load(RetrievalBuilder.config_path())["dataset_config"]["retrieval"]
    assert RetrievalBuilder.config_path().endswith(os.path.join("villa_plugin", "tasks", "retrieval", "defaults.yaml"))
    assert conf.negative_size == 399 and conf.hard_neg_size == 31 and conf.mining_warmup_batches == 0
    assert list(conf.coco.karpathy_splits.train) == ["train", "restval"]
    assert list(conf.coco.txt_db.train) == ["txt_db/itm_coco_train.db", "txt_db/itm_coco_restval.db"]
    assert conf.flickr30k.img_key_format.format(stem="1000092795") == "flickr30k_001000092795.npz"


def test_uniter_txt_db_train_split_gives_query_batches(uniter_files):
    builder = RetrievalBuilder("retrieval", config(uniter_files))
    train = builder.build_dataset("train")
    assert isinstance(train, RetrievalTrainDataset)
    c = train.corpus
    assert c.n_texts == 10 and c.n_images == 5 and train.num_dropped == 1  # "long" (9 > 6 tokens) dropped
    assert "long" not in c.text_ids
    assert [c.image_ids[j] for j in c.text_img[:4]] == flickr_keys(2)[:1] * 2 + flickr_keys(2)[1:] * 2
    assert len(train) == 10 and train[7] == {"id": 7, "text_query": 7, "image_query": 2}
    torch.manual_seed(0)
    batch = train.collate([train[i] for i in (0, 3)])
    assert batch["query_dir"].tolist() == [0, 0, 1, 1]
    assert batch["neg_img"].shape == (4, 3) and batch["mining_chunk_size"] == 8 and batch["hard_neg_size"] == 2
    assert batch["img_bank_feat"].shape[-1] == 2048 and batch["txt_bank_ids"][:, 0].eq(2).all()
    assert batch["query_ids"] == ["00", "11", flickr_keys(5)[0], flickr_keys(5)[3]]
    assert batch.get_batch_size() == 4


def test_directions_and_warm_up(uniter_files):
    builder = RetrievalBuilder("retrieval", config(uniter_files, directions=["image"], mining_warmup_batches=1))
    train = builder.build_dataset("train")
    assert len(train) == 5 and train[2] == {"id": 2, "text_query": None, "image_query": 2}
    first = train.collate([train[0], train[1]])
    second = train.collate([train[0], train[1]])
    assert first["neg_txt"].shape == (2, 2)  # warm-up: hard_neg_size random negatives, nothing to mine
    assert second["neg_txt"].shape == (2, 3) and second["query_dir"].tolist() == [1, 1]
    with pytest.raises(ConfigError, match="directions"):
        RetrievalBuilder("retrieval", config(uniter_files, directions=["audio"])).build_dataset("train")
    with pytest.raises(ConfigError, match="negative_size"):
        RetrievalBuilder("retrieval", config(uniter_files, negative_size=0)).build_dataset("train")


def test_eval_split_scores_every_pair_once_and_keeps_long_texts(uniter_files, caplog):
    builder = RetrievalBuilder("retrieval", config(uniter_files))
    with caplog.at_level("INFO"):
        val = builder.build_dataset("val")
        train = builder.build_dataset("train")
    assert "retrieval val: 7 examples kept; 1 longer than max_txt_len=6 kept (evaluation)" in caplog.text
    assert "retrieval train: 10 examples kept; 1 dropped: text_over_max_txt_len" in caplog.text and train.num_dropped == 1
    assert isinstance(val, RetrievalEvalDataset)
    c = val.corpus
    assert c.n_texts == 7 and c.n_images == 3 and "vlong" in c.text_ids and val.num_over_limit == 1
    assert len(val) == 21 and len(val.lengths()) == 21
    seen = set()
    for start in range(0, len(val), 8):
        batch = val.collate([val[i] for i in range(start, min(start + 8, len(val)))])
        for t, j, gt in zip(batch["txt_index"].tolist(), batch["img_index"].tolist(), batch["txt_gt_img"].tolist()):
            seen.add((t, j))
            assert gt == c.text_img[t]
        assert batch["n_texts"] == 7 and batch["n_images"] == 3
    assert seen == {(t, j) for t in range(7) for j in range(3)}
    assert val[8]["txt_index"] == 1 and val[8]["img_index"] == 1  # image-major order


def test_predictions_file_has_ranked_lists_and_metrics(uniter_files, tmp_path):
    val = RetrievalBuilder("retrieval", config(uniter_files, predict_top_k=2)).build_dataset("val")
    c = val.corpus
    scores = torch.rand(c.n_texts, c.n_images)
    scores[torch.arange(c.n_texts), torch.as_tensor(c.text_img)] += 2.0  # every gt pair ranked first
    records = []
    for start in range(0, len(val), 5):
        batch = val.collate([val[i] for i in range(start, min(start + 5, len(val)))])
        out = {"scores": scores[batch["txt_index"], batch["img_index"]].unsqueeze(1)}
        records.extend(val.format_predictions(batch, out))
    path = val.write_predictions(records, str(tmp_path / "pred" / "retrieval_val.json"))
    data = json.loads(open(path).read())
    assert data["format"] == "villa_plugin.retrieval/v1" and data["split"] == "val" and data["top_k"] == 2
    assert data["text_ids"] == c.text_ids and data["image_ids"] == c.image_ids and "scores" not in data
    first = data["text_to_image"][0]
    assert first["text_id"] == c.text_ids[0] and first["image_ids"][0] == c.image_ids[c.text_img[0]]
    assert len(first["image_ids"]) == 2 and first["scores"][0] >= first["scores"][1]
    assert data["image_to_text"][1]["text_ids"][0] in [c.text_ids[t] for t in c.image_texts[1]]
    assert data["metrics"]["ir_r1"] == 1.0 and data["metrics"]["tr_r1"] == 1.0
    with pytest.raises(DataError, match="have no score"):
        val.write_predictions(records[:-1], str(tmp_path / "x.json"))
    val.predict_score_matrix = True
    data = json.loads(open(val.write_predictions(records, str(tmp_path / "full.json"))).read())
    assert np.allclose(data["scores"], scores.numpy(), atol=1e-6)


def test_missing_feature_record_is_an_error_naming_the_key_or_is_skipped(uniter_files):
    write_itm_db(uniter_files / "txt_db" / "itm_bad.db", [("a", flickr_keys(1)[0], 3), ("b", "flickr30k_missing.npz", 3)])
    cfg = config(uniter_files)
    cfg["flickr30k"]["txt_db"]["train"] = ["txt_db/itm_bad.db"]
    with pytest.raises(DataError, match=r'itm_bad.db, example "b".*flickr30k_missing.npz.*missing_images=skip'):
        RetrievalBuilder("retrieval", cfg).build_dataset("train")
    cfg["missing_images"] = "skip"
    cfg["flickr30k"]["txt_db"]["train"] = ["txt_db/itm_bad.db", "txt_db/itm_train.db"]
    train = RetrievalBuilder("retrieval", cfg).build_dataset("train")
    assert "b" not in train.corpus.text_ids and train.num_dropped == 2  # the missing image + the long text


def test_image_with_zero_boxes_is_an_error(tmp_path):
    keys = flickr_keys(3)
    write_images(tmp_path / "img_db" / "flickr30k", keys, boxes={keys[1]: 0})
    write_itm_db(tmp_path / "txt_db" / "itm_train.db", [("a", keys[0], 3), ("b", keys[1], 3), ("c", keys[2], 3)])
    with pytest.raises(DataError, match=r"flickr30k_000000000002.npz.*zero boxes"):
        RetrievalBuilder("retrieval", config(tmp_path)).build_dataset("train")
    skipped = RetrievalBuilder("retrieval", config(tmp_path, missing_images="skip")).build_dataset("train")
    assert skipped.corpus.n_images == 2 and skipped.num_dropped == 1


def test_paired_txt_and_img_dbs_like_coco_train_restval(tmp_path):
    train_keys = [f"coco_train2014_{i:012d}.npz" for i in (9, 25)]
    val_keys = [f"coco_val2014_{i:012d}.npz" for i in (42, 73)]
    write_images(tmp_path / "img_db" / "coco_train2014", train_keys)
    write_images(tmp_path / "img_db" / "coco_val2014", val_keys, seed=5)
    write_itm_db(tmp_path / "txt_db" / "itm_coco_train.db", [("1", train_keys[0], 3), ("2", train_keys[1], 3)])
    write_itm_db(tmp_path / "txt_db" / "itm_coco_restval.db", [("3", val_keys[0], 3), ("4", val_keys[1], 4)])
    cfg = config(tmp_path, corpus="coco")
    cfg["coco"] = {"txt_db": {"train": ["txt_db/itm_coco_train.db", "txt_db/itm_coco_restval.db"]},
                   "img_db": {"train": ["img_db/coco_train2014", "img_db/coco_val2014"]}}
    train = RetrievalBuilder("retrieval", cfg).build_dataset("train")
    c = train.corpus
    assert c.image_keys == train_keys + val_keys and c.image_db.tolist() == [0, 0, 1, 1]
    assert c.tokens(3) == [5 + (1 + k) % (len(BASE_TOKENS) - 5) for k in range(4)]  # read from the second txt_db
    cfg["coco"]["img_db"]["train"] = ["img_db/coco_train2014"] * 3
    with pytest.raises(ConfigError, match="paired in order"):
        RetrievalBuilder("retrieval", cfg).build_dataset("train")


def karpathy(root, images):
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(BASE_TOKENS) + "\n")
    path = root / "karpathy" / "dataset_flickr30k.json"
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return str(vocab)


def test_karpathy_json_source(tmp_path):
    keys = flickr_keys(4)
    write_images(tmp_path / "img_db" / "flickr30k", keys)
    images = []
    for i in range(4):
        sents = [{"raw": SENTENCES[2 * i + k], "tokens": SENTENCES[2 * i + k].split(), "sentid": 10 * i + k, "imgid": i}
                 for k in range(2)]
        images.append({"filename": f"{i + 1}.jpg", "imgid": i, "split": ["train", "train", "val", "restval"][i], "sentences": sents})
    images[0]["sentences"].append({"raw": "what color is the dog the dog the dog", "sentid": 99, "imgid": 0})
    vocab = karpathy(tmp_path, images)
    cfg = config(tmp_path, source="karpathy_json", vocab=vocab, lowercase=True)
    cfg["flickr30k"].update(karpathy_json="karpathy/dataset_flickr30k.json", karpathy_splits={"train": ["train", "restval"], "val": ["val"]},
                            img_key_format="flickr30k_{stem:0>12}.npz")
    train = RetrievalBuilder("retrieval", cfg).build_dataset("train")
    c = train.corpus
    assert c.image_ids == ["1.jpg", "2.jpg", "4.jpg"] and c.image_keys == [keys[0], keys[1], keys[3]]
    assert c.text_ids == [0, 1, 10, 11, 30, 31] and train.num_dropped == 1  # sentence 99 is 9 tokens > 6
    assert c.tokens(0) == [BASE_TOKENS.index(w) for w in "what color is the dog".split()]
    val = RetrievalBuilder("retrieval", cfg).build_dataset("val")
    assert val.corpus.text_ids == [20, 21] and len(val) == 2
    cfg["flickr30k"]["img_key_format"] = "flickr30k_{nope}.npz"
    with pytest.raises(ConfigError, match="img_key_format"):
        RetrievalBuilder("retrieval", cfg).build_dataset("train")


def test_karpathy_image_keys_for_coco():
    coco = {"filename": "COCO_val2014_000000000042.jpg", "filepath": "val2014", "cocoid": 42, "imgid": 7}
    assert karpathy_image_key("coco_{filepath}_{cocoid:012d}.npz", coco, "x") == "coco_val2014_000000000042.npz"
    flickr = {"filename": "1000092795.jpg", "imgid": 0}
    assert karpathy_image_key("flickr30k_{stem:0>12}.npz", flickr, "x") == "flickr30k_001000092795.npz"


def test_bad_karpathy_file_and_unknown_corpus(tmp_path):
    write_images(tmp_path / "img_db" / "flickr30k", flickr_keys(1))
    vocab = karpathy(tmp_path, [])
    (tmp_path / "karpathy" / "dataset_flickr30k.json").write_text(json.dumps({"annotations": []}))
    cfg = config(tmp_path, source="karpathy_json", vocab=vocab)
    cfg["flickr30k"]["karpathy_json"] = "karpathy/dataset_flickr30k.json"
    with pytest.raises(DataError, match="no 'images' list"):
        RetrievalBuilder("retrieval", cfg).build_dataset("train")
    with pytest.raises(ConfigError, match="corpus"):
        RetrievalBuilder("retrieval", config(tmp_path, corpus="mscoco")).build_dataset("train")
