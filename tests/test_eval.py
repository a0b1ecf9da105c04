"""`gemmascope eval` end to end on a tiny Gemma 2: harvest, train, evaluate held-out data, export."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from gemmascope.config import load_config
from gemmascope.errors import UserError
from gemmascope.eval.evaluate import run_eval
from gemmascope.export.gemma_scope import read_params_npz
from gemmascope.export.release import run_export
from gemmascope.harvest.driver import run_harvest
from gemmascope.store import ActivationStore
from gemmascope.train.trainer import train_job
from tests.harvest_helpers import ROOT

pytestmark = pytest.mark.ray

OVERRIDES = [
    "harvest.sites=[res, mlp]", "harvest.layers=[1, 2]", "harvest.max_tokens=6000",
    "saes=[{sites: [res], layers: [1], widths: [128], sparsity: [1.0e-3, 1.0e-1], tokens: 12800}]",
    "train.batch_size=256", "train.lr=3.0e-3", "train.threshold_lr=1.0e-2", "train.lr_warmup_steps=5",
    "train.sparsity_warmup_steps=10", "train.norm_sample_rows=1024", "train.shuffle_rows=2048",
    "train.holdout_rows=1000", "train.log_every=25", "train.checkpoint_every=1000",
    "eval.sequences=6", "eval.batch_size=4",
]
JOB = "res-L1-w128"


@pytest.fixture(scope="module")
def evaluated(ray_address, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval")
    config = load_config(ROOT / "configs" / "tiny-gemma2.yaml", [f"run_dir={run_dir}", *OVERRIDES])
    run_harvest(config, progress=False)
    train_job(config, JOB, progress=False)
    line = run_eval(config, progress=False)
    return config, run_dir, line


def metrics(run_dir, name: str) -> dict:
    return json.loads((run_dir / "train" / JOB / "saes" / name / "metrics.json").read_text())


def test_metrics_match_a_numpy_recomputation_on_the_held_out_rows(evaluated):
    config, run_dir, line = evaluated
    assert "2 SAEs" in line and "6 sequences" in line
    store = ActivationStore.open(str(run_dir))
    x = np.asarray(store.read("res", 1, store.n_rows - 1000, store.n_rows), np.float64)
    for name in ("w128-s0.001", "w128-s0.1"):
        m = metrics(run_dir, name)
        p = {k: v.astype(np.float64) for k, v in read_params_npz(
            (run_dir / "train" / JOB / "saes" / name / "params.npz").read_bytes(), name).items()}
        pre = x @ p["W_enc"] + p["b_enc"]
        f = pre * (pre > p["threshold"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        assert m["eval_rows"] == 1000
        assert m["l0"] == pytest.approx(np.mean(np.sum(f != 0, axis=1)), rel=1e-3)
        assert m["fvu"] == pytest.approx(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2), rel=1e-3)
        density = np.mean(f != 0, axis=0)
        assert m["dead_fraction"] == pytest.approx(np.mean(density == 0))
        assert m["dense_fraction"] == pytest.approx(np.mean(density > 0.1))
        assert sum(m["density_histogram"]["counts"]) + m["density_histogram"]["dead"] == 128
        # LM metrics: consistent with each other, from the held-out sequences only.
        assert m["eval_sequences"] == 6 and m["eval_tokens"] > 0
        assert m["delta_loss"] == pytest.approx(m["spliced_loss"] - m["clean_loss"])
        assert m["kl"] >= 0
        recovered = (m["zero_ablation_loss"] - m["spliced_loss"]) / (m["zero_ablation_loss"] - m["clean_loss"])
        assert m["loss_recovered"] == pytest.approx(recovered)


def test_rerun_skips_and_export_follows(evaluated):
    config, run_dir, _ = evaluated
    before = metrics(run_dir, "w128-s0.001")
    assert run_eval(config, progress=False) == "eval: every SAE of the run already has metrics.json"
    assert metrics(run_dir, "w128-s0.001") == before
    run_export(config)
    index = json.loads((run_dir / "saes" / "index.json").read_text())["saes"]
    assert sorted(entry["name"] for entry in index) == ["w128-s0.001", "w128-s0.1"]
    for entry in index:
        assert (run_dir / entry["path"] / "params.npz").exists()
        assert entry["path"].endswith(f"average_l0_{round(entry['l0'])}")


def test_no_held_out_rows_is_a_clear_error(evaluated):
    config, _, _ = evaluated
    from dataclasses import replace

    with pytest.raises(UserError, match="holdout_rows is 0"):
        run_eval(replace(config, train=replace(config.train, holdout_rows=0)), progress=False)


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    from gemmascope.report.pages import run_report

    config, run_dir, _ = evaluated
    run_export(config)
    line = run_report(config, progress=False)
    index = run_dir / "report" / "index.html"
    assert str(index) in line
    pages = sorted((run_dir / "report" / "features").glob("*.html"))
    assert [p.stem for p in pages] == ["res-L1-w128-s0.001", "res-L1-w128-s0.1"]
    html = pages[0].read_text()
    assert html.count('class="feature"') == 8 and 'class="ctx"' in html and "promotes:" in html
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by `make test` (Debian package)"
    for page, expected in ((index, "Frontiers"), (pages[0], "latent ")):
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert expected in result.stdout and "<svg" in result.stdout  # rendered, with its charts
        console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
        assert not console, console
    shot = tmp_path / "feature.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p2'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", pages[0].as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_an_imported_saelens_sae_is_evaluated_indexed_and_shown_like_the_original(evaluated, tmp_path):
    """Import the run's own SAE through SAELens's format into a copy of the run: the same
    arrays must measure the same, and export and the report must carry it."""
    from dataclasses import replace

    from gemmascope.cli import main
    from gemmascope.export.importers import run_import
    from gemmascope.report.pages import run_report

    config, run_dir, _ = evaluated
    run_export(config)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = replace(config, run_dir=str(copy))
    original = json.loads((copy / "saes" / "index.json").read_text())["saes"]
    source = next(e for e in original if e["name"] == "w128-s0.001")
    saelens = copy / source["saelens_path"]

    assert main(["import", str(ROOT / "configs" / "tiny-gemma2.yaml"), f"run_dir={copy}", *OVERRIDES,
                 "--source", str(saelens), "--name", "from-saelens"]) == 0
    assert "already in the run" in run_import(config, str(saelens), name="from-saelens")
    with pytest.raises(UserError, match="another SAE was imported under the name 'from-saelens'"):
        run_import(config, str(copy / original[1]["path"]), name="from-saelens")
    with pytest.raises(UserError, match="site 'att' layer 1 was not harvested"):
        run_import(config, str(saelens), site="att", layer=1)  # the store has res and mlp at layers 1, 2
    assert "1 SAEs" in run_eval(config, progress=False)

    mine = json.loads((copy / "train" / JOB / "saes" / "w128-s0.001" / "metrics.json").read_text())
    theirs = json.loads((copy / "imported" / "from-saelens" / "metrics.json").read_text())
    assert theirs["job"] == "imported" and theirs["sparsity"] is None and theirs["source"] == str(saelens)
    for key in ("l0", "fvu", "delta_loss", "kl", "dead_fraction"):
        assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), key

    assert "+ 1 imported" in run_export(config)
    index = json.loads((copy / "saes" / "index.json").read_text())["saes"]
    entry = next(e for e in index if e["name"] == "from-saelens")
    assert entry["path"] == "imported/from-saelens" and not entry["canonical"] and entry["saelens_path"] is None
    assert not list((copy / "saes").glob("*/*/*/*from-saelens*"))  # not re-released as the run's own
    run_report(config, progress=False)
    page = copy / "report" / "features" / "res-L1-w128-from-saelens.html"
    assert "imported from" in page.read_text() and page.read_text().count('class="feature"') == 8
    assert "res L1 128 from-saelens" in (copy / "report" / "index.html").read_text()
