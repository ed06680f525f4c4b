"""The pure parts of bench/: figure parsing, goal checks, the document, and one real tiny run
of bench/chunked_loss.py (fused loss vs naive, checked equal) turned into a document."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import asha  # noqa: E402
import collect  # noqa: E402


def test_parse_figures():
    assert collect.parse_figures("peak_memory_ratio=0.2317 time_ratio=1.329 precision=fp32") == {
        "peak_memory_ratio": "0.2317", "time_ratio": "1.329", "precision": "fp32"}
    assert collect.parse_figures("  a=1   b=x=y ") == {"a": "1", "b": "x=y"}
    # a line that is not all name=value pairs holds no figures
    assert collect.parse_figures("RuntimeError: arm raykd failed (exit 1): x=1") == {}
    assert collect.parse_figures("=1 a=2") == {}
    assert collect.parse_figures("") == {}


def test_figures_line_round_trips(capsys):
    C.figures({"tokens_per_s_ratio": 2.345678, "same_best": True, "steps": 5, "precision": "fp 32"})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert collect.parse_figures(last) == {"tokens_per_s_ratio": "2.346", "same_best": "1", "steps": "5", "precision": "fp_32"}


@pytest.mark.parametrize("name, figures, met", [
    ("chunked_loss", {"peak_memory_ratio": "0.25", "time_ratio": "1.21", "same_result": "1"}, ["yes", "**no**", "yes"]),
    ("vs_trl", {"tokens_per_s_ratio": "2.19", "peak_memory_ratio": "0.4", "plain_loop_ratio": "1.1", "roofline": "0.85"},
     ["**no**", "yes", "yes", "missing", "yes"]),
    ("asha", {"trial_steps_saved": "0.5", "same_best": "0", "wall_time_saved": "0.41"}, ["yes", "**no**", "yes"]),
    ("kd_step", {"overhead_ratio": "nan"}, ["**no**"]),
    ("kd_step", {"overhead_ratio": "n/a"}, ["?"]),
    ("kd_step", {}, ["missing"]),
])
def test_goal_checks(name, figures, met):
    rows = collect.goal_rows(name, figures)
    assert [r[4] for r in rows[:len(collect.GOALS[name])]] == met
    assert collect.goals_met({"name": name, "figures": figures}) == (met.count("yes"), len(met))


def test_goal_names_match_issue_7():
    assert set(collect.GOALS["chunked_loss"]) >= {"peak_memory_ratio", "time_ratio"}
    assert set(collect.GOALS["kd_step"]) == {"overhead_ratio"}
    assert set(collect.GOALS["vs_trl"]) == {"tokens_per_s_ratio", "peak_memory_ratio", "plain_loop_ratio",
                                            "peak_memory_ratio_ckpt", "roofline"}  # the last two: issue 18
    assert set(collect.GOALS["asha"]) == {"trial_steps_saved", "same_best", "wall_time_saved"}  # the last: issue 18
    assert set(collect.GOALS["cache"]) >= {"sweep_time_ratio"}
    assert set(collect.GOALS["sweep_overhead"]) == {"fixed_s_per_trial", "max_ppl_deviation"}  # issue 18 item 1
    assert set(collect.GOALS["quality"]) == {"feature_beats_both", "feature_over_teacher", "ood_over_teacher_feature",
                                             "emails_over_teacher_feature", "task_share_feature"}  # the last two: issue 18
    assert [p.stem for p in collect.benchmarks(None)][:4] == ["chunked_loss", "kd_step", "vs_trl", "asha"]
    with pytest.raises(SystemExit):
        collect.benchmarks(["no_such_bench"])


def test_asha_best_and_keys():
    trials = [
        {"status": "TERMINATED", "val_perplexity": 9.0, "params": {"lr": 0.1000000001, "k": 2}},
        {"status": "EARLY_STOPPED", "val_perplexity": 1.0, "params": {"lr": 0.2, "k": 2}},
        {"status": "TERMINATED", "val_perplexity": 3.0, "params": {"k": 3, "lr": 0.3}},
        {"status": "TERMINATED", "val_perplexity": None, "params": {"k": 4, "lr": 0.4}},
    ]
    assert asha.best(trials) is trials[2]  # stopped trials and trials without a result do not count
    assert asha.best(trials[1:2]) is None
    assert C.params_key({"lr": 0.1, "k": 2}) == C.params_key({"k": 2, "lr": 0.1000000001})
    assert C.params_key({"lr": 0.1}) != C.params_key({"lr": 0.11})


def test_tiny_chunked_loss_run_makes_a_document(tmp_path):
    """A real (tiny) run of bench/chunked_loss.py: raykd's fused loss and the naive one agree,
    both arms are measured, and the document shows the figures against their goals."""
    # sizes where the naive arm's logits (256 x 4096 fp32 = 4 MiB, several copies) are well above RSS noise: at
    # 48 x 320 the allocator served them from the warm-up's freed pages and the increase was 0 MiB
    args = ["--tokens=256", "--vocab=4096", "--hidden=24", "--teacher-hidden=40", "--chunk=64", "--also-chunks=",
            "--also-row-blocks=64", "--reps=1", "--iters=1", "--threads=1"]
    info = collect.run(BENCH / "chunked_loss.py", args, echo=False)
    assert info["error"] is None, info["error"]
    fig = info["figures"]
    assert fig["same_result"] == "1"
    assert (fig["tokens"], fig["vocab"], fig["chunk"]) == ("256", "4096", "64")
    assert float(fig["naive_mem_mib"]) >= 1, fig
    for key in ("peak_memory_ratio", "time_ratio", "raykd_s", "naive_s", "time_ratio_rows64"):
        assert math.isfinite(float(fig[key])) and float(fig[key]) >= 0, (key, fig[key])
    assert float(fig["raykd_s"]) > 0 and float(fig["naive_s"]) > 0
    assert info["title"].startswith("chunked LM-head loss")
    assert any(x.startswith("machine:") for x in info["setup"])
    assert any(x.startswith("load average") for x in info["setup"])
    assert any("same seeded inputs" in n for n in info["notes"])

    info.update(date="2026-01-01 00:00 UTC", machine="elsewhere")
    failed = {"name": "kd_step", "args": [], "rc": 1, "wall_s": 3.0, "figures": {}, "title": "", "notes": [], "setup": [],
              "error": "RuntimeError: boom", "date": "2026-01-01 00:00 UTC"}
    doc = collect.render([info, failed], C.machine(), C.versions(), "2026-01-02 00:00 UTC")
    assert doc.startswith("# Benchmarks")
    assert "| [`chunked_loss`](#benchchunked_losspy) | ok |" in doc
    assert "| [`kd_step`](#benchkd_steppy) | FAILED | 0 / 1 |" in doc
    assert f"| `peak_memory_ratio` (raykd / naive peak memory increase) | {fig['peak_memory_ratio']} | <= 0.25 |" in doc
    assert "| `same_result` (loss and gradients allclose) | 1 | == 1 | yes |" in doc
    assert "`.venv/bin/python bench/chunked_loss.py --tokens=256" in doc
    assert "Measured on another machine: elsewhere." in doc
    assert "**FAILED** (exit 1): `RuntimeError: boom`" in doc
    assert f"* machine: {collect.machine_line(C.machine())}" in doc


def test_result_from_a_saved_log(tmp_path, monkeypatch):
    """`collect.py --from-log NAME=FILE` takes a standalone run's output instead of running it."""
    log = tmp_path / "cache.log"
    log.write_text("== a cache sweep\nmachine: somewhere\nfairness:\n  - same seed\nonline: 8 trials\n"
                   "sweep_time_ratio=0.87 max_ppl_deviation=0.1 trials=8\n")
    out = tmp_path / "B.md"
    monkeypatch.setattr(sys, "argv", ["collect.py", "--no-fetch", f"--out={out}", f"--from-log=cache={log}"])
    assert collect.main() == 0
    doc = out.read_text()
    assert "| `sweep_time_ratio` (cached sweep wall (build included) / online sweep wall) | 0.87 | <= 0.5 | **no** |" in doc
    assert "run on its own, its output read from a log" in doc and "* same seed" in doc
    import json
    assert json.loads(out.with_suffix(".json").read_text())["cache"]["figures"]["trials"] == "8"
    monkeypatch.setattr(sys, "argv", ["collect.py", "--no-fetch", f"--out={out}", "--from-log=cache"])
    with pytest.raises(SystemExit):
        collect.main()


