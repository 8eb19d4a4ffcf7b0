import pytest
import torch
import torchvision

from reid.config import ModelConfig
from reid.errors import ReidError
from reid.model import build_model, load_model_from_checkpoint


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_embedding_is_l2_normalised_with_last_stride_one(arch, dim):
    model = build_model(ModelConfig(arch=arch)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 32))
        fmap = model.backbone(torch.randn(1, 3, 64, 32))
    assert out.shape == (3, dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert fmap.shape[-2:] == (4, 2)  # stride 16 overall, not 32


def test_pretrained_torchvision_state_dict_loads(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(ModelConfig(arch="resnet18", pretrained=str(path)))
    assert torch.equal(model.backbone[0].weight, resnet.conv1.weight)
    assert torch.equal(model.backbone[7][1].conv2.weight, resnet.layer4[1].conv2.weight)


def test_missing_pretrained_file_names_the_path(tmp_path):
    with pytest.raises(ReidError, match="nope.pth"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nope.pth")))


def test_mismatching_pretrained_file_names_the_keys(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ReidError) as err:
        build_model(ModelConfig(arch="resnet18", pretrained=str(path)))
    assert "r50.pth" in str(err.value) and ("unexpected" in str(err.value) or "shape" in str(err.value))


def test_parameter_groups_use_reference_learning_rates():
    groups = build_model(ModelConfig(arch="resnet18")).parameter_groups(lr=0.1, backbone_lr=0.01)
    assert {g["name"]: g["lr"] for g in groups} == {"backbone": 0.01, "neck": 0.1}


def test_checkpoint_round_trip(tmp_path):
    from reid.config import Config, config_to_dict

    cfg = Config()
    cfg.model.arch = "resnet18"
    model = build_model(cfg.model)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, tmp_path / "m.pt")
    loaded, saved_cfg = load_model_from_checkpoint(str(tmp_path / "m.pt"))
    assert saved_cfg["model"]["arch"] == "resnet18"
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x))
