"""The teacher cache on local Ray with the tiny teacher: build (contents equal a direct teacher
forward), resume (only missing shards rebuilt), refusal of caches that do not match the run,
training from the cache vs the online teacher (the sweep from a cache: test_cache_sweep.py)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "smoke.yaml")
# the smoke job without the terms a cache cannot serve, on 48 blocks in shards of 16, top-64 (of the tiny teacher's
# 1,024 tokens; the default 256 would keep a quarter of them, where fp16 storage reorders many near-ties)
BASE = ["loss.weights.attention=0", "loss.weights.relation=0", "loss.weights.blockwise=0", "data.max_train_blocks=48",
        "teacher.cache_shard_blocks=16", "scale.num_workers=1", "train.max_steps=12", "train.precision=fp32", "teacher.cache_topk=64"]


def _cfg(cache_dir, *overrides):
    from raykd.config import load_config
    from raykd.plan import resolve

    cfg = load_config(SMOKE, [*BASE, f"teacher.cache={cache_dir}", *overrides])
    return resolve(cfg, log=lambda m: None)  # (resolved config, plan)


@pytest.fixture(scope="module")
def built(local_ray, tmp_path_factory):
    from raykd.data import cache

    d = tmp_path_factory.mktemp("cache") / "c"
    meta = cache.build(*_cfg(d), log=lambda m: None)
    return d, meta


def _table(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def test_build_holds_the_teachers_targets(built, tiny_teacher):
    from raykd.data import cache, cache_read
    from raykd.losses.topk import teacher_topk
    from raykd.objective import forward_with_capture, head
    from raykd.spec import Needs

    d, meta = built
    assert meta["complete"] and meta["shards"] == 3 and meta["blocks"] == 48 and meta["tokens"] == 48 * 64
    assert meta["layers"] == [0, 2, 5] and meta["topk"] == 64 and meta["dtype"] == "float16"
    assert 0 < meta["bytes_per_token"]["logits"] < meta["bytes_per_token"]["logits_and_hidden"]
    assert sorted(p.name for p in d.iterdir()) == [cache.META, "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    table = _table(d / "shard-00001.parquet")
    assert table.num_rows == 16
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    cfg, _ = _cfg(d)
    ids, t_out = cache_read.teacher_outputs(batch, cfg, 1024, torch.device("cpu"))
    assert ids.shape == (16, 64)
    assert table.schema.metadata[b"raykd_inputs_sha256"].decode() == hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()
    with torch.no_grad():
        last, cap = forward_with_capture(tiny_teacher, ids, Needs(hidden=(0, 2, 5)))
        w, _ = head(tiny_teacher)
        want = teacher_topk((last @ w.T).reshape(-1, w.shape[0]), 64)
    got = t_out.topk.flat()
    agree = (got.idx == want.idx).float().mean()
    assert agree > 0.98  # fp16 storage only reorders near-ties
    torch.testing.assert_close(got.logp.float(), want.logp, atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(got.tail, want.tail, atol=1e-4, rtol=1e-4)
    for t in (0, 2, 5):
        torch.testing.assert_close(t_out.hidden[t].float(), cap.hidden[t], atol=2e-3, rtol=2e-3)


def test_resume_rebuilds_only_missing_shards(built, tmp_path):
    from raykd.data import cache

    src, _ = built
    d = tmp_path / "c"
    shutil.copytree(src, d)
    before = {n: (d / n).stat().st_mtime_ns for n in ("shard-00000.parquet", "shard-00002.parquet")}
    (d / "shard-00001.parquet").unlink()
    (d / ".shard-00001.parquet.tmp").write_bytes(b"half a shard")  # what an interrupted build leaves
    meta = json.loads((d / cache.META).read_text())
    (d / cache.META).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(Exception, match="unfinished teacher cache"):
        cache.require(*_cfg(d))
    meta = cache.build(*_cfg(d), log=lambda m: None)
    assert meta["complete"] and meta["blocks"] == 48
    assert {n: (d / n).stat().st_mtime_ns for n in before} == before  # finished shards were not rewritten
    assert not list(d.glob(".*.tmp"))
    assert _table(d / "shard-00001.parquet").equals(_table(src / "shard-00001.parquet"))


def test_a_cache_holds_the_blocks_its_run_reads_and_grows_with_the_next(built, tmp_path):
    """A 5-step run reads 5 x 4 blocks: the cache holds those 20 (a shard of 16 and one of 4), not the train set.
    A 12-step run is refused by it in one line, and its build extends it: the full shard kept, the short one rebuilt,
    one added, the same shards as a cache built for 12 steps at once. A run that reads past the set's 48 blocks marks
    the cache whole (the stream ended first), after which any run reads it."""
    from raykd.config import ConfigError
    from raykd.data import cache

    d = tmp_path / "c"
    meta = cache.build(*_cfg(d, "train.max_steps=5"), log=lambda m: None)
    assert (meta["blocks"], meta["shards"], meta["whole"]) == (20, 2, False) and cache.reads(_cfg(d)[0]) == 48
    assert cache.require(*_cfg(d, "train.max_steps=3"))["blocks"] == 20  # 12 blocks read, 20 held
    with pytest.raises(ConfigError) as e:
        cache.require(*_cfg(d))
    assert str(e.value) == (f"teacher.cache: {d} holds the first 20 train blocks and this run reads 48 (train.max_steps x batch_size x "
                            "grad_accum x workers); run `raykd cache-teacher` with this run's config to extend it")
    first = (d / "shard-00000.parquet").stat().st_mtime_ns
    lines = []
    meta = cache.ensure(*_cfg(d), log=lines.append)
    assert (meta["blocks"], meta["shards"], meta["whole"]) == (48, 3, False)
    assert any("48 blocks (what the run reads) in 3 shards, 1 already built, 2 to build" in ln for ln in lines), lines
    assert (d / "shard-00000.parquet").stat().st_mtime_ns == first
    for i in range(3):
        assert _table(d / f"shard-{i:05d}.parquet").equals(_table(built[0] / f"shard-{i:05d}.parquet"))
    assert cache.status(*_cfg(d, "train.max_steps=20"))[0] == "short"
    meta = cache.ensure(*_cfg(d, "train.max_steps=20"), log=lambda m: None)  # 80 blocks asked, the set holds 48
    assert (meta["blocks"], meta["whole"]) == (48, True) and (d / "shard-00000.parquet").stat().st_mtime_ns == first
    assert cache.require(*_cfg(d, "train.max_steps=100"))["blocks"] == 48


def test_a_sweep_reads_the_cache_once_and_each_trial_takes_its_columns(built):
    from raykd.data import cache_read

    d, meta = built
    cfg, plan = _cfg(d)
    lines = []
    assert cache_read.shared_rows(cfg, lines.append, share=0.0) is None and "each trial reads its shards" in lines[-1]
    rows = cache_read.shared_rows(cfg, lines.append)  # every column, materialized once
    assert rows.count() == meta["blocks"] and "hidden_5" in rows.columns() and "read once for every trial" in lines[-1]
    cols = plan.objective.cache_columns()
    shared, own = cache_read.train_dataset(cfg, plan.objective, rows), cache_read.train_dataset(cfg, plan.objective)
    assert shared.columns() == own.columns() == cols and cols[:4] == ["input_ids", "topk_idx", "topk_logp", "tail"]
    key = lambda r: r["input_ids"]  # noqa: E731  (row order is the executor's; the rows must be the same)
    assert sorted(shared.take_all(), key=key) == sorted(own.take_all(), key=key)


@pytest.mark.parametrize("override, match", [
    ("data.block_size=32", r"data.block_size.*; set data\.block_size=64 to read it, point teacher\.cache at a new directory"),
    ("teacher.model=tiny-random:seed=1", "another teacher"),
    ("teacher.cache_topk=32", r"teacher.cache_topk.*; set teacher\.cache_topk=64 to read it"),
    ("teacher.cache_topk=0", r"teacher.cache_topk \(topk 64 vs 0 in this run\); set teacher\.cache_topk=64"),  # a top-k cache from before the dense default
    ("data.max_train_blocks=40", "other data settings"),
    ("student.init=first", r"needs \[1\] too"),  # maps teacher layers 0, 1, 2; the cache holds 0, 2, 5
])
def test_mismatching_cache_is_refused_before_ray(built, override, match):
    from raykd.config import ConfigError
    from raykd.data import cache

    d, _ = built
    cfg, plan = _cfg(d, override)
    with pytest.raises(ConfigError, match=match) as e:
        cache.require(cfg, plan)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_cli_refuses_a_mismatching_cache_with_one_line(built, capsys):
    from raykd.cli import main

    d, _ = built
    before = sorted(os.listdir(d))
    assert main(["distill", SMOKE, *BASE, f"teacher.cache={d}", "data.block_size=32", "output_dir=/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raykd: error: teacher.cache:") and "block_size" in err[0]
    assert sorted(os.listdir(d)) == before
    assert main(["cache-teacher", SMOKE]) == 2
    assert "teacher.cache=DIR" in capsys.readouterr().err
    (d.parent / "a-file").write_text("")
    assert main(["cache-teacher", SMOKE, *BASE, f"teacher.cache={d.parent / 'a-file' / 'cache'}"]) == 2  # refused before Ray
    assert capsys.readouterr().err.strip().splitlines() == [
        f"raykd: error: teacher.cache: cannot write {d.parent / 'a-file' / 'cache'} (Not a directory); choose a directory you can write, "
        "e.g. teacher.cache=runs/NAME"]


def test_plan_says_what_distill_will_find_in_the_cache(built, tmp_path, capsys):
    """`raykd plan` with teacher.cache: one line on whether the cache serves the run, is short of it (distill extends
    it), or is missing; --json carries the same."""
    from raykd.cli import main

    d, _ = built
    for extra, line in (((), "ready: holds 48 train blocks, this run reads 48"),
                        (("train.max_steps=20",), "holds 48 train blocks, this run reads 80: raykd distill extends it first"),
                        ((f"teacher.cache={tmp_path / 'none'}",), "not built: raykd distill builds it first (48 train blocks; or raykd cache-teacher)")):
        assert main(["plan", SMOKE, *BASE, f"teacher.cache={d}", *extra]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-1].startswith("cache      ") and out[-1].endswith(line), out[-1]
    assert main(["plan", SMOKE, *BASE, f"teacher.cache={d}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == {"path": str(d), "state": "complete", "blocks": 48, "whole": False, "reads": 48}


def test_config_refuses_terms_the_cache_cannot_serve():
    from raykd.config import ConfigError, load_config

    for term in ("attention", "relation", "blockwise"):
        with pytest.raises(ConfigError, match=f"loss.weights.{term}"):
            load_config(SMOKE, ["teacher.cache=x", *[f"loss.weights.{t}=0" for t in ("attention", "relation", "blockwise") if t != term]])
    with pytest.raises(ConfigError) as e:  # all three weighted: one line names them all and the whole fix
        load_config(SMOKE, ["teacher.cache=x", "loss.weights.attention=0.1", "loss.weights.relation=0.1", "loss.weights.blockwise=0.1"])
    assert str(e.value).startswith("loss.weights.attention, loss.weights.relation, loss.weights.blockwise: the teacher cache")
    assert "set loss.weights.attention=0 loss.weights.relation=0 loss.weights.blockwise=0 or drop teacher.cache" in str(e.value)
    with pytest.raises(ConfigError, match="loss.kd: dkd"):
        load_config(SMOKE, [*BASE, "teacher.cache=x", "loss.kd=dkd"])


def test_distill_from_cache_matches_online_teacher(built, tmp_path):
    from raykd.train import distill

    d, _ = built
    online = distill(_cfg(d, f"output_dir={tmp_path / 'online'}", "teacher.cache=null")[0], log=lambda m: None)
    cached = distill(_cfg(d, f"output_dir={tmp_path / 'cached'}")[0], log=lambda m: None)
    assert cached["steps"] == online["steps"] == 12 and cached["tokens_seen"] == online["tokens_seen"]
    assert cached["val_perplexity"] < cached["init_val_perplexity"]
    assert abs(cached["val_perplexity"] / online["val_perplexity"] - 1) < 0.02, (cached["val_perplexity"], online["val_perplexity"])
    # the (k+1)-bin KL is a lower bound of the full one (most of a random teacher's KL is in its
    # flat tail; a trained LM's top 64 hold most of its mass); the hidden term reads the same states
    for a, b in zip(cached["history"], online["history"]):
        assert 0 < a["kd"] <= 1.05 * b["kd"] and abs(a["hidden"] - b["hidden"]) < 0.02, (a, b)


@pytest.fixture(scope="module")
def dense(local_ray, tmp_path_factory):
    from raykd.data import cache

    d = tmp_path_factory.mktemp("dense") / "c"
    meta = cache.build(*_cfg(d, "teacher.cache_topk=0"), log=lambda m: None)
    return d, meta


def test_a_dense_cache_holds_the_teachers_final_hidden_state(dense, tiny_teacher):
    """teacher.cache_topk=0: a `last` column (the final normed hidden state) instead of the top-k ones; read back with
    the teacher's head, its logits are the teacher's."""
    from raykd.data import cache_read
    from raykd.objective import forward_with_capture, head
    from raykd.spec import Needs

    d, meta = dense
    assert meta["complete"] and meta["topk"] == 0 and meta["blocks"] == 48
    table = _table(d / "shard-00002.parquet")
    assert table.column_names == ["input_ids", "last", "hidden_0", "hidden_2", "hidden_5"]
    cfg, plan = _cfg(d, "teacher.cache_topk=0")
    assert cache_read.columns(cfg, plan.objective) == ["input_ids", "last", "hidden_0", "hidden_2", "hidden_5"]
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    w, b = head(tiny_teacher)
    ids, t_out = cache_read.teacher_outputs(batch, cfg, 1024, torch.device("cpu"), head=(w, b))
    assert t_out.topk is None and t_out.head[0] is w
    with torch.no_grad():
        last, _ = forward_with_capture(tiny_teacher, ids, Needs())
        torch.testing.assert_close(t_out.last_hidden.float() @ w.T, last @ w.T, atol=5e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="LM head"):
        cache_read.teacher_outputs(batch, cfg, 1024, torch.device("cpu"))


def test_a_float32_cache_holds_the_online_teachers_values(dense, tiny_teacher, tmp_path):
    """teacher.cache_dtype=float32: the stored final and layer states are the teacher's own (up to GEMM order), where
    the fp16 cache rounds them (which a 16-step trial at LR ~1e-3 turned into a 4% perplexity difference)."""
    from raykd.data import cache, cache_read
    from raykd.objective import forward_with_capture, head
    from raykd.spec import Needs

    d = tmp_path / "c32"
    meta = cache.build(*_cfg(d, "teacher.cache_topk=0", "teacher.cache_dtype=float32"), log=lambda m: None)
    assert meta["dtype"] == "float32" and meta["bytes_per_token"]["logits"] > 1.5 * dense[1]["bytes_per_token"]["logits"]
    errors = {}
    for name, where in (("float32", d), ("float16", dense[0])):
        table = _table(where / "shard-00002.parquet")
        batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
        cfg, _ = _cfg(where, "teacher.cache_topk=0", f"teacher.cache_dtype={name}")
        ids, t_out = cache_read.teacher_outputs(batch, cfg, 1024, torch.device("cpu"), head=head(tiny_teacher))
        with torch.no_grad():
            last, cap = forward_with_capture(tiny_teacher, ids, Needs(hidden=(0, 2, 5)))
        assert t_out.last_hidden.dtype == torch.float32 and t_out.hidden[5].dtype == getattr(torch, name)
        errors[name] = max((t_out.last_hidden - last).abs().max().item(), (t_out.hidden[5].float() - cap.hidden[5]).abs().max().item())
    assert errors["float32"] < 1e-5 < 1e-4 < errors["float16"], errors


def test_a_dense_cache_trains_as_the_online_teacher_at_any_temperature_and_loss(dense, tmp_path):
    """DKD at temperature 2 (which a top-k cache refuses; at T != 1 it approximates the tail): from the dense cache
    every step's KD term and the student are the online teacher's, up to the fp16 storage of the hidden states."""
    from raykd.config import ConfigError
    from raykd.train import distill

    d, _ = dense
    run = ["teacher.cache_topk=0", "loss.kd=dkd", "loss.temperature=2.0"]
    with pytest.raises(ConfigError, match="teacher.cache_topk=0"):  # the top-k cache's refusal names the dense one
        _cfg(d, *run[1:])
    online = distill(_cfg(d, *run, f"output_dir={tmp_path / 'online'}", "teacher.cache=null")[0], log=lambda m: None)
    cached = distill(_cfg(d, *run, f"output_dir={tmp_path / 'cached'}")[0], log=lambda m: None)
    assert cached["steps"] == online["steps"] == 12
    assert abs(cached["val_perplexity"] / online["val_perplexity"] - 1) < 2e-3, (cached["val_perplexity"], online["val_perplexity"])
    for a, b in zip(cached["history"], online["history"]):
        assert abs(a["kd"] / b["kd"] - 1) < 5e-3 and abs(a["hidden"] - b["hidden"]) < 0.02, (a, b)
