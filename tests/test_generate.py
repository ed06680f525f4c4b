"""`raykd generate` and `data.mix` with the tiny teacher.

Without Ray: one shard's sampling (seeded, scored by the teacher, filtered), shard files (commit by
rename, checksum, temp files never read as documents), the mix's block counts, and bad input (the
CLI in a subprocess: exit 2, one line, nothing written). On local Ray (one module-wide instance and
one generated directory): the output directory end to end, resume after a lost, truncated or
half-written shard, the log-prob filter, `raykd distill` on the generated text alone and mixed with
the corpus by weight (the shares checked on the built dataset), and a student as the generator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raykd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "smoke.yaml")
# 16 prompts of 8 tokens from pydoc, 2 continuations of up to 24 tokens each, shards of 6 prompts (6, 6, 4)
GEN = ["generate.prompt_tokens=8", "generate.max_new_tokens=24", "generate.num_samples=2", "generate.num_prompts=16",
       "generate.shard_size=6", "generate.batch_size=8", "train.precision=fp32", "scale.num_workers=1"]
# a distill of a few steps: one worker, no task evaluation, small blocks (the generated text is short)
QUICK = ["train.max_steps=3", "train.report_every=1", "train.checkpoint_every=0", "train.batch_size=2", "scale.num_workers=1",
         "eval.tasks=[]", "train.generation_eval=false", "data.block_size=32", "train.precision=fp32"]


def _rows(d: Path) -> list[dict]:
    from raykd.generation import read_rows

    return [r for f in sorted(d.glob("shard-*")) for r in read_rows(f)]


def _teacher_mean(teacher, row: dict, prompt_tokens: int = 8) -> float:
    from raykd.sampling import token_logprobs

    lp = token_logprobs(teacher, torch.tensor([row["ids"]]))[0, prompt_tokens - 1:]
    return float(lp.mean())


# --- without Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tiny_teacher_dir):
    from raykd.data.reader import documents
    from raykd.generation import prompt_ids
    from raykd.models import load_tokenizer

    cfg = load_config(SMOKE, GEN)
    tok = load_tokenizer(tiny_teacher_dir)
    return tok, torch.tensor(prompt_ids(documents(cfg.data, "train"), tok, 8, 4))


def test_a_shard_is_seeded_scored_by_the_teacher_and_filtered(tiny_teacher, prompts):
    from raykd.generation import sample_shard

    tok, ids = prompts
    gen = load_config(SMOKE, GEN).generate
    rows, counts = sample_shard(tiny_teacher, None, tok, ids, gen, seed=5, first=10)
    again, _ = sample_shard(tiny_teacher, None, tok, ids, gen, seed=5, first=10)
    other, _ = sample_shard(tiny_teacher, None, tok, ids, gen, seed=6, first=10)
    assert rows == again and [r["ids"] for r in rows] != [r["ids"] for r in other]
    assert counts["prompts"] == 4 and counts["samples"] == counts["kept"] == len(rows) == 8
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(10 + i // 2, i % 2) for i in range(8)]
    for r in rows:
        assert r["ids"][:8] == ids[r["prompt_index"] - 10].tolist() and r["tokens"] == len(r["ids"]) - 8
        assert r["text"] == r["prompt"] + r["continuation"] and r["teacher_logprob"] == r["generator_logprob"]
        assert abs(r["teacher_logprob"] - _teacher_mean(tiny_teacher, r)) < 1e-4
    # scored by another model: its log-probs, not the generator's; the filter reads the teacher's
    other_teacher = type(tiny_teacher)(tiny_teacher.config).eval()
    thr = sorted(r["teacher_logprob"] for r in rows)[4]
    gen.filter_min_logprob = None
    scored, _ = sample_shard(tiny_teacher, other_teacher, tok, ids, gen, seed=5, first=10)
    assert [r["ids"] for r in scored] == [r["ids"] for r in rows]
    assert all(abs(r["teacher_logprob"] - _teacher_mean(other_teacher, r)) < 1e-4 for r in scored)
    gen.filter_min_logprob = thr
    kept, c = sample_shard(tiny_teacher, None, tok, ids, gen, seed=5, first=10)
    assert kept == [r for r in rows if r["teacher_logprob"] >= thr] and c["kept"] == len(kept) < c["samples"] == 8


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_commit_by_rename_and_partial_files_are_never_read(tmp_path, fmt):
    from raykd.config import DataConfig
    from raykd.data.reader import documents
    from raykd.generation import finished, read_rows, shard_path, write_shard

    rows = [{"text": f"document number {i} " * 4, "prompt": "p", "continuation": "c", "teacher_logprob": -1.5, "generator_logprob": -1.0,
             "tokens": 3, "ids": [1, 2, 3], "prompt_index": i, "sample": 0} for i in range(3)]
    write_shard(rows, tmp_path, 0, fmt, {"prompts": 3})
    write_shard([], tmp_path, 1, fmt, {"prompts": 1})  # every sample filtered out: still a finished shard
    assert read_rows(shard_path(tmp_path, 0, fmt)) == rows and read_rows(shard_path(tmp_path, 1, fmt)) == []
    assert finished(tmp_path, 0, fmt)["prompts"] == 3 and finished(tmp_path, 1, fmt) is not None and finished(tmp_path, 2, fmt) is None
    for name in (f".shard-00002.{fmt}.tmp", f"shard-00003.{fmt}.tmp", "shard-00004.jsonl.partial", "x.part"):
        (tmp_path / name).write_text('{"text": "a half-written shard must never become a training document"}\n')
    (tmp_path / "generate.json").write_text('{"text": "metadata, not a document of the corpus at all"}')
    docs = list(documents(DataConfig(train=[str(tmp_path)], validation=[str(tmp_path)], text_field="text"), "train"))
    assert docs == [r["text"].strip() for r in rows]
    data = shard_path(tmp_path, 0, fmt).read_bytes()
    shard_path(tmp_path, 0, fmt).write_bytes(data[: len(data) // 2])  # truncated behind raykd's back
    assert finished(tmp_path, 0, fmt) is None


def test_mix_targets_sum_to_the_pool_and_follow_the_weights():
    from raykd.data.mix import targets

    assert targets([100, 10], [0.5, 0.5]) == [55, 55]
    assert targets([300, 7], [3, 1]) == [230, 77] and sum(targets([300, 7], [3, 1])) == 307
    assert targets([5, 5, 5], [1, 1, 1]) == [5, 5, 5] and targets([10, 10], [1, 0]) == [20, 0]
    assert targets([3, 3, 4], [1, 1, 1]) == [4, 3, 3]  # a tie goes to the earlier source


def test_generate_config_and_mix_are_checked():
    for override, start in [("generate.temperature=-1", "generate.temperature: must be >= 0"), ("generate.top_p=0", "generate.top_p"),
                            ("generate.top_p=1.5", "generate.top_p"), ("generate.num_samples=0", "generate.num_samples"),
                            ("generate.format=csv", "generate.format"), ("generate.filter_min_logprob=0.5", "generate.filter_min_logprob"),
                            ("data.mix={pydoc: 1}", "data.mix: replaces data.train"), ("generate.concurrency=0", "generate.concurrency")]:
        with pytest.raises(ConfigError, match=f"^{start}"):
            load_config(SMOKE, [override])
    for mix, start in [("{}", "data.mix: no sources"), ("{pydoc: 0}", "data.mix: the weights sum to 0"),
                       ("{pydoc: -1, sotu: 2}", "data.mix.pydoc: weight must be"), ("{pydoc: .inf}", "data.mix.pydoc")]:
        with pytest.raises(ConfigError, match=f"^{start}"):
            load_config(SMOKE, ["data.train=null", f"data.mix={mix}"])
    cfg = load_config(SMOKE, ["data.train=null", "data.mix={pydoc: 3, x/gen: '1e0'}"])
    assert cfg.data.sources == ["pydoc", "x/gen"] and cfg.data.mix == {"pydoc": 3.0, "x/gen": 1.0}
    assert load_config(None).data.sources == ["sotu"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raykd.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32,
                                               "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}))
    return d


@pytest.mark.parametrize("args, start", [
    (["generate.temperature=-0.5"], "generate.temperature: must be >= 0"),
    (["generate.top_p=2"], "generate.top_p: must be in (0, 1]"),
    (["generate.num_samples=0"], "generate.num_samples: must be > 0"),
    (["generate.model=BERT"], "generate.model: BERT holds a bert (BertForMaskedLM), not a causal language model"),
    (["--out", "FILE"], "--out: FILE is a file"),
    (["--out", "FILE/gen"], "--out: cannot write FILE/gen (Not a directory); choose a directory you can write"),
    (["distill", "data.train=null", "data.mix={pydoc: 0, sotu: 0}"], "data.mix: the weights sum to 0"),
    (["distill", "data.train=null", "data.mix={pydoc: 1, /nonexistent/gen: 1}"], "data.mix: /nonexistent/gen does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_teacher_dir, bert_dir, args, start):
    out, file = tmp_path / "out", tmp_path / "a-file"
    file.write_text("not a directory")
    subst = {"BERT": str(bert_dir), "FILE": str(file)}
    args = [subst.get(a, a.replace("BERT", str(bert_dir)).replace("FILE", str(file))) for a in args]
    start = start.replace("BERT", str(bert_dir)).replace("FILE", str(file))
    if args[0] == "distill":
        proc = _cli("distill", SMOKE, f"output_dir={out}", *args[1:])
    else:
        proc = _cli("generate", SMOKE, *([] if "--out" in args else ["--out", str(out)]), *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("raykd: error: " + start), lines[0]
    assert not out.exists() and file.read_text() == "not a directory"


# --- on local Ray -------------------------------------------------------------------------------------


def _generate(out: Path, *overrides) -> dict:
    from raykd.cli import main

    assert main(["generate", SMOKE, "--out", str(out), *GEN, *overrides]) == 0
    return json.loads((out / "generate.json").read_text())


@pytest.fixture(scope="module")
def generated(local_ray, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "g"
    return d, _generate(d)


@pytest.mark.ray
def test_generate_writes_shards_rows_and_counts(generated, tiny_teacher, tiny_teacher_dir):
    from raykd.data.reader import documents
    from raykd.generation import COLUMNS, prompt_ids
    from raykd.models import load_tokenizer

    d, meta = generated
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["generate.json", *(f"shard-0000{k}.jsonl" for k in range(3))]
    c = meta["counts"]
    assert meta["complete"] and (c["shards"], c["prompts"], c["samples"], c["kept"]) == (3, 16, 32, 32)
    assert c["tokens"] == c["kept_tokens"] > 0 and c["tokens_per_s"] > 0 and c["wall_s"] > 0
    assert meta["config"]["generate"]["num_samples"] == 2 and meta["identity"]["seed"] == 0
    rows = _rows(d)
    assert len(rows) == 32 and all(set(COLUMNS) <= set(r) for r in rows) and sum(r["tokens"] for r in rows) == c["tokens"]
    want = prompt_ids(documents(load_config(SMOKE, GEN).data, "train"), load_tokenizer(tiny_teacher_dir), 8, 16)
    assert [r["ids"][:8] for r in rows] == [p for p in want for _ in range(2)]
    for r in rows[::5]:
        assert r["text"] == r["prompt"] + r["continuation"] and abs(r["teacher_logprob"] - _teacher_mean(tiny_teacher, r)) < 1e-4


@pytest.mark.ray
def test_rerun_resumes_lost_truncated_and_half_written_shards_only(generated, tmp_path, capsys):
    from raykd.cli import main

    src, _ = generated
    d = tmp_path / "g"
    shutil.copytree(src, d)  # copy2: contents and mtimes
    orig = {k: (d / f"shard-0000{k}.jsonl").read_bytes() for k in range(3)}
    (d / "shard-00001.jsonl").unlink()
    (d / ".shard-00001.jsonl.tmp").write_bytes(orig[1][:100])  # an interrupted run was writing it
    (d / "shard-00002.jsonl").write_bytes(orig[2][: len(orig[2]) // 2])  # damaged behind raykd's back
    mtime0 = (d / "shard-00000.jsonl").stat().st_mtime_ns
    meta = _generate(d)
    assert {k: (d / f"shard-0000{k}.jsonl").read_bytes() for k in range(3)} == orig  # seed + shard: the same rows again
    assert (d / "shard-00000.jsonl").stat().st_mtime_ns == mtime0 and not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp"))
    assert meta["counts"]["kept"] == 32
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.name.startswith("shard-")}
    _generate(d)  # all finished: nothing is written again
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.name.startswith("shard-")} == mtimes
    capsys.readouterr()
    assert main(["generate", SMOKE, "--out", str(d), *GEN, "seed=1"]) == 2  # other settings: refused, one line
    assert capsys.readouterr().err.startswith(f"raykd: error: --out: {d} was generated with seed=0, this run has 1")


@pytest.mark.ray
def test_filter_keeps_only_samples_the_teacher_scores_high_enough(generated, tmp_path):
    src, meta = generated
    rows = _rows(src)
    thr = sorted(r["teacher_logprob"] for r in rows)[len(rows) // 2]
    d = tmp_path / "filtered"
    fmeta = _generate(d, f"generate.filter_min_logprob={thr}", "generate.format=parquet")
    kept = _rows(d)
    assert sorted(p.name for p in d.glob("shard-*")) == [f"shard-0000{k}.parquet" for k in range(3)]
    assert 0 < len(kept) < len(rows) and all(r["teacher_logprob"] >= thr for r in kept)
    assert kept == [r for r in rows if r["teacher_logprob"] >= thr]  # the same samples (same seeds), fewer of them
    assert fmeta["counts"]["samples"] == 32 and fmeta["counts"]["kept"] == len(kept)


@pytest.mark.ray
def test_unconditional_prompts_sample_the_generators_own_text(local_ray, tmp_path, tiny_teacher_dir):
    """generate.prompts=bos: num_prompts prompts of the start token alone, each shard seeded apart, so the rows are
    the generator's own text (no corpus prefix), different from each other, and the text is the continuation."""
    from raykd.models import load_tokenizer

    meta = _generate(tmp_path / "u", "generate.prompts=bos", "generate.num_prompts=12")
    tok = load_tokenizer(tiny_teacher_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = _rows(tmp_path / "u")
    assert meta["counts"]["prompts"] == 12 and len(rows) == 24 and meta["identity"]["generate"]["prompts"] == "bos"
    assert all(r["ids"][0] == start and r["prompt"] == "" and r["text"] == r["continuation"] for r in rows)
    assert len({tuple(r["ids"]) for r in rows}) == len(rows)  # seeded per shard and per row: no two samples alike
    with pytest.raises(ConfigError, match=r"^generate.num_prompts: prompts=bos samples num_prompts"):
        load_config(SMOKE, ["generate.prompts=bos"])
    with pytest.raises(ConfigError, match=r"^generate.prompts: unknown value .chat."):
        load_config(SMOKE, ["generate.prompts=chat"])


@pytest.fixture(scope="module")
def student_on_generated(generated, tmp_path_factory):
    """`raykd distill` on the generated text alone (validated on pydoc's held-out topics)."""
    from raykd.config import load_config
    from raykd.train import distill

    d, _ = generated
    out = tmp_path_factory.mktemp("seqkd") / "run"
    cfg = load_config(SMOKE, [*QUICK, f"data.train=[{d}]", "data.validation=[pydoc]", f"output_dir={out}"])
    return out, distill(cfg, log=lambda m: None)


@pytest.mark.ray
def test_distill_on_generated_text(student_on_generated):
    out, metrics = student_on_generated
    assert metrics["steps"] == 3 and metrics["tokens_seen"] == 3 * 2 * 32 and (out / "student" / "config.json").is_file()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """60 short documents (pydoc prose): a corpus of a few hundred 32-token blocks, so a mix with the
    generated text is both down-sampled (the corpus) and up-sampled (the generated text)."""
    from raykd.data.corpora import pydoc_documents

    d = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(pydoc_documents()[:60]):
        (d / f"doc{i:02d}.txt").write_text(doc[:700])
    return d


@pytest.mark.ray
def test_mix_shares_on_the_built_dataset_and_a_mixed_distill(generated, small_corpus, tmp_path):
    from raykd.data import pipeline
    from raykd.data.corpora import clean_text
    from raykd.data.mix import targets
    from raykd.data.reader import documents
    from raykd.train import distill

    d, _ = generated
    cfg = load_config(SMOKE, [*QUICK, "data.train=null", f"data.mix={{{small_corpus}: 0.75, {d}: 0.25}}", "data.val_fraction=0.2",
                              f"output_dir={tmp_path / 'mixed'}"])
    train, val = pipeline.build_datasets(cfg.data, "tiny-random", cfg.seed)
    pools = [[tuple(r["input_ids"]) for r in ds.take_all()] for ds in pipeline.source_blocks(cfg.data, "tiny-random")]
    sets = [set(p) for p in pools]
    blocks = [tuple(r["input_ids"]) for r in train.take_all()]
    n = [len(p) for p in pools]
    from_each = [sum(b in s for b in blocks) for s in sets]
    assert not sets[0] & sets[1] and n[1] * 4 < sum(n)  # the generated text alone is less than its share: up-sampled
    assert from_each == targets(n, [0.75, 0.25]) and sum(from_each) == len(blocks) == sum(n)
    assert abs(from_each[1] / len(blocks) - 0.25) < 1 / len(blocks) and from_each[0] < n[0]
    assert [r["blocks"] for r in getattr(train, pipeline.MIX_REPORT)] == n
    assert [tuple(r["input_ids"]) for r in train.take_all()] == blocks  # the same blocks in the same order every epoch
    val_blocks = {tuple(r["input_ids"]) for r in val.take_all()}
    assert val_blocks and not val_blocks & (sets[0] | sets[1])
    corpus = {clean_text(f.read_text()) for f in small_corpus.iterdir()}
    held_out = list(documents(cfg.data, "validation"))
    assert held_out and set(held_out) <= corpus  # validation: the first source's hash split, no generated text
    metrics = distill(cfg, log=lambda m: None)
    assert metrics["steps"] == 3 and metrics["val_perplexity"] > 0


@pytest.mark.ray
def test_a_student_generates_and_the_teacher_scores(student_on_generated, tmp_path, tiny_teacher):
    out, _ = student_on_generated
    d = tmp_path / "self"
    meta = _generate(d, f"generate.model={out / 'student'}", "generate.num_prompts=4", "generate.shard_size=4")
    rows = _rows(d)
    assert meta["counts"]["samples"] == len(rows) == 8 and meta["identity"]["generator"] == str(out / "student")
    for r in rows:
        assert abs(r["teacher_logprob"] - _teacher_mean(tiny_teacher, r)) < 1e-4
    assert any(abs(r["teacher_logprob"] - r["generator_logprob"]) > 1e-3 for r in rows)
