"""The config tree: typed dataclasses loaded from YAML, dotted CLI overrides and validation.

Every field is declared once, with its type, default and a one-line description in `help`. The
loader rejects unknown fields and bad values with a message naming the dotted field, so a run
fails before any worker starts. The DeepSpeed JSON is derived from this tree (engine/), never
kept as a second source of truth.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from iil_dist.data.scenario import DRIFT_FIELDS, Drift


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


def _f(default: Any, help: str, **checks: Any) -> Any:
    """Declares a field with its one-line description and optional range checks (gt, ge, lt, le)."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class DataConfig:
    source: Literal["digits", "cifar100", "imagefolder", "imagenet100", "arrays"] = _f(
        "digits",
        "dataset the scenario is built from (digits is bundled; the others read data.source_path; arrays: a folder "
        "with images.npy and labels.npy)",
    )
    source_path: str = _f(
        "", "cifar100: the official cifar-100-python.tar.gz; imagefolder/imagenet100: a folder with train/ and val/"
    )
    class_list: str = _f(
        "", "file of class folder names, one per line, to keep (imagenet100 defaults to the shipped 100-class list)"
    )
    root: str = _f(
        "",
        "scenario directory written by `prepare` and read by `train`; empty derives "
        "<scenarios_root>/<source>-<drift>-t<num_phases>-split<split_seed>-order<order_seed>",
    )
    scenarios_root: str = _f("data", "parent of the scenario directories derived when data.root is empty")
    drift: Literal["none", "rotation", "corruption", "subpopulation"] = _f(
        "rotation",
        "shift of the incremental phases: rotation (METHOD.md §2), corruption (blur + low contrast), "
        "subpopulation (sub-groups of each class kept out of D(0)), or none (the plain split)",
    )
    num_phases: int = _f(10, "number of incremental phases T after the base phase", ge=1)
    base_fraction: float = _f(0.5, "class-stratified share of the training set that forms D(0)", gt=0, lt=1)
    test_fraction: float = _f(
        0.25, "class-stratified share held out as the test set, for a source without an official one", gt=0, lt=1
    )
    split_seed: int = _f(0, "seed of the base/test split", ge=0)
    order_seed: int = _f(0, "seed of the order of the incremental phases", ge=0)
    rotation_min_deg: float = _f(20.0, "smallest rotation angle of drifted images, degrees", ge=0)
    rotation_max_deg: float = _f(60.0, "largest rotation angle of drifted images, degrees", ge=0, le=180)
    blur_min: float = _f(0.06, "corruption: smallest Gaussian blur sigma, as a fraction of the image side", ge=0)
    blur_max: float = _f(0.12, "corruption: largest Gaussian blur sigma, as a fraction of the image side", ge=0)
    contrast_min: float = _f(0.3, "corruption: smallest contrast factor (1 keeps the contrast)", ge=0, le=1)
    contrast_max: float = _f(0.6, "corruption: largest contrast factor (1 keeps the contrast)", ge=0, le=1)
    subgroups: int = _f(3, "subpopulation: sub-groups per class (k-means on 8x8 thumbnails)", ge=2)
    hidden_subgroups: int = _f(
        1, "subpopulation: the smallest sub-groups of each class kept out of D(0), seen only in phases >= 1", ge=1
    )
    image_size: int = _f(
        16, "side the images are resized to (square) before drift and sharding; 0 keeps their size", ge=0
    )
    max_side: int = _f(0, "downscale images whose longer side exceeds this many pixels (aspect kept); 0 never", ge=0)
    encode: Literal["png", "jpeg", "keep"] = _f(
        "png", "stored format: png, jpeg, or keep (source files' bytes where pixels are unchanged, else JPEG)"
    )
    jpeg_quality: int = _f(90, "JPEG quality when images are (re-)encoded as JPEG", ge=1, le=100)
    samples_per_shard: int = _f(200, "samples per WebDataset tar shard (unless data.shard_size_mb is set)", ge=1)
    shard_size_mb: float = _f(
        0.0, "target shard size in MB (e.g. 256 at ImageNet scale); 0 uses data.samples_per_shard", ge=0
    )
    prepare_workers: int = _f(0, "processes writing shards in parallel; 0 uses every CPU", ge=0)
    shard_url: str = _f(
        "",
        "read shards through this URL template instead of data.root, e.g. 'pipe:aws s3 cp s3://b/scen/{file} -' "
        "or 's3://b/scen/{file}' (fsspec); {file} is a manifest shard path. Streams (see README)",
    )
    train_transform: Literal["none", "pad_crop_flip", "resized_crop_flip"] = _f(
        "none", "augmentation of training samples: none, CIFAR-style pad+crop+flip, ImageNet-style resized crop+flip"
    )
    eval_transform: Literal["none", "resize_center_crop"] = _f(
        "none", "evaluation transform: none, or resize the shorter side and take a centre crop"
    )
    crop_size: int = _f(0, "output side of the transforms; 0 uses data.image_size", ge=0)
    loader_workers: int = _f(
        0, "data-loading processes per rank (decoding and augmentation); 0 loads in the rank", ge=0
    )
    verify_checksums: bool = _f(True, "check every shard's sha256 against the manifest before training")
    in_memory: bool = _f(True, "decode each split once and keep it in memory (small datasets such as digits)")
    on_error: Literal["raise", "skip"] = _f(
        "raise",
        "a sample that cannot be decoded (bad image bytes, label outside the classes): raise an error naming the "
        "shard and key, or skip it, log it and count it in results.json (bad_samples); broken shards always raise",
    )

    def shift(self) -> Drift:
        """The drift these fields describe (it checks their ranges)."""
        return Drift(self.drift, **{name: getattr(self, name) for name in DRIFT_FIELDS})

    @property
    def scenario_dir(self) -> Path:
        """`root`, or a name derived from the scenario's settings, so that another drift, phase count or
        seed gets its own directory instead of clashing with a prepared one."""
        if self.root:
            return Path(self.root)
        name = f"{self.source}-{self.drift}-t{self.num_phases}-split{self.split_seed}-order{self.order_seed}"
        return Path(self.scenarios_root) / name


