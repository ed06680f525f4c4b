import json
import math
import os
import subprocess
import sys

import pytest
import torch

from raykd import models
from raykd.cli import main
from raykd.config import ConfigError
from raykd.evaluate import (
    METRIC_KEYS,
    eval_blocks,
    evaluate_pair,
    generation_agreement,
    perplexity,
    tokens_per_s,
    top1_agreement,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return models.load_tokenizer(tiny_teacher_dir)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return eval_blocks(["pydoc"], tokenizer, block_size=32, max_blocks=6)  # [6, 32]


@pytest.fixture(scope="module")
def student(tiny_teacher):
    return models.cut_student(tiny_teacher, [0, 5]).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, student, tokenizer):
    path = tmp_path_factory.mktemp("student")
    student.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_perplexity_equals_exp_of_hf_labels_loss(tiny_teacher, blocks):
    with torch.no_grad():
        hf_loss = tiny_teacher(input_ids=blocks, labels=blocks).loss.item()  # mean over N*(T-1)
    # batch size 4 over 6 blocks: uneven batches must still give the overall mean
    assert perplexity(tiny_teacher, blocks, batch_size=4) == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_a_model_agrees_fully_with_itself_and_keeps_its_mode(student, tokenizer, blocks):
    student.train()
    assert top1_agreement(student, student, blocks, batch_size=4) == 1.0
    gen = generation_agreement(student, student, blocks, tokenizer, prompt_tokens=8, new_tokens=8, num_prompts=3)
    assert gen["rougeL"] == 1.0 and gen["bleu"] == pytest.approx(100.0)
    ids_only = generation_agreement(student, student, blocks, prompt_tokens=8, new_tokens=8, num_prompts=2)  # no tokenizer
    assert ids_only["rougeL"] == 1.0 and ids_only["bleu"] == pytest.approx(100.0)
    assert student.training  # metrics put the model back in the mode they found it in
    student.eval()


def test_cut_student_against_teacher(student, tiny_teacher, tokenizer, blocks):
    m = evaluate_pair(student, tiny_teacher, tokenizer, blocks, batch_size=4)
    assert set(m) == set(METRIC_KEYS)
    assert 0.0 < m["top1_agreement"] < 1.0
    assert m["top1_agreement"] == pytest.approx(top1_agreement(student, tiny_teacher, blocks, batch_size=5))
    assert m["val_perplexity"] == pytest.approx(perplexity(student, blocks, batch_size=2), rel=1e-6)
    assert m["teacher_val_perplexity"] == pytest.approx(perplexity(tiny_teacher, blocks), rel=1e-6)
    assert m["val_perplexity"] != pytest.approx(m["teacher_val_perplexity"], rel=1e-6)
    assert 0.0 <= m["rougeL"] < 1.0 and 0.0 <= m["bleu"] < 100.0
    assert m["student_params"] < m["teacher_params"] == models.count_params(tiny_teacher)
    assert m["student_tokens_per_s"] > 0 and m["teacher_tokens_per_s"] > 0
    assert m["val_tokens"] == blocks.numel() == 6 * 32
    no_gen = evaluate_pair(student, tiny_teacher, tokenizer, blocks[:2], generation=False)
    assert no_gen["rougeL"] is None and no_gen["bleu"] is None


def test_the_teachers_side_is_scored_once_per_validation_set(student, tiny_teacher, tokenizer, blocks, tmp_path):
    """With a memo (a sweep's trials, repeated `raykd eval`), a second student's evaluation reads the
    teacher's NLL, argmax, speed and greedy texts instead of running the teacher: same numbers, no
    teacher forward. Other blocks are scored anew."""
    from raykd.tasks.memo import TeacherMemo

    memo = TeacherMemo(tmp_path, "tiny-teacher")
    first = evaluate_pair(student, tiny_teacher, tokenizer, blocks, batch_size=4, memo=memo)
    calls = []
    hook = tiny_teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = evaluate_pair(student, tiny_teacher, tokenizer, blocks, batch_size=4, memo=memo)
        assert calls == [] and memo.hits == 2  # val-stats and greedy texts
        for k in ("teacher_val_perplexity", "top1_agreement", "rougeL", "bleu", "teacher_tokens_per_s", "val_perplexity"):
            assert again[k] == pytest.approx(first[k], rel=1e-9), k
        other = evaluate_pair(student, tiny_teacher, tokenizer, blocks[:3], batch_size=4, memo=memo, generation=False)
        assert calls and other["teacher_val_perplexity"] == pytest.approx(perplexity(tiny_teacher, blocks[:3]), rel=1e-6)
    finally:
        hook.remove()


def test_tokens_per_s_counts_repeats(student, blocks):
    assert tokens_per_s(student, blocks, batch_size=4, repeats=2) > 0
    assert tokens_per_s(student, blocks[:1], batch_size=8, max_batches=1) > 0


