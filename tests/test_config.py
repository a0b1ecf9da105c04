"""Loading configs: the repository's files, defaults, overrides, and one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from gemmascope.config import (
    Config,
    HarvestConfig,
    ModelConfig,
    SAEGridEntry,
    SourceConfig,
    load_config,
)
from gemmascope.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ROOT / "configs" / "tiny-gemma2.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path, overrides=()) -> str:
    """The message of the ConfigError that loading raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    assert isinstance(info.value, UserError)
    return message


# ---------------------------------------------------------------- the repository's configs


def test_demo_config_has_the_values_in_the_file():
    config = load_config(DEMO)
    assert config.run_dir == "runs/demo"
    assert config.model == ModelConfig(source="gemma3-270m", dtype="auto", device="auto", revision=None)
    assert config.source == SourceConfig(paths=(), builtin="pydoc", text_field="text", pieces_per_shard=8)
    h = config.harvest
    assert h.sites == ("res", "mlp", "att", "mlp_in")
    assert h.layers == (3, 6, 9)
    assert h.context_length == 256
    assert h.batch_size == 8
    assert h.max_tokens == 65536
    assert h.store_dtype == "bfloat16"
    assert (h.unit_rows, h.shard_rows, h.chunk_rows) == (16384, 4096, 512)
    # Not in the file: defaults.
    assert h.workers is None
    assert h.cpus_per_worker == 2
    assert h.output_format == "zarr3"
    assert config.origin == str(DEMO)
    assert config.saes == (
        SAEGridEntry(sites=("res",), layers=(3, 6, 9), widths=(1024,), sparsity=(3e-4, 1e-3, 3e-3), tokens=512000),
        SAEGridEntry(sites=("res",), layers=(6,), widths=(2048,), sparsity=(3e-4, 1e-3, 3e-3), tokens=1024000),
        SAEGridEntry(sites=("res",), layers=(6,), widths=(1024,), architecture="jumprelu_target_l0",
                     l0_targets=("small", "medium", "big"), tokens=512000),
        SAEGridEntry(sites=("res",), layers=(6,), widths=(1024,), architecture="batchtopk", k=(20, 50, 120),
                     tokens=512000),
        SAEGridEntry(sites=("mlp",), layers=(6,), widths=(1024,), sparsity=(3e-4, 1e-3, 3e-3), tokens=512000),
        SAEGridEntry(sites=("mlp_in",), layers=(6,), widths=(1024,), target="mlp", sparsity=(3e-4, 1e-3, 3e-3),
                     tokens=512000),
        SAEGridEntry(sites=("mlp_in",), layers=(6,), widths=(1024,), target="mlp", skip=True,
                     sparsity=(3e-4, 1e-3, 3e-3), tokens=512000),
        SAEGridEntry(sites=("mlp_in",), layers=(6,), widths=(1024,), target="mlp",
                     architecture="jumprelu_target_l0", l0_targets=("small", "medium", "big"), tokens=512000),
    )
    assert config.train.batch_size == 1024
    assert config.sweep.cpus_per_job == 1


def test_tiny_gemma2_config_has_the_values_in_the_file():
    config = load_config(TINY)
    assert config.run_dir == "runs/tiny-gemma2"
    assert config.model.source == "tiny-gemma2"
    assert config.source.builtin == "pydoc"
    assert config.source.paths == ()
    assert config.source.pieces_per_shard == 4
    h = config.harvest
    assert h.sites == ("res", "mlp", "att", "mlp_in")
    assert h.layers == "all"
    assert h.context_length == 64
    assert h.max_tokens == 6000
    assert (h.unit_rows, h.shard_rows, h.chunk_rows) == (2048, 512, 128)
    assert h.cpus_per_worker == 1
    assert h.workers == 2
    assert h.gpus_per_worker == 1.0


def test_empty_file_gives_the_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config == Config()
    assert config.run_dir == "runs/default"
    assert config.model.source == "gemma3-270m"
    assert config.source.builtin == "pydoc"
    h = config.harvest
    assert h.sites == ("res", "mlp", "att")
    assert h.layers == "all"
    assert h.context_length == 1024
    assert h.batch_size == 8
    assert h.max_tokens is None
    assert (h.unit_rows, h.shard_rows, h.chunk_rows) == (262144, 16384, 1024)
    assert h.max_attempts == 3


def test_partial_section_keeps_other_defaults(tmp_path):
    config = load_config(write(tmp_path, "harvest:\n  context_length: 32\n"))
    assert config.harvest.context_length == 32
    assert config.harvest == dataclasses.replace(HarvestConfig(), context_length=32)


# ---------------------------------------------------------------- overrides