@dataclass
class ModelConfig:
    name: Literal["small_cnn", "resnet18_cifar", "resnet18", "resnet34", "resnet50"] = _f(
        "small_cnn", "architecture from the model registry"
    )


@dataclass
class MethodConfig:
    name: Literal["dbd", "finetune", "lwf", "mean_teacher", "joint"] = _f(
        "dbd",
        "learning method of phases >= 1: dbd (the method), finetune, lwf, mean_teacher, or joint "
        "(trains on D(0) + ... + D(t): the upper bound that breaks the IIL rule on purpose)",
    )
    fused_label: bool = _f(
        True, "dbd: train on fused labels (teacher prediction fused with the one-hot label); off: no label term"
    )
    dusting: bool = _f(True, "dbd: distil the teacher on Gaussian-dusted inputs")
    consolidation: bool = _f(True, "dbd: fold the student into the deployed teacher by KC-EMA")
    beta_inner: float = _f(1.0, "fused-label weight of the one-hot label for inner samples", ge=0)
    beta_outer: float = _f(1.0, "fused-label weight of the one-hot label for outer samples", ge=0)
    tau_fuse: float = _f(1.0, "temperature of the teacher prediction in the fused label", gt=0)
    sigma: float = _f(1.0, "standard deviation of the dusting noise, in normalised input units", ge=0)
    tau_distill: float = _f(2.0, "temperature of the dusted-input distillation", gt=0)
    lambda_dis: float = _f(1.0, "weight of the dusted-input distillation loss", ge=0)
    ema_alpha: float = _f(0.9, "KC-EMA decay: teacher <- alpha * teacher + (1 - alpha) * student", gt=0, lt=1)
    ema_every_epochs: int = _f(1, "epochs between consolidations after the freezing period", ge=1)
    freeze_epochs: int = _f(10, "epochs at the start of a phase in which the teacher is not updated", ge=0)
    targets_from: Literal["teacher", "phase_start"] = _f(
        "teacher",
        "model that gives fused-label and distillation targets: current teacher or phase-start copy",
    )
    lwf_lambda: float = _f(1.0, "lwf: weight of the distillation to the phase-start model", ge=0)
    lwf_tau: float = _f(2.0, "lwf: temperature of the distillation to the phase-start model", gt=0)
    mt_alpha: float = _f(
        0.99, "mean_teacher: EMA decay applied after every step: teacher <- a * teacher + (1 - a) * student", gt=0, lt=1
    )


