"""LXMERT as a second VILLA backbone: trunk, task heads, checkpoint key maps, obj36 TSV reader."""
from villa_plugin.backbones.lxmert.config import LxmertConfig
from villa_plugin.backbones.lxmert.heads import LxmertHead, LxmertLogitHead
from villa_plugin.backbones.lxmert.modeling import LxmertModel, LxmertOutput
from villa_plugin.backbones.lxmert.task_model import LxmertForTask, build_lxmert_for_task

__all__ = [
    "LxmertConfig",
    "LxmertModel",
    "LxmertOutput",
    "LxmertForTask",
    "LxmertLogitHead",
    "LxmertHead",
    "build_lxmert_for_task",
]
