"""Config composition with Hydra's compose API: every group option, schema checks, value checks."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import tropd_cli.commands.common as common  # registers the structured-config schemas
from tropd_cli.config import AblateConfig, EvalConfig, TrainConfig
from tropd_cli.errors import UserError
from tropd_cli.validate import validate_suites, validate_train

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PLACEHOLDER = "placeholder-value"

Compose = Callable[..., DictConfig]


def default_groups(config: str) -> list[str]:
    """The config groups in a primary config's defaults list (``train`` -> teacher, student, ...)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config}.yaml"))["defaults"]  # type: ignore[index]
    return [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]


TRAIN_GROUPS = default_groups("train")
EVAL_GROUPS = default_groups("eval")


def options(group: str) -> list[str]:
    """Every option of a group, nested ones as ``paper/NAME``."""
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


def is_global(path: Path) -> bool:
    return "# @package _global_" in path.read_text()


# Options that name something only the user can supply (a model, a dataset): a run needs the value on
# the command line. A ``???`` in any YAML is treated the same way.
USER_SUPPLIED = {
    ("teacher", "hub"): {"teacher.name": "org/teacher"},
    ("student", "hub"): {"student.name": "org/student"},
    ("dataset", "hub"): {"dataset.name": "org/dataset"},
    ("dataset", "file"): {"dataset.path": "prompts.jsonl"},
    # The authors' own checkpoints and prompts (docs/scaling.md).
    ("experiment", "paper/qwen3_1p7b_from_nemotron4b"): {
        "dataset.path": "prompts.jsonl",
        "teacher.name": "org/teacher",
        "student.name": "org/student",
    },
}


def required_values(group: str, option: str) -> dict[str, str]:
    """``{dotted key: value}`` the option needs from the command line before it is a valid run."""
    path = CONF_DIR / group / f"{option}.yaml"
    prefix = "" if is_global(path) else f"{group}."
    values = {f"{prefix}{key}": PLACEHOLDER for key in OmegaConf.missing_keys(OmegaConf.load(path))}
    values.update(USER_SUPPLIED.get((group, option), {}))
    return values


def group_option_cases() -> list[Any]:
    cases = [pytest.param(group, option, id=f"{group}={option}") for group in TRAIN_GROUPS for option in options(group)]
    cases += [pytest.param("+outlier", option, id=f"+outlier={option}") for option in options("outlier")]
    return cases


def yaml_values(group: str, option: str) -> dict[str, Any]:
    """The values an option's YAML sets, keyed by their dotted place in the composed config."""
    path = CONF_DIR / group / f"{option}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(data, dict)
    data.pop("defaults", None)
    if not data:  # an option made only of other options (eval_suite/paper)
        return {}

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                yield from walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, list) and node:
            for index, value in enumerate(node):
                yield from walk(value, f"{prefix}.{index}")
        else:
            yield prefix, node

    return {key: value for key, value in walk(data, "" if is_global(path) else group) if value != "???"}


@pytest.fixture
def compose_in() -> Callable[[Path], Iterator[Compose]]:
    """A context that points Hydra at a config dir and hands back ``compose``."""
    from contextlib import contextmanager

    @contextmanager
    def within(config_dir: Path) -> Iterator[Compose]:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            yield lambda name="train", overrides=(): compose(name, overrides=list(overrides))

    return within


@pytest.fixture
def compose_cfg(compose_in) -> Iterator[Compose]:
    with compose_in(CONF_DIR) as fn:
        yield fn


def as_train(cfg: DictConfig) -> TrainConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    return obj


# ---------------------------------------------------------------------------------------------


def test_every_config_group_is_covered():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert {"teacher", "student", "dataset", "method", "logger", "experiment"} <= set(TRAIN_GROUPS)
    assert "outlier" not in TRAIN_GROUPS  # so that `+outlier=...` appends it
    # ablation/ is covered by tests/commands/test_ablation.py (every grid, every variant as a train config)
    covered = {*TRAIN_GROUPS, *EVAL_GROUPS, "outlier", "ablation"}
    assert groups <= covered, f"a config group has no composition test: {groups - covered}"


