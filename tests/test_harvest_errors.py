"""Bad input to `gemmascope harvest`: exit status 2, one clear line, nothing corrupted."""

from __future__ import annotations

import pytest

from gemmascope.config import load_config
from gemmascope.harvest.driver import run_harvest
from tests.harvest_helpers import ROOT, cli, snapshot

TINY = str(ROOT / "configs" / "tiny-gemma2.yaml")


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("gemmascope: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_config_file(tmp_path):
    result = cli("harvest", str(tmp_path / "nope.yaml"))
    assert_one_line_error(result, "nope.yaml", "not found")


def test_unknown_key(tmp_path):
    result = cli("harvest", TINY, f"run_dir={tmp_path}", "harvest.layer=3")
    assert_one_line_error(result, "tiny-gemma2.yaml", "harvest.layer=3", "unknown key")


def test_unknown_site(tmp_path):
    result = cli("harvest", TINY, f"run_dir={tmp_path}", "harvest.sites=[res,resid]")
    assert_one_line_error(result, "harvest.sites='resid'", "unknown site")


def test_layer_out_of_range(tmp_path):
    result = cli("harvest", TINY, f"run_dir={tmp_path}", "harvest.layers=[1,4]")
    assert_one_line_error(result, "tiny-gemma2.yaml", "harvest.layers[1]=4", "4 layers")
    assert not (tmp_path / "activations").exists()


def test_missing_text_files(tmp_path):
    result = cli("harvest", TINY, f"run_dir={tmp_path / 'run'}", "source.builtin=null",
                 f"source.paths=[{tmp_path}/corpus/*.jsonl]")
    assert_one_line_error(result, "source.paths[0]", "no files match")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli("harvest", TINY, f"run_dir={blocker}/run")
    assert_one_line_error(result, str(blocker))


def test_model_not_found(tmp_path):
    result = cli("harvest", TINY, f"run_dir={tmp_path}", f"model.source={tmp_path}/no-such-model")
    assert_one_line_error(result, "no-such-model", "not found")


@pytest.mark.ray
def test_empty_corpus(ray_address, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("   \n\n")
    (corpus / "b.jsonl").write_text('{"text": ""}\n')
    result = cli("harvest", TINY, f"run_dir={tmp_path / 'run'}", "source.builtin=null",
                 f"source.paths=[{corpus}/*.txt,{corpus}/*.jsonl]", "--ray-address", ray_address,
                 "--no-progress")
    assert_one_line_error(result, "corpus has no text")


@pytest.mark.ray
def test_changed_config_refuses_existing_store_and_keeps_it(ray_address, tmp_path):
    run_dir = tmp_path / "run"
    run_harvest(load_config(TINY, [f"run_dir={run_dir}", "harvest.max_tokens=1000"]), progress=False)
    before = snapshot(str(run_dir))
    result = cli("harvest", TINY, f"run_dir={run_dir}", "harvest.max_tokens=1000",
                 "harvest.context_length=32", "--ray-address", ray_address)
    assert_one_line_error(result, "ledger.json", "harvest.context_length", "64", "32")
    assert snapshot(str(run_dir)) == before


@pytest.mark.ray
def test_corrupt_ledger_is_reported_not_overwritten(ray_address, tmp_path):
    ledger = tmp_path / "run" / "activations" / "ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"format": "gemmascope.activations/1", "units": ')
    result = cli("harvest", TINY, f"run_dir={tmp_path / 'run'}", "--ray-address", ray_address)
    assert_one_line_error(result, "ledger.json", "not valid JSON")
    assert ledger.read_text() == '{"format": "gemmascope.activations/1", "units": '
