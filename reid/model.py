"""ResNet backbone (last stride 1) → global average pooling → BatchNorm neck → L2-normalised embedding (DESIGN §2).

Weights come only from local files: a torchvision ResNet state dict passed by path. Nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reid.errors import ReidError

ARCHS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}


class ReidNet(nn.Module):
    """images (B, 3, H, W) → embeddings (B, D), L2-normalised; D = 512 (resnet18/34) or 2048."""

    def __init__(self, arch: str = "resnet50", last_stride: int = 1):
        super().__init__()
        if arch not in ARCHS:
            raise ReidError(f"config key 'model.arch': got {arch!r}, expected one of {', '.join(ARCHS)}")
        resnet = ARCHS[arch](weights=None)
        if last_stride == 1:
            # Keep the last stage at 1/16 resolution: the usual re-ID trick for finer part detail.
            block = resnet.layer4[0]
            strided = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
            strided.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        self.backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                      resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.dim = resnet.fc.in_features
        self.neck = nn.BatchNorm1d(self.dim)
        self.neck.bias.requires_grad_(False)  # BNNeck: no shift, the embedding stays centred
        nn.init.constant_(self.neck.weight, 1.0)
        nn.init.constant_(self.neck.bias, 0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone(images)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.normalize(self.neck(x), dim=1)

    def parameter_groups(self, lr: float, backbone_lr: float) -> list[dict]:
        """Reference recipe: new layers at `lr`, the (pretrainable) backbone at `backbone_lr`."""
        return [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": backbone_lr, "name": "backbone"},
            {"params": [p for p in self.neck.parameters() if p.requires_grad], "lr": lr, "name": "neck"},
        ]


def load_pretrained(model: ReidNet, path: str) -> None:
    """Load a torchvision ResNet state dict (as saved by `torch.save(resnet.state_dict())`) into the backbone."""
    if not os.path.isfile(path):
        raise ReidError(f"model.pretrained: file '{path}' not found (expected a torchvision ResNet state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise ReidError(f"model.pretrained: cannot read '{path}' as a torch state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # torchvision names: conv1, bn1, layer1..4 (the fc head is dropped). Backbone indices: 0 conv1, 1 bn1, 4..7 layers.
    rename = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    mapped = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        if head.startswith("module"):  # saved from DataParallel
            head, _, rest = rest.partition(".")
        mapped[f"{rename.get(head, head)}.{rest}"] = value
    own = model.backbone.state_dict()
    missing = sorted(k for k in own if k not in mapped)
    unexpected = sorted(k for k in mapped if k not in own)
    shape = sorted(k for k in mapped if k in own and own[k].shape != mapped[k].shape)
    if missing or unexpected or shape:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                parts.append(f"{name} {len(keys)}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}")
        raise ReidError(f"model.pretrained: '{path}' does not match the {len(own)}-tensor backbone ({'; '.join(parts)})")
    model.backbone.load_state_dict(mapped)


def build_model(model_cfg) -> ReidNet:
    model = ReidNet(model_cfg.arch, model_cfg.last_stride)
    if model_cfg.pretrained:
        load_pretrained(model, model_cfg.pretrained)
    return model


def load_model_from_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[ReidNet, dict]:
    """A training checkpoint (or `final_model.pt`) → (model in eval mode, its config as a dict)."""
    from reid.config import config_from_dict  # config imports the data package; keep model import-light

    if not os.path.isfile(path):
        raise ReidError(f"checkpoint '{path}' not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ReidError(f"checkpoint '{path}': cannot be read ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ReidError(f"checkpoint '{path}': expected keys 'model' and 'config'")
    cfg = config_from_dict(ckpt["config"])
    cfg.model.pretrained = ""
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]
