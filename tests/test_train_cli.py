"""kd-train's command line (issue #30 item 2): per-method help with every flag's help and default,
``--config`` files (JSON, YAML) under the command line, ``config.json`` round trips. Nothing here
trains."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kd_kernels.train import cli
from kd_kernels.train import config as C
from kd_kernels.train.methods import METHODS, method_summaries

ROOT = Path(__file__).resolve().parents[1]


def help_text(method: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        C.parse_args([method, "--help"], method_summaries())
    assert e.value.code == 0
    return capsys.readouterr().out


def declared_flags(text: str) -> list[str]:
    """The flags the help declares (option lines), without -h / --help."""
    return [m for m in re.findall(r"^  (--[\w-]+)", text, flags=re.M) if m != "--help"]


# --------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_help_lists_only_its_flags_each_with_help_and_default(method, capsys):
    text = help_text(method, capsys)
    expected = ["--config"] + [C._flag(n) for n in C.method_fields(method)]
    assert sorted(declared_flags(text)) == sorted(expected)
    others = [C._flag(n) for n in C.FIELDS if n not in C.method_fields(method)]
    assert others and not [f for f in others if re.search(rf"^  {f}\b", text, flags=re.M)]
    # every flag's help entry has a description and its default (argparse wraps long entries)
    entries = [e for e in re.split(r"\n(?=  --)", text.split("common flags:")[1]) if e.strip()]
    defaults = C.method_defaults(method)
    for entry in entries:
        flag = re.match(r"\s*(--[\w-]+)", entry).group(1)
        name = flag[2:].replace("-", "_")
        body = " ".join(entry.split())
        assert f"(default: {C._show(defaults[name])})" in body, entry
        # the flag, its metavar and a description
        assert len(body.split("(default:")[0].split()) > 3, entry


def test_help_shows_the_method_default(capsys):
    """`kd-train minillm --help` shows minillm's own --steps default (what the run uses)."""
    minillm = " ".join(help_text("minillm", capsys).split())
    kd = " ".join(help_text("kd", capsys).split())
    assert re.search(r"--steps INT optimizer steps \(default: 40\)", minillm)
    assert re.search(r"--steps INT optimizer steps \(default: 60\)", kd)


def test_every_field_has_help_and_known_owners():
    assert set(C.BUILTIN_METHODS) == set(METHODS)
    for name, f in C.FIELDS.items():
        assert f.metadata["help"].strip(), name
        assert C.owners(name) is None or set(C.owners(name)) <= set(METHODS), name
    assert C.method_fields("my_method") == list(C.FIELDS)  # registered elsewhere: every flag


def test_top_level_help_lists_methods_with_descriptions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for method, summary in method_summaries().items():
        assert f"{method} {' '.join(summary.rstrip('.').split())[:30]}" in text
    assert "compare" in text and "cache-teacher" in text


