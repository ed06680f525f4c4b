"""Task evaluation: how users judge a student, beside perplexity.

Built-in tasks (zero-shot, scored by log-likelihood or greedy generation; no hub access):
  sentiment  human-rated sentences (VADER's ICWSM-2014 sets), few-shot prompt: acc, auc
  cloze      last word of held-out validation passages (LAMBADA-style): acc, logprob
  cer        character error rate of the student's greedy continuation against the teacher's
             (beside ROUGE-L and BLEU), and of both against the corpus's own text (cer_text)
Any other name is an lm-evaluation-harness task: a task name lm-eval knows locally or a
directory / YAML file of custom tasks with local data (raykd.tasks.harness).

Each task reports {"student": {...}, "teacher": {...}, "retained": r}; r is the share of the
teacher's lead over chance the student keeps, (student - chance) / (teacher - chance), on the
task's main metric (sentiment: auc, cloze: acc, lm-eval tasks: acc), and 1 - cer for cer.
"""

from __future__ import annotations

import time

from raykd.errors import ConfigError
from raykd.tasks.names import BUILTIN, check_names, check_objective, is_builtin, objective_metric  # noqa: F401 (public)

MAIN = {"sentiment": ("auc", 0.5), "cloze": ("acc", 0.0)}  # task -> (main metric, chance)


def prepare(names: list[str], field: str = "eval.tasks", fetch: bool = False, log=print) -> dict:
    """Everything a task needs before any model loads, checked here (one-line errors): the sentiment
    set (fetched first when `fetch`), lm-eval task definitions. Returns {task: data} that travels to
    the workers with the config (small: at most 2,000 sentences)."""
    data = check(names, field)
    if "sentiment" in names:
        from raykd.tasks import sentiment

        if fetch:
            sentiment.fetch(log=log)
        data["sentiment"] = sentiment.load(field)
    return data


def check(names: list[str], field: str = "eval.tasks") -> dict:
    """`prepare`'s checks that need no task data fetched (what `raykd plan` runs): the names, and that
    lm-eval knows every other task. Returns {"lm_eval": spec} when lm-eval tasks are named, else {}."""
    check_names(names, field)
    others = [n for n in names if not is_builtin(n)]
    if not others:
        return {}
    from raykd.tasks import harness

    return {"lm_eval": harness.check(others, field)}


def run(student, teacher, tokenizer, names: list[str], data: dict, *, documents=None, blocks=None, limit: int = 200,
        prompts: int = 16, batch_size: int = 16, log=print, memo=None) -> dict:
    """Score `student` and `teacher` on each task in `names` -> {task: {"student", "teacher", "retained"}}.

    `data` from `prepare`; `documents()` yields validation texts (cloze); `blocks` LongTensor[N, T] of
    validation ids (cer prompts: the first 32 tokens of the first `prompts` blocks). `memo`
    (raykd.tasks.memo.TeacherMemo): the teacher's side of the built-in tasks is read from it when an
    earlier run on this node computed it (sweep trials), else computed and stored.
    """
    from raykd.tasks.memo import TeacherMemo

    memo = memo or TeacherMemo(None, None)
    out = {}
    for name in names:
        if not is_builtin(name):  # an lm-eval name or YAML path: one entry per lm-eval task it holds
            from raykd.tasks import harness

            for task in data["lm_eval"]["by_name"][name]:
                t0 = time.perf_counter()
                out[task] = harness.run_pair(student, teacher, tokenizer, task, data["lm_eval"], limit, batch_size)
                out[task]["seconds"] = round(time.perf_counter() - t0, 2)
                log(f"raykd: task {task}: {summary(task, out[task])}")
            continue
        t0 = time.perf_counter()
        if name == "sentiment":
            out[name] = _pair("sentiment", student, teacher, tokenizer, data["sentiment"][:limit], batch_size, memo)
        elif name == "cloze":
            from raykd.tasks import cloze

            if documents is None:
                raise ConfigError("eval.tasks: the cloze task needs validation text; set data.validation or --data")
            out[name] = _pair("cloze", student, teacher, tokenizer, cloze.items(documents(), limit), batch_size, memo)
        else:
            out[name] = generation_task(student, teacher, tokenizer, blocks, prompts, memo=memo)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"raykd: task {name}: {summary(name, out[name])}")
    return out


def _pair(name: str, student, teacher, tokenizer, items: list[dict], batch_size: int, memo) -> dict:
    from raykd.tasks import cloze, sentiment

    score = {"sentiment": sentiment.score, "cloze": cloze.score}[name]
    if not items:  # a finished run is not failed for it: the task is reported as skipped, with why
        return {"student": {}, "teacher": {}, "retained": None,
                "skipped": f"no {name} examples in the validation text (passages of at least 10 words ending in a word)"}
    s = score(student, tokenizer, items, batch_size)
    t = memo.get(name, items, lambda: score(teacher, tokenizer, items, batch_size))
    from raykd.tasks.scoring import retained

    metric, chance = MAIN[name]
    return {"student": s, "teacher": t, "retained": retained(s[metric], t[metric], chance)}


