"""The Python example in docs/villa.md runs as written (with a tiny UNITER JSON and checkpoint)."""
import json
import re
from pathlib import Path

import torch

from villa_plugin.models.registered import VILLA

DOC = Path(__file__).resolve().parents[2] / "docs" / "villa.md"
TINY = {"vocab_size": 28996, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02}


def _example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/villa.md should hold exactly one Python example"
    return blocks[0]


def test_villa_doc_example_runs_and_produces_gradients(tmp_path):
    uniter_json = tmp_path / "uniter-tiny.json"
    uniter_json.write_text(json.dumps(TINY))
    donor = VILLA({"uniter_config": str(uniter_json), "head": "vqa", "num_labels": 3129, "dropout": 0.1,
                   "pretrained_checkpoint": "", "losses": [{"type": "logit_bce"}]})
    donor.build()
    checkpoint = tmp_path / "villa-tiny.pt"
    trunk = {k.replace("uniter.", "bert.", 1): v for k, v in donor.state_dict().items() if k.startswith("uniter.")}
    torch.save(trunk, checkpoint)  # official pretrained files may carry `bert.` keys

    code = _example_code()
    code = re.sub(r'^UNITER_JSON = .*$', f'UNITER_JSON = "{uniter_json}"', code, count=1, flags=re.M)
    code = re.sub(r'^CHECKPOINT = .*$', f'CHECKPOINT = "{checkpoint}"', code, count=1, flags=re.M)
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)

    assert namespace["scores"].shape == (2, 3129)
    report = namespace["model"].load_report
    assert len(report.loaded) == len(trunk) and all(k.startswith("vqa_output") for k in report.missing)
    torch.testing.assert_close(namespace["model"].uniter.pooler.dense.weight, donor.uniter.pooler.dense.weight)
    grads = namespace["grads"]
    assert "uniter.embeddings.word_embeddings.weight" in grads and "vqa_output.3.weight" in grads
    assert all(torch.isfinite(g).all() for g in grads.values())
    stats = namespace["stats"]
    # a non-zero delta moves the perturbed scores away from the clean ones: the KL term is positive
    assert float(stats["delta_norm_text"]) > 0 and float(stats["kl"]) > 0