def test_eval_blocks_packs_documents_with_eos(tmp_path, tokenizer):
    docs = ["The quick brown fox jumps over the lazy dog. " * 3, "Lists and   tuples\r\nare sequences.\n\n\n\nSo are strings. " * 4]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    from raykd.data.corpora import clean_text

    ids = [tokenizer(clean_text(d), add_special_tokens=False)["input_ids"] for d in docs]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    out = eval_blocks([str(tmp_path)], tokenizer, block_size=8, max_blocks=1000)
    assert out.dtype == torch.long and out.shape == (len(stream) // 8, 8)
    assert out.flatten().tolist() == stream[: out.numel()]
    assert out.flatten()[len(ids[0])].item() == tokenizer.eos_token_id  # EOS between the documents
    assert eval_blocks([str(tmp_path)], tokenizer, block_size=8, max_blocks=3).tolist() == out[:3].tolist()


def test_eval_blocks_uses_the_validation_split(tokenizer):
    from raykd.data.corpora import clean_text, pydoc_split

    first = clean_text(next(pydoc_split("pydoc:validation")))
    head = tokenizer(first, add_special_tokens=False)["input_ids"][:16]
    assert eval_blocks(["pydoc"], tokenizer, block_size=16, max_blocks=2)[0].tolist() == head


def test_eval_blocks_reads_what_training_reads(tmp_path, tokenizer):
    """`raykd eval --data` takes the training reader's inputs: a datasets DatasetDict (its validation
    split), a BOM-prefixed JSONL; a bad row is one line naming --data's field."""
    import datasets

    texts = {"train": ["Training text only. " * 20], "validation": ["The held-out speech about the union. " * 20]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in texts.items()}).save_to_disk(str(tmp_path / "dd"))
    want = tokenizer(texts["validation"][0].strip(), add_special_tokens=False)["input_ids"][:16]
    assert eval_blocks([str(tmp_path / "dd")], tokenizer, block_size=16, max_blocks=1)[0].tolist() == want
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps({"text": texts["validation"][0]}) + "\n", encoding="utf-8")
    assert eval_blocks([str(tmp_path / "bom.jsonl")], tokenizer, block_size=16, max_blocks=1)[0].tolist() == want
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data\.text_field: .*bad\.jsonl:1 has no field 'text'"):
        eval_blocks([str(tmp_path / "bad.jsonl")], tokenizer, block_size=16, max_blocks=1)


def test_eval_blocks_too_short_names_the_field(tmp_path, tokenizer):
    (tmp_path / "tiny.txt").write_text("Too short.")
    with pytest.raises(ConfigError, match=r"^data\.validation: the text holds \d+ tokens, fewer than one block of 512"):
        eval_blocks([str(tmp_path / "tiny.txt")], tokenizer, block_size=512, max_blocks=4)


def _eval_args(student_dir, teacher, *extra):
    return ["eval", "--student", str(student_dir), "--teacher", str(teacher), "--data", "pydoc", "--block-size", "32", "--max-blocks", "4", *extra]


def test_cli_eval_json(capsys, student_dir, tiny_teacher_dir):
    assert main(_eval_args(student_dir, tiny_teacher_dir, "--json")) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m) == set(METRIC_KEYS)
    assert m["val_tokens"] == 4 * 32 and 0 < m["top1_agreement"] < 1 and m["student_params"] < m["teacher_params"]


def test_cli_eval_table_and_named_teacher(capsys, student_dir):
    assert main(_eval_args(student_dir, "tiny-random", "--no-generation")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["student", "teacher"]
    assert lines[1].startswith("perplexity") and len(lines[1].split()) == 3
    assert any(line.startswith("top-1 agreement") for line in lines)
    assert any(line.split()[-1] == "-" for line in lines if line.startswith("ROUGE-L"))


@pytest.mark.parametrize(
    "case, start",
    [
        ("missing_student", "--student: "),
        ("student_without_weights", "--student: "),
        ("missing_teacher", "--teacher: "),
        ("missing_data", "--data: "),
        ("short_data", "--data: the text holds"),
        ("bad_block_size", "--block-size: "),
        ("block_over_context", "--block-size: 4096 exceeds the teacher's context of 2048 tokens; use at most 2048"),
    ],
)
def test_cli_eval_bad_input_exits_2_with_one_line(case, start, tmp_path, capsys, student_dir, tiny_teacher_dir):
    short = tmp_path / "short.txt"
    short.write_text("Hello there.")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    student, teacher, data, size = str(student_dir), str(tiny_teacher_dir), "pydoc", "32"
    if case == "missing_student":
        student = str(tmp_path / "nope")
    elif case == "student_without_weights":
        student = str(tmp_path / "empty")
    elif case == "missing_teacher":
        teacher = str(tmp_path / "no-teacher")
    elif case == "missing_data":
        data = str(tmp_path / "nope.txt")
    elif case == "short_data":
        data = str(short)
    elif case == "bad_block_size":
        size = "1"
    elif case == "block_over_context":
        size = "4096"
    argv = ["eval", "--student", student, "--teacher", teacher, "--data", data, "--block-size", size]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("raykd: error: " + start), lines[0]
    assert captured.out == ""


def test_evaluate_runs_without_importing_ray(student_dir, tiny_teacher_dir):
    code = (
        "import sys; from raykd.eval_command import run_eval; "
        f"m = run_eval({str(student_dir)!r}, {str(tiny_teacher_dir)!r}, ['pydoc'], block_size=16, max_blocks=2, "
        "generation=True, log=lambda m: None); "
        "assert m['val_tokens'] == 32, m; "
        "assert not [k for k in sys.modules if k == 'ray' or k.startswith('ray.')], 'ray imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
