"""Typed configuration: dataclass defaults, YAML files that override them, `key=value` overrides.

Every error names the key, what was given and what is allowed, on one line (STYLE.md "Typed config").
The keys `data.format`, `data.root`, `data.protocol`, `output_dir`, `seed`, `train.epochs`,
`train.batch_size` and `model.arch` are a public contract.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from reid.data.synthetic import SynthConfig
from reid.errors import ReidError
from reid.video import evaluation_level

DATA_FORMATS = ("synthetic", "veri776", "veriwild", "vveri901", "csv")
PROTOCOLS = ("small", "medium", "large", "all")  # all: `reid evaluate` of the three VeRi-Wild protocols
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass
class DataConfig:
    format: str = "synthetic"      # synthetic = generate a VeRi-776-layout folder at `root` if missing, then read it
    root: str = "data/synthetic"   # dataset folder (for csv: the manifest file)
    protocol: str = "small"        # VeRi-Wild test protocol: small / medium / large (all: `reid evaluate` only)
    height: int = 256
    width: int = 128
    workers: int = 4               # DataLoader workers per rank
    check_images: bool = False     # open every image header when reading the dataset
    skip_corrupt: bool = False     # corrupt images: False = stop with an error naming the file, True = blank + count
    # where training images are decoded and augmented: cpu = PIL in DataLoader workers; gpu = workers only read
    # bytes, the training device decodes (batched nvjpeg on CUDA) and augments (reid.data.gpu_decode). gpu on a
    # CPU device is allowed: the same code decodes on the CPU.
    decode: str = "cpu"


@dataclass
class AugmentConfig:
    """Training augmentations (reid.data.images.train_transform); evaluation and memory fills use none."""
    flip: float = 0.5              # probability of a horizontal flip
    pad: int = 10                  # pixels of padding before the random crop back to (height, width)
    rotation: float = 0.0          # random affine: rotation range in degrees (the original uses 10)
    shear: float = 0.0             # random affine: horizontal shear range in degrees
    scale: float = 0.0             # random affine: zoom range, ± this share
    jitter: float = 0.2            # colour jitter: brightness / contrast / saturation
    hue: float = 0.0               # colour jitter: hue (at most 0.5)
    blur: float = 0.0              # probability of a Gaussian blur
    erasing: float = 0.5           # probability of random erasing


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    pretrained: str = ""           # path to a torchvision ResNet state dict; "" = random init
    last_stride: int = 1
    # With several ranks: all_cameras = BatchNorm over the union batch of all ranks (reid.batchnorm's
    # all-reduce BatchNorm, CPU and GPU); per_rank = each rank normalises its own cameras (camera-specific
    # statistics) and running statistics are merged over ranks before every memory fill, evaluation and save.
    batchnorm: str = "all_cameras"


@dataclass
class LossConfig:
    temperature: float = 0.07
    topk: int = 5
    grey_zone: float = 0.01
    cam_weight: float = 0.2
    hard_positives: bool = True    # ablation switches: mined cross-camera positives of each kind
    easy_positives: bool = True
    # seed = DESIGN §3 exactly. Options, joined with "+": center = mine cross-camera positives and the grey zone
    # with each camera's mean memory row removed (rows and anchors); camera_softmax = each positive competes only
    # with the rows of its own camera (camera-conditional denominators). README "Cross-camera recipes".
    variant: str = "seed"


@dataclass
class MemoryConfig:
    refresh_every: int = 5         # epochs between full feature passes that rebuild the memory
    dtype: str = "float32"         # float32 or bfloat16 rows


@dataclass
class TrainConfig:
    epochs: int = 20
    warmup_epochs: int = 6         # epochs 0..warmup_epochs-1 use the intra-camera loss only
    batch_size: int = 128          # global: the union batch over all ranks (the same recipe at any world size)
    steps_per_epoch: int = 0       # cap on the steps of an epoch; 0 = one pass over the training images
    lr: float = 0.1                # new layers (BN neck)
    backbone_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 10              # ×lr_gamma every lr_step epochs
    lr_gamma: float = 0.1
    amp: bool = True               # bf16 autocast on CUDA (no effect on CPU or with dtype float64)
    # The GPU fast path; "auto" = on CUDA only. Each is also usable (and tested) on the CPU.
    channels_last: str = "auto"    # NHWC images and weights (auto | true | false)
    fused_optimizer: str = "auto"  # fused SGD kernels (auto | true | false); off = torch's foreach SGD
    cudnn_benchmark: bool = True   # let cuDNN pick the fastest convolutions (CUDA; not bit-reproducible)
    compile: bool = False          # torch.compile the model (not the loss: its collectives stay eager)
    compile_backend: str = "inductor"
    dtype: str = "float32"         # float64: slow, for exactness checks (README "Same model at any world size")
    resume: bool = True            # resume from output_dir's checkpoint when one exists
    init_from: str = ""            # a run folder: start from its newest complete checkpoint (model, optimizer,
                                   # memory, epoch) when output_dir has none; the run itself is not touched
    skip_nonfinite: bool = False   # a NaN/Inf loss: False = stop naming step and part, True = skip the step
    keep_checkpoints: int = 2      # complete checkpoints kept in output_dir/checkpoints (the newest ones)
    checkpoint_every_steps: int = 0  # also a mid-epoch checkpoint every N steps (0 = at epoch ends only)
    checkpoint_every_min: float = 0.0  # ... and/or every M minutes (decided by rank 0, for all ranks)
    log_every: int = 20


@dataclass
class EvalConfig:
    flip: bool = True              # average the embeddings of an image and its mirror
    batch_size: int = 256
    every: int = 0                 # also evaluate every N epochs (0 = only untrained, end of warm-up, final)
    diagnostics: bool = True       # identity-based diagnostics (labelled sets only; never fed to the loss)
    picture_queries: int = 6
    level: str = "auto"            # items: image, tracklet (the video protocol), auto = tracklet for vveri901
    frames: int = 0                # tracklet level: at most this many evenly spaced frames per tracklet (0 = all)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"           # auto / cpu / cuda / cuda:N (with several ranks each uses its local rank's GPU)


_CHOICES = {
    "data.format": DATA_FORMATS,
    "data.protocol": PROTOCOLS,
    "model.arch": ARCHS,
    "memory.dtype": ("float32", "bfloat16"),
    "model.batchnorm": ("all_cameras", "per_rank"),
    "train.dtype": ("float32", "float64"),
    "eval.level": ("auto", "image", "tracklet"),
    "data.decode": ("cpu", "gpu"),
    "train.channels_last": ("auto", "true", "false"),
    "train.fused_optimizer": ("auto", "true", "false"),
}
LOSS_VARIANT_OPTIONS = ("center", "camera_softmax")
LEGACY_KEYS = ("model.sync_bn", "loss.exact")  # in configs saved by older versions (checkpoints); ignored when read back


def _convert(key: str, value, typ):
    """Coerce a YAML value or a command-line string to the field's type, or explain why not."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ReidError(f"config key '{key}': got {value!r}, expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ReidError(f"config key '{key}': got {value!r}, expected an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ReidError(f"config key '{key}': got {value!r}, expected an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise ReidError(f"config key '{key}': got {value!r}, expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ReidError(f"config key '{key}': got {value!r}, expected a number") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ReidError(f"config key '{key}': got {value!r}, expected a string")
        if isinstance(value, bool):  # YAML reads a bare true/false as a bool; the choice keys spell it as a word
            return "true" if value else "false"
        return "" if value is None else str(value)
    raise ReidError(f"config key '{key}': unsupported type {typ}")


