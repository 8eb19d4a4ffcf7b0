import pytest

from reid.config import Config, config_from_dict, config_to_dict, load_config
from reid.errors import ReidError


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 32\nmodel:\n  arch: resnet18\n")
    cfg = load_config(str(path), ["train.epochs=3", "data.root=/data/VeRi", "loss.cam_weight=0"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 32 and cfg.model.arch == "resnet18"
    assert cfg.data.root == "/data/VeRi" and cfg.loss.cam_weight == 0.0
    assert cfg.train.lr == Config().train.lr


@pytest.mark.parametrize("key", ["data.format", "data.root", "data.protocol", "output_dir", "seed",
                                 "train.epochs", "train.batch_size", "model.arch"])
def test_public_contract_keys_exist(key):
    value = {"data.format": "veri776", "data.root": "/x", "data.protocol": "large", "output_dir": "/o",
             "seed": "5", "train.epochs": "2", "train.batch_size": "16", "model.arch": "resnet34"}[key]
    load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["train.epoch", "train.epochs"]),
    ("nosuch=1", ["nosuch", "known"]),
    ("train.epochs=three", ["train.epochs", "three", "integer"]),
    ("train.amp=maybe", ["train.amp", "true or false"]),
    ("model.arch=vgg16", ["model.arch", "vgg16", "resnet50"]),
    ("data.protocol=huge", ["data.protocol", "huge", "small"]),
    ("train.batch_size=0", ["train.batch_size", "positive"]),
    ("loss.grey_zone=2", ["loss.grey_zone"]),
    ("augment.erasing=1.5", ["augment.erasing", "1.5", "probability"]),
    ("augment.hue=0.7", ["augment.hue", "0.7", "0.5"]),
    ("augment.rotation=-5", ["augment.rotation", ">= 0"]),
    ("train", ["key=value"]),
    ("model.batchnorm=sync", ["model.batchnorm", "sync", "all_cameras", "per_rank"]),
    ("device=gpu0", ["device", "gpu0", "cuda:N"]),
    ("train.dtype=float16", ["train.dtype", "float16", "float64"]),
    ("loss.variant=centre", ["loss.variant", "centre", "center", "camera_softmax"]),
    ("loss.variant=center+center", ["loss.variant", "center+center"]),
    ("train.init_from=/no/such/run", ["train.init_from", "/no/such/run", "run folder"]),
])
def test_bad_override_is_one_line_naming_key_given_and_allowed(override, words):
    with pytest.raises(ReidError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ReidError, match="bad.yaml"):
        load_config(str(path))
    with pytest.raises(ReidError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_unknown_nested_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ReidError, match="train.epocs"):
        load_config(str(path))


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["train.epochs=4", "synth.identities=12", "memory.dtype=bfloat16"])
    again = config_from_dict(config_to_dict(cfg), ["seed=9"])
    assert again.train.epochs == 4 and again.synth.identities == 12 and again.memory.dtype == "bfloat16"
    assert again.seed == 9


def test_shipped_configs_load():
    for name in ("synthetic", "veri776", "veriwild"):
        load_config(f"configs/{name}.yaml")


def test_cuda_with_an_index_is_a_valid_device_and_old_checkpoint_configs_still_load():
    from reid.config import config_from_dict, config_to_dict

    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"
    saved = config_to_dict(load_config(None, []))
    saved["model"]["sync_bn"] = False  # written by versions before model.batchnorm
    assert config_from_dict(saved).model.batchnorm == "all_cameras"
