"""Export to the Gemma Scope tree and SAELens, and import back: formats, numbers, determinism."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import params_npz_bytes, read_params_npz
from gemmascope.export.importers import load_released
from gemmascope.export.release import run_export
from gemmascope.export.saelens import saelens_files
from gemmascope.store import ActivationStore
from gemmascope.sweep.grid import plan_jobs
from gemmascope.train.checkpoints import Checkpoints
from gemmascope.train.group import Group, sharded_layout
from gemmascope.train.mesh import make_mesh
from gemmascope.train.release import from_release, to_release
from gemmascope.train.trainer import train_job
from tests.train_helpers import gaussian_store, small_config

JOB = "res-L0-w64"
NAMES = ("w64-s0.001", "w64-s0.01", "w64-s0.1")
FAKE_L0 = {"w64-s0.001": 130.4, "w64-s0.01": 95.2, "w64-s0.1": 12.6}  # written as if measured by eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export")
    rows = gaussian_store(run_dir, n_rows=8192, d_in=16)
    config = small_config(run_dir, widths=(64,), sparsity=(0.001, 0.01, 0.1), steps=30, batch=256,
                          checkpoint_every=10, holdout_rows=1024, shuffle_rows=2048, norm_sample_rows=1024)
    train_job(config, JOB, progress=False)
    for name in NAMES:
        directory = run_dir / "train" / JOB / "saes" / name
        (directory / "metrics.json").write_text(json.dumps({"l0": FAKE_L0[name], "fvu": 0.1, "name": name}))
    line = run_export(config)
    return config, run_dir, rows, line


def released_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "saes" / "res" / "layer_0" / "width_64" / f"average_l0_{round(FAKE_L0[name])}"


def test_the_tree_follows_the_release_layout(trained):
    _, run_dir, _, line = trained
    assert "3 SAEs" in line
    for name in NAMES:
        folder = released_dir(run_dir, name)
        data = (folder / "params.npz").read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert sorted(archive.namelist()) == sorted(f"{k}.npy" for k in ("W_enc", "W_dec", "b_enc", "b_dec",
                                                                              "threshold"))
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            shapes = {k: arrays[k].shape for k in arrays.files}
            assert {arrays[k].dtype for k in arrays.files} == {np.dtype(np.float32)}
        assert shapes == {"W_enc": (16, 64), "W_dec": (64, 16), "b_enc": (64,), "b_dec": (16,), "threshold": (64,)}
        assert json.loads((folder / "config.json").read_text())["sae"] == name
    index = json.loads((run_dir / "saes" / "index.json").read_text())["saes"]
    canonical = [entry["name"] for entry in index if entry["canonical"]]
    assert canonical == ["w64-s0.01"]  # L0 95.2 is the closest to 100


def test_released_params_on_raw_activations_reproduce_the_trained_sae(trained):
    config, run_dir, rows, _ = trained
    store = ActivationStore.open(str(run_dir))
    (job,) = plan_jobs(config, store.model_info())
    scale = json.loads((run_dir / "train" / JOB / "normalisation.json").read_text())["scale"]
    group = Group.of(16, [(s.width, s.sparsity) for s in job.saes])
    abstract, _ = sharded_layout(group, config.train, make_mesh(config.train))
    state, _ = Checkpoints(str(run_dir / "train" / JOB / "checkpoints")).restore(abstract)
    x = rows[-512:].astype(np.float64)
    for index, name in enumerate(group.name(i) for i in range(group.size)):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params[index])
        # The training-time SAE (SPEC.md section 2) on x / C, written out in numpy, times C.
        xn = x / scale
        pre = (xn - p.b_dec) @ p.W_enc + p.b_enc
        f = pre * (pre > np.exp(p.log_threshold))
        expected = (f @ p.W_dec + p.b_dec) * scale
        released = load_released(str(released_dir(run_dir, name)))
        r = {k: v.astype(np.float64) for k, v in released.arrays.items()}
        pre_raw = x @ r["W_enc"] + r["b_enc"]
        got = (pre_raw * (pre_raw > r["threshold"])) @ r["W_dec"] + r["b_dec"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        assert released.site == "res" and released.layer == 0 and released.format == "gemma-scope"


def test_export_import_export_is_byte_identical(trained):
    config, run_dir, _, _ = trained
    for name in NAMES:
        folder = released_dir(run_dir, name)
        original = (folder / "params.npz").read_bytes()
        assert params_npz_bytes(load_released(str(folder)).arrays) == original
        saelens = run_dir / "saelens" / folder.relative_to(run_dir / "saes")
        imported = load_released(str(saelens))
        assert imported.format == "saelens" and (imported.site, imported.layer) == ("res", 0)
        weights, cfg = saelens_files(imported.arrays, site="res", layer=0, model_name=config.model.source,
                                     context_size=config.harvest.context_length, dataset="pydoc")
        assert weights == (saelens / "sae_weights.safetensors").read_bytes()
        assert cfg == (saelens / "cfg.json").read_bytes()
    before = {p: p.read_bytes() for p in run_dir.glob("sae*/**/*") if p.is_file()}
    run_export(config)  # a rerun rewrites the same bytes
    assert before == {p: p.read_bytes() for p in run_dir.glob("sae*/**/*") if p.is_file()}


def test_saelens_files_carry_what_its_loader_reads(trained):
    _, run_dir, _, _ = trained
    folder = run_dir / "saelens" / "res" / "layer_0" / "width_64" / "average_l0_95"
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    gemma = read_params_npz((run_dir / "saes" / "res" / "layer_0" / "width_64" / "average_l0_95" /
                             "params.npz").read_bytes(), "params.npz")
    assert sorted(tensors) == sorted(gemma)
    for key in gemma:
        np.testing.assert_array_equal(tensors[key], gemma[key])
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def test_saelens_input_with_the_bias_applied_to_the_input_is_folded(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.normal(size=(8, 32)), "W_dec": rng.normal(size=(32, 8)), "b_enc": rng.normal(size=32),
              "b_dec": rng.normal(size=8), "threshold": rng.uniform(0.1, 1.0, size=32)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    weights, cfg = saelens_files(arrays, site="mlp", layer=3, model_name="m", context_size=8, dataset="d")
    cfg_data = json.loads(cfg)
    cfg_data["apply_b_dec_to_input"] = True  # SAELens's default: pre = (x - b_dec) @ W_enc + b_enc
    storage.write_bytes_atomic(str(tmp_path / "sae_weights.safetensors"), weights)
    storage.write_bytes_atomic(str(tmp_path / "cfg.json"), json.dumps(cfg_data).encode())
    imported = load_released(str(tmp_path))
    x = rng.normal(size=(5, 8))
    expected = (x - arrays["b_dec"]) @ arrays["W_enc"] + arrays["b_enc"]
    np.testing.assert_allclose(x @ imported.arrays["W_enc"] + imported.arrays["b_enc"], expected, rtol=1e-5,
                               atol=1e-5)
    assert (imported.site, imported.layer) == ("mlp", 3)


def test_bad_inputs_are_one_line_errors(tmp_path, trained):
    with pytest.raises(UserError, match="no SAE here"):
        load_released(str(tmp_path))
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a params.npz"):
        load_released(str(tmp_path))
    buffer = io.BytesIO()
    np.savez(buffer, W_enc=np.zeros((2, 3), np.float64))
    (tmp_path / "params.npz").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="expected arrays W_enc, W_dec"):
        load_released(str(tmp_path))
    config, run_dir, _, _ = trained
    metrics = run_dir / "train" / JOB / "saes" / NAMES[0] / "metrics.json"
    saved = metrics.read_text()
    metrics.unlink()
    try:
        with pytest.raises(UserError, match="not evaluated yet"):
            run_export(config)
    finally:
        metrics.write_text(saved)


def test_release_reparameterisation_inverts(trained):
    _, run_dir, _, _ = trained
    released = load_released(str(released_dir(run_dir, NAMES[1]))).arrays
    back = to_release(from_release(released, 37.5), 37.5)
    for key in released:
        np.testing.assert_allclose(back[key], released[key], rtol=1e-5, atol=1e-6)


def test_training_can_start_from_an_exported_sae(trained, tmp_path):
    """One step at a negligible learning rate: the new job's SAE is the imported one."""
    _, run_dir, _, _ = trained
    source = released_dir(run_dir, NAMES[1])
    gaussian_store(tmp_path, n_rows=4096, d_in=16, seed=3)  # other data, so another scale C
    config = small_config(tmp_path, widths=(64,), sparsity=(0.01,), steps=1, batch=256, lr=1e-12,
                          threshold_lr=1e-12, shuffle_rows=2048, norm_sample_rows=1024, log_every=1)
    config = dataclasses.replace(config, saes=(dataclasses.replace(config.saes[0], init_from=str(source)),))
    train_job(config, JOB, progress=False)
    got = read_params_npz((tmp_path / "train" / JOB / "saes" / "w64-s0.01" / "params.npz").read_bytes(), "new")
    original = load_released(str(source)).arrays
    for key in original:
        np.testing.assert_allclose(got[key], original[key], rtol=1e-4, atol=1e-5)
    wrong = dataclasses.replace(config, run_dir=str(tmp_path / "other"),
                                saes=(dataclasses.replace(config.saes[0], widths=(128,), init_from=str(source)),))
    gaussian_store(tmp_path / "other", n_rows=4096, d_in=16, seed=3)
    with pytest.raises(UserError, match="cannot start res-L0-w128"):
        train_job(wrong, "res-L0-w128", progress=False)
