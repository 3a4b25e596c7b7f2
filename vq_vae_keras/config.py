"""All hyper-parameters of a run, as plain fields (reference defaults)."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError


QUANTIZERS = ("vq", "ema", "gumbel", "fsq")
# Options that only some quantizers take, and which (an option in no group applies to every
# quantizer). validate refuses one that is on (not its off default: None, False, 0) with another
# quantizer; the others have defaults that are not off, so only the command line can tell one was
# given (--beta with gumbel). The layers agree: codebook_terms is True exactly where beta applies.
QUANTIZER_OPTIONS = {
    ("restart_dead", "kmeans_init"): ("vq", "ema"),
    ("rotation_trick",): ("vq", "ema"),
    ("cosine_codebook",): ("vq", "ema"),
    ("fsq_levels",): ("fsq",),
    ("beta",): ("vq", "ema"),
    ("ema_decay", "ema_epsilon"): ("ema",),
    ("gumbel_temperature", "gumbel_temperature_end", "gumbel_anneal_steps", "gumbel_schedule", "gumbel_kl_weight"):
        ("gumbel",),
}
MAX_FSQ_CODES = 2 ** 16  # the prior has a softmax over every code
SCHEDULES = ("cosine", "linear", "exponential")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZER_FIELDS = ("lr", "lr_schedule", "warmup_steps", "lr_min_ratio")  # each with a prior_ twin
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
PRIORS = ("attention", "pixelcnn")
LEVELS = (1, 2)
PRIOR_LEVELS = ("top", "bottom")  # a two-level run's priors, in training order


@dataclass
class Config:
    # VQ-VAE (the reference's globals)
    img_dim: int = 128
    z_dim: int = 128
    num_codes: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    # learning-rate schedule (a departure, off by default: the reference's Adam keeps lr throughout)
    lr_schedule: str = "constant"  # "constant" or "cosine": from lr down to lr * lr_min_ratio as the run ends
    warmup_steps: int = 0  # linear warm-up from 0 to lr over the first steps (either schedule); 0: none
    lr_min_ratio: float = 0.0  # cosine: the lr the run ends at, as a fraction of lr (Keras's alpha)
    beta: float = 0.25  # weight of the commitment term mse_z (vq, ema: gumbel and fsq have none)
    # codebook health: every option off by default, which is the reference
    quantizer: str = "vq"  # "vq" (the reference), "ema" (EMA codebook), "gumbel" (Gumbel-softmax), "fsq"
    fsq_levels: Optional[list] = None  # fsq: levels per channel, e.g. [4, 4, 4]; num_codes = their product
    rotation_trick: bool = False  # vq, ema: gradient to z by the rotation trick, not the straight-through copy
    cosine_codebook: bool = False  # vq, ema: z and code vectors l2-normalised (distance and lookup)
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    restart_dead: int = 0  # move a code unused for this many steps to a random encoder output; 0: never
    kmeans_init: bool = False  # codebook from k-means on the first batch's encoder outputs
    gumbel_temperature: float = 1.0  # annealed from this ...
    gumbel_temperature_end: float = 1 / 16  # ... to this (DALL-E's values) ...
    gumbel_anneal_steps: int = 5000  # ... over this many steps ...
    gumbel_schedule: str = "cosine"  # ... along "cosine", "linear" or "exponential"
    gumbel_kl_weight: float = 5e-4  # weight of KL(q || uniform) per code position
    # VQ-VAE-2 (a departure, off by default: one level is the reference)
    levels: int = 1  # 2: a top level of codes at img_dim/8 conditions the bottom level at img_dim/4
    top_num_codes: Optional[int] = None  # codes in the top level's codebook; None: num_codes
    # prior ("PixelAtt", the comment block at the end of the reference)
    prior_heads: int = 8
    prior_head_dim: int = 32
    prior_depth: int = 4
    prior_batch_size: int = 32
    prior_lr: float = 1e-3
    prior_lr_schedule: str = "constant"  # the prior's lr_schedule, warmup_steps and lr_min_ratio
    prior_warmup_steps: int = 0
    prior_lr_min_ratio: float = 0.0
    val_split: float = 0.0  # codes held out for val_nll; 0: train on every code map, as the reference
    prior_seed: Optional[int] = None  # None: the run's seed
    # prior kind and class conditioning: departures, off by default
    prior: str = "attention"  # "attention" (the reference's PixelAtt) or "pixelcnn" (gated PixelCNN)
    pixelcnn_width: int = 128  # channels of both stacks
    pixelcnn_depth: int = 16  # gated layers; depth * (kernel // 2) >= w - 1: the last code of a 32x32 map sees all
    pixelcnn_kernel: int = 5  # odd: vertical convolutions k//2+1 x k, horizontal 1 x k//2+1
    classes: Optional[list] = None  # class names (first-level subfolders of data): a conditional prior
    # run
    data: Optional[str] = None  # the VQ-VAE's image folder; None: trained on arrays or a dataset from Python
    prior_data: Optional[str] = None  # images the prior's code maps come from; None: data, the VQ-VAE's
    seed: int = 0
    sample_every: int = 100
    # speed: results within float noise of the reference, except as README says
    precision: str = "float32"  # "float32", "mixed_bfloat16" or "mixed_float16"
    jit_compile: bool = False  # XLA for the VQ-VAE's training step (slower than oneDNN on CPU: bench/README.md)
    prior_jit_compile: bool = False  # XLA for the prior's (not measured faster on CPU at the demo's size)
    sample_every_epochs: int = 1  # prior: sample grid every N epochs; 0: never
    # several devices
    sync_batchnorm: bool = False  # under a strategy: BatchNorm statistics of the global batch, not each replica's

    @property
    def num_layers(self) -> int:
        """Residual blocks in encoder and decoder: int(log2(img_dim) - 4), 3 at 128 px, 0 below 32."""
        return max(0, int(math.log2(self.img_dim) - 4))

    @property
    def grid_shape(self) -> tuple:
        """(h, w) of the latent code grid."""
        return (self.img_dim // 4, self.img_dim // 4)

    @property
    def top_grid_shape(self) -> tuple:
        """(h, w) of the top level's code grid (levels 2)."""
        return (self.img_dim // 8, self.img_dim // 8)

    @property
    def top_codes(self) -> int:
        """Codes in the top level's codebook (levels 2): top_num_codes, or num_codes."""
        return self.num_codes if self.top_num_codes is None else self.top_num_codes

    @property
    def prior_dim(self) -> int:
        return 2 * self.z_dim

    def _check_types(self):
        """Each field holds its annotated type (an int is fine for a float), every float is finite."""
        kinds = {"list": ((list, tuple), "a list"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
                 "str": ((str,), "a string"), "bool": ((bool,), "true or false")}
        for field in dataclasses.fields(self):
            value, annotation = getattr(self, field.name), str(field.type)
            if value is None and "Optional" in annotation:
                continue
            kind = next(k for k in kinds if k in annotation)
            types, words = kinds[kind]
            if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
                raise UsageError(f"{field.name} must be {words}, got {value!r}", field.name)
            if kind == "float" and not math.isfinite(value):
                raise UsageError(f"{field.name} must be finite, got {value}", field.name)

    def validate(self) -> "Config":
        def need(ok, message, field=None):
            if not ok:
                raise UsageError(message, field=field)

        self._check_types()
        need(self.img_dim >= 16 and self.img_dim % 4 == 0,
             f"img_dim must be a multiple of 4 and at least 16, got {self.img_dim}", "img_dim")
        for name in ("z_dim", "batch_size", "prior_heads", "prior_head_dim", "prior_depth",
                     "prior_batch_size", "sample_every", "pixelcnn_width", "pixelcnn_depth"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}", name)
        need(self.num_codes >= 2, f"num_codes must be at least 2, got {self.num_codes}", "num_codes")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}", "lr")
        need(self.prior_lr > 0, f"prior_lr must be > 0, got {self.prior_lr}", "prior_lr")
        for prior in (False, True):
            schedule, warmup, ratio = (self.stage_field(name, prior) for name in ("lr_schedule", "warmup_steps", "lr_min_ratio"))
            need(getattr(self, schedule) in LR_SCHEDULES,
                 f"{schedule} must be one of {', '.join(LR_SCHEDULES)}, got {getattr(self, schedule)!r}", schedule)
            need(getattr(self, warmup) >= 0, f"{warmup} must be >= 0, got {getattr(self, warmup)}", warmup)
            need(0 <= getattr(self, ratio) < 1, f"{ratio} must be in [0, 1), got {getattr(self, ratio)}", ratio)
            need(getattr(self, ratio) == 0 or getattr(self, schedule) == "cosine",
                 f"{ratio} applies to {schedule} cosine, not {getattr(self, schedule)}", ratio)
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}", "beta")
        need(0 <= self.val_split < 1, f"val_split must be in [0, 1), got {self.val_split}", "val_split")
        need(self.quantizer in QUANTIZERS, f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}", "quantizer")
        need(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}", "ema_decay")
        need(self.ema_epsilon > 0, f"ema_epsilon must be > 0, got {self.ema_epsilon}", "ema_epsilon")
        need(self.restart_dead >= 0, f"restart_dead must be >= 0, got {self.restart_dead}", "restart_dead")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}", "seed")
        need(self.prior_seed is None or self.prior_seed >= 0, f"prior_seed must be >= 0, got {self.prior_seed}", "prior_seed")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for group, kinds in QUANTIZER_OPTIONS.items():
            on = [name for name in group if defaults[name] in (None, False, 0) and getattr(self, name)]
            if on and not self.takes(on[0]):
                verb = "apply" if len(group) > 1 or group[0].endswith("s") else "applies"
                where = f"quantizer {kinds[0]}" if len(kinds) == 1 else f"the {' and '.join(kinds)} quantizers"
                need(False, f"{' and '.join(group)} {verb} to {where}, not {self.quantizer}", on[0])
        if self.takes("fsq_levels"):
            levels = self.fsq_levels
            need(levels is not None, "fsq_levels are needed with quantizer fsq (--quantizer fsq needs --fsq-levels), e.g. [4, 4, 4] for 64 codes",
                 "fsq_levels")
            need(len(levels) >= 1 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in levels),
                 f"fsq_levels must be integers of at least 2, got {levels}", "fsq_levels")
            need(math.prod(levels) <= MAX_FSQ_CODES,
                 f"fsq_levels give {math.prod(levels)} codes, more than {MAX_FSQ_CODES}", "fsq_levels")
            need(math.prod(levels) == self.num_codes,
                 f"num_codes must be the product of fsq_levels {levels} ({math.prod(levels)}), got {self.num_codes}", "num_codes")
        need(self.gumbel_temperature > 0, f"gumbel_temperature must be > 0, got {self.gumbel_temperature}", "gumbel_temperature")
        need(self.gumbel_temperature_end > 0, f"gumbel_temperature_end must be > 0, got {self.gumbel_temperature_end}",
             "gumbel_temperature_end")
        need(self.gumbel_anneal_steps >= 1, f"gumbel_anneal_steps must be at least 1, got {self.gumbel_anneal_steps}", "gumbel_anneal_steps")
        need(self.gumbel_schedule in SCHEDULES,
             f"gumbel_schedule must be one of {', '.join(SCHEDULES)}, got {self.gumbel_schedule!r}", "gumbel_schedule")
        need(self.gumbel_kl_weight >= 0, f"gumbel_kl_weight must be >= 0, got {self.gumbel_kl_weight}", "gumbel_kl_weight")
        need(self.levels in LEVELS, f"levels must be 1 or 2, got {self.levels}", "levels")
        if self.levels == 2:
            need(self.img_dim % 8 == 0, f"img_dim must be a multiple of 8 with levels 2 (the top codes are at "
                                        f"img_dim/8), got {self.img_dim}", "img_dim")
        else:
            need(self.top_num_codes is None, "top_num_codes applies to levels 2 (--levels 2)", "top_num_codes")
        if self.top_num_codes is not None:
            need(self.top_num_codes >= 2, f"top_num_codes must be at least 2, got {self.top_num_codes}", "top_num_codes")
            need(self.quantizer != "fsq" or self.top_num_codes == self.num_codes,
                 f"with quantizer fsq both levels take fsq_levels: top_num_codes must be {self.num_codes} or "
                 f"left out, got {self.top_num_codes}", "top_num_codes")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}", "precision")
        for name in ("jit_compile", "prior_jit_compile", "sync_batchnorm"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}", name)
        need(self.prior in PRIORS, f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}", "prior")
        need(self.pixelcnn_kernel >= 3 and self.pixelcnn_kernel % 2 == 1,
             f"pixelcnn_kernel must be odd and at least 3, got {self.pixelcnn_kernel}", "pixelcnn_kernel")
        if self.prior == "pixelcnn":  # else the last codes of a row never see the codes above-right of them
            reach, width = self.pixelcnn_depth * (self.pixelcnn_kernel // 2), self.img_dim // 4
            need(reach >= width - 1, f"pixelcnn_depth * (pixelcnn_kernel // 2) = {reach} must be at least the code "
                                     f"map's width - 1 = {width - 1}: raise pixelcnn_depth or pixelcnn_kernel", "pixelcnn_depth")
        if self.classes is not None:
            names = self.classes
            need(len(names) >= 1 and all(isinstance(c, str) and c for c in names),
                 f"classes must be a list of class names, got {names!r}", "classes")
            need(len(set(names)) == len(names), f"classes must not repeat a name, got {names!r}", "classes")
        need(self.sample_every_epochs >= 0, f"sample_every_epochs must be >= 0, got {self.sample_every_epochs}", "sample_every_epochs")
        return self

    def check_level(self, level) -> None:
        """A prior's level: None for a one-level run, "top" or "bottom" for a two-level one."""
        if self.levels == 1 and level is not None:
            raise UsageError(f"level {level!r}: this run has one level of codes (levels 1): its prior has no level",
                             "level")
        if self.levels == 2 and level not in PRIOR_LEVELS:
            raise UsageError(f"level must be \"top\" or \"bottom\" for a two-level run's prior, got {level!r}", "level")

    def takes(self, option) -> bool:
        """Whether a Config field applies to this config's quantizer (QUANTIZER_OPTIONS)."""
        return all(self.quantizer in kinds for group, kinds in QUANTIZER_OPTIONS.items() if option in group)

    @staticmethod
    def stage_field(name, prior=False) -> str:
        """The name of a field that each stage has its own of: "lr" is the VQ-VAE's, "prior_lr" the prior's."""
        return "prior_" + name if prior else name

    def lr_scheduled(self, prior=False) -> bool:
        """Whether the VQ-VAE's (or the prior's) learning rate follows a schedule (models.learning_rate)."""
        return (getattr(self, self.stage_field("lr_schedule", prior)) != "constant"
                or getattr(self, self.stage_field("warmup_steps", prior)) > 0)

    def gumbel_temperature_at(self, step) -> float:
        """The annealed Gumbel-softmax temperature at a global step."""
        start, end = self.gumbel_temperature, self.gumbel_temperature_end
        t = min(step / self.gumbel_anneal_steps, 1.0)
        if self.gumbel_schedule == "linear":
            return start + (end - start) * t
        if self.gumbel_schedule == "exponential":
            return start * (end / start) ** t
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        """Write every field as JSON (atomically), plus the Keras backend that trained with it
        ("backend": the last stage's) and the versions of keras, tensorflow and that backend."""
        import importlib

        import keras
        import tensorflow as tf

        from .io import atomic_write_text

        record = self.to_dict()
        backend = keras.backend.backend()
        record["backend"] = backend
        record["versions"] = {"keras": keras.__version__, "tensorflow": tf.__version__}
        if backend != "tensorflow":
            record["versions"][backend] = importlib.import_module(backend).__version__
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "Config":
        if not os.path.isfile(path):
            raise UsageError(f"no config at {path}")
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read config {path}: {e}") from None
        if not isinstance(record, dict):
            raise UsageError(f"config {path} is not a JSON object")
        record.pop("versions", None)
        record.pop("backend", None)  # runs of every backend load under any
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise UsageError(f"config {path} has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**record).validate()
        except TypeError as e:
            raise UsageError(f"config {path}: {e}") from None
        except UsageError as e:  # name the file: the field is in it, not on the command line
            raise UsageError(f"config {path}: {e}", field=e.field) from None
