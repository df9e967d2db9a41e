"""LXMERT text ids: lower-cased WordPiece, [CLS] + 18 pieces + [SEP] at most."""
from __future__ import annotations

from villa_plugin.backbones.lxmert.text import lxmert_input_ids
from villa_plugin.datasets.text import WordPieceTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "the", "cafe", "?", "color", "##s", "man"]


def _tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer(str(path), lowercase=True)


def test_ids_are_lowercased_wordpieces_between_cls_and_sep(tmp_path):
    tok = _tokenizer(tmp_path)
    ids = lxmert_input_ids(tok, "What is the CAFÉ colors?")
    assert [VOCAB[i] for i in ids] == ["[CLS]", "what", "is", "the", "cafe", "color", "##s", "?", "[SEP]"]


def test_truncation_keeps_cls_and_sep(tmp_path):
    tok = _tokenizer(tmp_path)
    ids = lxmert_input_ids(tok, " ".join(["man"] * 30))
    assert len(ids) == 20 and ids[0] == VOCAB.index("[CLS]") and ids[-1] == VOCAB.index("[SEP]")
    assert ids[1:-1] == [VOCAB.index("man")] * 18