def test_rerun_keeps_the_hand_maintained_section():
    old = "# Benchmarks\nold figures\n\n" + collect.HAND_KEPT + "\n\nquality seed 1: 107.1\n"
    merged = collect.keep_hand_section(old, "# Benchmarks\nnew figures\n")
    assert merged == "# Benchmarks\nnew figures\n\n" + collect.HAND_KEPT + "\n\nquality seed 1: 107.1\n"
    assert collect.keep_hand_section("# Benchmarks\nold\n", "new\n") == "new\n"  # nothing hand-kept: the page as rendered
    repo_page = (Path(collect.__file__).parents[1] / "docs" / "BENCHMARKS.md").read_text()
    assert collect.HAND_KEPT in repo_page  # the heading the merge looks for is the one the page uses


@pytest.mark.slow  # spawns a torch.distributed process group (gloo) and trains tiny models
def test_gpu_check_runs_its_code_paths_on_the_cpu_and_says_so_without_cuda():
    """bench/gpu_check.py --dry-run drives raykd's engine and objective (ddp, fsdp2, the train loop's
    reductions, a checkpoint round trip, the student step) on gloo; without --dry-run and without
    CUDA it is one clear line and exit 0 (the GPU figures come from a GPU machine)."""
    import subprocess

    script = str(Path(collect.__file__).parent / "gpu_check.py")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    dry = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, timeout=600, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    figures = collect.parse_figures(dry.stdout.strip().splitlines()[-1])
    assert figures["ddp_ok"] == figures["fsdp2_ok"] == figures["collectives_on_device"] == "1", dry.stdout
    assert float(figures["tok_s_1p7b"]) > 0
    # bf16 as on a GPU: the CE-only student step has no teacher to store for autocast (the first H200 run broke there)
    bf16 = subprocess.run([sys.executable, script, "--dry-run", "--precision", "bf16"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert bf16.returncode == 0 and "precision: bf16" in bf16.stdout, bf16.stderr[-2000:]
    plain = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, env=env)
    assert plain.returncode == 0 and plain.stdout.count("\n") == 1 and "no CUDA device" in plain.stdout


def test_quality_data_mix_is_every_arms_data(tmp_path):
    """bench/quality.py --data: one source is data.train (the SOTU-only study's configs, unchanged), several a
    data.mix, validated by raykd's own config; the seqkd arm halves the study's sources beside the teacher
    text; a malformed --data is one line naming the flag."""
    import argparse

    import quality

    from raykd.config import from_dict

    def args(data):
        return argparse.Namespace(block=64, val_blocks=8, steps=4, batch=2, lr=3e-4, precision="fp32", seed=0, kd=1.0,
                                  hidden=0.5, attention=0.1, data=data)

    alone = quality.base_config(args("sotu=1"), tmp_path)["data"]
    assert alone["train"] == ["sotu"] and "mix" not in alone
    a = args("sotu=0.75, moby-dick=0.25")
    base = from_dict(quality.base_config(a, tmp_path)).to_dict()
    assert base["data"]["mix"] == {"sotu": 0.75, "moby-dick": 0.25} and base["data"]["train"] is None
    feature, seqkd = (quality.arm_config(arm, base, a, tmp_path, tmp_path / "gen") for arm in ("feature", "seqkd"))
    assert feature["data"]["mix"] == base["data"]["mix"] and feature["loss"]["weights"]["hidden"] == 0.5
    assert from_dict(seqkd).data.mix == {"sotu": 0.375, "moby-dick": 0.125, str(tmp_path / "gen"): 0.5}
    assert feature["student"]["freeze_embeddings"]  # jobs/demo.yaml's recipe: every arm freezes the embeddings
    a.set = ["student.freeze_embeddings=false", "train.lr=1e-3"]  # --set: every arm alike, on top of the arm's own changes
    for arm in ("ce", "feature", "seqkd"):
        cfg = from_dict(quality.arm_config(arm, base, a, tmp_path, tmp_path / "gen"))
        assert not cfg.student.freeze_embeddings and cfg.train.lr == 1e-3 and cfg.loss.weights.ce == 1.0
    a.set = ["student.dropped=linear"]  # and the shared cut: the importance search and the map see it too
    assert from_dict(quality.base_config(a, tmp_path)).student.dropped == "linear"
    with pytest.raises(SystemExit, match=r"^--data: expected SOURCE=WEIGHT pairs"):
        quality.mix_weights("sotu=half")


def test_quality_takes_its_recipe_from_the_demo_config(tmp_path, monkeypatch):
    """bench/quality.py's feature arm is jobs/demo.yaml's recipe at the study's budget: with no flags its batch, LR,
    weights, data mix and frozen embeddings are the demo's and its steps fill 196,608 tokens; a flag overrides one
    value; --config takes another recipe file; a file that is not a run config is a one-line error naming --config."""
    import quality
    import yaml

    from raykd.config import from_dict

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())
    monkeypatch.setattr(sys, "argv", ["quality.py", "--out", str(tmp_path)])
    a = quality.parse_args()
    a.seed = 0
    assert (a.batch, a.lr, a.block) == (demo["train"]["batch_size"], demo["train"]["lr"], demo["data"]["block_size"])
    assert a.steps * a.batch * a.block == 196_608 and a.data == ",".join(f"{k}={w:g}" for k, w in demo["data"]["mix"].items())
    cfg = from_dict(quality.base_config(a, tmp_path))
    weights = dataclasses.asdict(cfg.loss.weights)
    assert {k: weights[k] for k in demo["loss"]["weights"]} == {**demo["loss"]["weights"], "ce": 1.0} and cfg.loss.hidden == demo["loss"]["hidden"]
    assert cfg.student.freeze_embeddings == demo["student"]["freeze_embeddings"] and cfg.train.max_steps == a.steps
    assert cfg.data.mix == demo["data"]["mix"] and cfg.output_dir == str(tmp_path)
    other = {**demo, "student": {**demo["student"], "freeze_embeddings": False}, "train": {**demo["train"], "batch_size": 4, "lr": 3e-4}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(tmp_path / "other.yaml"), "--lr", "1e-3"])
    b = quality.parse_args()
    b.seed = 0
    assert (b.batch, b.steps, b.lr) == (4, 192, 1e-3) and not from_dict(quality.base_config(b, tmp_path)).student.freeze_embeddings
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit, match=r"^--config: .*bad.yaml is not a run config"):
        quality.parse_args()