def test_overrides_nested_lists_strings_ints_and_null():
    config = load_config(TINY, [
        "harvest.layers=[1,2]",
        "harvest.context_length=128",
        "harvest.max_tokens=null",
        "model.source=google/gemma-2-2b",
        "run_dir=gs://bucket/run",
        "harvest.sites=[res]",
        "source.pieces_per_shard=2",
        "harvest.gpus_per_worker=1",  # int accepted for a float
    ])
    assert config.harvest.layers == (1, 2)
    assert config.harvest.context_length == 128
    assert config.harvest.max_tokens is None
    assert config.model.source == "google/gemma-2-2b"
    assert config.run_dir == "gs://bucket/run"
    assert config.harvest.sites == ("res",)
    assert config.source.pieces_per_shard == 2
    assert config.harvest.gpus_per_worker == 1.0
    assert isinstance(config.harvest.gpus_per_worker, float)
    # Untouched values stay as in the file.
    assert config.harvest.unit_rows == 2048
    assert config.harvest.workers == 2


def test_later_override_wins_and_layers_all_is_accepted():
    config = load_config(DEMO, ["harvest.layers=[1]", "harvest.layers=all"])
    assert config.harvest.layers == "all"


def test_override_creates_missing_section(tmp_path):
    config = load_config(write(tmp_path, "run_dir: x\n"), ["model.dtype=float32"])
    assert config.model.dtype == "float32"
    assert config.run_dir == "x"


def test_empty_override_value_is_the_empty_string():
    # `model.source=` sets "", which the model section then rejects.
    message = config_error(TINY, ["model.source="])
    assert str(TINY) in message
    assert "model.source=''" in message


def test_source_paths_override_with_builtin_cleared():
    config = load_config(TINY, ["source.builtin=null", "source.paths=[data/*.txt, gs://b/x.jsonl]"])
    assert config.source.paths == ("data/*.txt", "gs://b/x.jsonl")
    assert config.source.builtin is None


def test_override_without_equals_is_an_error():
    message = config_error(TINY, ["harvest.layers"])
    assert str(TINY) in message
    assert "harvest.layers" in message


