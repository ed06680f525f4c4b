"""`raykd generate CONFIG --out DIR`: teacher-written training text, as a Ray Data stage.

The driver checks everything first, with no Ray and nothing written (the output path, the
generator and teacher are causal LMs sharing a vocabulary, the corpus yields prompts, an existing
DIR was written with the same settings), cuts the prompts (the first `generate.prompt_tokens`
tokens of each training document, `raykd.generation.prompt_ids`; with `generate.prompts: bos`,
`generate.num_prompts` prompts of the start token alone: unconditional samples), splits them into shards of
`generate.shard_size` prompts and sends every unfinished shard through
`map_batches(_ShardGenerator)` on `generate.concurrency` actors: an actor pool, one generator
(and the teacher, when the generator is another model) per actor, on a GPU each with
`scale.use_gpu`. Shard k is sampled with the seed `seed + k`, so its rows do not depend on which
actor runs it or when. Each actor writes its shards itself (`raykd.generation.write_shard`:
temp file, checksum, rename), so a rerun skips every finished shard and redoes the others.

DIR/generate.json holds the settings that must match for a rerun to resume (`identity`), the
whole config, and once complete the counts: prompts, samples, kept, tokens (sampled), kept_tokens
(in kept rows), shards, and of the last invocation that generated anything: wall_s (the whole
command: Ray start, model loads), tokens_per_s (its sampled tokens / wall_s) and shard_s (actor
seconds spent sampling, scoring and writing shards, summed over actors). DIR works as `data.train` or a `data.mix` source
(`text_field: text`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from raykd import capture, generation, manifest, models
from raykd.config import Config, ConfigError, from_dict
from raykd.data.reader import documents

META = "generate.json"
FORMAT = 1


def prompt_data(cfg: Config):
    """The data settings prompts are read with: data.train, or with data.mix its first source (the
    corpus by convention; the other sources may be what this command is about to write)."""
    if not cfg.data.mix:
        return cfg.data
    return dataclasses.replace(cfg.data, mix=None, train=[next(iter(cfg.data.mix))])


def identity(cfg: Config) -> dict:
    """What a rerun must agree on to resume into the same directory."""
    gen = {k: v for k, v in dataclasses.asdict(cfg.generate).items() if k != "concurrency"}
    data = prompt_data(cfg)
    return {"format": FORMAT, "teacher": cfg.teacher.model, "generator": cfg.generate.model or cfg.teacher.model,
            "teacher_dtype": cfg.teacher.dtype, "precision": cfg.train.precision, "seed": cfg.seed, "generate": gen,
            "data": {"train": data.sources, **{k: getattr(data, k) for k in ("validation", "text_field", "min_chars", "dedupe",
                                                                                "val_fraction", "bad_rows")}}}


def _abs(spec: str) -> str:
    """A model spec that is a local path, made absolute (actors may run elsewhere); names stay names."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _check_out(out: Path, want: dict) -> dict | None:
    """The existing generate.json of `out` (None for a new or empty directory); refuses a directory of
    other files, or one written with other settings (a file or an unwritable path: `run`'s check_writable)."""
    meta_file = out / META
    if not meta_file.is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ConfigError(f"--out: {out} holds other files and no {META}; give a new or empty directory")
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        raise ConfigError(f"--out: {meta_file} is not valid JSON; delete {out} to generate again") from None
    have = meta.get("identity", {})
    for key in want:
        a, b = have.get(key), want[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                k = diff[0]
                raise ConfigError(f"--out: {out} was generated with {key}.{k}={a.get(k)!r}, this run has {b.get(k)!r}; "
                                  f"rerun with the same settings to resume, or give a new --out")
        elif a != b:
            raise ConfigError(f"--out: {out} was generated with {key}={a!r}, this run has {b!r}; rerun with the same settings to resume, or give a new --out")
    return meta


def prepare(cfg: Config, out: Path, log=print) -> dict:
    """Every check, with no Ray and nothing written: (a plan dict) the resolved model dirs, the prompts
    [n][P], the shards and which of them are finished."""
    gen = cfg.generate
    want = identity(cfg)
    meta = _check_out(out, want)
    trc = cfg.teacher.trust_remote_code
    teacher_dir = models.resolve_model(cfg.teacher.model, "teacher.model", log)
    generation.check_causal_lm(teacher_dir, "teacher.model", trc)
    gen_dir = models.resolve_model(gen.model, "generate.model", log) if gen.model else teacher_dir
    tok = models.load_tokenizer(teacher_dir, trc)
    if gen.model:
        generation.check_causal_lm(gen_dir, "generate.model", trc)
        models.check_same_vocab(tok, models.load_tokenizer(gen_dir, trc), "generate.model")
    data = prompt_data(cfg)
    if gen.prompts == "bos":
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ConfigError("generate.prompts: bos needs a tokenizer with a BOS or EOS token and the teacher's has neither; use documents")
        prompts = [[int(start)]] * gen.num_prompts
    else:
        prompts = generation.prompt_ids(documents(data, "train"), tok, gen.prompt_tokens, gen.num_prompts)
    if not prompts:
        raise ConfigError(f"generate.prompt_tokens: no training document of {', '.join(data.sources)} has {gen.prompt_tokens} tokens; "
                          f"lower generate.prompt_tokens or add text")
    n_shards = -(-len(prompts) // gen.shard_size)
    done = {k: s for k in range(n_shards) if (s := generation.finished(out, k, gen.format)) is not None}
    return {"identity": want, "meta": meta, "teacher": _abs(cfg.teacher.model), "generator": _abs(gen.model) if gen.model else None,
            "same_model": not gen.model or Path(gen_dir).resolve() == Path(teacher_dir).resolve(),
            "prompts": prompts, "shards": n_shards, "done": done}


class _ShardGenerator:
    """Ray Data actor: a generator (and the teacher, when they differ); each input row is one shard
    of prompts to sample, score, filter and write."""

    def __init__(self, config: dict, plan: dict, out: str):
        from transformers.utils import logging as hf_logging

        from raykd import runtime

        hf_logging.disable_progress_bar()  # raykd logs one line per shard
        cfg = from_dict(config)
        use_gpu = cfg.scale.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.set_num_threads(runtime.threads(cfg, cfg.generate.concurrency))
        dtype, trc = models.resolve_dtype(cfg.teacher.dtype), cfg.teacher.trust_remote_code
        teacher_dir = models.resolve_model(plan["teacher"], "teacher.model", log=lambda m: None)
        self.tok = models.load_tokenizer(teacher_dir, trc)
        self.teacher = models.load_model(teacher_dir, dtype, trc, frozen=True).to(self.device)
        self.generator = self.teacher
        if not plan["same_model"]:
            gen_dir = models.resolve_model(plan["generator"], "generate.model", log=lambda m: None)
            self.generator = models.load_model(gen_dir, dtype, trc, frozen=True).to(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if runtime.precision(cfg) == "bf16" else None
        for model in {self.teacher, self.generator}:  # no weight casts per decoded token
            capture.store_for_autocast(model, self.autocast.fast_dtype if self.autocast else None)
        self.stops = generation.stop_ids(self.generator, self.tok)
        self.cfg, self.out = cfg, Path(out)

    def __call__(self, batch: dict) -> dict:
        gen, stats = self.cfg.generate, []
        for shard, raw, first, width in zip(batch["shard"], batch["ids"], batch["first"], batch["width"]):
            prompts = torch.from_numpy(np.frombuffer(raw, dtype=np.int32).reshape(-1, int(width)).astype(np.int64))
            with self.autocast or torch.autocast(self.device.type, enabled=False):
                rows, counts = generation.sample_shard(self.generator, None if self.generator is self.teacher else self.teacher, self.tok,
                                                       prompts, gen, self.cfg.seed + int(shard), int(first), self.stops)
            generation.write_shard(rows, self.out, int(shard), gen.format, counts)
            stats.append({"shard": int(shard), **counts})
        return {k: np.asarray([s[k] for s in stats]) for k in stats[0]}


def _totals(out: Path, n_shards: int, fmt: str) -> dict:
    """Counts summed over the finished shards."""
    keys = ("prompts", "samples", "kept", "tokens", "kept_tokens")
    tot = dict.fromkeys(keys, 0)
    for k in range(n_shards):
        s = generation.finished(out, k, fmt) or {}
        for key in keys:
            tot[key] += int(s.get(key, 0))
    return tot


def run(cfg: Config, out: str | os.PathLike, log=print) -> dict:
    """`raykd generate`: check (nothing written on bad input), then generate every unfinished shard
    of `out` and return its generate.json."""
    import ray.data

    from raykd.data.cache import _driven
    from raykd.plan import check_writable
    from raykd.runtime import init_ray, quiet_data_progress

    t0 = time.perf_counter()
    check_writable(str(out), "--out")
    out = Path(out)
    gen = cfg.generate
    plan = prepare(cfg, out, log)
    todo = [k for k in range(plan["shards"]) if k not in plan["done"]]
    log(f"raykd: generate into {out}: {len(plan['prompts'])} prompts x {gen.num_samples} samples in {plan['shards']} shards, "
        f"{len(plan['done'])} finished, {len(todo)} to generate (generator {plan['generator'] or plan['teacher']})")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp"), *(generation.shard_path(out, k, gen.format) for k in todo)]:
        stale.unlink(missing_ok=True)  # a shard an interrupted run was writing, or one that fails its checksum
    meta = {"identity": plan["identity"], "complete": False, "config": cfg.to_dict()}
    manifest.write_json(out / META, meta)
    new_tokens, shard_s = 0, 0.0
    if todo:
        init_ray(cfg, runs=gen.concurrency, log=log)
        quiet_data_progress()
        P = len(plan["prompts"][0])  # prompt_tokens, or 1 for unconditional prompts
        items = [{"shard": k, "first": k * gen.shard_size, "width": P,
                  "ids": np.asarray(plan["prompts"][k * gen.shard_size:(k + 1) * gen.shard_size], dtype=np.int32).reshape(-1, P).tobytes()}
                 for k in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardGenerator, batch_size=1, compute=ray.data.ActorPoolStrategy(size=gen.concurrency), num_cpus=cfg.scale.cpus_per_worker,
            **({"num_gpus": 1} if cfg.scale.use_gpu else {}),
            fn_constructor_kwargs={"config": cfg.to_dict(), "plan": {k: plan[k] for k in ("teacher", "generator", "same_model")}, "out": str(out)})
        for i, row in enumerate(_driven(ds.iter_rows()), 1):
            new_tokens, shard_s = new_tokens + int(row["tokens"]), shard_s + float(row["seconds"])
            log(f"raykd: shard {int(row['shard'])} written ({i}/{len(todo)}): {int(row['kept'])}/{int(row['samples'])} samples kept, "
                f"{int(row['tokens'])} tokens in {float(row['seconds']):.1f} s")
    wall = time.perf_counter() - t0
    last = (plan["meta"] or {}).get("counts", {})
    speed = ({"wall_s": round(wall, 1), "tokens_per_s": round(new_tokens / wall, 1), "shard_s": round(shard_s, 1)} if new_tokens else
             {k: last.get(k) for k in ("wall_s", "tokens_per_s", "shard_s")})  # nothing new: the run that generated them
    counts = {**_totals(out, plan["shards"], gen.format), "shards": plan["shards"], **speed}
    meta.update(complete=True, counts=counts)
    manifest.write_json(out / META, meta)
    return meta
