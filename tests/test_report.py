"""The sweep report without Ray: the Pareto front against brute force, ASHA savings, and the
report set written from synthetic trials (including failed and early-stopped ones)."""

import csv
import random

import pytest

from raykd.config import load_config
from raykd.report import asha_savings, pareto_front, write_report


def _brute(points):
    ok = [i for i, p in enumerate(points) if None not in p]
    return sorted(i for i in ok if not any(
        points[j][0] <= points[i][0] and points[j][1] <= points[i][1] and points[j] != points[i] for j in ok))


@pytest.mark.parametrize("seed", range(8))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    points = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 40))]
    points += [(None, 1.0), (2.0, float("nan"))]
    assert pareto_front(points) == _brute([(a, None if b != b else b) for a, b in points])


def _trial(i, depth, hidden, status, ppl=None, steps=12, error=None):
    cfg = load_config("jobs/smoke.yaml", [f"student.num_layers={depth}", f"loss.weights.hidden={hidden}"]).to_dict()
    return {
        "trial_id": f"t{i}", "status": status, "error": error,
        "params": {"student.num_layers": depth, "loss.weights.hidden": hidden},
        "metrics": {"val_perplexity": ppl, "top1_agreement": 0.1 if ppl else None, "student_params": 1000 * depth if ppl else None,
                    "student_latency_ms": 0.5 * depth if ppl else None, "student_tokens_per_s": None, "val_loss": 6.0},
        "steps": steps, "max_steps": 12, "history": [{"step": s, "val_loss": 7 - s / 10} for s in range(4, steps + 1, 4)],
        "config": cfg,
    }


def test_asha_savings():
    trials = [_trial(0, 2, 0.1, "TERMINATED", 500), _trial(1, 3, 0.2, "EARLY_STOPPED", steps=4), _trial(2, 6, 0.1, "ERROR", steps=0)]
    s = asha_savings(trials)
    assert s == {"trial_steps": 16, "full_steps": 24, "saved_fraction": pytest.approx(1 / 3), "early_stopped": 1}


def test_report_set(tmp_path):
    trials = [
        _trial(0, 2, 0.1, "TERMINATED", 600.0), _trial(1, 2, 0.9, "TERMINATED", 550.0), _trial(2, 3, 0.1, "TERMINATED", 500.0),
        _trial(3, 3, 0.5, "EARLY_STOPPED", steps=4), _trial(4, 4, 0.5, "TERMINATED", 520.0),
        _trial(5, 6, 0.3, "ERROR", steps=0, error="ConfigError: student.num_layers: 6 is not below the teacher's depth"),
    ]
    paths = write_report(tmp_path, trials, {"wall_s": 12.0, "scheduler": "asha", "search": "grid"})
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert len(rows) == 6 and {"student.num_layers", "loss.weights.hidden", "val_perplexity"} <= set(rows[0])
    front = {r["trial_id"] for r in csv.DictReader((tmp_path / "pareto.csv").open()) if r["front"] == "params"}
    assert front == {"t1", "t2"}  # (550, 2000) and (500, 3000); t0 and t4 are dominated
    best = load_config(paths["best_config"])
    assert best.student.num_layers == 3 and best.sweep is None
    md = (tmp_path / "report.md").read_text()
    assert "not below the teacher's depth" in md and "1 stopped early" in md and "1 failed" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "src='http" not in page and 'src="http' not in page
    for name in ("ppl_vs_params", "ppl_vs_latency", "learning_curves", "sensitivity"):
        assert paths[name].stat().st_size > 1000


def test_report_with_no_finished_trial(tmp_path):
    trials = [_trial(0, 6, 0.3, "ERROR", steps=0, error="boom")]
    paths = write_report(tmp_path, trials, {})
    assert "best_config" not in paths and "No trial finished" in (tmp_path / "report.md").read_text()


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium for headless rendering, installed here when missing (about 75 s)."""
    import shutil
    import subprocess

    exe = shutil.which("chromium")
    if exe is None and shutil.which("apt-get"):
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(cmd, capture_output=True, timeout=600)
            exe = shutil.which("chromium")
            if exe:
                break
    if exe is None:
        pytest.skip("chromium is not installed and apt-get could not install it")
    return exe


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    import subprocess

    import matplotlib.image

    trials = [_trial(0, 2, 0.1, "TERMINATED", 600.0), _trial(1, 3, 0.5, "TERMINATED", 500.0), _trial(2, 4, 0.2, "EARLY_STOPPED", steps=4)]
    write_report(tmp_path, trials, {"wall_s": 3.0})
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,1600",
                    (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1200
    non_white = (pixels.min(axis=-1) < 0.9).mean()
    assert non_white > 0.02 and pixels.std() > 0.05  # text, tables and embedded plots were drawn