@dataclass
class OptimConfig:
    base_lr: float = _f(0.05, "peak learning rate of phase 0 (SGD, cosine-decayed over the phase)", gt=0)
    lr: float = _f(0.02, "peak learning rate of phases >= 1 (SGD, cosine-decayed over each phase)", gt=0)
    momentum: float = _f(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _f(5e-4, "SGD weight decay", ge=0)
    grad_clip: float = _f(1.0, "gradient-norm clipping threshold; 0 disables it", ge=0)
    batch_size: int = _f(32, "samples per step on each rank", ge=1)
    base_epochs: int = _f(30, "epochs of phase 0 (the base model)", ge=1)
    epochs_per_phase: int = _f(30, "epochs of each incremental phase", ge=1)
    eval_batch_size: int = _f(256, "samples per evaluation batch on each rank", ge=1)
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop",
        "a step whose loss has a non-finite term on any rank: stop with a message naming phase, step and term, "
        "or skip the step on every rank and count it (results.json: skipped_steps)",
    )


@dataclass
class DistConfig:
    num_workers: int = _f(2, "Ray Train workers, one DeepSpeed rank each", ge=1)
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage of the student; the teacher is partitioned the same way", ge=0, le=3)
    use_gpu: bool = _f(False, "one GPU per worker, nccl and bf16; false runs fp32 on CPU with gloo")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", "bf16 runs forward passes under torch.autocast(bfloat16); weights, gradients, EMA stay fp32"
    )
    channels_last: bool = _f(
        False, "feed inputs, hence activations, in channels_last memory format (faster convs on GPU)"
    )
    cpus_per_worker: float = _f(1.0, "CPUs Ray reserves for each worker", gt=0)
    torch_threads: int = _f(1, "intra-op threads of each worker on CPU", ge=1)
    poll_interval_s: float = _f(
        0.2, "seconds between the Ray Train controller's polls of the workers; a checkpoint can wait this long", gt=0
    )
    max_failures: int = _f(
        0, "restarts of the worker group from the last checkpoint after a lost worker; -1 retries forever", ge=-1
    )


@dataclass
class CheckpointConfig:
    every_epochs: int = _f(1, "epochs between checkpoints inside a phase; 0 checkpoints only at phase ends", ge=0)
    keep: int = _f(2, "newest checkpoints kept; older ones are deleted", ge=1)
    storage_path: str = _f(
        "", "where Ray Train keeps checkpoints: a shared path or URI (s3://, gs://); empty is RUN_DIR/checkpoints"
    )


@dataclass
class TrackingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = _f(
        "offline", "wandb mode; the WANDB_MODE environment variable overrides it"
    )
    project: str = _f("iil-dist", "wandb project")
    group: str = _f("", "wandb group of the run; empty uses the experiment name (a study sets its own name)")
    log_every: int = _f(
        10, "steps per metric record (wandb, metrics.jsonl): loss terms averaged over the window and ranks", ge=1
    )
    print_every: int = _f(100, "steps between console progress lines; a multiple of tracking.log_every", ge=1)
    step_timing: bool = _f(
        False,
        "time the sections of every training step (data, data_epoch_start: the first batch of an epoch, teacher "
        "forward, student forward, backward, optimizer, consolidation, logging, checkpoint) into results.json "
        "step_ms; synchronises the GPU at each section",
    )
    init_timeout_s: float = _f(
        30.0, "online mode: seconds to wait for the wandb server before logging offline instead (with a warning)", gt=0
    )
    finish_timeout_s: float = _f(
        120.0,
        "seconds the end of a run waits for wandb to finish uploading; after that it warns and leaves the run's "
        "files for `wandb sync` (a server lost mid-run can otherwise hold the job for good)",
        gt=0,
    )


