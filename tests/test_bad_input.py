"""Bad input, systematically: the CLI contract of DESIGN.md under Hypothesis.

Every invalid config, override, argument or path must exit non-zero with exactly one
stderr line that names the problem (file, key, value), no traceback, and no output: the
run directory is not created and nothing appears in the working directory. Config
mistakes must be caught by the loader itself, before any stage starts (a stage that got
one would start Ray, load a model or write a store). Commands run in-process through
`gemmascope.cli.main` for speed; a handful go through the real executable.

The strategies are in tests/bad_input_cases.py. The session prints how many distinct
bad inputs were tried, by kind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemmascope.cli import build_parser, main
from gemmascope.config import load_config
from gemmascope.errors import ConfigError
from tests.bad_input_cases import (
    BASES,
    CONFIG_CASES,
    DEMO,
    ROOT,
    TINY,
    TINY_GRID,
    Case,
    model_range,
    set_path,
)

GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")
# Every command that takes a config, with the options it needs to get as far as loading it.
COMMANDS = {"plan": [], "harvest": ["--no-progress"], "train": ["--job", "res-L1-w256"], "sweep": ["--no-progress"],
            "status": [], "eval": ["--no-progress"], "export": [], "report": [], "verify": [],
            "import": ["--source", "nowhere"]}
TRIED: dict[str, set] = defaultdict(set)


def examples(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def count_report(request):
    """Print how many distinct bad inputs this session tried, by kind."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TRIED:
        counts = ", ".join(f"{kind} {len(seen)}" for kind, seen in sorted(TRIED.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\ntest_bad_input: {sum(map(len, TRIED.values()))} distinct bad inputs ({counts})")


# ---------------------------------------------------------------- running the CLI


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `gemmascope ARGV` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def error_line(code: int, out: str, err: str) -> str:
    """The one line a rejected command prints; checks the rest of the contract."""
    assert code not in (0, None), (code, out, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith("gemmascope: error: "), err
    assert out == "", out
    return lines[0]


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def rejected(argv: list[str], where: Path, kind: str, *fragments: str) -> str:
    """Run in `where` (also the working directory); it must fail in one line and add no file."""
    before = files_under(where)
    with contextlib.chdir(where):
        line = error_line(*run_main(argv))
    assert files_under(where) == before, files_under(where) - before
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    TRIED[kind].add(signature(argv))
    return line


def signature(argv: list[str]) -> tuple:
    """What makes an input distinct: the arguments and the content of the config file they name."""
    config = argv[1] if len(argv) > 1 else ""
    content = Path(config).read_bytes() if config.endswith(".yaml") and os.path.isfile(config) else b""
    return (*argv, content)


def write_case(case: Case, directory: Path) -> Path:
    """The case's config file; run_dir points into `directory` unless the case sets it."""
    path = directory / "config.yaml"
    if case.text is not None:
        path.write_bytes(case.text)
        return path
    data = yaml.safe_load(yaml.safe_dump(BASES[case.base]))
    data["run_dir"] = str(directory / "run")
    for key_path, value in case.sets:
        set_path(data, key_path, value)
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def check_config_case(case: Case, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_case(case, tmp)
        with pytest.raises(ConfigError):  # caught by the loader, before any stage starts
            load_config(path, list(case.overrides))
        argv = [command, str(path), *case.overrides, *COMMANDS[command]]
        line = rejected(argv, tmp, case.kind, str(path), *case.expect)
        assert not (tmp / "run").exists(), line


# ---------------------------------------------------------------- configs and overrides


def test_the_bases_are_valid_so_each_mutation_is_what_fails(tmp_path):
    """The unmutated bases plan cleanly: every failure below is the mutation's."""
    for name in BASES:
        path = write_case(Case("valid", name), tmp_path)
        code, out, err = run_main(["plan", str(path), "--json"])
        assert code == 0, err
        assert '"saes"' in out
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", sorted(CONFIG_CASES))
@given(data=st.data())
@examples(40)
def test_a_bad_config_is_one_line_naming_it_and_writes_nothing(kind, data):
    case = data.draw(CONFIG_CASES[kind], label="case")
    check_config_case(case, data.draw(st.sampled_from(sorted(COMMANDS)), label="command"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CONFIG_CASES))
@given(data=st.data())
@examples(1000)
def test_many_bad_configs(kind, data):
    case = data.draw(CONFIG_CASES[kind], label="case")
    check_config_case(case, data.draw(st.sampled_from(sorted(COMMANDS)), label="command"))


@given(case=model_range(), command=st.sampled_from(["plan", "harvest", "status"]))
@examples(30)
def test_a_layer_the_model_lacks_is_caught_by_commands_that_read_the_model(case, command):
    if command == "harvest" and case.sets[0][0] != ("harvest", "layers"):
        command = "plan"  # a harvest does not read the SAE grid
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_case(case, tmp)
        rejected([command, str(path), *COMMANDS[command]], tmp, case.kind, str(path), *case.expect)
        assert not (tmp / "run").exists()


def test_yaml_nested_too_deeply_is_one_line(tmp_path):
    """PyYAML composes nested collections recursively: deep nesting is a RecursionError."""
    deep = "[" * 1100 + "]" * 1100
    path = tmp_path / "deep.yaml"
    path.write_text(f"harvest:\n  layers: {deep}\n")
    rejected(["plan", str(path)], tmp_path, "nested too deeply", str(path), "nested too deeply")
    rejected(["plan", str(TINY), f"harvest.layers={deep}"], tmp_path, "nested too deeply", "nested too deeply")


# ---------------------------------------------------------------- files and paths


def _config_paths(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Config paths that cannot be read, with a fragment of the reason."""
    a_file = tmp / "a-file"
    a_file.write_text("run_dir: x\n")
    (tmp / "a-dir").mkdir()
    return {
        "missing": (tmp / "no-such.yaml", "not found"),
        "a directory": (tmp / "a-dir", "cannot read"),
        "through a file": (a_file / "config.yaml", "cannot read"),
        "name too long": (tmp / ("x" * 300 + ".yaml"), "cannot read"),
    }


@pytest.mark.parametrize("which", ["missing", "a directory", "through a file", "name too long"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unreadable_config_file_is_named(tmp_path, which, command):
    path, reason = _config_paths(tmp_path)[which]
    rejected([command, str(path), *COMMANDS[command]], tmp_path, "unreadable config", str(path), reason)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_config_without_read_permission_is_named(tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text(TINY.read_text())
    path.chmod(0)
    rejected(["plan", str(path)], tmp_path, "unreadable config", str(path), "Permission denied")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_run_dir_that_is_a_file_is_refused_by_every_command(tmp_path, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    rejected([command, str(TINY), f"run_dir={blocker}", *COMMANDS[command]], tmp_path, "bad path",
             "run_dir", str(blocker), "is a file")
    assert blocker.read_text() == "not a directory"


@given(pattern=st.sampled_from(["*.txt", "*.jsonl", "**/*.parquet", "missing.txt", "[ab]*.jsonl"]))
@examples(10)
def test_source_globs_that_match_nothing_stop_the_harvest_before_it_starts(pattern):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        argv = ["harvest", str(TINY), f"run_dir={tmp / 'run'}", "source.builtin=null",
                f"source.paths=['{tmp / 'corpus' / pattern}']", "--no-progress"]
        rejected(argv, tmp, "bad path", "source.paths[0]", "no files match")
        assert not (tmp / "run").exists()


@pytest.mark.parametrize("command", ["harvest", "sweep"])
@pytest.mark.parametrize("address", ["127.0.0.1:1", "no-such-host.invalid:6379", "ray://127.0.0.1:1"])
def test_a_ray_address_where_nothing_answers_fails_fast_and_writes_nothing(tmp_path, command, address):
    rejected([command, str(TINY), f"run_dir={tmp_path / 'run'}", "--ray-address", address, "--no-progress"],
             tmp_path, "bad path", f"Ray address {address}", "no cluster answers")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["plan", "harvest"])
def test_a_model_that_is_not_there_is_named(tmp_path, command):
    missing = tmp_path / "no-such-model"
    rejected([command, str(DEMO), f"run_dir={tmp_path / 'run'}", f"model.source={missing}", *COMMANDS[command]],
             tmp_path, "bad path", str(missing), "not found")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the command line itself


@given(name=st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda n: n not in COMMANDS and n not in ("demo", "bench") and not n.startswith("-")))
@examples(30)
def test_an_unknown_subcommand_is_one_line(name):
    with tempfile.TemporaryDirectory() as tmp:
        rejected([name, str(TINY)], Path(tmp), "unknown subcommand", "invalid choice", repr(name))


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option the CLI defines, in every subcommand."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                found |= option_strings(subcommand)
    return found


OPTIONS = option_strings(build_parser())


@given(command=st.sampled_from(sorted(COMMANDS)),
       flag=st.from_regex(r"--[a-z][a-z-]{0,12}", fullmatch=True).filter(lambda f: f not in OPTIONS))
@examples(30)
def test_an_unknown_flag_is_one_line(command, flag):
    """Also a prefix of a real option (`--c` of `--coordinator`): long options are never abbreviated."""
    with tempfile.TemporaryDirectory() as tmp:
        rejected([command, str(TINY), *COMMANDS[command], flag], Path(tmp), "unknown flag",
                 f"unrecognized arguments: {flag}")


@pytest.mark.parametrize("argv", [
    [], ["plan"], ["train", str(TINY)], ["import", str(TINY)], ["import", str(TINY), "--source", "x", "--layer", "x"],
    ["bench"], ["bench", "nope"], ["bench", "train-step", "--d-in", "-3"], ["bench", "train-step", "--width", "0"],
    ["bench", "train-step", "--peak-flops", "nan"], ["bench", "train-step", "--l0-fraction", "2"],
    ["bench", "loader", "--rows", "x"], ["bench", "harvest", "--tokens", "0"], ["demo", "--bogus"],
])
def test_missing_and_malformed_arguments_are_one_line(tmp_path, argv):
    rejected(argv, tmp_path, "bad arguments")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A complete store (res, layer 1) a train command can open: only the job id is wrong."""
    import numpy as np

    from gemmascope.store.synthetic import write_store

    run_dir = tmp_path_factory.mktemp("synthetic-run")
    write_store(str(run_dir), {("res", 1): np.ones((4096, 16), np.float32)})
    return run_dir


@given(job=st.text(st.characters(codec="utf-8"), max_size=20).filter(lambda j: j != "res-L1-w256")
       | st.sampled_from(["../../etc", "res-L1-w256/..", "res-L1-w256 ", "RES-L1-W256", "res-L6-w16k"]))
@examples(40)
def test_a_bad_job_id_is_named_and_trains_nothing(synthetic_run, job):
    before = files_under(synthetic_run)
    argv = ["train", str(TINY), f"run_dir={synthetic_run}", f"saes={TINY_GRID}", "--job", job, "--no-progress"]
    if job.startswith("-"):
        argv = [*argv[:-3], f"--job={job}", "--no-progress"]
    rejected(argv, synthetic_run, "bad job id", "no job", repr(job) if not job.startswith("-") else "")
    assert files_under(synthetic_run) == before


@pytest.fixture(scope="module")
def released_sae(tmp_path_factory) -> Path:
    """A Gemma Scope params.npz that the synthetic run could import (res, layer 1, d_in 16)."""
    import numpy as np

    from gemmascope.export.gemma_scope import params_npz_bytes

    folder = tmp_path_factory.mktemp("released")
    arrays = {"W_enc": np.zeros((16, 32), np.float32), "W_dec": np.zeros((32, 16), np.float32),
              "b_enc": np.zeros(32, np.float32), "b_dec": np.zeros(16, np.float32),
              "threshold": np.ones(32, np.float32)}
    (folder / "params.npz").write_bytes(params_npz_bytes(arrays))
    return folder


@given(name=st.sampled_from([".", "..", "../x", "a/b", ".hidden", " ", "a b", "x\ny", "/abs"])
       | st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(lambda n: "/" in n or n[0] == "."))
@examples(20)
def test_an_import_name_that_is_not_a_plain_folder_name_writes_nothing(synthetic_run, released_sae, name):
    before = files_under(synthetic_run)
    argv = ["import", str(TINY), f"run_dir={synthetic_run}", "--source", str(released_sae), "--site", "res",
            "--layer", "1", f"--name={name}"]
    rejected(argv, synthetic_run, "bad import name", "--name", repr(name))
    assert files_under(synthetic_run) == before


# ---------------------------------------------------------------- through the real executable


@pytest.mark.parametrize(("args", "fragments"), [
    (["plan", str(TINY), "train.lr=.nan"], ["train.lr=nan", "finite"]),
    (["harvest", str(TINY), "harvest.context_length=99999999999999999999999"], ["harvest.context_length", "64 bits"]),
    (["train", str(TINY), "--job", "x", "run_dir=s3://bucket/run"], ["run_dir", "unsupported URL scheme"]),
    (["export", str(ROOT / "configs")], ["cannot read config file"]),
    (["plan", str(TINY), "harvest..layers=1"], ["empty"]),
    (["frobnicate"], ["invalid choice"]),
    (["plan", str(TINY), "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_the_executable_prints_exactly_one_line(tmp_path, args, fragments):
    result = subprocess.run([GEMMASCOPE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("gemmascope: error: ")
    for fragment in fragments:
        assert fragment in line, line
    assert list(tmp_path.iterdir()) == []
    TRIED["executable"].add(tuple(args))


def test_a_binary_config_through_the_executable(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"run_dir: x\n\xff\xfe" + os.urandom(64))
    result = subprocess.run([GEMMASCOPE, "plan", str(path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"gemmascope: error: {path}: not a text file (byte 11 is not UTF-8)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    TRIED["executable"].add(("plan", "binary"))