def _set(cfg, dotted: str, value) -> None:
    parts = dotted.split(".")
    node, path = cfg, []
    for name in parts[:-1]:
        path.append(name)
        child = getattr(node, name, None) if name in _field_types(node) else None
        if not dataclasses.is_dataclass(child):
            known = ", ".join(sorted(_field_types(node)))
            raise ReidError(f"unknown config section '{'.'.join(path)}' (known: {known})")
        node = child
    name = parts[-1]
    types = _field_types(node)
    if name not in types:
        prefix = ".".join(parts[:-1])
        known = ", ".join(f"{prefix}.{k}" if prefix else k for k in sorted(types))
        raise ReidError(f"unknown config key '{dotted}' (known: {known})")
    if dataclasses.is_dataclass(getattr(node, name)):
        if not isinstance(value, dict):
            raise ReidError(f"config key '{dotted}' is a section: give '{dotted}.<key>=value'")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v)
        return
    setattr(node, name, _convert(dotted, value, types[name]))


def _field_types(node) -> dict:
    hints = typing.get_type_hints(type(node))
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def validate(cfg: Config) -> Config:
    """Check values that a type alone does not pin down."""
    for key, allowed in _CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ReidError(f"config key '{key}': got {value!r}, expected one of {', '.join(allowed)}")
    variant = [part.strip() for part in cfg.loss.variant.split("+")]
    if variant != ["seed"] and not (set(variant) <= set(LOSS_VARIANT_OPTIONS) and len(set(variant)) == len(variant)):
        raise ReidError(f"config key 'loss.variant': got {cfg.loss.variant!r}, expected seed or options from "
                        f"{', '.join(LOSS_VARIANT_OPTIONS)} joined with '+'")
    if cfg.train.init_from and not os.path.isdir(cfg.train.init_from):
        raise ReidError(f"config key 'train.init_from': {cfg.train.init_from!r} is not a folder, expected a run "
                        "folder with checkpoints")
    evaluation_level(cfg.eval.level, "veri776" if cfg.data.format == "synthetic" else cfg.data.format)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ReidError(f"config key 'device': got {cfg.device!r}, expected auto, cpu, cuda or cuda:N")
    if cfg.data.protocol == "all" and cfg.data.format != "veriwild":
        raise ReidError(f"config key 'data.protocol': all given for data.format={cfg.data.format}, expected "
                        "data.format=veriwild (the three VeRi-Wild protocols) or small / medium / large")
    positive = ["train.epochs", "train.batch_size", "train.keep_checkpoints", "data.height", "data.width", "memory.refresh_every",
                "eval.batch_size", "loss.temperature"]
    for key in positive:
        if get(cfg, key) <= 0:
            raise ReidError(f"config key '{key}': got {get(cfg, key)!r}, expected a positive value")
    if cfg.train.batch_size < 2:
        raise ReidError(f"config key 'train.batch_size': got {cfg.train.batch_size!r}, expected at least 2 "
                        "(the global batch; BatchNorm needs more than one image)")
    non_negative = ["train.warmup_epochs", "train.steps_per_epoch", "data.workers", "loss.topk", "loss.cam_weight",
                    "train.lr", "train.backbone_lr", "eval.every", "eval.frames", "train.checkpoint_every_steps",
                    "train.checkpoint_every_min"]
    for key in non_negative:
        if get(cfg, key) < 0:
            raise ReidError(f"config key '{key}': got {get(cfg, key)!r}, expected a value >= 0")
    for key in ("augment.flip", "augment.blur", "augment.erasing"):
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ReidError(f"config key '{key}': got {get(cfg, key)!r}, expected a probability in [0, 1]")
    for key in ("augment.pad", "augment.rotation", "augment.shear", "augment.jitter"):
        if get(cfg, key) < 0:
            raise ReidError(f"config key '{key}': got {get(cfg, key)!r}, expected a value >= 0")
    if not 0.0 <= cfg.augment.scale < 1.0:
        raise ReidError(f"config key 'augment.scale': got {cfg.augment.scale!r}, expected 0 <= value < 1")
    if not 0.0 <= cfg.augment.hue <= 0.5:
        raise ReidError(f"config key 'augment.hue': got {cfg.augment.hue!r}, expected 0 <= value <= 0.5")
    if not 0.0 <= cfg.loss.grey_zone < 1.0:
        raise ReidError(f"config key 'loss.grey_zone': got {cfg.loss.grey_zone!r}, expected 0 <= value < 1")
    if cfg.model.last_stride not in (1, 2):
        raise ReidError(f"config key 'model.last_stride': got {cfg.model.last_stride!r}, expected 1 or 2")
    return cfg


def get(cfg, dotted: str):
    node = cfg
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ReidError(f"override '{text}': expected key=value, e.g. train.epochs=5")
    key, value = text.split("=", 1)
    # YAML parsing gives numbers and booleans their types; strings stay strings.
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)):
        parsed = value
    return key.strip(), parsed


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file at `path` ← `key=value` overrides; validated."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ReidError(f"config file '{path}' not found")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ReidError(f"config file '{path}': not valid YAML ({first})") from None
        if not isinstance(data, dict):
            raise ReidError(f"config file '{path}': expected a mapping of keys at the top level")
        for key, value in _flatten(data):
            _set(cfg, key, value)
    for text in overrides or []:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return validate(cfg)


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A saved config (e.g. from a checkpoint) ← `key=value` overrides; validated."""
    cfg = Config()
    for key, value in _flatten(data):
        if key not in LEGACY_KEYS:
            _set(cfg, key, value)
    for text in overrides or []:
        _set(cfg, *parse_override(text))
    return validate(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
