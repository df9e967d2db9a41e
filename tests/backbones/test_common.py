"""backbones/common.py: the set-up checks UNITER and LXMERT share."""
import types

import pytest

from villa_plugin.backbones.common import check_attention_shape, check_config_keys, existing_checkpoint
from villa_plugin.backbones.lxmert.config import LxmertConfig
from villa_plugin.backbones.uniter.model import UniterConfig
from villa_plugin.common.errors import CheckpointError, ConfigError


def test_unknown_keys_name_the_source_and_the_known_keys():
    with pytest.raises(ConfigError, match=r"cfg.yaml: unknown LXMERT config key\(s\) \['hiden_size'\]; known keys: .*hidden_size"):
        check_config_keys(LxmertConfig, {"hiden_size": 8}, "cfg.yaml", "LXMERT")
    check_config_keys(UniterConfig, {"hidden_size": 8}, "cfg.yaml", "UNITER")


def test_attention_shape():
    ok = types.SimpleNamespace(hidden_size=8, num_attention_heads=2, attn_implementation="sdpa")
    check_attention_shape(ok)
    with pytest.raises(ConfigError, match=r"^LXMERT hidden_size \(8\) must be a multiple of num_attention_heads \(3\)"):
        check_attention_shape(types.SimpleNamespace(**{**vars(ok), "num_attention_heads": 3}), "LXMERT ")
    with pytest.raises(ConfigError, match=r"attn_implementation must be one of \('eager', 'sdpa'\), got \"flash\""):
        check_attention_shape(types.SimpleNamespace(**{**vars(ok), "attn_implementation": "flash"}))


def test_existing_checkpoint(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    assert existing_checkpoint("model_config.m.pretrained_checkpoint", str(path)) == str(path)
    with pytest.raises(CheckpointError, match=r"model_config.m.pretrained_checkpoint = nope.pt: file not found \(resolved to /"):
        existing_checkpoint("model_config.m.pretrained_checkpoint", "nope.pt")