# ---------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["bogus=1"], "bogus", "1"),
        (["harvest.bogus=1"], "harvest.bogus", "1"),
        (["model.sauce=x"], "model.sauce", "'x'"),
        (["harvest.context_length=abc"], "harvest.context_length", "'abc'"),
        (["harvest.batch_size=true"], "harvest.batch_size", "True"),
        (["harvest.context_length=2.5"], "harvest.context_length", "2.5"),
        (["harvest.sites=3"], "harvest.sites", "3"),
        (["harvest.layers=3"], "harvest.layers", "3"),
        (["harvest.layers=[1, true]"], "harvest.layers", "[1, True]"),
        (["harvest.layers=[-1]"], "harvest.layers[0]", "-1"),
        (["harvest.layers=[0, 4, -2]"], "harvest.layers[2]", "-2"),
        (["harvest.sites=[res, resid]"], "harvest.sites", "'resid'"),
        (["harvest.layers=[1, 2, 1]"], "harvest.layers", "[1, 2, 1]"),
        (["harvest.sites=[res, res]"], "harvest.sites", "['res', 'res']"),
        (["harvest.context_length=1"], "harvest.context_length", "1"),
        (["harvest.unit_rows=1000"], "harvest.unit_rows", "1000"),
        (["harvest.chunk_rows=100"], "harvest.shard_rows", "512"),
        (["harvest.store_dtype=float16"], "harvest.store_dtype", "'float16'"),
        (["harvest.max_tokens=0"], "harvest.max_tokens", "0"),
        (["harvest.workers=0"], "harvest.workers", "0"),
        (["source.paths=[a.txt]"], "source.paths", "['a.txt']"),
        (["source.builtin=null"], "source.paths", "[]"),
        (["source.pieces_per_shard=0"], "source.pieces_per_shard", "0"),
        (["model=gemma"], "model", "'gemma'"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_key_and_value(overrides, key, value):
    message = config_error(TINY, overrides)
    assert message.startswith(f"{TINY}: ")
    assert f"{key}={value}" in message


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("bogus: 1\n", "bogus", "1"),
        ("harvest:\n  bogus: [1]\n", "harvest.bogus", "[1]"),
        ("harvest:\n  context_length: '64'\n", "harvest.context_length", "'64'"),
        ("harvest:\n  layers: [-3]\n", "harvest.layers[0]", "-3"),
        ("harvest:\n  sites: [res, resid]\n", "harvest.sites", "'resid'"),
        ("harvest:\n  sites: [embed]\n  layers: [3]\n", "harvest.sites", "'embed'"),
        ("harvest:\n  layers: [5, 5]\n", "harvest.layers", "[5, 5]"),
        ("saes:\n  - sites: [res]\n    widht: [1024]\n", "saes[0].widht", "[1024]"),
        ("saes:\n  - widths: [1000]\n", "saes[0].widths[0]", "1000"),
        ("saes: []\n", "saes", "[]"),
        ("saes:\n  - sparsity: []\n", "saes[0].sparsity", "[]"),
        ("saes:\n  - target: mlp_out\n", "saes[0].target", "'mlp_out'"),
        ("sweep:\n  devices_per_job: 3\n", "sweep.devices_per_job", "3"),
        ("sweep:\n  heartbeat_seconds: 400\n", "sweep.heartbeat_seconds", "400.0"),
        ("harvest:\n  context_length: 1\n", "harvest.context_length", "1"),
        ("harvest:\n  unit_rows: 24576\n  shard_rows: 16384\n", "harvest.unit_rows", "24576"),
        ("source:\n  builtin: pydoc\n  paths: ['*.txt']\n", "source.paths", "['*.txt']"),
        ("source:\n  builtin: null\n", "source.paths", "[]"),
        ("source:\n  builtin: wiki\n", "source.builtin", "'wiki'"),
        ("harvest:\n", "harvest", "None"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_key_and_value(tmp_path, text, key, value):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert f"{key}={value}" in message


def test_unknown_key_lists_the_known_keys():
    message = config_error(TINY, ["harvest.bogus=1"])
    assert "unknown key" in message
    for known in ("context_length", "layers", "sites", "unit_rows"):
        assert known in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert message.startswith(str(path))
    assert "not found" in message


def test_config_path_is_a_directory(tmp_path):
    message = config_error(tmp_path)
    assert message.startswith(str(tmp_path))


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "run_dir: x\nharvest:\n  layers: [1, 2\n  sites: [res]\n")
    message = config_error(path)
    assert message.startswith(f"{path}: not valid YAML at line ")
    line = int(message.rsplit(" ", 1)[1])
    assert 3 <= line <= 5


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_non_mapping_top_level(tmp_path, text, kind):
    path = write(tmp_path, text)
    message = config_error(path)
    assert message == f"{path}: expected a mapping at the top level, got {kind}"


def test_override_into_a_scalar_names_the_file_and_value():
    message = config_error(TINY, ["run_dir.sub=1"])
    assert message.startswith(f"{TINY}: ")
    assert "run_dir.sub=1" in message


def test_non_string_keys_give_a_config_error(tmp_path):
    path = write(tmp_path, "1: x\nbogus: y\n")
    message = config_error(path)
    assert message.startswith(f"{path}: ")


# ---------------------------------------------------------------- identity


def test_configs_are_frozen():
    config = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run_dir = "elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.harvest.context_length = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.source = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.source.pieces_per_shard = 9
    assert isinstance(config.harvest.layers, str)
    assert isinstance(load_config(DEMO).harvest.layers, tuple)


def test_harvest_fingerprint_tracks_what_decides_the_rows():
    base = load_config(TINY)
    fp = base.harvest_fingerprint()
    assert len(fp) == 16
    int(fp, 16)
    assert load_config(TINY).harvest_fingerprint() == fp
    # The origin file is not part of the identity.
    assert dataclasses.replace(base, origin="elsewhere.yaml").harvest_fingerprint() == fp
    # Scheduling knobs do not change the rows.
    for override in ("harvest.workers=7", "harvest.cpus_per_worker=3",
                     "harvest.gpus_per_worker=0.5", "harvest.max_attempts=9"):
        assert load_config(TINY, [override]).harvest_fingerprint() == fp, override
    # Everything that decides the rows does.
    changed = {
        load_config(TINY, [override]).harvest_fingerprint()
        for override in ("harvest.context_length=65", "harvest.layers=[0]", "harvest.sites=[res]",
                         "harvest.max_tokens=6001", "harvest.store_dtype=float32",
                         "model.source=other", "source.pieces_per_shard=2",
                         "source.text_field=body")
    }
    assert fp not in changed
    assert len(changed) == 8


def test_fingerprint_ignores_run_dir():
    a = load_config(TINY, ["run_dir=/a"]).harvest_fingerprint()
    b = load_config(TINY, ["run_dir=/b"]).harvest_fingerprint()
    assert a == b


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["configs/tiny-gemma2.yaml", "harvest.bogus=1"], "harvest.bogus"),
        (["configs/tiny-gemma2.yaml", "harvest.layers=[-1]"], "harvest.layers[0]=-1"),
        (["configs/no-such-config.yaml"], "configs/no-such-config.yaml"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_status_2(args, needle):
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "gemmascope"), "harvest", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gemmascope: error:")
    assert needle in lines[0]
    assert result.stdout == ""
