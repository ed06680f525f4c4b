"""The Ray Data pipeline on a real local Ray (2 CPUs): formats, packing, split, dedupe, bad
input, seeded order, and Ray Train workers streaming their shards without deadlock. The tests
without `local_ray` (preflight, interrupt handling) need no Ray and run in the fast lane."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from raykd.config import ConfigError, DataConfig
from raykd.data import pipeline as data
from raykd.data.corpora import clean_text

BLOCK = 32


RAY_CPUS = 2  # the local_ray fixture's CPUs (tests/conftest.py): Ray Data's reservation on a 2-core machine


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    from raykd.models import load_tokenizer

    return load_tokenizer(Path(tiny_teacher_dir))


def _docs(n, start=0):
    """Distinct documents with messy whitespace (cleaning must normalise it)."""
    words = "the module defines classes for functions and statements used by the interpreter".split()
    out = []
    for i in range(start, start + n):
        body = " ".join(words[(i + k) % len(words)] for k in range(5 + i % 17))
        out.append(f"  Document {i}:\t{body}.\r\n\r\n\r\n  Second   line of {i} \n")
    return out


def _write_txt(root: Path, docs, prefix="d"):
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (root / f"{prefix}{i:03d}.txt").write_text(d)
    return root


def _rows(ds):
    return [tuple(np.asarray(r["input_ids"]).tolist()) for r in ds.take_all()]


def _unshuffled(ds):
    return getattr(ds, data._PROBE)[0]  # the training blocks before the seeded shuffle


def _assert_packed(rows, tok, docs):
    """`rows` (in order) are the cleaned, tokenized `docs` joined by EOS, cut into blocks: each
    packing batch starts at a document and drops its last < BLOCK tokens (ending in EOS)."""
    eos = tok.eos_token_id
    stream = [t for d in docs for t in tok(clean_text(d), add_special_tokens=False)["input_ids"] + [eos]]
    assert rows and all(len(r) == BLOCK for r in rows)
    pos = 0
    for row in rows:
        starts = [pos] + [p for p in range(pos + 1, pos + BLOCK) if stream[p - 1] == eos]  # continue, or a new batch
        match = [p for p in starts if tuple(stream[p:p + BLOCK]) == row]
        assert match, f"block at token {pos} is not the packed stream"
        pos = match[0] + BLOCK
    assert len(stream) - pos < BLOCK  # only the last batch's leftover is missing at the end


def _cfg(**kw):
    kw.setdefault("block_size", BLOCK)
    return DataConfig(**kw)


# --- formats, packing, explicit validation --------------------------------------------------


@pytest.mark.ray
def test_txt_dir_packs_exact_blocks_with_eos(local_ray, tiny_teacher_dir, tok, tmp_path):
    train_docs, val_docs = _docs(30), _docs(8, start=100)
    _write_txt(tmp_path / "train", train_docs)
    _write_txt(tmp_path / "val", val_docs)
    cfg = _cfg(train=[str(tmp_path / "train")], validation=[str(tmp_path / "val")])
    summary = data.preflight(cfg)
    assert summary["train_files"] == 30 and summary["validation_files"] == 8 and summary["train_documents"] == 30
    train, val = data.build_datasets(cfg, str(tiny_teacher_dir), seed=0)
    val_rows = _rows(val)  # validation keeps corpus order
    _assert_packed(val_rows, tok, val_docs)
    ordered, train_rows = _rows(_unshuffled(train)), _rows(train)
    _assert_packed(ordered, tok, train_docs)
    assert sorted(train_rows) == sorted(ordered) and train_rows != ordered  # shuffled, same blocks
    assert data.take_blocks(val, 3).tolist() == [list(r) for r in val_rows[:3]]


@pytest.mark.ray
def test_glob_jsonl_parquet_and_datasets_dir(local_ray, tiny_teacher_dir, tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs, val_docs = _docs(20), _docs(6, start=200)
    _write_txt(tmp_path / "val", val_docs)
    _write_txt(tmp_path / "mixed", docs, prefix="a")
    (tmp_path / "mixed" / "skip.md").write_text("not matched by the glob " * 5)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)) + "\n\n")
    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs}),
                          "validation": datasets.Dataset.from_dict({"body": val_docs})}).save_to_disk(str(tmp_path / "hfdict"))
    nest = tmp_path / "nest"  # a directory holding a DatasetDict: only its train split is training data
    shutil.copytree(tmp_path / "hfdict", nest / "hfdict")
    assert data.preflight(_cfg(train=[str(nest)], validation=[str(tmp_path / "val")], text_field="body"))["train_documents"] == len(docs)
    for source in (str(tmp_path / "mixed" / "a*.txt"), str(jsonl), str(tmp_path / "c.parquet"), str(tmp_path / "hf"), str(tmp_path / "hfdict")):
        validation = None if source.endswith("hfdict") else [str(tmp_path / "val")]  # a DatasetDict brings its own split
        cfg = _cfg(train=[source], validation=validation, text_field="body")
        assert data.preflight(cfg)["train_documents"] == len(docs), source
        train, val = data.build_datasets(cfg, str(tiny_teacher_dir))
        _assert_packed(_rows(_unshuffled(train)), tok, docs)
        _assert_packed(_rows(val), tok, val_docs)


# --- dedupe, split, order ------------------------------------------------------------------


@pytest.mark.ray
def test_dedupe_drops_exact_duplicates(local_ray, tiny_teacher_dir, tok, tmp_path):
    docs = _docs(12)
    _write_txt(tmp_path / "train", docs)
    (tmp_path / "train" / "z_copy.txt").write_text(docs[3] + "\n\n   ")  # same text after cleaning
    (tmp_path / "train" / "z.jsonl").write_text(json.dumps({"text": docs[5]}) + "\n" + json.dumps({"text": docs[5]}) + "\n")
    _write_txt(tmp_path / "val", [docs[0], *_docs(4, start=50)])  # a training document leaking into validation
    cfg = _cfg(train=[str(tmp_path / "train")], validation=[str(tmp_path / "val")])
    summary = data.preflight(cfg)
    assert summary["duplicates"] == 4 and summary["train_documents"] == 12 and summary["validation_documents"] == 4
    train, val = data.build_datasets(cfg, str(tiny_teacher_dir))
    _assert_packed(_rows(_unshuffled(train)), tok, docs)
    _assert_packed(_rows(val), tok, _docs(4, start=50))
    train_all, _ = data.build_datasets(_cfg(train=cfg.train, validation=cfg.validation, dedupe=False), str(tiny_teacher_dir))
    assert train_all.count() > train.count()


@pytest.mark.ray
def test_hash_split_is_deterministic_and_disjoint(local_ray, tiny_teacher_dir, tmp_path):
    docs = _docs(60)
    _write_txt(tmp_path / "train", docs)
    cfg = _cfg(train=[str(tmp_path / "train")], val_fraction=0.25)
    summary = data.preflight(cfg)
    assert summary["train_documents"] + summary["validation_documents"] == 60 and summary["validation_documents"] > 5

    def texts(want):  # the documents each split keeps (before tokenizing)
        plan = data._plan(cfg)
        items = plan.train if want == "train" else plan.validation
        return [r["text"] for r in data._documents_ds(plan, items, cfg, want, {}, keys_only=False).take_all()]

    tr, va = texts("train"), texts("validation")
    assert not set(tr) & set(va) and sorted(tr + va) == sorted(clean_text(d) for d in docs)
    a = data.build_datasets(cfg, str(tiny_teacher_dir), seed=3)
    b = data.build_datasets(cfg, str(tiny_teacher_dir), seed=3)
    assert _rows(a[1]) == _rows(b[1]) and _rows(a[0]) == _rows(b[0])  # same split, same seeded order
    c = data.build_datasets(cfg, str(tiny_teacher_dir), seed=4)
    assert _rows(c[0]) != _rows(a[0]) and sorted(_rows(c[0])) == sorted(_rows(a[0]))


@pytest.mark.ray
def test_named_pydoc_corpus_uses_its_own_split(local_ray, tiny_teacher_dir):
    cfg = _cfg(train=["pydoc"], block_size=256)
    summary = data.preflight(cfg)
    assert summary["train_documents"] > 10 * summary["validation_documents"] > 0
    train, val = data.build_datasets(cfg, str(tiny_teacher_dir))
    data.check_blocks(train, "data.train")
    data.check_blocks(val, "data.validation")
    assert data.take_blocks(val, 4).shape == (4, 256)


def test_imports_in_tasks_are_not_interrupted():
    """Ray cancels a running task with `_thread.interrupt_main`; inside `_no_interrupts` the
    KeyboardInterrupt waits until the block (an import, the tokenizer load) has finished."""
    import _thread

    finished = False
    with pytest.raises(KeyboardInterrupt):
        with data._no_interrupts():
            _thread.interrupt_main()
            for _ in range(10000):
                pass
            finished = True
    assert finished


# --- bad input: one line naming the field, before Ray work -------------------------------------


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        data.preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_fail_in_preflight(tmp_path):
    _write_txt(tmp_path / "ok", _docs(5))
    ok = str(tmp_path / "ok")
    assert _error(_cfg(train=[str(tmp_path / "missing")])).startswith("data.train: ")
    assert _error(_cfg(train=[ok], validation=[str(tmp_path / "nope.txt")])).startswith("data.validation: ")
    (tmp_path / "empty").mkdir()
    assert _error(_cfg(train=[str(tmp_path / "empty")])).startswith("data.train: ")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("  tiny \n\n")
    assert "no document" in _error(_cfg(train=[str(tmp_path / "short")]))
    (tmp_path / "ok" / "latin1.txt").write_bytes("caf\xe9 au lait, a fine document of some length".encode("latin-1"))
    msg = _error(_cfg(train=[ok]))
    assert msg.startswith("data.train: ") and "latin1.txt is not UTF-8" in msg
    (tmp_path / "ok" / "latin1.txt").unlink()
    val = tmp_path / "v.txt"
    val.write_bytes(b"\xff\xfe bad bytes in a validation file that is long enough")
    assert _error(_cfg(train=[ok], validation=[str(val)])).startswith("data.validation: ")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 40]}), tmp_path / "p.parquet")
    assert "no column 'text'" in _error(_cfg(train=[str(tmp_path / "p.parquet")]))
    assert _error(_cfg(train=[ok], val_fraction=0.0)).startswith("data.val_fraction: ")


@pytest.mark.ray
def test_jsonl_row_without_field_error_and_skip(local_ray, tiny_teacher_dir, tok, tmp_path):
    docs = _docs(10)
    rows = [{"text": d} for d in docs]
    rows[4] = {"body": "no text field here"}
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    _write_txt(tmp_path / "val", _docs(3, start=40))
    cfg = _cfg(train=[str(path)], validation=[str(tmp_path / "val")])
    msg = _error(cfg)
    assert msg.startswith("data.text_field: ") and f"{path}:5 has no field 'text'" in msg and "data.bad_rows=skip" in msg
    skip = _cfg(train=[str(path)], validation=[str(tmp_path / "val")], bad_rows="skip")
    assert data.preflight(skip)["bad_rows_skipped"] == 2
    with pytest.raises(ConfigError) as e:  # no preflight: the Ray task's error still comes back as one line
        data.build_datasets(cfg, str(tiny_teacher_dir))
    assert str(e.value) == msg
    train, _ = data.build_datasets(skip, str(tiny_teacher_dir))
    kept = docs[:4] + docs[5:]
    _assert_packed(_rows(_unshuffled(train)), tok, kept)
    with pytest.raises(ConfigError, match="data.bad_rows"):
        DataConfig(bad_rows="ignore")


@pytest.mark.ray
def test_corpus_too_short_for_one_block(local_ray, tiny_teacher_dir, tmp_path):
    _write_txt(tmp_path / "t", _docs(2))
    cfg = _cfg(train=[str(tmp_path / "t")], validation=[str(tmp_path / "t" / "d000.txt")], dedupe=False, block_size=4096)
    data.preflight(cfg)  # readable text; too short only shows once tokenized
    train, val = data.build_datasets(cfg, str(tiny_teacher_dir))
    with pytest.raises(ConfigError) as e:
        data.check_blocks(train, "data.train")
    assert str(e.value) == "data.train: the corpus is too short for one block of 4096 tokens; add text or lower data.block_size"


# --- Ray Train: 2 workers x 0.5 CPU on a 2-CPU Ray stream their shards --------------------------


@pytest.mark.ray
def test_train_workers_stream_shards_without_deadlock(local_ray, tiny_teacher_dir, tmp_path):
    """raykd's own trainer (`build_trainer`: 2 workers x 0.5 CPU, Ray Data tasks at data.task_cpus) on a
    2-CPU Ray trains to the end, each worker streaming an equal half of the training blocks. With
    batch_size 1, a worker whose shard holds n blocks is, after `steps` > n steps, in its second pass
    at batch steps - n: the data position each worker checkpoints tells its shard size."""
    import torch

    from raykd.config import load_config
    from raykd.plan import resolve
    from raykd.train import build_trainer

    _write_txt(tmp_path / "train", _docs(40))
    smoke = str(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml")
    over = [f"output_dir={tmp_path / 'out'}", f"data.train=[{tmp_path / 'train'}]", "data.val_fraction=0.1",
            f"data.block_size={BLOCK}", "data.max_val_blocks=4", "train.batch_size=1", "train.checkpoint_every=0",
            "train.generation_eval=false", "scale.num_workers=2", "scale.cpus_per_worker=0.5"]
    train, _ = data.build_datasets(load_config(smoke, over).data, str(tiny_teacher_dir), seed=0)
    total = train.count()
    half = total // 2
    assert half >= 4, total
    steps = half + half // 2  # one and a half passes over each shard
    cfg, plan = resolve(load_config(smoke, [*over, f"train.max_steps={steps}", f"train.report_every={steps}"]), log=lambda m: None)
    trainer, done = build_trainer(cfg, plan, log=lambda m: None), {}
    run = threading.Thread(target=lambda: done.update(result=trainer.fit()), daemon=True)
    run.start()
    run.join(timeout=600)
    assert done, "the 2-worker run did not finish in 600 s on the 2-CPU Ray: Train and Data deadlocked?"
    result = done["result"]
    assert result.error is None and result.metrics["step"] == steps
    with result.checkpoint.as_directory() as d:  # one file per worker: run state, data position, RNG
        saved = [torch.load(Path(d) / f"worker{r}.pt", weights_only=True)["state"] for r in range(2)]
    positions = [{"epoch": w["epoch"], "batch_index": w["batch_index"]} for w in saved]
    # equal shards (an odd last block dropped), each read whole once and half again
    assert positions == [{"epoch": 1, "batch_index": steps - half}] * 2, (positions, total)


def test_a_named_corpus_is_read_from_the_cache_of_the_node_that_reads_it(tmp_path, monkeypatch):
    """The driver plans `sotu` as named files ('sotu:SPLIT/NAME'), not paths into its own cache: a Ray
    Data task on another node (another RAYKD_CACHE) reads them from that node's copy."""
    from raykd.data.reader import _documents, _plan

    for node in ("driver", "worker"):
        for split, name in (("train", "1999_Clinton_Democratic.txt"), ("validation", "2005_Bush_Republican.txt")):
            d = tmp_path / node / "corpora" / "sotu" / split
            d.mkdir(parents=True)
            (d / name).write_text(f"The {node} node's copy of the {split} speech. " * 4)
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "driver"))
    plan = _plan(DataConfig(train=["sotu"]), fetch=True)
    assert sorted(f.path for f in plan.files) == ["sotu:train/1999_Clinton_Democratic.txt", "sotu:validation/2005_Bush_Republican.txt"]
    monkeypatch.setenv("RAYKD_CACHE", str(tmp_path / "worker"))  # the reading task runs on another node
    texts = [text for f in plan.files for _, text, _ in _documents(f, "text", "error", 1)]
    assert texts and all(t.startswith("The worker node's copy") for t in texts)


def test_a_corpus_of_short_documents_names_min_chars_wherever_it_is_read_first(tmp_path):
    """The importance search reads calibration text before the corpus preflight: both say what is wrong and the fix."""
    from raykd.data.reader import calibration_text, preflight

    (tmp_path / "table.csv").write_text("a,b\n1,2\n")  # 8 characters: shorter than data.min_chars
    cfg = DataConfig(train=[str(tmp_path / "table.csv")], validation=[str(tmp_path / "table.csv")])
    want = rf"^data\.train: the corpus holds no document of at least data\.min_chars={cfg.min_chars} characters after cleaning; add text or lower data\.min_chars$"
    for read in (lambda: calibration_text(cfg, 100), lambda: preflight(cfg)):
        with pytest.raises(ConfigError, match=want):
            read()