def generation_task(student, teacher, tokenizer, blocks, prompts: int, prompt_tokens: int = 32, new_tokens: int = 32,
                    memo=None) -> dict:
    """cer: greedy continuations of `prompts` validation prompts; the student's against the teacher's
    (cer, rougeL, bleu) and both against the corpus's own next `new_tokens` tokens (cer_text)."""
    from raykd.evaluate import generation_texts, overlap
    from raykd.tasks.scoring import cer

    if blocks is None:
        raise ConfigError("eval.tasks: the cer task needs validation blocks; set data.validation or --data")
    hyp, ref, truth = generation_texts(student, teacher, blocks, tokenizer, prompt_tokens, new_tokens, prompts, memo=memo)
    s = {"cer": cer(hyp, ref), "cer_text": cer(hyp, truth), **overlap(hyp, ref), "n": len(hyp)}
    t = {"cer": 0.0, "cer_text": cer(ref, truth), "n": len(ref)}
    return {"student": s, "teacher": t, "retained": max(0.0, 1.0 - s["cer"])}


def summary(name: str, result: dict) -> str:
    """One line: the student's and the teacher's numbers and the retained share."""
    def fmt(d):
        return ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float))

    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    r = result.get("retained")
    kept = "-" if r is None else f"{r:.3f}"
    return f"student {fmt(result['student'])} | teacher {fmt(result['teacher'])} | retained {kept}"


def flat(tasks: dict) -> dict:
    """{"sentiment_auc": student's auc, ..., "sentiment_retained": ...}: task scores as flat metric keys
    (sweep objectives `task:sentiment_auc`, report columns)."""
    out = {}
    for name, result in tasks.items():
        key = name.replace("/", "_").replace(".", "_")
        for metric, value in result["student"].items():
            if isinstance(value, (int, float)) and metric != "n":
                out[f"{key}_{metric}"] = value
        out[f"{key}_retained"] = result.get("retained")
    return out


def teacher_memo(teacher_dir, teacher):
    """This node's store of `teacher`'s scores (raykd.tasks.memo.TeacherMemo under RAYKD_CACHE)."""
    from raykd.tasks import memo

    return memo.default(teacher_dir, teacher)


def score_run(cfg, student, teacher, tokenizer, val_blocks, teacher_dir, log=print) -> dict:
    """Everything a finished run is scored on (`eval.final: full`): `raykd.evaluate.evaluate_pair` on the
    validation blocks LongTensor[N, T] and the `eval.tasks` (`for_run`); the teacher's side from this node's memo."""
    from raykd.evaluate import evaluate_pair

    generation = cfg.train.generation_eval and "cer" not in cfg.eval.tasks  # the cer task generates once for both
    memo = teacher_memo(teacher_dir, teacher)  # the teacher's scores, once per teacher and validation set
    metrics = evaluate_pair(student, teacher, tokenizer, val_blocks, batch_size=cfg.train.batch_size, generation=generation, memo=memo)
    if cfg.eval.tasks:
        metrics.update(for_run(cfg, student, teacher, tokenizer, val_blocks, teacher_dir, log=log, memo=memo))
    return metrics


def for_run(cfg, student, teacher, tokenizer, val_blocks, teacher_dir, log=print, memo=None) -> dict:
    """The `eval.tasks` of a finished run (rank 0, after export): {"tasks": run(...), "task_<name>_<metric>":
    the student's scores as flat keys (sweep objectives and report columns)}; with the cer task its
    ROUGE-L / BLEU replace the generation metrics (one greedy generation, not two). `memo`: the
    teacher's scores (default: this node's store for `teacher_dir`)."""
    from raykd.data.reader import documents

    data = prepare(cfg.eval.tasks, fetch=True, log=log)  # on this node: a cluster node fetches its own copy
    res = run(student, teacher, tokenizer, cfg.eval.tasks, data, documents=lambda: documents(cfg.data, "validation"),
              blocks=val_blocks, limit=cfg.eval.limit, prompts=cfg.eval.prompts, batch_size=cfg.eval.batch_size, log=log,
              memo=memo or teacher_memo(teacher_dir, teacher))
    out = {"tasks": res, **{f"task_{k}": v for k, v in flat(res).items()}}
    if "cer" in res and cfg.train.generation_eval:
        out.update(rougeL=res["cer"]["student"]["rougeL"], bleu=res["cer"]["student"]["bleu"])
    return out