@dataclass
class Config:
    name: str = _f("digits-rotation", "experiment name: run directory, Ray run name and wandb group")
    run_root: str = _f("runs", "directory under which each experiment gets its run directory")
    seed: int = _f(0, "seed of model initialisation, data order and dusting noise")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "scenario and shards"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "architecture"})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "IIL method"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimisation"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "workers and sharding"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "logging"})

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


def _check_value(path: str, tp: Any, value: Any) -> Any:
    """Returns `value` converted to `tp`, or raises ConfigError naming `path`."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if get_origin(tp) in (types.UnionType, typing.Union):
        if value is None and type(None) in get_args(tp):
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")


def _check_range(path: str, meta: typing.Mapping[str, Any], value: Any) -> None:
    bounds = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
              "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}  # fmt: skip
    for key, (ok, sign) in bounds.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{path}: must be {sign} {meta[key]}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown field {where}{unknown[0]}; known fields of {prefix or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
        else:
            kwargs[name] = _check_value(path, tp, value)
            _check_range(path, fields[name].metadata, kwargs[name])
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Checks that span several fields."""
    d, m, o = cfg.data, cfg.method, cfg.optim
    try:
        d.shift()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if m.name == "dbd" and m.consolidation and m.freeze_epochs >= o.epochs_per_phase:
        raise ConfigError(
            f"method.freeze_epochs ({m.freeze_epochs}) must be < optim.epochs_per_phase ({o.epochs_per_phase}) "
            "or the teacher is never consolidated; set method.consolidation=false to train without KC-EMA"
        )
    if m.name == "dbd" and not (m.fused_label or m.dusting):
        raise ConfigError("method: dbd needs method.fused_label or method.dusting (or both) switched on")
    if not (d.crop_size or d.image_size):
        raise ConfigError(
            "data.crop_size: data.image_size is 0 (images keep their own sizes), so batches need a fixed size: "
            "set data.crop_size with data.train_transform and data.eval_transform, or set data.image_size"
        )
    if not d.image_size and "none" in (d.train_transform, d.eval_transform):
        raise ConfigError("data.train_transform and data.eval_transform must crop (not none) when data.image_size is 0")
    if d.source != "digits" and not d.source_path:
        raise ConfigError(f"data.source_path: required for data.source={d.source}")
    if d.shard_url and "{file}" not in d.shard_url:
        raise ConfigError(f"data.shard_url: must contain {{file}}, got {d.shard_url!r}")
    t = cfg.tracking
    if t.print_every % t.log_every:
        raise ConfigError(
            f"tracking.print_every ({t.print_every}) must be a multiple of tracking.log_every ({t.log_every}): "
            "a console line shows the metric record of its step"
        )
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: must be a non-empty name without '/', got {cfg.name!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses `a.b.c=value` (value in YAML syntax) into (["a", "b", "c"], value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.field=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds and validates a Config from a plain mapping plus dotted overrides."""
    raw = _deep_copy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML recipe (safe loader), applies dotted overrides and validates the result."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    try:
        return from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# Fields a resumed run may change: how it runs, not what it computes. The world size and ZeRO stage
# may change too: the teacher and student are restored from world-size independent forms.
RESUMABLE_PREFIXES = ("dist.", "tracking.", "checkpoint.", "data.verify_checksums", "data.in_memory",
                      "data.loader_workers", "data.prepare_workers", "data.shard_url", "data.source_path",
                      "optim.eval_batch_size")  # fmt: skip


def resume_conflicts(saved: Config, new: Config) -> list[str]:
    """Dotted fields whose values differ between a saved run's config and the config to resume it with,
    leaving out those a resumed run may change."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_PREFIXES)]


def _flat(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default and description (used by `iil-dist train --help-config`)."""
    lines = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{path}."))
        else:
            lines.append(f"{path} = {f.default!r}  # {f.metadata['help']}")
    return lines


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    return raw
