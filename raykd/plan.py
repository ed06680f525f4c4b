"""Resolve a validated Config into a Plan: teacher, student layers, layer map, loss terms, FLOPs.

Everything here runs before any cluster resource is used; every problem is a one-line
`ConfigError`. Shapes come from meta-device models (no weights) unless the student cut
needs the teacher's weights (`student.init: importance`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raykd import models, replace
from raykd.capture import decoder_layers
from raykd.config import Config, ConfigError
from raykd.layer_map import layer_map, select_layers
from raykd.spec import ObjectiveSpec


@dataclass
class ModelInfo:
    source: str  # the spec or "cut from the teacher"
    path: str  # local directory (teacher / HF student) or "" for a cut student
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    params: int
    matmul_params: int  # parameters that cost 2 FLOPs per token in a forward (layers + LM head)


@dataclass
class Plan:
    teacher: ModelInfo
    student: ModelInfo
    kept: list[int] | None  # teacher layers a cut student keeps (None: an HF student)
    importance: dict | None  # the scores that chose `kept` (student.init=importance)
    pairs: list[tuple[int, int]]  # (teacher_layer, student_layer)
    objective: ObjectiveSpec  # active terms, their pairs, what teacher and student capture
    flops_per_token: dict[str, float] = field(default_factory=dict)

    @property
    def terms(self) -> dict[str, float]:
        """Active loss terms and weights."""
        return self.objective.weights

    @property
    def teacher_dir(self) -> Path:
        """The teacher's local directory, resolved once (fetched or converted if needed)."""
        return Path(self.teacher.path)

    def to_dict(self) -> dict:
        return {**asdict(self), "terms": dict(self.terms)}


def model_info(config, source: str, path: str, trust_remote_code: bool = False) -> ModelInfo:
    meta = models.meta_model(config, trust_remote_code)
    params = models.count_params(meta)
    emb = meta.get_input_embeddings().weight
    head_w = meta.get_output_embeddings().weight
    tied = head_w is emb
    matmul = params - emb.numel() + (head_w.numel() if tied else 0)
    heads = getattr(config, "num_attention_heads", 0)
    return ModelInfo(
        source, path, type(meta).__name__, models.num_layers(config), config.hidden_size, heads,
        getattr(config, "num_key_value_heads", None) or heads, config.vocab_size, params, matmul,
    )


def kd_flops_per_token(teacher: ModelInfo, student: ModelInfo, block: int, frozen_head: bool = False) -> dict[str, float]:
    """FLOPs per token: teacher forward 2·N_t, student forward+backward 6·N_s (N = matmul
    parameters), plus causal attention scores 2·L·T·H forward per model (Kaplan et al. 2020).
    `frozen_head` (student.freeze_embeddings): no weight gradient for the [V, H] head, 2·V·H less."""
    t_fwd = 2 * teacher.matmul_params + 2 * teacher.layers * block * teacher.hidden
    s_step = 3 * (2 * student.matmul_params + 2 * student.layers * block * student.hidden) - (2 * student.vocab * student.hidden if frozen_head else 0)
    return {"teacher_forward": float(t_fwd), "student_step": float(s_step), "total": float(t_fwd + s_step)}


