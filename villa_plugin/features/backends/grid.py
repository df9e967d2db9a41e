"""``grid``: a torchvision ResNet's C5 map pooled to a fixed grid; each cell is a region (no detector).

For quick starts and training from scratch: the features are not BUTD features (released UNITER /
VILLA / LXMERT checkpoints were trained on ``butd_r101``). Weights: a torchvision ResNet state dict
(``resnet50-*.pth`` etc.; ``fc.*`` is ignored) or ``random``.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import models
from torchvision.transforms.functional import pil_to_tensor

from villa_plugin.common.errors import ConfigError
from villa_plugin.features.backends import check_options, register_backend
from villa_plugin.features.regions import FEATURE_DIM, Regions, background_only_labels
from villa_plugin.features.weights import RANDOM, load_state_dict, load_strict, strip_prefixes

DEFAULTS = {"depth": 50, "image_size": 448, "grid_size": 6}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHERE_FROM = ("Use a torchvision ImageNet ResNet state dict for the configured depth (torchvision's "
              "resnet50/101/152 weight files, downloaded by you), or --weights random.")


class SquareResize:
    """PIL image -> normalised float tensor [3, S, S] (a square resize, so a batch stacks exactly)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = pil_to_tensor(image.resize((self.size, self.size), Image.BILINEAR)).float() / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std


def cell_boxes(grid: int) -> torch.Tensor:
    """Normalised ``x1, y1, x2, y2`` of the grid cells, row-major."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([edges[xs], edges[ys], edges[xs + 1], edges[ys + 1]], dim=-1).reshape(-1, 4)


class GridBackend(nn.Module):
    has_vg_classes = False

    def __init__(self, depth: int, image_size: int, grid_size: int):
        super().__init__()
        if depth not in (50, 101, 152):
            raise ConfigError(f"grid backend: depth {depth} has no {FEATURE_DIM}-d C5 map; use 50, 101 or 152.")
        # zero-init residuals keep a randomly initialised net's activations O(1) (random weights only)
        net = getattr(models, f"resnet{depth}")(weights=None, zero_init_residual=True)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                  net.layer3, net.layer4)
        self.grid_size = grid_size
        self.preprocess = SquareResize(image_size)
        self.register_buffer("boxes", cell_boxes(grid_size), persistent=False)

    def load_torchvision(self, state: dict, path: str) -> None:
        names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
        inverse = {v: k for k, v in names.items()}
        mapped = {}
        for key, value in strip_prefixes(state).items():
            head = key.split(".", 1)[0]
            if head in inverse:
                mapped[f"{inverse[head]}.{key.split('.', 1)[1]}"] = value
        load_strict(self.body, mapped, path, "grid ResNet", WHERE_FROM)

    @torch.inference_mode()
    def extract(self, inputs: List[torch.Tensor]) -> List[Regions]:
        x = torch.stack(inputs).to(self.boxes.device)
        cells = F.adaptive_avg_pool2d(self.body(x), self.grid_size)        # [B, 2048, g, g]
        feats = cells.flatten(2).transpose(1, 2)                           # [B, g*g, 2048], row-major
        n = feats.shape[1]
        out = []
        for f in feats:
            out.append(Regions(boxes=self.boxes.clone(), features=f, conf=torch.ones(n, device=f.device),
                               soft_labels=background_only_labels(n, f.device)))
        return out


@register_backend("grid")
def build(options: dict, weights: str) -> GridBackend:
    opts = check_options("grid", options, DEFAULTS)
    model = GridBackend(int(opts["depth"]), int(opts["image_size"]), int(opts["grid_size"]))
    if weights != RANDOM:
        model.load_torchvision(load_state_dict(weights, "grid ResNet", WHERE_FROM), weights)
    return model.eval()