def test_flag_of_another_method_or_a_typo_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(["kd", "--gkd-beta", "1", "--stepz", "3"], ["kd", "gkd"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gkd-beta is a flag of gkd, not of kd" in err
    assert "--stepz: did you mean --steps?" in err


def test_flags_reference_in_docs_is_the_generated_one():
    doc = (ROOT / "docs" / "TRAINER.md").read_text()
    block = doc.split("<!-- flags:begin -->\n")[1].split("<!-- flags:end -->")[0]
    assert block == C.flags_markdown()


# ------------------------------------------------------------------------------------- config files


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_file_under_the_command_line(tmp_path):
    """defaults < method defaults < the file < the command line; file keys count as given."""
    yaml_file = write(
        tmp_path / "run.yaml",
        "kd_ratio: 0.3\nlr: 1e-4\nsteps: 9\nskip-eval: true\ngrad_clip: .inf\neval_seeds: '1,2'\n",
    )
    cfg, explicit = C.parse_args(["kd", "--config", yaml_file, "--steps", "7"], ["kd"])
    assert (cfg.kd_ratio, cfg.lr, cfg.steps, cfg.skip_eval, cfg.grad_clip, cfg.eval_seeds) == (
        0.3,
        1e-4,
        7,
        True,
        math.inf,
        "1,2",
    )  # YAML reads 1e-4 as a string: taken as --lr takes it
    assert explicit == {"kd_ratio", "lr", "steps", "skip_eval", "grad_clip", "eval_seeds"}
    assert cfg.batch_size == C.TrainConfig().batch_size
    json_file = write(
        tmp_path / "run.json", json.dumps({"method": "minillm", "minillm_rollouts": 12})
    )
    cfg, _ = C.parse_args(["minillm", "--config", json_file], ["minillm"])
    assert (cfg.minillm_rollouts, cfg.steps) == (12, C.METHOD_DEFAULTS["minillm"]["steps"])
    cfg, _ = C.parse_args(["kd", "--config", write(tmp_path / "empty.yaml", "")], ["kd"])
    assert cfg == C.TrainConfig()


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("a.yaml", "kd_ration: 0.3\n", r"unknown key 'kd_ration'; did you mean 'kd_ratio'\?"),
        ("a.yaml", "gkd_beta: 1\n", "gkd_beta is a flag of gkd, not of kd"),
        ("a.json", '{"method": "gkd"}', "is for method 'gkd', not 'kd'; run kd-train gkd"),
        ("a.yaml", "steps: 1.5\n", r"steps: 1.5 is not an int \(the type --steps takes\)"),
        ("a.yaml", "skip_eval: 1\n", "skip_eval: 1 is not a bool"),
        ("a.yaml", "lr: fast\n", "lr: 'fast' is not a float"),
        ("a.yaml", "eval_seeds: 10\n", "eval_seeds: 10 is not a str"),
        ("a.yaml", "student_layers: 3:30\n", r"student_layers: 210 is not a str .*; quote it"),
        ("a.yaml", "kd_ratio: 7\n", "--kd-ratio=7.0"),  # values are checked as flags are
        ("a.yaml", "- steps\n", "expected a mapping"),
        ("a.yaml", "steps: [1\n", "is not valid YAML"),
        ("a.json", "{steps: 1}", "is not valid JSON"),
        ("a.toml", "steps = 1\n", "use a .json, .yaml or .yml file"),
    ],
)
def test_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, name, text, match):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=match):
        C.parse_args(["kd", "--config", path], ["kd", "gkd"])
    assert cli.main(["kd", "--config", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kd-train: error: ")


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        C.parse_args(["kd", "--config", str(tmp_path / "nope.json")], ["kd"])


FLAGS = {
    "sft": ["--steps", "7", "--grad-clip", "inf", "--no-eval-teacher", "--student-layers", "0:9:3"],
    "kd": ["--kd-ratio", "0.25", "--temperature", "2", "--sparse-tail", "renormalize"],
    "seqkd": ["--seqkd-temperature", "0.7", "--kd-ratio", "0"],
    "minillm": ["--minillm-rollouts", "8", "--no-minillm-pt", "--minillm-top-p", "0.9"],
    "distillm": ["--distillm-loss", "skl", "--distillm-alpha", "0.2"],
    "gkd": ["--gkd-beta", "1", "--gkd-estimator", "sampled", "--gkd-seq-kd", "--lr", "3e-5"],
}


@pytest.mark.parametrize("method", sorted(FLAGS))
def test_config_json_round_trips(method, tmp_path):
    """The config.json a run writes, given back with --config, is the same config."""
    argv = [method, *FLAGS[method], "--out", str(tmp_path / "run"), "--resume"]
    cfg, _ = C.parse_args(argv, [method])
    saved = C.config_file_dict(cfg)
    assert set(saved) == {"method", *C.method_fields(method)} - set(C.NOT_SAVED)
    path = write(tmp_path / C.CONFIG_NAME, C.config_text(cfg))
    json.loads(Path(path).read_text(), parse_constant=pytest.fail)  # strict JSON (inf as "inf")
    again, explicit = C.parse_args([method, "--config", path], [method])
    assert again == C.TrainConfig(**(cfg.to_dict() | {"resume": False}))
    assert explicit == set(saved) - {"method"}


def test_trainer_writes_config_json(tmp_path, monkeypatch):
    """The run writes config.json into --out before loading anything (here: a failing load)."""
    from kd_kernels.train import trainer as T

    def no_models(*args, **kwargs):
        raise T.TrainError("stop after the config")

    monkeypatch.setattr(T, "Run", no_models)
    argv = [
        "gkd",
        "--preset",
        "tiny",
        "--gkd-beta",
        "0.2",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    cfg, explicit = C.parse_args(argv, ["gkd"])
    with pytest.raises(T.TrainError, match="stop after the config"):
        T.train(cfg, explicit)
    again, _ = C.parse_args(["gkd", "--config", str(tmp_path / "run" / C.CONFIG_NAME)], ["gkd"])
    assert again == cfg


# ------------------------------------------------------------------------------------------ compare


def test_compare_hands_each_method_its_own_flags(tmp_path):
    conf = write(tmp_path / "c.yaml", "gkd_beta: 1\nsteps: 4\n")
    values = C.shared_run_values(
        ["--config", conf, "--kd-ratio", "0.3", "--steps", "5", "--no-progress"],
        ["sft", "kd", "gkd"],
    )
    assert C.method_argv("sft", values) == ["--steps", "5", "--no-progress"]
    assert C.method_argv("kd", values) == ["--steps", "5", "--kd-ratio", "0.3", "--no-progress"]
    assert C.method_argv("gkd", values) == ["--steps", "5", "--gkd-beta", "1.0", "--no-progress"]
    with pytest.raises(ValueError, match="--gkd-beta is a flag of gkd; none of the methods sft"):
        C.shared_run_values(["--gkd-beta", "1"], ["sft", "kd"])
    with pytest.raises(ValueError, match="unrecognized arguments: --stepz"):
        C.shared_run_values(["--stepz", "1"], ["sft"])


def test_compare_rejects_a_flag_no_chosen_method_takes(tmp_path, capsys):
    from kd_kernels.train import compare

    # --table-only: should the check fail, nothing trains (the table is written: the last line
    # sees it)
    argv = ["--methods", "sft,kd", "--out", str(tmp_path), "--table-only", "--gkd-beta", "1"]
    assert compare.main(argv) == 2
    assert "--gkd-beta is a flag of gkd" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was run