@pytest.mark.parametrize(("group", "option"), group_option_cases())
def test_every_group_option_composes_into_the_schema(compose_cfg, group, option):
    name = group.lstrip("+")
    required = required_values(name, option)
    cfg = compose_cfg("train", [f"{group}={option}", *(f"{key}={value}" for key, value in required.items())])
    train_cfg = as_train(cfg)
    for key, value in yaml_values(name, option).items():
        if key not in required:
            assert OmegaConf.select(cfg, key) == value, f"{key} from {name}/{option}.yaml did not reach the config"
    for key, value in required.items():
        assert OmegaConf.select(cfg, key) == value
    # Every shipped option is a valid run once the user-supplied values are given.
    validate_train(train_cfg)


@pytest.mark.parametrize("preset", ["paper/ds_r1_1p5b_from_skywork_math7b", "paper/qwen3_1p7b_from_nemotron4b"])
def test_paper_presets_carry_the_papers_hyperparameters(compose_cfg, preset):
    required = required_values("experiment", preset)
    cfg = as_train(compose_cfg("train", [f"experiment={preset}", *(f"{k}={v}" for k, v in required.items())]))
    assert (cfg.steps, cfg.optim.lr, cfg.optim.warmup_steps) == (200, 5e-6, 0)  # 200 steps, constant 5e-6
    assert (cfg.rollout.batch_size, cfg.rollout.n_samples_per_prompt, cfg.rollout.max_new_tokens) == (128, 4, 8192)
    assert (cfg.method.name, cfg.method.top_k, cfg.guidance.beta) == ("tropd", 64, 0.001)
    assert cfg.guidance.enabled and cfg.trust_region.kind == "bernoulli" and cfg.outlier.strategy == "fkl"
    assert cfg.teacher.dtype == "bfloat16" and cfg.student.dtype == "float32" and cfg.student.gradient_checkpointing
    assert cfg.rollout.batch_size % 8 == 0  # splits over 1 node x 8 GPUs
    assert cfg.eval_suite  # its matching benchmarks, for eval_every=N or `tropd eval eval_suite=...`
    if preset.startswith("paper/ds_r1"):
        assert cfg.teacher.name == "Skywork/Skywork-OR1-Math-7B"
        assert cfg.student.name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
        assert set(cfg.eval_suite) == {"math_competition", "math_standard"}
    else:
        assert set(cfg.eval_suite) == {"math_competition", "code_competition", "general"}


def test_tiny_experiment_overrides_the_groups(compose_cfg):
    cfg = as_train(compose_cfg("train", ["experiment=tiny"]))
    assert cfg.teacher.name == "tiny-random"
    assert cfg.student.from_teacher and cfg.student.keep_layers == [0, 3]
    assert cfg.logger.name == "none"
    assert cfg.steps == 2 and cfg.rollout.max_new_tokens == 12


def test_outlier_defaults_to_fkl(compose_cfg):
    cfg = as_train(compose_cfg("train", []))
    assert cfg.method.name == "tropd"
    assert cfg.outlier.strategy == "fkl"
    assert not cfg.outlier.renormalize


@pytest.mark.parametrize("strategy", ["fkl", "mask", "clip"])
def test_outlier_group_sets_the_strategy(compose_cfg, strategy):
    assert as_train(compose_cfg("train", [f"+outlier={strategy}"])).outlier.strategy == strategy


def test_command_line_values_override_yaml(compose_cfg):
    cfg = as_train(compose_cfg("train", ["experiment=tiny", "optim.lr=0.25", "trust_region.tau=-1", "seed=7"]))
    assert (cfg.optim.lr, cfg.trust_region.tau, cfg.seed) == (0.25, -1.0, 7)


@pytest.mark.parametrize(
    "override",
    [
        "foo=1",
        "optim.learning_rate=1e-3",
        "optim.lr=abc",
        "steps=many",
        "rollout.max_new_tokens=1.5",
        "guidance.enabled=maybe",
        "method=nosuchmethod",
    ],
)
def test_unknown_keys_and_wrong_types_fail_while_composing(compose_cfg, override):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_cfg("train", ["experiment=tiny", override])