def _check_attention_modules(model_config, field: str, trust_remote_code: bool) -> None:
    attn = getattr(decoder_layers(models.meta_model(model_config, trust_remote_code))[0], "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        raise ConfigError(f"{field}: attention/relation terms need q_proj/k_proj/v_proj attention modules (Llama, Qwen, Mistral...); set the weight to 0 for this model")


def _choose_kept(cfg: Config, teacher_dir: Path, depth: int, log) -> tuple[list[int], dict | None]:
    s = cfg.student
    if s.init != "importance":
        kept = select_layers(s.init, depth, s.num_layers, s.layers, s.ends_first)
        if s.dropped == "linear":
            replace.maps_for(cfg, teacher_dir, kept, log=log)  # fitted here once, read by the workers
        return kept, None
    select_layers("first", depth, s.num_layers)  # the depth check, before loading anything
    from raykd import importance as imp
    from raykd.calibration import calibration, calibration_ids
    from raykd.data.reader import calibration_text

    tok = models.load_tokenizer(teacher_dir, cfg.teacher.trust_remote_code)
    linear = s.dropped == "linear" and s.importance_metric == "block_ppl"  # candidates scored with their stand-ins
    if linear:
        ids, fit_ids = calibration(cfg, tok)
    else:
        ids = calibration_ids(tok, calibration_text(cfg.data, n_chars=8 * s.calibration_tokens), s.calibration_tokens, cfg.data.block_size)
    key = (torch.cat([ids.flatten(), fit_ids.flatten()])[None], f"{s.importance_metric}+linear-v{replace.MEMO_VERSION}") if linear else (ids, s.importance_metric)
    memo = imp.memo_path(models.cache_root(), teacher_dir, s.num_layers, *key)  # with stand-ins: their tokens too
    maps = None
    if (found := imp.memo_load(memo)) is not None:
        log(f"raykd: the {s.importance_metric} cut of {s.num_layers} layers, scored before on the same teacher and tokens ({memo})")
    else:
        log(f"raykd: scoring {s.importance_metric} cuts of the teacher on {s.calibration_tokens} calibration tokens"
            + (f" with linear stand-ins fitted on {fit_ids.numel()} more" if linear else ""))
        teacher = models.load_model(teacher_dir, models.DTYPE["float32"], cfg.teacher.trust_remote_code, frozen=True)
        if linear:
            replace.check_foldable(teacher)
            maps, _ = replace.fit(teacher, fit_ids, sorted({g for c in imp.candidates(depth, s.num_layers) for g in replace.gaps(list(c), depth)}))
        kept, scores = imp.importance_cut(teacher, s.num_layers, ids, s.importance_metric, maps)
        scores["calibration_tokens"] = int(ids.numel())
        if maps is not None:  # the chosen cut's maps, where the workers look for them
            replace.save(replace.memo_path(models.cache_root(), teacher_dir, kept, fit_ids), {g: maps[g] for g in replace.gaps(kept, depth)})
        imp.memo_save(memo, kept, scores)
        found = kept, scores
    if s.dropped == "linear" and maps is None:  # a memo found, or block_influence: the cut's maps read back or fitted
        replace.maps_for(cfg, teacher_dir, found[0], log=log)
    return found


def map_strategy(cfg: Config) -> str:
    """`layer_map.strategy`, with `auto` made explicit for a cut whose dropped layers have linear stand-ins:
    `bridge` (the layer before a gap now writes the state at its end, so it is aligned with that state)."""
    return "bridge" if cfg.layer_map.strategy == "auto" and replace.applies(cfg) else cfg.layer_map.strategy


def _attention_on_kept(cfg: Config, kept: list[int] | None, pairs: list[tuple[int, int]]):
    """`cfg.loss`, where the bridge map pairs a student layer before a gap with the teacher layer at the gap's end,
    with the attention and relation terms (a layer's own Q/K/V) on the pairs whose teacher layer is the one the
    student layer was copied from; unchanged when `loss.attention_pairs` is set or no pair is such a copy."""
    loss, w = cfg.loss, cfg.loss.weights
    if map_strategy(cfg) != "bridge" or kept is None or loss.attention_pairs is not None or not (w.attention or w.relation):
        return loss
    same = [i for i, (t, j) in enumerate(pairs) if t == kept[j]]
    return dataclasses.replace(loss, attention_pairs=same) if same else loss


def _check_installed(cfg: Config) -> None:
    """A strategy or search whose package is missing is one line here, not a crash inside the workers."""
    import importlib.util

    wanted = [("scale.strategy", "deepspeed", "deepspeed==0.19.8", "ddp or fsdp2")] if cfg.scale.strategy == "deepspeed" else []
    if cfg.sweep and cfg.sweep.get("search") == "optuna":
        wanted.append(("sweep.search", "optuna", "'optuna>=4,<6'", "random or grid"))
    for key, module, pin, other in wanted:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: {module} is not installed here; pip install {pin} (a raykd dependency) or use {other}")


def check_static(cfg: Config, t_config) -> None:
    """What build_plan refuses that needs only the teacher's config (no weights, no importance search): the
    block against its positions, the cut's depth or layers, the layer map, the objective's pair indices.
    Sweeps run it on every listed value before a trial starts (an importance cut is checked as a `first` cut
    of the same depth: same bounds)."""
    depth = models.num_layers(t_config)
    models.check_context("data.block_size", cfg.data.block_size, t_config, "teacher")
    if cfg.student.model:
        return
    s, lm = cfg.student, cfg.layer_map
    kept = select_layers("first" if s.init == "importance" else s.init, depth, s.num_layers, s.layers, s.ends_first)
    ObjectiveSpec.build(cfg.loss, layer_map(map_strategy(cfg), depth, len(kept), kept, lm.pairs, lm.num_pairs), depth)


def check_inputs(cfg: Config, teacher: str, planning: bool = False, log=print) -> dict:
    """What `raykd plan`, `distill` and `sweep` refuse before Ray, in one place: the corpus (files, text fields,
    both splits), at least one block of tokens per split, the eval tasks, the directories the run writes.
    `teacher`: the teacher's spec or directory. `planning`: nothing fetched (task names and lm-eval tasks only checked), and a directory without a
    tokenizer (a planning-only directory of config.json) leaves the one-block check to the run. Returns the
    corpus summary of `preflight`."""
    from raykd import tasks
    from raykd.data import pipeline

    data = pipeline.preflight(cfg.data)
    for name, where in (("output_dir", cfg.output_dir), ("teacher.cache", cfg.teacher.cache), ("scale.storage_path", cfg.scale.storage_path)):
        if where and "://" not in where:  # a URI (s3://...) is checked by Ray Train itself
            check_writable(where, name)
    if planning:
        tasks.check(cfg.eval.tasks)
    else:
        tasks.prepare(cfg.eval.tasks, fetch=True, log=log)  # task data fetched once (or refused)
    if not planning or pipeline.has_tokenizer(teacher):
        pipeline.check_tokens(cfg.data, teacher, cfg.teacher.trust_remote_code)
    return data


def check_writable(directory: str, field: str) -> None:
    """Refuse, before Ray starts, a directory the run could not write (read-only, a path that cannot be created):
    the missing parts are created, a file written and removed, and what was created removed again."""
    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {directory} is a file, not a directory; choose a directory you can write, e.g. {field}=runs/NAME")
    missing = [d for d in (path, *path.parents) if not d.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".raykd-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write {directory} ({e.strerror or e}); choose a directory you can write, "
                          f"e.g. {field}=runs/NAME") from None
    finally:
        for d in missing:  # deepest first; a run that goes on creates it again
            with contextlib.suppress(OSError):
                d.rmdir()


def build_plan(cfg: Config, log=print) -> Plan:
    _check_installed(cfg)
    trc = cfg.teacher.trust_remote_code
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log)
    t_config = models.load_config(teacher_dir, trc)
    models.check_context("data.block_size", cfg.data.block_size, t_config, "teacher")
    teacher = model_info(t_config, cfg.teacher.model, str(teacher_dir), trc)
    if cfg.student.model:
        s_dir = models.resolve_model(cfg.student.model, "student.model", log)
        s_config = models.load_config(s_dir, trc, "student.model")
        models.check_context("data.block_size", cfg.data.block_size, s_config, "student")
        models.check_same_vocab(models.load_tokenizer(teacher_dir, trc), models.load_tokenizer(s_dir, trc))
        student = model_info(s_config, cfg.student.model, str(s_dir), trc)
        kept, importance = None, None
    else:
        kept, importance = _choose_kept(cfg, teacher_dir, teacher.layers, log)
        s_config = models.student_config(t_config, kept)
        student = model_info(s_config, f"cut from the teacher (init={cfg.student.init})", "", trc)
    lm = cfg.layer_map
    pairs = layer_map(map_strategy(cfg), teacher.layers, student.layers, kept, lm.pairs, lm.num_pairs)
    objective = ObjectiveSpec.build(_attention_on_kept(cfg, kept, pairs), pairs, teacher.layers)  # bad attention/blockwise pair indices fail here
    if objective.attn_pairs:
        field = "loss.weights.attention" if "attention" in objective.weights else "loss.weights.relation"
        _check_attention_modules(t_config, field, trc)
        _check_attention_modules(s_config, field, trc)
    plan = Plan(teacher, student, kept, importance, pairs, objective)
    plan.flops_per_token = kd_flops_per_token(teacher, student, cfg.data.block_size, cfg.student.freeze_embeddings)
    return plan