def test_quality_learning_curve_from_the_runs_checks():
    """--eval-every N: each arm validates on the first 32 blocks every N steps, and its curve is (step, tokens,
    perplexity) at the history rows that hold a val_loss (a mean token NLL), in order; none without it."""
    import argparse

    import quality

    from raykd.config import from_dict

    a = argparse.Namespace(block=64, val_blocks=8, steps=96, batch=2, lr=6e-4, precision="fp32", seed=0, data="sotu=1", kd=1.0, hidden=0.5, attention=0.1,
                           eval_every=48)
    train = from_dict(quality.base_config(a, Path("/tmp/q"))).train
    assert (train.eval_every, train.eval_blocks) == (48, 32)
    history = [{"step": 24, "ce": 5.0}, {"step": 48, "val_loss": math.log(180.0)}, {"step": 96, "val_loss": math.log(120.0)}]
    curve = quality.learning_curve(history, tokens_per_step=2 * 64)
    assert [c["step"] for c in curve] == [48, 96] and [c["tokens"] for c in curve] == [6144, 12288]
    assert [round(c["val_perplexity"], 6) for c in curve] == [180.0, 120.0]
    assert quality.learning_curve([{"step": 8, "ce": 4.0}], 128) == []


def test_vs_trl_gemm_rate_is_measured_in_the_runs_precision(monkeypatch):
    """bench/vs_trl.py's roofline divides by the GEMM rate of the run's precision: a bf16 run times bf16
    operands (AMX where the CPU has it), not fp32 ones."""
    import torch
    import vs_trl

    seen = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda x, y: seen.append(x.dtype) or real(x, y))
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        assert vs_trl.gemm_flops(1, precision, n=64, reps=2) > 0
        assert seen == [dtype] * 3, (precision, seen)


