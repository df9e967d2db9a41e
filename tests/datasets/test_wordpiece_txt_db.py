"""WordPiece tokenisation from a local vocab, and the txt_db reader/writer."""
import json
import os

import lz4.frame
import msgpack
import pytest

from datasets_testlib import vocab_file  # noqa: F401 (fixture)
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.text import TxtDB, WordPieceTokenizer, decode_example, write_txt_db


def _ids(tok, tokens):
    return [tok.token_to_id(t) for t in tokens]


def test_uncased_lowercases_and_splits_pieces(vocab_file):
    tok = WordPieceTokenizer(vocab_file, lowercase=True)
    assert tok.tokens("What Color is the umbrellas?") == ["what", "color", "is", "the", "umbrella", "##s", "?"]
    assert tok.encode("What Color is the umbrellas?") == _ids(tok, ["what", "color", "is", "the", "umbrella", "##s", "?"])


def test_cased_keeps_case(vocab_file):
    tok = WordPieceTokenizer(vocab_file, lowercase=False)
    # "What" is not in the vocab with a capital letter -> [UNK]; "Color"/"Dog" are
    assert tok.tokens("What Color Dog dog") == ["[UNK]", "Color", "Dog", "dog"]


def test_words_without_pieces_are_dropped_unknown_words_are_unk(vocab_file):
    tok = WordPieceTokenizer(vocab_file, lowercase=True)
    # "\x00" and "\u200b" (control / format characters) produce no pieces; "zebra" is [UNK]
    assert tok.tokens("what \x00 is \u200b zebra") == ["what", "is", "[UNK]"]


@pytest.mark.parametrize("lowercase", [True, False])
def test_whole_text_equals_uniter_word_by_word(vocab_file, lowercase):
    """UNITER tokenises word by word (split on whitespace); encoding the whole text gives the same ids."""
    tok = WordPieceTokenizer(vocab_file, lowercase=lowercase)
    for text in ["What Color is the umbrellas?", "how  many\tdogs\x00 are there ?!", "cat-dog's \u200b Dog."]:
        per_word = [i for word in text.split() for i in tok.encode(word)]
        assert tok.encode(text) == per_word
        assert tok.encode_batch([text, text]) == [per_word, per_word]


def test_no_special_tokens_and_meta(vocab_file):
    tok = WordPieceTokenizer(vocab_file, lowercase=True)
    assert tok.encode("dog") == [tok.token_to_id("dog")]
    meta = tok.meta("tiny-uncased")
    assert meta == {"bert": "tiny-uncased", "lowercase": True, "UNK": 1, "CLS": 2, "SEP": 3, "MASK": 4,
                    "v_range": [5, tok.vocab_size]}


def test_missing_vocab_names_path(tmp_path):
    with pytest.raises(DataError, match=r"nope/vocab.txt.*nothing is downloaded"):
        WordPieceTokenizer(str(tmp_path / "nope" / "vocab.txt"), lowercase=False)


def test_vocab_without_specials_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"lacks the special tokens"):
        WordPieceTokenizer(str(path), lowercase=True)


def _examples():
    return [("1", {"input_ids": [5, 6, 7], "img_fname": "a.npz", "target": {"labels": [1], "scores": [0.9]}}),
            ("2", {"input_ids": list(range(10, 20)), "img_fname": "a.npz"}),
            ("3", {"input_ids": [8], "img_fname": ["b-img0.npz", "b-img1.npz"]})]


def test_txt_db_round_trip_side_files_and_encoding(tmp_path):
    meta = {"bert": "tiny", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, 24]}
    id2len = write_txt_db(str(tmp_path / "db"), _examples(), meta)
    assert id2len == {"1": 3, "2": 10, "3": 1}
    side = {n: json.loads((tmp_path / "db" / n).read_text()) for n in ("meta.json", "id2len.json", "txt2img.json", "img2txts.json")}
    assert side["meta.json"] == meta
    assert side["txt2img.json"] == {"1": "a.npz", "2": "a.npz", "3": ["b-img0.npz", "b-img1.npz"]}
    assert side["img2txts.json"] == {"a.npz": ["1", "2"], "b-img0.npz": ["3"], "b-img1.npz": ["3"]}
    db = TxtDB(str(tmp_path / "db"))
    assert db["1"] == dict(_examples()[0][1])
    # the value format is exactly lz4.frame(msgpack(example))
    raw = db.db.get("3")
    assert msgpack.unpackb(lz4.frame.decompress(raw), raw=False) == dict(_examples()[2][1])
    assert decode_example(raw)["img_fname"] == ["b-img0.npz", "b-img1.npz"]
    assert db.combine_inputs([5, 6]) == [2, 5, 6, 3]
    assert db.combine_inputs([5], [6]) == [2, 5, 3, 6, 3]
    assert db.img2txts["a.npz"] == ["1", "2"]


def test_txt_db_length_filter_counts(tmp_path):
    write_txt_db(str(tmp_path / "db"), _examples(), {"bert": "tiny", "CLS": 2, "SEP": 3})
    train = TxtDB(str(tmp_path / "db"), max_txt_len=3)
    assert sorted(train.ids) == ["1", "3"] and train.num_dropped == 1
    assert len(TxtDB(str(tmp_path / "db"), max_txt_len=-1).ids) == 3


def test_txt_db_errors(tmp_path):
    with pytest.raises(DataError, match=r"txt_db directory not found: .*missing.db.*build_vqa_txt_db"):
        TxtDB(str(tmp_path / "missing.db"))
    write_txt_db(str(tmp_path / "db"), _examples(), {"bert": "tiny", "CLS": 2, "SEP": 3})
    os.remove(tmp_path / "db" / "meta.json")
    with pytest.raises(DataError, match=r"meta.json not found"):
        TxtDB(str(tmp_path / "db"))
    with pytest.raises(DataError, match="already holds an LMDB"):
        write_txt_db(str(tmp_path / "db"), _examples(), {})
