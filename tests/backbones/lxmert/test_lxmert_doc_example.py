"""The Python example in docs/lxmert.md runs as written (with a tiny architecture and checkpoint)."""
import re
from pathlib import Path

import torch

from lxmert_reference import TINY
from villa_plugin.backbones.lxmert import build_lxmert_for_task
from villa_plugin.backbones.lxmert.keys import export_state_dict

DOC = Path(__file__).resolve().parents[3] / "docs" / "lxmert.md"


def test_lxmert_doc_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/lxmert.md should hold exactly one Python example"
    tiny = dict(TINY, vocab_size=30522, visual_feat_dim=2048)
    donor = build_lxmert_for_task({"architecture": tiny, "num_labels": 3129})
    checkpoint = tmp_path / "model_LXRT.pth"
    torch.save(export_state_dict(donor, "official_pretrained", multi_gpu=True), checkpoint)

    code = re.sub(r"^CHECKPOINT = .*$", f'CHECKPOINT = "{checkpoint}"', blocks[0], count=1, flags=re.M)
    code = re.sub(r"^ARCHITECTURE = .*$", f"ARCHITECTURE = {tiny!r}", code, count=1, flags=re.M)
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)

    model = namespace["model"]
    report = namespace["report"]
    assert report.layout == "official" and len(report.loaded) == len(donor.lxmert.state_dict())
    assert sorted(report.missing) == sorted(f"logit_fc.{k}" for k in model.logit_fc.state_dict())
    assert torch.equal(model.lxmert.pooler.dense.weight, donor.lxmert.pooler.dense.weight)
    assert namespace["stats"]["delta_norm_text"] > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