def test_a_typo_in_a_yaml_file_fails_while_composing(compose_in, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "teacher" / "typo.yaml").write_text("nme: tiny-random\n")
    (conf / "logger" / "wrongtype.yaml").write_text("log_every: often\n")
    with compose_in(conf) as compose_fn:
        for override in ("teacher=typo", "logger=wrongtype"):
            with pytest.raises((HydraException, OmegaConfBaseException)):
                compose_fn("train", [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-5", "optim.lr"),
        ("steps=0", "steps"),
        ("steps=-2", "steps"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("rollout.max_new_tokens=-4", "rollout.max_new_tokens"),
        ("outlier.strategy=trim", "outlier.strategy"),
        ("method.name=nonexistent_method", "method.name"),
        ("trust_region.kind=soft", "trust_region.kind"),
        ("optim.micro_batches=0", "optim.micro_batches"),
    ],
)
def test_validate_train_rejects_bad_values(compose_cfg, override, key):
    train_cfg = as_train(compose_cfg("train", ["experiment=tiny", override]))
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_train(train_cfg)


def test_validate_train_accepts_the_tiny_experiment(compose_cfg):
    validate_train(as_train(compose_cfg("train", ["experiment=tiny"])))


@pytest.mark.parametrize(("group", "option"), sorted(USER_SUPPLIED), ids=lambda v: str(v))
def test_an_option_without_its_user_supplied_value_is_a_user_error(compose_cfg, group, option):
    """``dataset=hub`` alone must not fall back to a schema default such as the task name chain_sum."""
    base = [] if group == "experiment" else ["experiment=tiny"]
    train_cfg = common.to_object(compose_cfg("train", [*base, f"{group}={option}"]), TrainConfig)
    key = next(iter(USER_SUPPLIED[(group, option)]))  # the first one validation checks
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_train(train_cfg)


def test_an_added_key_the_schema_lacks_is_rejected(compose_cfg):
    """``+key=value`` bypasses struct mode; to_object must still refuse a key the schema lacks."""
    cfg = compose_cfg("train", ["experiment=tiny", "+optim.learning_rate=1e-3"])
    with pytest.raises(UserError, match=r"optim\.learning_rate"):
        common.to_object(cfg, TrainConfig)


@pytest.mark.parametrize(
    ("group", "option"), [(group, option) for group in EVAL_GROUPS for option in options(group)], ids=str
)
def test_every_eval_group_option_composes(compose_cfg, group, option):
    cfg = compose_cfg("eval", [f"{group}={option}"])
    assert isinstance(OmegaConf.to_object(cfg), EvalConfig)
    for key, value in yaml_values(group, option).items():
        assert OmegaConf.select(cfg, key) == value, f"{key} from {group}/{option}.yaml did not reach the config"


@pytest.mark.parametrize("suite", options("eval_suite"))
def test_eval_config_composes(compose_cfg, suite):
    cfg = compose_cfg("eval", [f"eval_suite={suite}", "models=[/some/checkpoint,latest]"])
    eval_cfg = OmegaConf.to_object(cfg)
    assert isinstance(eval_cfg, EvalConfig)
    assert eval_cfg.models == ["/some/checkpoint", "latest"]
    assert eval_cfg.eval_suite and all(s.tasks for s in eval_cfg.eval_suite.values())
    if suite != "paper":  # a plain suite file holds one suite, keyed by its own name
        assert list(eval_cfg.eval_suite) == [suite]
    validate_suites(eval_cfg.eval_suite)  # known benchmarks, pass@k within n_samples


def test_eval_suites_combine_and_keep_their_own_sampling(compose_cfg):
    eval_cfg = OmegaConf.to_object(compose_cfg("eval", ["eval_suite=[math,code_quick]", "eval_suite.math.n_samples=4"]))
    assert isinstance(eval_cfg, EvalConfig)
    assert list(eval_cfg.eval_suite) == ["math", "code_quick"]
    assert eval_cfg.eval_suite["math"].n_samples == 4 and eval_cfg.eval_suite["code_quick"].n_samples == 1
    paper = OmegaConf.to_object(compose_cfg("eval", ["eval_suite=paper"]))
    assert isinstance(paper, EvalConfig)
    assert set(paper.eval_suite) == {"math_competition", "code_competition", "general"}
    assert paper.eval_suite["math_competition"].n_samples == 32  # the paper's avg@32
    benchmarks = {t.benchmark for s in paper.eval_suite.values() for t in s.tasks}
    assert benchmarks == {
        "aime24",
        "aime25",
        "amc23",
        "livecodebench",
        "mbpp",
        "gpqa_diamond",
        "mmlu_redux",
        "ifeval",
        "ifbench",
    }


def test_eval_defaults_and_bad_overrides(compose_cfg):
    eval_cfg = OmegaConf.to_object(compose_cfg("eval", []))
    assert isinstance(eval_cfg, EvalConfig)
    assert "latest" in eval_cfg.models and eval_cfg.runs_dir == "outputs/train"
    assert list(eval_cfg.eval_suite) == ["worked_sum_1d"]  # the default training task's held-out suite
    suite = "eval_suite.worked_sum_1d"
    for override in ("foo=1", f"{suite}.max_new_tokens=lots", f"{suite}.tasks.0.sizee=3"):
        with pytest.raises((HydraException, OmegaConfBaseException)):
            compose_cfg("eval", [override])


def test_eval_models_take_train_style_specs_and_shorthands(compose_cfg):
    """``models`` entries: names, mappings of ModelConfig fields, and teacher/student_init from the same
    teacher/student groups as ``tropd train``."""
    from tropd_cli.commands.evaluate import model_entries

    keep = "[0,1,2,3,4,5,6,7,22,23,24,25,26,27,28,29]"
    models = f"models=[teacher,{{name:smollm2-135m-instruct,keep_layers:{keep},label:cut}},student_init,/a/dir]"
    eval_cfg = common.to_object(compose_cfg("eval", [models]), EvalConfig)
    assert eval_cfg.models[1] == {
        "name": "smollm2-135m-instruct",
        "keep_layers": [*range(8), *range(22, 30)],
        "label": "cut",
    }
    train_cfg = as_train(compose_cfg("train", []))
    assert (eval_cfg.teacher, eval_cfg.student) == (train_cfg.teacher, train_cfg.student)  # the same groups
    entries = model_entries(eval_cfg, eval_cfg.teacher, eval_cfg.student)
    labels = ["smol-lab-teacher", "cut", "smollm2-135m-instruct", "/a/dir"]  # the default pair: teacher and its base
    assert [e.label for e in entries] == labels
    assert all(e.spec.dtype == "auto" for e in entries)  # eval's dtype, not the student's training float32
    compression = common.to_object(
        compose_cfg("eval", ["teacher=smollm2_135m", "student=smollm2_16l", "models=[student_init]"]), EvalConfig
    )
    (cut,) = model_entries(compression, compression.teacher, compression.student)
    assert cut.label == "smollm2-135m-instruct[layers 0-7,22-29]" and cut.spec.from_teacher
    assert cut.spec.keep_layers == entries[1].spec.keep_layers

    tiny = common.to_object(
        compose_cfg("eval", ["teacher=tiny", "student=tiny", "models=[teacher,student_init]"]), EvalConfig
    )
    assert [e.label for e in model_entries(tiny, tiny.teacher, tiny.student)] == [
        "tiny-random",
        "tiny-random[layers 0,3]",
    ]
    lab = common.to_object(compose_cfg("eval", ["teacher=lab", "student=lab", "models=[student_init]"]), EvalConfig)
    assert [e.label for e in model_entries(lab, lab.teacher, lab.student)] == ["lab-student"]
    for bad, message in (
        ("{name:x,keep_layers:abc}", "models.0.keep_layers"),
        ("{dtype:float32}", "models.0 names no model"),
        ("{name:x,from_teacher:true}", "models.0.name=x conflicts with models.0.from_teacher=true"),
    ):
        cfg = common.to_object(compose_cfg("eval", [f"models=[{bad}]"]), EvalConfig)
        with pytest.raises(UserError, match=re.escape(message)):
            model_entries(cfg, cfg.teacher, cfg.student)


def test_a_named_student_that_is_also_a_copy_of_the_teacher_is_refused(compose_cfg):
    train_cfg = as_train(compose_cfg("train", ["student=smollm2_16l", "student.name=org/other"]))  # from_teacher
    with pytest.raises(UserError, match=r"student\.name=org/other conflicts with student\.from_teacher=true"):
        validate_train(train_cfg)
    validate_train(as_train(compose_cfg("train", ["student=hub", "student.name=org/other"])))


def test_bad_suite_values_name_the_key_to_fix(compose_cfg):
    for override, message in (
        ("eval_suite.math.pass_k=[4]", "eval_suite.math.pass_k has k=4"),
        ("eval_suite.math.tasks.0.benchmark=gsm9k", "eval_suite.math.tasks.0.benchmark='gsm9k' is not an option"),
        ("eval_suite.math.n_samples=0", "eval_suite.math.n_samples=0 must be positive"),
    ):
        eval_cfg = OmegaConf.to_object(compose_cfg("eval", ["eval_suite=math", override]))
        assert isinstance(eval_cfg, EvalConfig)
        with pytest.raises(UserError, match=re.escape(message)):
            validate_suites(eval_cfg.eval_suite)


def test_train_can_evaluate_every_n_steps(compose_cfg):
    train_cfg = as_train(compose_cfg("train", ["eval_every=5", "eval_suite=tiny"]))
    assert train_cfg.eval_every == 5 and list(train_cfg.eval_suite) == ["tiny"]
    validate_train(train_cfg)
    assert as_train(compose_cfg("train", [])).eval_suite == {}  # no suite unless asked
    with pytest.raises(UserError, match="needs a suite to run: add eval_suite=NAME"):
        validate_train(as_train(compose_cfg("train", ["eval_every=5"])))


def test_ablate_config_composes(compose_cfg):
    assert isinstance(OmegaConf.to_object(compose_cfg("ablate", [])), AblateConfig)


def test_the_default_run_distils_the_lab_teacher_into_its_base_and_is_scored_on_its_held_out_twin(compose_cfg):
    """`tropd train`'s default pair and task, and `tropd eval`'s and the lab's: the same models, and a suite that
    draws the same problems' eval split (so the README's three rows are the student before and after)."""
    train_cfg = as_train(compose_cfg("train", []))
    assert (train_cfg.teacher.name, train_cfg.student.name) == ("smol-lab-teacher", "smollm2-135m-instruct")
    assert not train_cfg.student.from_teacher and train_cfg.student.keep_layers is None
    assert train_cfg.method.name == "tropd" and train_cfg.guidance.enabled
    eval_cfg = common.to_object(compose_cfg("eval", []), EvalConfig)
    assert (eval_cfg.teacher, eval_cfg.student) == (train_cfg.teacher, train_cfg.student)
    (task,) = eval_cfg.eval_suite["worked_sum_1d"].tasks
    assert train_cfg.dataset.name == task.name == "worked_sum"
    held_out = dict(task.generator_kwargs)
    assert held_out.pop("split") == "eval" and dict(train_cfg.dataset.generator_kwargs).pop("split") == "train"
    assert held_out == {k: v for k, v in train_cfg.dataset.generator_kwargs.items() if k != "split"}
    lab = as_train(compose_cfg("train", ["experiment=smol_lab"]))
    assert (lab.teacher, lab.student, lab.dataset) == (train_cfg.teacher, train_cfg.student, train_cfg.dataset)
    assert (lab.steps, lab.rollout.batch_size, lab.optim.lr) == (train_cfg.steps, 8, train_cfg.optim.lr)
