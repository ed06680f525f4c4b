"""`raykd eval`: a saved student against its teacher on validation text, and on tasks.

Loads both models (fp32, frozen) without Ray, computes `raykd.evaluate.evaluate_pair` on
validation blocks and the `raykd.tasks` scores under "tasks"; bad input is one line naming the
command-line flag, raised before any model loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raykd.data.pipeline import has_tokenizer
from raykd.errors import ConfigError
from raykd.evaluate import eval_blocks, evaluate_pair

_CLI_FIELDS = {"data.text_field": "--text-field", "data.train": "--data", "data.validation": "--data", "teacher.model": "--teacher",
               "eval.tasks": "--tasks"}


def run_eval(student_dir, teacher_spec: str, data: list[str], block_size: int = 256, max_blocks: int = 32,
             text_field: str = "text", trust_remote_code: bool = False, generation: bool = True, tasks: list[str] | None = None,
             limit: int = 200, log=print) -> dict:
    """`raykd eval`: load a saved student and a teacher spec, read validation blocks, evaluate_pair,
    then score `tasks` (raykd.tasks) for both models under the key "tasks".

    Blocks come from the teacher's tokenizer; both models are loaded frozen in fp32.
    Bad input raises ConfigError naming the command-line flag, before any model loads.
    """
    try:
        return _run_eval(student_dir, teacher_spec, data, block_size, max_blocks, text_field, trust_remote_code, generation,
                         tasks or [], limit, log)
    except ConfigError as e:  # messages from shared readers name config keys; name the flags instead
        msg = str(e)
        for key, flag in _CLI_FIELDS.items():
            if msg.startswith(key + ":"):
                raise ConfigError(flag + msg[len(key):]) from None
        raise


def _run_eval(student_dir, teacher_spec, data, block_size, max_blocks, text_field, trust_remote_code, generation, tasks,
              limit, log) -> dict:
    from raykd import models
    from raykd import tasks as task_eval

    if limit < 1:
        raise ConfigError(f"--limit: {limit} must be at least 1")
    task_data = task_eval.prepare(tasks, "eval.tasks")  # unknown, missing or unfetched tasks fail before any model loads
    if block_size < 2:
        raise ConfigError(f"--block-size: {block_size} is too small; use at least 2")
    if max_blocks < 1:
        raise ConfigError(f"--max-blocks: {max_blocks} must be at least 1")
    student_dir = Path(student_dir).expanduser()
    if not student_dir.is_dir():
        raise ConfigError(f"--student: {student_dir} is not a directory; pass a saved student (OUTPUT/student from raykd distill)")
    if not models._is_model_dir(student_dir):
        raise ConfigError(f"--student: {student_dir} is not a Hugging Face model directory (needs config.json and weights); pass OUTPUT/student from raykd distill")
    teacher_dir = models.resolve_model(teacher_spec, "--teacher", log=log)
    tokenizer = models.load_tokenizer(teacher_dir, trust_remote_code)
    s_config = models.load_config(student_dir, trust_remote_code, "--student")
    t_config = models.load_config(teacher_dir, trust_remote_code, "--teacher")
    if has_tokenizer(student_dir):
        models.check_same_vocab(tokenizer, models.load_tokenizer(student_dir, trust_remote_code), "--student")
    elif getattr(s_config, "vocab_size", None) != getattr(t_config, "vocab_size", None):
        raise ConfigError(f"--student: vocabulary size {s_config.vocab_size} differs from the teacher's {t_config.vocab_size}; use a student cut from this teacher")
    models.check_context("--block-size", block_size, t_config, "teacher")
    blocks = eval_blocks(data, tokenizer, block_size, max_blocks, text_field, field="--data")
    log(f"raykd: evaluating on {blocks.shape[0]} blocks x {block_size} tokens")
    student = models.load_model(student_dir, torch.float32, trust_remote_code, frozen=True)
    teacher = models.load_model(teacher_dir, torch.float32, trust_remote_code, frozen=True)
    memo = task_eval.teacher_memo(teacher_dir, teacher)  # the teacher is scored once per validation set and task
    metrics = evaluate_pair(student, teacher, tokenizer, blocks, batch_size=8, generation=generation and "cer" not in tasks, memo=memo)
    if tasks:
        metrics["tasks"] = task_eval.run(student, teacher, tokenizer, tasks, task_data, blocks=blocks, limit=limit, log=log,
                                         documents=lambda: _documents(data, text_field), memo=memo)
        if "cer" in tasks and generation:  # the cer task's greedy texts give ROUGE-L / BLEU too: generated once
            metrics.update({k: metrics["tasks"]["cer"]["student"][k] for k in ("rougeL", "bleu")})
    return metrics


def _documents(sources: list[str], text_field: str):
    """The validation documents of `sources` (as `eval_blocks` reads them) for the cloze task."""
    from raykd.config import DataConfig
    from raykd.data.reader import documents

    return documents(DataConfig(train=list(sources), validation=list(sources), text_field=text_field, min_chars=1, dedupe=False),
                     "validation")


def format_eval(metrics: dict) -> str:
    """The metrics of evaluate_pair as an aligned two-column (student / teacher) table."""

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    m = metrics
    rows = [
        ("", "student", "teacher"),
        ("perplexity", num(m["val_perplexity"], ".3f"), num(m["teacher_val_perplexity"], ".3f")),
        ("parameters", num(m["student_params"], ","), num(m["teacher_params"], ",")),
        ("tokens/s (prefill)", num(m["student_tokens_per_s"], ".1f"), num(m["teacher_tokens_per_s"], ".1f")),
        ("top-1 agreement", num(m["top1_agreement"], ".4f"), ""),
        ("ROUGE-L (greedy)", num(m["rougeL"], ".4f"), ""),
        ("BLEU (greedy)", num(m["bleu"], ".2f"), ""),
        ("validation tokens", num(m["val_tokens"], ","), ""),
    ]
    for name, res in m.get("tasks", {}).items():
        for key, value in res["student"].items():
            if key != "n" and isinstance(value, float):
                rows.append((f"{name} {key}", num(value, ".4f"), num(res["teacher"].get(key), ".4f")))
        rows.append((f"{name} retained", num(res.get("retained"), ".3f"), f"(n={res['student'].get('n')})"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}".rstrip() for a, b, c in rows)