def resolve(cfg: Config, log=print) -> tuple[Config, Plan]:
    """Validate and make the run explicit: kept layers and layer-map pairs written into the config
    (workers and trials then never re-derive them); the plan carries the teacher's directory."""
    plan = build_plan(cfg, log)
    student = cfg.student if plan.kept is None else dataclasses.replace(cfg.student, init="list", layers=list(plan.kept))
    layer_map_cfg = dataclasses.replace(cfg.layer_map, strategy="list", pairs=[list(p) for p in plan.pairs], num_pairs=None)
    return dataclasses.replace(cfg, student=student, layer_map=layer_map_cfg, loss=_attention_on_kept(cfg, plan.kept, plan.pairs)), plan


def _m(n: float) -> str:
    return f"{n / 1e6:.1f} M"


def format_plan(cfg: Config, plan: Plan) -> str:
    t, s = plan.teacher, plan.student
    lines = [
        f"teacher    {t.source}  ({t.path})",
        f"           {t.arch}: {t.layers} layers, hidden {t.hidden}, {t.heads} heads / {t.kv_heads} kv heads, vocab {t.vocab}, {_m(t.params)} params",
        f"student    {s.source}: {s.layers} layers, hidden {s.hidden}, {_m(s.params)} params ({100 * s.params / t.params:.1f}% of the teacher)"
        + ("; embeddings and head frozen" if cfg.student.freeze_embeddings else ""),
    ]
    if plan.kept is not None:
        lines.append(f"           kept teacher layers {plan.kept}")
        if cfg.student.dropped == "linear" and (gaps := replace.gaps(plan.kept, t.layers)):
            lines.append("           dropped layers stood in for by linear maps folded into teacher layer(s) "
                         + ", ".join(f"{a} (for {a + 1}..{b - 1})" for a, b in gaps))
    if plan.importance and "perplexity" in plan.importance:
        best = sorted(plan.importance["perplexity"].items(), key=lambda kv: kv[1])[:3]
        lines.append("           best cuts by calibration perplexity: " + "; ".join(f"[{k}] {v:.4g}" for k, v in best))
    lines.append(f"layer map  ({map_strategy(cfg)}) teacher->student " + ", ".join(f"{a}->{b}" for a, b in plan.pairs))
    parts = []
    for name, wt in plan.terms.items():
        detail = {"kd": f"({cfg.loss.kd}, T={cfg.loss.temperature:g})", "class_kd": f"(class_kl, T={cfg.loss.temperature:g})",
                  "hidden": f"({cfg.loss.hidden})"}.get(name, "")
        parts.append(f"{wt:g}*{name}{detail}")
    lines.append("loss       " + " + ".join(parts))
    op = cfg.loss.on_policy
    if op.active:  # raykd.onpolicy
        lines.append(f"on-policy  {op.fraction:g} of micro-batches: the student samples the last {op.max_new_tokens} of {cfg.data.block_size} "
                     f"tokens (T={op.temperature:g}), the teacher scores them; CE on the prompt only")
    f = plan.flops_per_token
    lines.append(
        f"flops/tok  teacher fwd {f['teacher_forward'] / 1e9:.3f} GF + student fwd+bwd {f['student_step'] / 1e9:.3f} GF = {f['total'] / 1e9:.3f} GF (block {cfg.data.block_size})"
    )
    sc = cfg.scale
    lo, hi = sc.worker_range
    workers = f"{lo}-{hi} workers (elastic; global batch {hi * cfg.train.grad_accum * cfg.train.batch_size} sequences at any size)" if sc.elastic else f"{hi} worker(s)"
    lines.append(f"scale      {workers}, {sc.strategy}, {'gpu' if sc.use_gpu else 'cpu'}; output {cfg.output_dir}")
    t = cfg.train
    if t.warmup_steps >= t.max_steps:  # allowed (smoke runs of a few steps), but rarely meant
        lines.append(f"note       train.warmup_steps ({t.warmup_steps}) >= train.max_steps ({t.max_steps}): the LR never reaches "
                     f"train.lr and there is no decay; set train.warmup_steps below {t.max_steps} (about a tenth)")
    return "\n".join(lines)
