"""Typed run configuration: dataclasses <-> YAML <-> plain dicts, with `key=value` overrides.

Every knob of a run lives here; Ray hands it to workers as a plain dict (`Config.to_dict`)
and Tune samples into one. Local checks run in `__post_init__`; checks that need the
teacher (depth, vocabulary) run when the plan is built (`raykd.plan`). All raise
`ConfigError` with one line that names the field and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from raykd.dictconf import build as _build
from raykd.dictconf import load_yaml_file, parse_overrides, set_dotted  # noqa: F401  (public here: sweeps set dotted keys)
from raykd.errors import ConfigError, suggest  # noqa: F401  (ConfigError: public here too)
from raykd.errors import check_choice as _choice
from raykd.errors import check_positive as _positive
from raykd.generate_config import GenerateConfig, OnPolicyConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
INITS = ("uniform", "first", "last", "ends", "list", "importance")
IMPORTANCE_METRICS = ("block_ppl", "block_influence")
DROPPED = ("drop", "linear")
MAP_STRATEGIES = ("auto", "kept", "bridge", "uniform", "last", "list")
HIDDEN_LOSS_NAMES = ("mse", "cosine", "nmse")
STRATEGIES = ("ddp", "fsdp2", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TeacherConfig:
    model: str = "smollm2-135m"  # local HF dir | hub id (online or HF cache only) | FILE.gguf | smollm2-135m | tiny-random[:key=value,...]
    dtype: str = "float32"  # weights dtype of the frozen teacher: float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False  # run modelling code shipped with the model dir; off unless you trust its source
    cache: str | None = None  # teacher cache dir (`raykd cache-teacher`): training reads the teacher's targets (final state or top-k log-probs) and hidden states from it instead of running the teacher each step
    cache_topk: int = 0  # building the cache: 0: dense, the teacher's final hidden state (its head runs each step: exact at any temperature, every logit loss; the default by bench/topk.py, docs/cache.md); K: the top K log-probs per token, the rest pooled into one tail bin (smaller without hidden states; lossy at T > 1)
    cache_layers: str | list[int] = "mapped"  # building the cache: teacher layers whose hidden states are stored: mapped | all | none | [ids]
    cache_dtype: str = "float16"  # building the cache: dtype of stored log-probs and hidden states: float16 | bfloat16 | float32 (the online teacher's exact values, twice the bytes)
    cache_shard_blocks: int = 256  # building the cache: packed blocks per Parquet shard (the unit of resume)
    cache_actors: int = 1  # building the cache: teachers in the Ray Data actor pool (each takes scale.cpus_per_worker CPUs, or a GPU with scale.use_gpu)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("teacher.model: empty; give a local HF directory, a .gguf file or 'smollm2-135m'")
        _choice("teacher.dtype", self.dtype, DTYPES)
        _positive("teacher.cache_topk", self.cache_topk, allow_zero=True)
        if isinstance(self.cache_layers, str):
            _choice("teacher.cache_layers", self.cache_layers, ("mapped", "all", "none"))
        elif not isinstance(self.cache_layers, list) or not all(isinstance(i, int) and i >= 0 for i in self.cache_layers):
            raise ConfigError(f"teacher.cache_layers: expected mapped | all | none or a list of layer indices, got {self.cache_layers!r}")
        _choice("teacher.cache_dtype", self.cache_dtype, ("float16", "bfloat16", "float32"))
        _positive("teacher.cache_shard_blocks", self.cache_shard_blocks)
        _positive("teacher.cache_actors", self.cache_actors)


@dataclass
class StudentConfig:
    model: str | None = None  # an HF causal-LM directory used as the student instead of a cut of the teacher
    num_layers: int = 6  # depth of a student cut from the teacher's layers
    init: str = "uniform"  # which teacher layers a cut student keeps: uniform | first | last | ends | list | importance
    layers: list[int] | None = None  # init=list: the teacher layer indices to keep
    ends_first: int | None = None  # init=ends: how many leading layers to keep (the rest come from the end); default half
    importance_metric: str = "block_ppl"  # init=importance: block_ppl (drop a contiguous block, score perplexity) | block_influence (1 - cos(h_in, h_out))
    calibration_tokens: int = 2048  # init=importance: training tokens scored per candidate
    freeze_embeddings: bool = False  # keep the token embeddings and output head as initialised (no gradient, no AdamW state; a cut student trained with ddp shares the teacher's)
    dropped: str = "drop"  # what stands in for a cut student's dropped layers: drop (nothing) | linear (a least-squares map folded into the kept layer before them; ReplaceMe)
    fit_tokens: int = 16384  # dropped=linear: training tokens the maps are fitted on (after the importance search's own)

    def __post_init__(self):
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ConfigError(f"student.num_layers: must be an integer >= 1, got {self.num_layers!r}; pick a depth below the teacher's")
        _choice("student.init", self.init, INITS)
        _choice("student.importance_metric", self.importance_metric, IMPORTANCE_METRICS)
        if self.init == "list":
            if not self.layers:
                raise ConfigError("student.layers: student.init=list needs the teacher layer indices to keep, e.g. student.layers=[0,5,9]")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"student.layers: duplicate layer indices in {self.layers}; list each teacher layer once")
            self.num_layers = len(self.layers)
        if self.ends_first is not None and not 0 <= self.ends_first <= self.num_layers:
            raise ConfigError(f"student.ends_first: must be between 0 and student.num_layers={self.num_layers}, got {self.ends_first}")
        _positive("student.calibration_tokens", self.calibration_tokens)
        _choice("student.dropped", self.dropped, DROPPED)
        _positive("student.fit_tokens", self.fit_tokens)
        if self.dropped == "linear" and self.model:
            raise ConfigError("student.dropped: 'linear' folds maps into a student cut from the teacher; unset student.model or use student.dropped=drop")


@dataclass
class LayerMapConfig:
    strategy: str = "auto"  # (teacher, student) layer pairs: auto (kept for cut students, else uniform) | kept | bridge (cut students: the layer before a dropped block <-> the teacher layer ending it) | uniform | last | list
    pairs: list[list[int]] | None = None  # strategy=list: explicit [[teacher_layer, student_layer], ...]
    num_pairs: int | None = None  # map only this many student layers, evenly spread, last included (default: every student layer)

    def __post_init__(self):
        _choice("layer_map.strategy", self.strategy, MAP_STRATEGIES)
        if self.strategy == "list":
            if not self.pairs or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in self.pairs):
                raise ConfigError("layer_map.pairs: layer_map.strategy=list needs pairs like [[29, 9], [14, 4]] (teacher_layer, student_layer)")
        if self.num_pairs is not None:
            _positive("layer_map.num_pairs", self.num_pairs)


@dataclass
class LossWeights:
    ce: float = 1.0  # cross-entropy on the data
    kd: float = 1.0  # output-distribution matching (the logit loss named by loss.kd)
    class_kd: float = 0.0  # class-aware logit KD: class_kl, each vocabulary entry's distribution over the batch's tokens (Zhang et al. 2022), beside the per-token kd; needs the live teacher
    hidden: float = 0.0  # hidden-state alignment on mapped layers (through learned projections when widths differ)
    attention: float = 0.0  # attention-map KL on mapped layers (from captured q/k; no eager attention)
    relation: float = 0.0  # MiniLM-v2 Q-Q/K-K/V-V relation KL on mapped layers (any head counts)
    blockwise: float = 0.0  # block-wise logit KD: student hidden through the teacher's upper blocks and head

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"loss.weights.{f.name}: must be a finite number, got {v!r}; use 0 to switch the term off")
            if v < 0:
                raise ConfigError(f"loss.weights.{f.name}: negative weight {v}; use 0 to switch the term off")
        if sum(getattr(self, f.name) for f in dataclasses.fields(self)) == 0:
            raise ConfigError("loss.weights: every weight is 0; give at least one term a positive weight, e.g. loss.weights.kd=1")


@dataclass
class LossConfig:
    kd: str = "forward_kl"  # per-token logit loss from raykd.losses.LOGIT_LOSSES: forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tvd | dkd (class_kl is weighted by loss.weights.class_kd)
    temperature: float = 1.0  # softmax temperature of the logit losses, kd and class_kd (each scaled by T^2)
    kd_params: dict[str, float] = field(default_factory=dict)  # extra parameters of the logit loss (jsd: beta; skew_*: alpha; dkd: alpha, beta)
    hidden: str = "cosine"  # hidden-state loss: mse | cosine | nmse
    weights: LossWeights = field(default_factory=LossWeights)  # weight of each term in the one objective
    chunk_size: int = 256  # tokens per chunk of the fused LM-head + logit loss (256: 2.4x leaner than 1024, 7% slower)
    relation_heads: int | None = None  # relation heads of the MiniLM-v2 loss (default: largest divisor <= 64 of all widths)
    attention_pairs: list[int] | None = None  # indices into the layer map used by attention/relation terms (default: all pairs)
    blockwise_pairs: list[int] | None = None  # indices into the layer map used by block-wise KD (default: the middle pair)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # on-policy KD (GKD): a share of micro-batches on the student's own samples

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = _build(LossWeights, self.weights, "loss.weights")
        if isinstance(self.on_policy, dict):
            self.on_policy = _build(OnPolicyConfig, self.on_policy, "loss.on_policy")
        from raykd.losses.divergences import check_logit_loss

        try:
            check_logit_loss(self.kd, self.kd_params or {})
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _positive("loss.temperature", self.temperature)
        _choice("loss.hidden", self.hidden, HIDDEN_LOSS_NAMES)
        _positive("loss.chunk_size", self.chunk_size)
        if self.relation_heads is not None:
            _positive("loss.relation_heads", self.relation_heads)


@dataclass
class DataConfig:
    train: list[str] | None = None  # text/JSONL/Parquet files, directories, globs (a `raykd generate` output dir), or a named corpus: sotu | moby-dick | emails | pydoc; null = sotu, or the sources of data.mix
    mix: dict[str, float] | None = None  # train on several sources by weight, e.g. {sotu: 0.5, runs/gen: 0.5}: each key a source as data.train takes, share of training blocks = weight / sum; replaces data.train; the first source gives the validation split (see docs/generation.md)
    validation: list[str] | None = None  # explicit validation files (default: the named corpus's split, else a document-hash split)
    text_field: str = "text"  # JSONL / Parquet column that holds the text
    block_size: int = 256  # tokens per packed block (EOS between documents, no padding)
    val_fraction: float = 0.05  # share of documents held out (by document hash) when no validation files are given
    min_chars: int = 32  # drop documents shorter than this after cleaning
    dedupe: bool = True  # drop exact duplicate documents
    max_val_blocks: int = 64  # validation blocks used for perplexity / agreement
    bad_rows: str = "error"  # a JSONL/Parquet/datasets row without usable text (no field, null, bad JSON): error | skip (skipped rows are counted)
    task_cpus: float = 0.25  # logical CPUs each Ray Data read/tokenize/shuffle task reserves (small, so Data runs beside Train workers)
    max_train_blocks: int = 0  # train on the first N shuffled blocks only (quick runs, a cache of a corpus slice); 0 = all

    def __post_init__(self):
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.validation, str):
            self.validation = [self.validation]
        if self.mix is not None:
            self._check_mix()
        elif not (self.train is None or self.train):
            raise ConfigError("data.train: no training data; give files, a directory, a glob or a named corpus (sotu, moby-dick, emails, pydoc)")
        if self.block_size < 2:  # a block of T tokens trains on T - 1 next-token predictions
            raise ConfigError(f"data.block_size: must be >= 2 (each block predicts its next tokens), got {self.block_size}; e.g. 256")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        _positive("data.max_val_blocks", self.max_val_blocks)
        _choice("data.bad_rows", self.bad_rows, ("error", "skip"))
        _positive("data.task_cpus", self.task_cpus)
        _positive("data.max_train_blocks", self.max_train_blocks, allow_zero=True)

    def _check_mix(self) -> None:
        if self.train is not None:
            raise ConfigError("data.mix: replaces data.train (the mix's keys are the training sources); drop data.train (data.train=null on the command line) or give its sources a weight in data.mix")
        if not self.mix:
            raise ConfigError("data.mix: no sources; give each source a weight, e.g. data.mix={sotu: 0.5, runs/gen: 0.5}")
        mix = {}
        for src, w in self.mix.items():
            with contextlib.suppress(ValueError, TypeError):
                w = float(w) if isinstance(w, str) else w  # YAML 1.1 reads 1e-1 as text
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"data.mix.{src}: weight must be a finite number >= 0, got {self.mix[src]!r}; e.g. 0.5 (weights are normalised)")
            mix[str(src)] = float(w)
        if sum(mix.values()) <= 0:
            raise ConfigError(f"data.mix: the weights sum to {sum(mix.values()):g}; give at least one source a positive weight")
        self.mix = mix

    @property
    def sources(self) -> list[str]:
        """The training sources: the keys of data.mix, else data.train (default: sotu)."""
        return list(self.mix) if self.mix else list(self.train or ["sotu"])


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # packed blocks per worker per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-4  # peak AdamW learning rate (student and projections)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 10  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    precision: str = "auto"  # auto (bf16 only where the hardware has it) | fp32 | bf16
    report_every: int = 10  # steps between metric reports
    checkpoint_every: int = 50  # steps between checkpoints (0 = only at the end)
    generation_eval: bool = True  # after training: ROUGE-L / BLEU of greedy student continuations vs the teacher's
    eval_every: int = 0  # steps between validation-loss checks reported as val_loss (0 = none during training; sweeps set it)
    eval_blocks: int = 8  # validation blocks per check, split across workers
    final_training_state: bool = True  # the final checkpoint keeps the training state (student + projections, AdamW, schedule) so the run can go on past max_steps; false (sweep trials): the exported student, metrics and run state only
    activation_checkpointing: bool = False  # recompute the student's decoder layers in backward: less activation memory, ~1/3 more student compute
    compile: bool = False  # torch.compile the student layers' MLPs and norms (fused elementwise kernels; the first steps pay the compile; ddp/fsdp2)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "report_every"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.eval_blocks", self.eval_blocks)
        for name in ("warmup_steps", "grad_clip", "weight_decay", "checkpoint_every", "eval_every"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.lr", self.lr)
        _choice("train.precision", self.precision, PRECISIONS)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["sentiment", "cloze", "cer"])  # after training, task scores of student and teacher: sentiment, cloze, cer, lm-eval task names or YAML paths ([] = none)
    limit: int = 200  # examples per task (sentiment sentences of 2,000, cloze passages, lm-eval documents)
    prompts: int = 16  # validation prompts the cer task continues greedily (32 tokens each; also gives ROUGE-L / BLEU)
    batch_size: int = 16  # sequences per forward when scoring tasks
    final: str = "full"  # the end of a run: full (student and teacher: perplexity, agreement, speed, generation, the tasks) | light (the student's perplexity, speed and size only; a sweep's trials, scored fully later)

    def __post_init__(self):
        from raykd.tasks.names import check_names

        check_names(self.tasks, "eval.tasks")
        _choice("eval.final", self.final, ("full", "light"))
        for name in ("limit", "prompts", "batch_size"):
            _positive(f"eval.{name}", getattr(self, name))


@dataclass
class ScaleConfig:
    num_workers: int | list[int] = 1  # Ray Train workers (one process each); [min, max] = elastic: starts once min fit, goes on with fewer after a lost node (global batch kept)
    strategy: str = "ddp"  # ddp | fsdp2 | deepspeed
    zero_stage: int = 2  # strategy=deepspeed: ZeRO stage 1, 2 or 3
    deepspeed_config: str | None = None  # strategy=deepspeed: a DeepSpeed JSON file used instead of the generated one
    shard_teacher: bool = False  # fsdp2 / ZeRO-3: shard the frozen teacher across workers too
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # logical CPUs each worker reserves (fractions leave room for Ray Data on small machines)
    max_failures: int = 0  # worker failures the run survives by restarting from the last checkpoint
    torch_threads: int = 0  # intra-op threads per worker (0 = the node's cores / workers on it)
    storage_path: str | None = None  # Ray Train checkpoint storage every node sees (s3://... or a shared FS); required on a cluster of more than one node; default OUTPUT/
    placement_timeout_s: float = 300.0  # how long a run waits for a cluster (or its autoscaler) to offer the workers' CPUs/GPUs before failing
    worker_start_timeout_s: float = 0.0  # seconds Ray Train waits for a worker group's resources before it tries another size (after a lost node, an elastic run first asks for the old size); 0 = Ray's (60)

    def __post_init__(self):
        self._check_workers()
        _choice("scale.strategy", self.strategy, STRATEGIES)
        _choice("scale.zero_stage", self.zero_stage, (1, 2, 3))
        _positive("scale.cpus_per_worker", self.cpus_per_worker)
        _positive("scale.max_failures", self.max_failures, allow_zero=True)
        _positive("scale.placement_timeout_s", self.placement_timeout_s)
        _positive("scale.worker_start_timeout_s", self.worker_start_timeout_s, allow_zero=True)
        _positive("scale.torch_threads", self.torch_threads, allow_zero=True)
        if self.deepspeed_config and not os.path.isfile(self.deepspeed_config):
            raise ConfigError(f"scale.deepspeed_config: {self.deepspeed_config} does not exist; give a DeepSpeed JSON file or drop the key to use the generated config")
        if self.shard_teacher and self.strategy != "fsdp2":
            raise ConfigError(f"scale.shard_teacher: sharding the teacher is implemented for strategy fsdp2, not {self.strategy}; set scale.strategy=fsdp2 or scale.shard_teacher=false")
        if self.strategy != "deepspeed" and self.deepspeed_config:
            raise ConfigError("scale.deepspeed_config: only used with scale.strategy=deepspeed; set the strategy or drop the key")
        if self.elastic and self.strategy == "deepspeed":
            raise ConfigError("scale.num_workers: a [min, max] worker range needs scale.strategy ddp or fsdp2 (a DeepSpeed "
                              "checkpoint resumes only on the world size that wrote it); give one number or change the strategy")
        if self.elastic and self.max_failures < 1:
            raise ConfigError("scale.max_failures: a [min, max] worker range goes on with fewer workers only by restarting "
                              "from a checkpoint; set scale.max_failures >= 1 (e.g. 3)")

    def _check_workers(self) -> None:
        n = self.num_workers
        if not isinstance(n, list):
            _positive("scale.num_workers", n)
            return
        if len(n) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in n) or not 1 <= n[0] <= n[1]:
            raise ConfigError(f"scale.num_workers: a worker range is [min, max] with 1 <= min <= max, got {n}; e.g. [1, 4], or one number")

    @property
    def elastic(self) -> bool:
        """Whether the worker count is a range (Ray Train's elastic `ScalingConfig(num_workers=(min, max))`)."""
        return isinstance(self.num_workers, list) and self.num_workers[0] != self.num_workers[1]

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; the global batch is defined for max: train.batch_size x train.grad_accum x max."""
        n = self.num_workers
        return (n[0], n[1]) if isinstance(n, list) else (n, n)


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the frozen model distilled from
    student: StudentConfig = field(default_factory=StudentConfig)  # the model trained
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)  # which teacher layer each student layer is aligned to
    loss: LossConfig = field(default_factory=LossConfig)  # the multi-task objective
    data: DataConfig = field(default_factory=DataConfig)  # corpora, cleaning, packing, split
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    scale: ScaleConfig = field(default_factory=ScaleConfig)  # workers and parallel strategy
    eval: EvalConfig = field(default_factory=EvalConfig)  # task evaluation after training
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # `raykd generate`: teacher-written training text (sequence-level KD, docs/generation.md)
    output_dir: str = "runs/default"  # where student/, metrics.json, config.yaml and checkpoints go
    seed: int = 0  # seeds model init, data order and dropout
    sweep: dict[str, Any] | None = None  # `raykd sweep` search space and scheduler (fields: SweepConfig)

    def __post_init__(self):
        _positive("seed", self.seed, allow_zero=True)  # Ray Data's shuffle (numpy) refuses a negative seed
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"output_dir: {self.output_dir} is a file, not a directory; choose a directory path for the run's outputs")
        if self.sweep is not None:
            from raykd.sweep_config import SweepConfig

            sw = _build(SweepConfig, self.sweep, "sweep")  # validated here, used by raykd.sweep
            from raykd.tasks.names import check_objective

            for objective in (o for o in sw.objectives if o.startswith("task:")):
                check_objective(objective, self.eval.tasks)
        if self.train.compile and self.scale.strategy == "deepspeed":
            raise ConfigError("train.compile: not with scale.strategy=deepspeed (ZeRO gathers weights in module hooks); use ddp or fsdp2, or drop train.compile")
        from raykd.spec import cache_refusal, on_policy_refusal

        why = on_policy_refusal(self)
        if not why and self.teacher.cache:  # the cache holds the teacher's states (or log-probs), not attention or the upper blocks
            from raykd.losses.divergences import SPARSE_UNSUPPORTED

            why = cache_refusal(self.loss, SPARSE_UNSUPPORTED if self.teacher.cache_topk else None)
        if why:
            raise ConfigError(why)

    @property
    def val_blocks(self) -> int:
        """Validation blocks any reader of a run takes: perplexity / agreement (data.max_val_blocks) and the checks (train.eval_blocks)."""
        return max(self.data.max_val_blocks, self.train.eval_blocks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- building from dicts / YAML / overrides -------------------------------------------


def from_dict(data: dict | None) -> Config:
    return _build(Config, dict(data or {}), "")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or none: the defaults), apply `key=value` overrides, validate."""
    data = load_yaml_file(path) if path is not None else {}
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    return from_dict(data)
