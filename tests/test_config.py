import pytest
import yaml

from raykd.config import Config, ConfigError, from_dict, load_config


def test_defaults_round_trip_through_a_plain_dict_and_yaml():
    cfg = Config()
    again = from_dict(cfg.to_dict())
    assert again == cfg
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_jobs_load_and_overrides_apply(tmp_path):
    cfg = load_config("jobs/demo.yaml", ["student.num_layers=12", "loss.weights.hidden=0.25", "output_dir=/tmp/x", "loss.kd_params.beta=0.3", "loss.kd=jsd"])
    assert cfg.student.num_layers == 12
    assert cfg.loss.weights.hidden == 0.25 and isinstance(cfg.loss.weights.hidden, float)
    assert cfg.output_dir == "/tmp/x"
    assert cfg.loss.kd == "jsd" and cfg.loss.kd_params == {"beta": 0.3}
    assert load_config("jobs/smoke.yaml").teacher.model == "tiny-random"


def test_teacher_shorthand():
    assert from_dict({"teacher": "tiny-random"}).teacher.model == "tiny-random"
    assert load_config(None, ["teacher.model=tiny-random"]).teacher.model == "tiny-random"


@pytest.mark.parametrize(
    "overrides, field, hint",
    [
        (["student.num_layer=3"], "student.num_layer", "did you mean 'num_layers'"),
        (["studnt.num_layers=3"], "studnt", "did you mean 'student'"),
        (["student.num_layers=0"], "student.num_layers", ">= 1"),
        (["scale.worker_start_timeout_s=-5"], "scale.worker_start_timeout_s", ">= 0"),
        (["student.num_layers=ten"], "student.num_layers", "integer"),
        (["loss.kd=forwrd_kl"], "loss.kd", "did you mean 'forward_kl'"),
        (["loss.weights.hidden=-1"], "loss.weights.hidden", "use 0 to switch the term off"),
        (["loss.weights.ce=0", "loss.weights.kd=0", "loss.weights.hidden=0"], "loss.weights", "positive weight"),
        (["loss.kd=jsd", "loss.kd_params.beta=2"], "loss.kd_params.beta", ""),
        (["loss.kd=jsd", "loss.kd_params.gamma=2"], "loss.kd_params.gamma", ""),
        (["student.init=bogus"], "student.init", "choose one of"),
        (["student.init=list"], "student.layers", "student.layers=[0,5,9]"),
        (["layer_map.strategy=list"], "layer_map.pairs", "teacher_layer, student_layer"),
        (["scale.strategy=fsdp"], "scale.strategy", "did you mean 'fsdp2'"),
        (["train.lr=0"], "train.lr", "> 0"),
        (["scale.shard_teacher=true"], "scale.shard_teacher", "scale.strategy=fsdp2"),
        (["scale.strategy=deepspeed", "scale.deepspeed_config=/no/such.json"], "scale.deepspeed_config", "does not exist"),
        (["scale.torch_threads=-1"], "scale.torch_threads", ""),
        (["data.bad_rows=ignore"], "data.bad_rows", "choose one of"),
        (["sweep={params: {}}"], "sweep.params", "nothing to search"),
        (["sweep={params: {train.lr: {loguniform: [0, 1]}}}"], "sweep.params.train.lr.loguniform", "> 0"),
        (["sweep={params: {train.lr: {uniform: [1, 2]}}, search: grid}"], "sweep.search", "choice/grid"),
        (["sweep={params: {train.lr: {choice: [1]}}, schedular: asha}"], "sweep.schedular", "did you mean 'scheduler'"),
        (["sweep={params: {train.lr: {choice: [1]}}, asha_brackets: layer}"], "sweep.asha_brackets", "choose one of: depth, one"),
        (["nonsense"], "nonsense", "key=value"),
        (["train.lr=.nan"], "train.lr", "finite"),
        (["train.lr=.inf"], "train.lr", "finite"),
        (["loss.temperature=.nan"], "loss.temperature", "finite"),
        (["loss.weights.kd=.nan"], "loss.weights.kd", "finite"),
        (["train.lr=1e-x"], "train.lr", "expected a number"),
        (["scale.num_workers=[2,1]", "scale.max_failures=1"], "scale.num_workers", "1 <= min <= max"),
        (["scale.num_workers=[0,2]", "scale.max_failures=1"], "scale.num_workers", "1 <= min <= max"),
        (["scale.num_workers=[1,2,3]", "scale.max_failures=1"], "scale.num_workers", "[min, max]"),
        (["scale.num_workers=[1,2]"], "scale.max_failures", "scale.max_failures >= 1"),
        (["scale.num_workers=[1,2]", "scale.max_failures=1", "scale.strategy=deepspeed"], "scale.num_workers", "ddp or fsdp2"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config("jobs/demo.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith(field + ":"), msg
    assert hint in msg
    assert "\n" not in msg


def test_numbers_as_people_write_them():
    """YAML 1.1 reads 1e-3 (no dot) as text: a float field takes it as the number a person meant."""
    cfg = load_config("jobs/demo.yaml", ["train.lr=1e-3", "loss.temperature=2E0", "loss.weights.kd= 5e-1"])
    assert (cfg.train.lr, cfg.loss.temperature, cfg.loss.weights.kd) == (0.001, 2.0, 0.5)
    assert isinstance(cfg.train.lr, float)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("teacher:\n\tmodel: tiny-random\n")  # a tab: the line and column of the fault
    with pytest.raises(ConfigError, match=rf"^config: {bad}:2:1: not valid YAML \(found character '\\t'"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match=rf"^config: {tmp_path} is a directory"):
        load_config(tmp_path)


def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path):
    """PyYAML keeps the last of two equal keys: a run would drop the first section without a word."""
    f = tmp_path / "twice.yaml"
    f.write_text("student:\n  num_layers: 2\ntrain:\n  lr: 1.0e-3\n  max_steps: 4\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=rf"^config: {f}:6:3: 'lr' is given twice in one mapping .*; keep one$"):
        load_config(f)
    f.write_text("student:\n  num_layers: 2\n")
    assert load_config(f).student.num_layers == 2


def test_list_init_sets_depth_from_layers():
    cfg = load_config(None, ["student.init=list", "student.layers=[0,3,5]"])
    assert cfg.student.num_layers == 3


def test_sweep_objectives_validated():
    from raykd.config import ConfigError
    from raykd.sweep_config import SweepConfig

    params = {"train.lr": {"choice": [1e-3]}}
    assert SweepConfig(params=params, search="optuna", objectives=["val_loss", "student_params"]).objectives[1] == "student_params"
    for bad, search in ((["val_loss", "student_params"], "random"), (["student_params"], "optuna"), (["val_loss", "speed"], "optuna"), ([], "optuna")):
        with pytest.raises(ConfigError, match="sweep.objectives"):
            SweepConfig(params=params, search=search, objectives=bad)


def test_runs_sharing_a_basename_get_their_own_checkpoint_storage(tmp_path):
    from raykd.runtime import run_name

    a, b = run_name(tmp_path / "x" / "run"), run_name(tmp_path / "y" / "run")
    assert a != b and a.startswith("run-") and b.startswith("run-")
    assert run_name(tmp_path / "x" / "run") == a  # the same output dir resumes its own checkpoints


def test_check_finite_names_the_step_the_terms_and_the_fix():
    from raykd.errors import Diverged, check_finite

    check_finite({"loss": 3.2, "ce": 2.0}, 1.5, 10, 3e-4)  # finite: nothing
    check_finite({"loss": 3.2}, float("nan"), 10, 3e-4, norm_known=False)  # DeepSpeed reports nan for a norm it did not take
    with pytest.raises(Diverged, match=r"^train: the run diverged by step 10 \(kd inf\); lower train.lr \(now 0.0003\)"):
        check_finite({"loss": 3.2, "kd": float("inf")}, 1.5, 10, 3e-4)
    with pytest.raises(Diverged, match=r"by step 7 \(grad_norm nan\)"):
        check_finite({"loss": 3.2}, float("nan"), 7, 1e-3)
