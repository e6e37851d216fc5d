"""TrainConfig: the trainer's settings, with TRL `DPOConfig` / `KTOConfig` names where TRL has one.

Sources, later wins: dataclass defaults < `--config file.yaml|json` < command-line flags.
The defaults are the embedded demo (tiny random Llama on the shipped sort-the-digits data; its duration is in
docs/bench.md, "Durations"); for a real model set at least `model`, `dataset`, `learning_rate` (TRL default: 1e-6).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class PrefoptInputError(ValueError):
    """Bad user input (config, data, checkpoint). The CLI prints the message without a traceback."""


class NonFiniteError(PrefoptInputError):
    """Training stopped on a non-finite loss or gradient norm (the update was not applied)."""


# TRL loss names, used only when the loss module cannot tell us its own list.
_FALLBACK_PAIRED_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                           "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
                           "simpo", "orpo", "cpo")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class TrainConfig:
    # ---- what to train -------------------------------------------------------------------------------
    model: str = "tiny-llama"
    """'tiny-llama' (random-init tiny Llama built from a config), a local HF model directory
    (config.json + weights), or 'package.module:factory' returning an nn.Module (see docs/trainer.md)."""
    model_config: dict = field(default_factory=dict)
    """Overrides of the tiny model's config (e.g. {"hidden_size": 128, "num_hidden_layers": 4})."""
    tokenizer: Optional[str] = None
    """Local HF tokenizer directory or tokenizer.json file; default: the shipped character tokenizer."""
    processor: Optional[str] = None
    """Local HF processor directory (AutoProcessor) for a dataset with images; default: `model` when it is a local
    directory holding a processor. Image rows are tokenized by it (docs/trainer.md "Image rows")."""
    dataset: Optional[str] = None
    """Preference JSONL (prompt/chosen/rejected, or prompt/completion/label for KTO; paired rows may carry `images`);
    default: shipped data."""
    output_dir: Optional[str] = None
    """Run directory; default runs/<timestamp>."""
    resume: Optional[str] = None
    """'latest' (newest verified checkpoint in output_dir; none yet: start at step 0) or a checkpoint directory."""
    overwrite: bool = False
    """Start over in an output_dir that already holds a run (deletes its checkpoints, metrics and model)."""

    # ---- loss (TRL DPOConfig / KTOConfig names) ----------------------------------------------------
    beta: float = 0.1
    """Strength of the KL-to-reference term (DPO beta; IPO tau; ORPO lambda; KTO beta)."""
    loss_type: Union[str, list] = "sigmoid"
    """Loss name or comma-separated list (TRL names: sigmoid, ipo, robust, ..., simpo, orpo, cpo; kto,
    apo_zero_unpaired for unpaired rows)."""
    loss_weights: Optional[list] = None
    """One weight per loss_type entry (comma-separated); default: 1 each."""
    label_smoothing: float = 0.0
    """cDPO smoothing for sigmoid (prefopt-native; TRL 1.16 ignores it there), flip rate for robust, epsilon for
    exo_pair, smoothing for aot / simpo / cpo."""
    rpo_alpha: Optional[float] = None
    """RPO: adds rpo_alpha x the chosen completions' NLL to the loss (null: off)."""
    use_weighting: bool = False
    """WPO: weight each pair by its length-normalised policy probabilities (TRL use_weighting)."""
    ld_alpha: Optional[float] = None
    """LD-DPO: weight in [0, 1] of the log-probs past the length shared by chosen and rejected (null: off)."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO divergence: reverse_kl, forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = 1.0
    """alpha of alpha_divergence (1 = reverse KL)."""
    reference_free: bool = False
    """Use zero reference log-probs instead of a reference model (no frozen copy is kept)."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable examples' loss."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable examples' loss."""
    temperature: float = 1.0
    """Divide the logits by this before the log-softmax (policy and reference)."""
    router_aux_loss_coef: Optional[float] = None
    """Mixture-of-experts models: weight of the router load-balancing loss added to the loss (TRL's
    router_aux_loss_coef); null: the model config's own coefficient; 0: off."""

    # ---- data ------------------------------------------------------------------------------------------
    max_length: Optional[int] = 1024
    """Maximum tokens of prompt + completion; completions are cut to fit (null: no limit)."""
    max_prompt_length: Optional[int] = 512
    """Maximum prompt tokens, cut by truncation_mode (null: no limit)."""
    truncation_mode: str = "keep_end"
    """How an over-long prompt is cut: keep_end (drop its start, TRL default for prompts) or keep_start."""
    padding_free: bool = False
    """Pack sequences into one row with position_ids / cu_seqlens instead of padding."""
    skip_bad_rows: bool = False
    """Skip (and count) dataset rows that are malformed or have an empty text, instead of stopping at the first."""
    long_context: Optional[int] = None
    """Long-sequence preset: N tokens per sequence, padding-free, gradient checkpointing, one pair per step, a Llama
    with vocabulary 128256 from a config, generated pairs unless --dataset is given (docs/trainer.md "Long
    sequences"); a config file and flags override its settings."""

    # ---- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = 3e-3
    """AdamW peak learning rate (the demo's 3e-3 suits the tiny model only; TRL's default is 1e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    per_device_train_batch_size: int = 16
    """Rows (pairs, or unpaired examples) per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_train_epochs: float = 3.0
    """Passes over the data (used when max_steps <= 0)."""
    max_steps: int = -1
    """Optimizer steps to run; > 0 overrides num_train_epochs."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear LR warmup (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Linear LR warmup steps; > 0 overrides warmup_ratio."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (<= 0: no clipping)."""
    seed: int = 42
    """Seed of the model init, the data order and dropout."""
    bf16: bool = False
    """bf16 autocast for the forward (CPU or CUDA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (HF gradient_checkpointing_enable)."""
    fsdp: bool = False
    """Shard the model with FSDP2 (fully_shard per decoder layer + root) across the torchrun processes instead of
    DistributedDataParallel; checkpoints are sharded (torch.distributed.checkpoint). See docs/trainer.md."""
    context_parallel: int = 1
    """Split every sequence's tokens over this many ranks (groups of consecutive torchrun ranks read the same rows;
    the world is data-parallel replicas x this); combinable with --fsdp. See docs/trainer.md "Context parallelism"."""
    context_parallel_balanced: bool = False
    """With context_parallel: give each rank a head and a tail part of every sequence instead of one contiguous part,
    so the causal attention's work is the same on every rank (not with ld_alpha)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs once before training, cache them in the run directory and free the reference
    model."""

    # ---- logging / saving ------------------------------------------------------------------------------
    logging_steps: int = 5
    """Log averaged metrics every N optimizer steps (metrics.jsonl and the console)."""
    save_steps: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: Optional[int] = 2
    """Keep at most this many checkpoints (null: all)."""
    disable_tqdm: bool = False
    """No progress bar (it is also off when stderr is not a terminal: logs get plain step lines)."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, cuda or cuda:N."""
    backend: Optional[str] = None
    """prefopt kernel backend (auto|triton|cpp|torch); default: PREFOPT_BACKEND or auto."""

    # ------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @property
    def loss_types(self) -> list:
        if isinstance(self.loss_type, str):
            return [s.strip() for s in self.loss_type.split(",") if s.strip()]
        return list(self.loss_type)

    @property
    def is_kto(self) -> bool:
        return any(t in KTO_LOSSES for t in self.loss_types)

    def validate(self):
        def bad(msg):
            raise PrefoptInputError(msg)

        types = self.loss_types
        if not types:
            bad("loss_type is empty")
        check_loss_names(types)
        if any(t in KTO_LOSSES for t in types) and len(types) > 1:
            bad(f"KTO losses ({', '.join(KTO_LOSSES)}) cannot be combined with other loss types: {types}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            bad(f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(types)}: {types}")
        self._check_numbers(types)
        if self.save_steps < 0:
            bad(f"save_steps must be >= 0, got {self.save_steps}")
        if self.max_length is not None and self.max_length < 2:
            bad(f"max_length must be >= 2 (or null), got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            bad(f"max_prompt_length must be >= 1 (or null), got {self.max_prompt_length}")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            bad(f"truncation_mode must be 'keep_end' or 'keep_start', got {self.truncation_mode!r}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            bad("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            bad(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.resume is not None and self.resume != "latest" and not os.path.isdir(self.resume):
            bad(f"--resume: checkpoint directory {self.resume!r} does not exist (use 'latest' or a checkpoint-N dir)")
        if self.resume == "latest" and not self.output_dir:
            bad("--resume latest needs --output_dir (the run directory holding checkpoint-N folders)")
        if self.resume is not None and self.overwrite:
            bad("--resume and --overwrite exclude each other (continue the run, or start it over)")
        if self.context_parallel_balanced and self.ld_alpha is not None:
            bad("context_parallel_balanced cannot be combined with ld_alpha: LD-DPO counts completion tokens in rank "
                "order, which only the contiguous layout keeps")
        if self.context_parallel_balanced and self.context_parallel == 1:
            bad("context_parallel_balanced needs context_parallel > 1")
        if not isinstance(self.model_config, dict):
            bad(f"model_config must be a mapping, got {type(self.model_config).__name__}")

    # Ranges of the numeric settings: (low, high, low_inclusive, high_inclusive); None: unbounded. Every value must
    # also be finite. Checked here, before anything is written, so a bad number never reaches the loop.
    _RANGES = {
        "beta": (0.0, None, False, True), "label_smoothing": (0.0, 1.0, True, True),
        "rpo_alpha": (None, None, True, True), "ld_alpha": (0.0, 1.0, True, True),
        "f_alpha_divergence_coef": (None, None, True, True), "desirable_weight": (0.0, None, True, True),
        "undesirable_weight": (0.0, None, True, True), "temperature": (0.0, None, False, True),
        "learning_rate": (0.0, None, True, True), "weight_decay": (0.0, None, True, True),
        "adam_beta1": (0.0, 1.0, True, False), "adam_beta2": (0.0, 1.0, True, False),
        "adam_epsilon": (0.0, None, True, True), "num_train_epochs": (0.0, None, True, True),
        "warmup_ratio": (0.0, 1.0, True, True), "max_grad_norm": (0.0, None, True, True),
        "per_device_train_batch_size": (1, None, True, True), "gradient_accumulation_steps": (1, None, True, True),
        "logging_steps": (1, None, True, True), "save_steps": (0, None, True, True),
        "warmup_steps": (0, None, True, True), "save_total_limit": (0, None, True, True),
        "seed": (0, 2 ** 32 - 1, True, True), "max_steps": (None, None, True, True),
        "max_length": (2, None, True, True), "max_prompt_length": (1, None, True, True),
        "router_aux_loss_coef": (None, None, True, True),
        "long_context": (16, None, True, True),
        "context_parallel": (1, None, True, True),
    }

    def _check_numbers(self, types):
        hints = _field_types()
        for f in dataclasses.fields(self):
            value, optional = getattr(self, f.name), type(None) in typing.get_args(hints[f.name])
            if value is None and not optional:
                raise PrefoptInputError(f"{f.name} must be set (got null)")
        values = [(name, getattr(self, name)) for name in self._RANGES]
        values += [(f"loss_weights[{i}]", w) for i, w in enumerate(self.loss_weights or [])]
        for name, value in values:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PrefoptInputError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise PrefoptInputError(f"{name} must be a finite number, got {value}")
            lo, hi, lo_in, hi_in = self._RANGES.get(name, (None, None, True, True))
            if (lo is not None and (value < lo if lo_in else value <= lo)) or \
                    (hi is not None and (value > hi if hi_in else value >= hi)):
                rng = f"{'[' if lo_in else '('}{lo if lo is not None else '-inf'}, " \
                      f"{hi if hi is not None else 'inf'}{']' if hi_in and hi is not None else ')'}"
                raise PrefoptInputError(f"{name} must be in {rng}, got {value}")
        for name, (lo, hi, lo_in, hi_in) in _loss_label_smoothing_ranges().items():
            ls = self.label_smoothing
            if name in types and not ((ls >= lo if lo_in else ls > lo) and (ls <= hi if hi_in else ls < hi)):
                rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                raise PrefoptInputError(f"label_smoothing must be in {rng} for the {name!r} loss, got {ls}")

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrefoptInputError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid settings: "
                                    f"{', '.join(sorted(known))}")
        if data.get("long_context") is not None:  # the preset's settings, below the file's and the flags'
            from prefopt.trainer.long_context import preset_settings
            data = {**preset_settings(_coerce("long_context", data["long_context"], source)), **data}
        return cls(**{k: _coerce(k, v, source) for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        return cls.from_dict(load_config_file(path), source=path)

    @classmethod
    def from_args(cls, argv=None) -> "TrainConfig":
        """Parse `prefopt train` flags (plus --config FILE) into a config."""
        parser = build_arg_parser()
        args = parser.parse_args(argv)
        data = load_config_file(args.config) if args.config else {}
        flags = {k: v for k, v in vars(args).items() if k != "config"}
        data.update(flags)
        return cls.from_dict(data, source=args.config or "command line")


# ---------------------------------------------------------------------------------------------------------
def valid_loss_names() -> tuple:
    """Loss names the loss module accepts: its paired LOSS_TYPES plus the KTO ones."""
    try:
        from prefopt.losses import LOSS_TYPES
        return tuple(LOSS_TYPES) + KTO_LOSSES
    except ImportError:  # pragma: no cover - only while the losses subpackage is being built
        return _FALLBACK_PAIRED_LOSSES + KTO_LOSSES


def _loss_label_smoothing_ranges() -> dict:
    """The loss module's per-loss label_smoothing ranges (one place for them: prefopt/losses/api.py)."""
    try:
        from prefopt.losses.api import _LS_RANGES
    except ImportError:  # pragma: no cover
        return {}
    return dict(_LS_RANGES)


def check_loss_names(types):
    """Reuse the loss-name check of prefopt/_validation.py, so the message lists the names the loss table knows."""
    paired = [t for t in types if t not in KTO_LOSSES]
    if not paired:
        return
    from prefopt._validation import loss_names
    try:
        loss_names(paired)
    except (TypeError, ValueError) as err:
        msg = str(err).replace(" (unpaired KTO: prefopt.kto_loss)", "")
        if "unknown loss_type" in msg:
            msg += f"; for unpaired (KTO) data: {', '.join(KTO_LOSSES)}"
        raise PrefoptInputError(f"loss_type: {msg}") from None


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise PrefoptInputError(f"--config: file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as err:
        raise PrefoptInputError(f"{path}: cannot parse config: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PrefoptInputError(f"{path}: a config file must hold a mapping of setting -> value")
    return data


def _field_types():
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Union:
        return args
    return [tp]


def _coerce(name, value, source):
    """Coerce YAML/JSON/CLI values to the field's type, with a clear message on failure."""
    tp = _field_types()[name]
    bases = _base_type(tp)
    if value is None:
        return None
    try:
        if bool in bases:
            return _str2bool(value)
        if dict in bases:
            return json.loads(value) if isinstance(value, str) else dict(value)
        if list in bases and str in bases:  # loss_type: str or list
            return value if isinstance(value, (str, list)) else str(value)
        if list in bases:  # loss_weights
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return [float(v) for v in value]
        if int in bases:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        if float in bases:
            return float(value)
        if str in bases:
            return str(value)
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise PrefoptInputError(f"{source}: bad value {value!r} for {name}: {err}") from None
    return value


def _str2bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def build_arg_parser(prog="prefopt train"):
    parser = argparse.ArgumentParser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Train a causal LM with a DPO-family (or KTO) loss using prefopt's fused head. With no "
                    "arguments: the embedded demo (tiny random Llama on the shipped data, ~30 s on a 2-core CPU; "
                    "docs/bench.md lists the measured durations).")
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it)")
    docs = _field_docs()
    for f in dataclasses.fields(TrainConfig):
        bases = _base_type(_field_types()[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = (docs.get(f.name, "") + f" (default: {default})").strip()
        if bool in bases:
            parser.add_argument(f"--{f.name}", nargs="?", const=True, metavar="BOOL", help=help_text)
        elif f.name == "resume":
            parser.add_argument("--resume", nargs="?", const="latest", metavar="CKPT", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", metavar=f.name.upper(), help=help_text)
    return parser


def _field_docs():
    """Attribute docstrings of TrainConfig, for --help."""
    import ast
    import inspect
    try:
        tree = ast.parse(inspect.getsource(TrainConfig))
    except (OSError, TypeError):
        return {}
    docs, last = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif (isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)
              and isinstance(node.value.value, str) and last):
            docs[last] = " ".join(node.value.value.split())
            last = None
        else:
            last = None
    return docs


# Settings that may differ between a run and its --resume (they do not change the computation).
# context_parallel: how the global batch's tokens are split over ranks, as the process count is (the global batch is
# checked on resume).
RESUME_FREE = ("output_dir", "resume", "overwrite", "logging_steps", "save_steps", "save_total_limit", "disable_tqdm",
               "device", "backend", "context_parallel", "context_parallel_balanced")


def resume_mismatch(saved: dict, current: "TrainConfig") -> list:
    """Settings that differ between a checkpoint's config and the current one (except RESUME_FREE)."""
    now = current.to_dict()
    # a setting the checkpoint does not name was added later: it ran with that setting's default
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    saved = {**json.loads(json.dumps(defaults, default=str)), **saved}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_FREE:
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} != now {now.get(key)!r}")
    return diffs


def as_jsonable(cfg: "TrainConfig") -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def config_field_names():
    return [f.name for f in dataclasses.fields(TrainConfig)]
