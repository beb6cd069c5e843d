"""Recipes: a typed schema, strict YAML loading and `--set section.key=value` overrides.

A recipe states only what differs from the defaults below. Loading refuses, with one line, anything that
could make a run silently different from what its author meant: unknown or duplicate keys, wrong types
(PyYAML reads `3e-4` as a string), values out of range and conflicting settings.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imret.data.storage import is_remote
from imret.errors import RecipeError, did_you_mean


def bounds(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # the run directory is <dir>/<name>
    seed: int = 0


@dataclass
class DataConfig:
    shards: str = "shards/synth"  # a local directory or a URL: s3://bucket/prefix, gs://..., https://...
    image_size: int = field(default=224, metadata=bounds(16, 4096))  # what the network sees
    load_size: int | None = field(default=None, metadata=bounds(16, 4096))  # CPU-side size; None = image_size
    batch_size_per_device: int = field(default=128, metadata=bounds(1))
    workers: int = field(default=4, metadata=bounds(0, 64))
    shuffle_buffer: int = field(default=1000, metadata=bounds(0))
    max_bad_fraction: float = field(default=0.001, metadata=bounds(0.0, 1.0, hi_open=True))
    zero_background: bool = False  # multiply images by their true mask (the study's masked variant)
    # where JPEGs are decoded: gpu = nvJPEG on the device (workers only read tars), auto = gpu on CUDA, else cpu
    decode: Literal["auto", "cpu", "gpu"] = "auto"


@dataclass
class AugmentConfig:
    crop: Literal["none", "random", "random_resized"] = "none"
    crop_scale_min: float = field(default=0.35, metadata=bounds(0.0, 1.0, lo_open=True))
    hflip: bool = False
    color_jitter: float = field(default=0.0, metadata=bounds(0.0, 1.0))


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | small-cnn | timm:<any timm model name>
    # pretrained: the backbone's published weights (torchvision's for resnet18, timm's for timm:<name>), read from
    # model.weights or a local cache, never downloaded in the run; imagenet is the same thing; run: another run's
    init: Literal["scratch", "imagenet", "pretrained", "run"] = "scratch"
    weights: str | None = None  # a local weights file (.safetensors, .pth), or the run directory for init: run
    embedding_dim: int = field(default=128, metadata=bounds(2, 8192))  # metric-learning head (task.name: triplet)
    grad_checkpointing: bool = False  # timm backbones: recompute activations in the backward pass, for large models


@dataclass
class TaskConfig:
    name: Literal["multilabel", "triplet", "rotation", "segmentation"] = "multilabel"
    # triplet: a pair is positive above this label IoU, negative at or below the other
    positive_min_iou: float = field(default=0.5, metadata=bounds(0.0, 1.0, lo_open=True))
    negative_max_iou: float = field(default=0.0, metadata=bounds(0.0, 1.0, hi_open=True))
    mining: Literal["batch_hard", "semi_hard"] = "batch_hard"
    margin_start: float = field(default=0.1, metadata=bounds(0.0, lo_open=True))
    margin_end: float = field(default=1.0, metadata=bounds(0.0, lo_open=True))
    margin_epochs: int = field(default=10, metadata=bounds(1))
    # metric-learning validation: a seeded sample of at most val_sample images, its pairs mined in chunks
    val_sample: int = field(default=4096, metadata=bounds(2))
    val_chunk: int = field(default=256, metadata=bounds(2))


# loss.name -> the loss.* parameters it reads; None in the recipe means the loss's own default (LOSS_DEFAULTS)
LOSS_PARAMETERS: dict[str, tuple[str, ...]] = {
    "triplet": (), "multi_similarity": ("alpha", "beta", "base"), "contrastive": ("pos_margin", "neg_margin"),
    "supcon": ("temperature",), "ntxent": ("temperature",), "circle": ("margin", "gamma"),
    "proxy_anchor": ("margin", "alpha"), "arcface": ("margin", "scale", "sub_centers"),
    "subcenter_arcface": ("margin", "scale", "sub_centers"),
}  # fmt: skip
LOSS_DEFAULTS: dict[str, dict[str, float | int]] = {  # pytorch-metric-learning's defaults
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5}, "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
    "supcon": {"temperature": 0.1}, "ntxent": {"temperature": 0.1}, "circle": {"margin": 0.4, "gamma": 80.0},
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0}, "arcface": {"margin": 28.6, "scale": 64.0, "sub_centers": 1},
    "subcenter_arcface": {"margin": 28.6, "scale": 64.0, "sub_centers": 3},
}  # fmt: skip
MINER_PARAMETERS: dict[str, tuple[str, ...]] = {"none": (), "multi_similarity": ("miner_epsilon",),
                                                 "pair_margin": ("miner_pos_margin", "miner_neg_margin")}  # fmt: skip
MINER_DEFAULTS = {"miner_epsilon": 0.1, "miner_pos_margin": 0.2, "miner_neg_margin": 0.8}


@dataclass
class LossConfig:
    """The metric-learning loss of task.name: triplet. `triplet` is imret's own (tag-overlap mining, task.* margins);
    the others are pytorch-metric-learning's, fed the same tag-overlap positives and negatives (task.positive_min_iou,
    task.negative_max_iou) as pairs, or, for the proxy losses, one proxy per tag. Parameters left at None take the
    loss's default; setting one the chosen loss does not read is an error."""

    name: Literal["triplet", "multi_similarity", "contrastive", "supcon", "ntxent", "circle", "proxy_anchor",
                  "arcface", "subcenter_arcface"] = "triplet"  # fmt: skip
    miner: Literal["none", "multi_similarity", "pair_margin"] = "none"  # pair losses: keep only the hard pairs
    gather: bool = False  # pair and proxy losses over the embeddings of every rank (the global batch)
    alpha: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    beta: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    base: float | None = None
    pos_margin: float | None = None
    neg_margin: float | None = None
    temperature: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    margin: float | None = None  # circle: relaxation m; proxy_anchor: delta (cosine); arcface: additive angle, degrees
    gamma: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    scale: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    sub_centers: int | None = field(default=None, metadata=bounds(1, 16))
    proxy_lr_scale: float = field(default=1.0, metadata=bounds(0.0, lo_open=True))  # proxies' LR x optim.lr
    miner_epsilon: float | None = field(default=None, metadata=bounds(0.0))
    miner_pos_margin: float | None = None
    miner_neg_margin: float | None = None

    def value(self, name: str) -> float | int:
        """A parameter of the chosen loss or miner: the recipe's, else the default."""
        set_value = getattr(self, name)
        if set_value is not None:
            return set_value
        return LOSS_DEFAULTS.get(self.name, {}).get(name, MINER_DEFAULTS.get(name))  # type: ignore[return-value]


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = field(default=3.0e-4, metadata=bounds(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=bounds(0.0))  # adamw: decoupled; adam, sgd: L2 in the gradient
    momentum: float = field(default=0.9, metadata=bounds(0.0, 1.0, hi_open=True))  # sgd
    nesterov: bool = False  # sgd
    schedule: Literal["plateau", "cosine", "onecycle"] = "plateau"
    warmup_epochs: float = field(default=0.0, metadata=bounds(0.0))  # linear warm-up before the schedule
    plateau_factor: float = field(default=0.1, metadata=bounds(0.0, 1.0, lo_open=True, hi_open=True))
    plateau_patience: int = field(default=2, metadata=bounds(0))
    # lr x global batch (per device x ranks x accumulation) / lr_reference_batch: the same recipe on 1 or 8 GPUs
    scale_lr_with_batch: bool = False
    lr_reference_batch: int = field(default=256, metadata=bounds(1))
    # fine-tuning: the trunk's rate x trunk_lr_scale; timm backbones: layer-wise decay, each layer's rate x
    # layer_decay^(layers above it) (timm's param_groups_layer_decay)
    trunk_lr_scale: float = field(default=1.0, metadata=bounds(0.0, lo_open=True))
    layer_decay: float | None = field(default=None, metadata=bounds(0.0, 1.0, lo_open=True))


@dataclass
class TrainConfig:
    max_epochs: int = field(default=50, metadata=bounds(1))
    steps_per_epoch: int | None = field(default=None, metadata=bounds(1))  # None: a full pass over the shards
    grad_accum_steps: int = field(default=1, metadata=bounds(1))
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: the launch config decides
    compile: bool = False
    freeze_trunk_epochs: int = field(default=0, metadata=bounds(0))  # a warm-up of the heads with the trunk frozen
    early_stop_patience: int = field(default=5, metadata=bounds(1))
    early_stop_min_delta: float = field(default=0.0, metadata=bounds(0.0))
    max_nonfinite_steps: int = field(default=5, metadata=bounds(1))  # in a row, then all ranks stop
    collective_timeout_s: int = field(default=1800, metadata=bounds(10))  # a dead rank ends the run after this


@dataclass
class CheckpointConfig:
    every_n_steps: int = field(default=0, metadata=bounds(0))  # 0: once per epoch only
    keep: int = field(default=2, metadata=bounds(2))


@dataclass
class LogConfig:
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE, else by API key
    wandb_project: str = "imret"
    every_n_steps: int = field(default=20, metadata=bounds(1))


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def load_size(self) -> int:
        return self.data.load_size or self.data.image_size

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


# ---------------------------------------------------------------- YAML that rejects duplicate keys


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(f"duplicate key '{key}' on line {line} (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {' '.join(str(exc).split())}") from None


# ---------------------------------------------------------------- typed conversion


def _check_value(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [opt for opt in options if opt is not type(None)]
        return _check_value(where, value, inner)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {_check_value(f"{where} key", k, key_type): _check_value(f"{where}.{k}", v, item) for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            listed = ", ".join(map(str, choices))
            raise RecipeError(f"{where}: '{value}' is not one of {listed}{did_you_mean(value, choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _parses_as_float(value):
            raise RecipeError(
                f"{where}: expected a number, got the string {value!r} "
                f"(YAML reads exponents without a dot as text: write {_yaml_float(value)})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint!r} at {where}")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _check_range(where: str, value: Any, spec: dict) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # every comparison with NaN is false
        raise RecipeError(f"{where}: must be a finite number, got {value}")
    if value is None or "range" not in spec:
        return
    lo, hi, lo_open, hi_open = spec["range"]
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RecipeError(f"{where}: must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise RecipeError(f"{where}: must be {'<' if hi_open else '<='} {hi}, got {value}")


def _fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def _hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _set_field(recipe: Any, section: str, key: str, value: Any, *, from_text: bool = False) -> None:
    sections = _fields(type(recipe))
    if section not in sections:
        raise RecipeError(f"unknown section '{section}'{did_you_mean(section, sections)}")
    section_obj = getattr(recipe, section)
    fields = _fields(type(section_obj))
    if key not in fields:
        raise RecipeError(f"unknown key '{section}.{key}'{did_you_mean(key, fields)}")
    where = f"{section}.{key}"
    hint = _hints(type(section_obj))[key]
    if from_text:
        value = _from_text(where, value, hint)
    value = _check_value(where, value, hint)
    _check_range(where, value, fields[key].metadata)
    setattr(section_obj, key, value)


def _from_text(where: str, text: str, hint: Any) -> Any:
    """A command-line value is text, not YAML: convert it by the field's type (so 3e-4 is a float); a list or a
    mapping is written in YAML's flow style (`[a=1, b=2]`, `{name: recipe.yaml}`) and replaces the recipe's."""
    if typing.get_origin(hint) in (list, dict):
        value = parse_yaml(text)
        return [] if value is None and typing.get_origin(hint) is list else value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() in ("null", "none", "~"):
            return None
        (hint,) = [opt for opt in typing.get_args(hint) if opt is not type(None)]
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise RecipeError(f"{where}: expected true or false, got {text!r}")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            kind = "an integer" if hint is int else "a number"
            raise RecipeError(f"{where}: expected {kind}, got {text!r}") from None
    return text


# ---------------------------------------------------------------- loading


def recipe_from_dict(data: Any, root: type = Recipe) -> Any:
    """A root dataclass of sections (a Recipe by default) from parsed YAML, checked key by key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping of sections ({', '.join(_fields(root))})")
    recipe = root()
    for section, values in data.items():
        if section not in _fields(root):
            raise RecipeError(f"unknown section '{section}'{did_you_mean(section, _fields(root))}")
        if not isinstance(values, dict):
            raise RecipeError(f"section '{section}' must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _set_field(recipe, section, str(key), value)
    return recipe


def apply_overrides(recipe: Any, overrides: typing.Sequence[str]) -> Any:
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=3e-4")
        _set_field(recipe, section, key, text.strip(), from_text=True)
    return recipe


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), root: type = Recipe) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        recipe = recipe_from_dict(parse_yaml(text), root)
        apply_overrides(recipe, overrides)
        if root is Recipe:
            check_consistency(recipe)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return recipe


def check_consistency(recipe: Recipe) -> None:
    """Settings that are each valid but contradict one another."""
    data, task = recipe.data, recipe.task
    if is_remote(recipe.run.dir):
        raise RecipeError(f"run.dir {recipe.run.dir}: run directories and checkpoints stay on a local or shared disk; "
                          f"only data.shards may be a URL")  # fmt: skip
    if recipe.load_size < data.image_size:
        raise RecipeError(f"data.load_size ({data.load_size}) is smaller than data.image_size ({data.image_size})")
    if recipe.augment.crop == "random" and recipe.load_size == data.image_size:
        raise RecipeError("augment.crop: random crops nothing when data.load_size equals data.image_size")
    if task.negative_max_iou >= task.positive_min_iou:
        raise RecipeError(
            f"task.negative_max_iou ({task.negative_max_iou}) must be below "
            f"task.positive_min_iou ({task.positive_min_iou})"
        )
    if task.margin_end < task.margin_start:
        raise RecipeError(f"task.margin_end ({task.margin_end}) is below task.margin_start ({task.margin_start})")
    if recipe.model.init == "run" and not recipe.model.weights:
        raise RecipeError("model.init: run needs model.weights set to the run directory to start from")
    if recipe.checkpoint.every_n_steps % recipe.train.grad_accum_steps:
        raise RecipeError(f"checkpoint.every_n_steps ({recipe.checkpoint.every_n_steps}) must be a multiple of "
                          f"train.grad_accum_steps ({recipe.train.grad_accum_steps}): checkpoints fall between windows")  # fmt: skip
    optim = recipe.optim
    if optim.nesterov and (optim.name != "sgd" or optim.momentum == 0):
        raise RecipeError(f"optim.nesterov needs optim.name: sgd with optim.momentum above 0 "
                          f"(got {optim.name}, momentum {optim.momentum})")  # fmt: skip
    if optim.warmup_epochs >= recipe.train.max_epochs:
        raise RecipeError(f"optim.warmup_epochs ({optim.warmup_epochs}) must be below train.max_epochs "
                          f"({recipe.train.max_epochs})")  # fmt: skip
    if recipe.model.init == "scratch" and recipe.model.weights:
        raise RecipeError(f"model.weights ({recipe.model.weights}) is only read with model.init pretrained, imagenet "
                          f"or run, and model.init is scratch")  # fmt: skip
    if recipe.train.freeze_trunk_epochs >= recipe.train.max_epochs:
        raise RecipeError(f"train.freeze_trunk_epochs ({recipe.train.freeze_trunk_epochs}) must be below "
                          f"train.max_epochs ({recipe.train.max_epochs}): the trunk would never train")  # fmt: skip
    timm_only = [name for name, on in (("optim.layer_decay", optim.layer_decay is not None),
                                       ("model.grad_checkpointing", recipe.model.grad_checkpointing)) if on]  # fmt: skip
    if timm_only and not recipe.model.backbone.startswith("timm:"):
        raise RecipeError(f"{', '.join(timm_only)}: needs a timm backbone (model.backbone: timm:<name>), and this one is "
                          f"{recipe.model.backbone}")  # fmt: skip
    if optim.layer_decay is not None and recipe.task.name == "segmentation":
        raise RecipeError("optim.layer_decay: the U-Net's timm encoder (a features_only model) has no layer groups for "
                          "it; give the encoder its own rate with optim.trunk_lr_scale")  # fmt: skip
    check_loss(recipe)


def check_loss(recipe: Recipe) -> None:
    """The loss section: a loss other than triplet trains the metric task; each parameter set must be one the loss
    (or the miner) reads."""
    loss = recipe.loss
    if loss.name != "triplet" and recipe.task.name != "triplet":
        raise RecipeError(f"loss.name: {loss.name} trains a metric-learning embedding: set task.name: triplet "
                          f"(now {recipe.task.name})")  # fmt: skip
    proxy = loss.name in ("proxy_anchor", "arcface", "subcenter_arcface")
    if loss.miner != "none" and (loss.name == "triplet" or proxy):
        raise RecipeError(f"loss.miner: {loss.miner} selects pairs for the pair losses (multi_similarity, contrastive, "
                          f"supcon, ntxent, circle); {loss.name} {'mines its own triplets (task.mining)' if not proxy else 'has no pairs'}")  # fmt: skip
    readable = set(LOSS_PARAMETERS[loss.name]) | set(MINER_PARAMETERS[loss.miner]) | ({"proxy_lr_scale"} if proxy else set())
    for parameter in dataclasses.fields(LossConfig):
        if parameter.name in ("name", "miner", "gather") or parameter.name in readable:
            continue
        if getattr(loss, parameter.name) != parameter.default:
            reads = ", ".join(f"loss.{n}" for n in sorted(readable)) or "no loss.* parameter"
            raise RecipeError(f"loss.{parameter.name} is not read by loss.name {loss.name} (miner {loss.miner}): it "
                              f"reads {reads}")  # fmt: skip


def check_against_shards(recipe: Recipe, has_masks: bool, shards: str) -> None:
    """Checked when the shards are opened: what the recipe asks of the data must be in it."""
    if has_masks:
        return
    if recipe.task.name == "segmentation":
        raise RecipeError(f"task.name: segmentation needs masks, and the shards in {shards} have none")
    if recipe.data.zero_background:
        raise RecipeError(f"data.zero_background needs masks, and the shards in {shards} have none")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