def test_vs_trl_step_gemms_are_the_plans_matmul_flops(tiny_teacher_dir):
    """bench/vs_trl.py's roofline_ceiling times one step's linear-layer GEMMs: at the model's shapes they add up to
    `raykd plan`'s FLOPs without the attention scores (teacher forward 2·N_t, student forward + backward 6·N_s per token)."""
    import dataclasses

    import vs_trl
    from transformers import AutoConfig

    from raykd.plan import kd_flops_per_token, model_info

    config = AutoConfig.from_pretrained(tiny_teacher_dir)
    teacher = model_info(config, "teacher", str(tiny_teacher_dir))
    depth, kept, tokens = config.num_hidden_layers, 2, 3 * 16
    cut = config.to_dict() | {"num_hidden_layers": kept}
    student = model_info(type(config).from_dict(cut), "cut", "")
    gemms = vs_trl.step_gemms(config, kept, tokens)
    flops = sum(c * 2 * m * k * n for c, m, k, n in gemms)
    no_scores = kd_flops_per_token(dataclasses.replace(teacher, layers=0), dataclasses.replace(student, layers=0), 16)["total"]
    norms = config.hidden_size * (2 * depth + 1) * 2 + config.hidden_size * (2 * kept + 1) * 6  # norm weights count as matmul params in the plan
    assert flops == pytest.approx((no_scores - norms) * tokens, rel=1e-9)
    frozen = kd_flops_per_token(dataclasses.replace(teacher, layers=0), dataclasses.replace(student, layers=0), 16, frozen_head=True)
    assert (1, config.hidden_size, tokens, config.vocab_size) in gemms  # the head's dW = X^T dY, the one GEMM a frozen head skips:
    assert frozen["total"] == no_scores - 2 * config.vocab_size * config.hidden_size
    assert len(gemms) == 8 + 3 * 8 and {g[0] for g in gemms} == {1, depth, kept}
