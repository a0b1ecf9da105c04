"""Transcoders (mlp_in -> mlp, SPEC.md 5) after training: metrics, splicing in place of the
MLP, export to the Gemma Scope tree and SAELens, the report.

References are independent of the code under test: plain torch forward hooks of our own
on the real (tiny, random) Gemma 2, numpy sums over the stored arrays, and SAELens's
transcoder formula (x @ W_skip.T on its [d_out, d_in] W_skip) evaluated by hand.
The trainer's side is not needed: finished transcoder jobs are written here file by file
as the training contract describes them (done.json, saes/<name>/params.npz, sae.json).
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from gemmascope.config import (
    Config,
    EvalConfig,
    HarvestConfig,
    ModelConfig,
    SAEGridEntry,
    TrainConfig,
)
from gemmascope.errors import UserError
from gemmascope.eval.activations import activation_metrics
from gemmascope.eval.catalog import run_saes
from gemmascope.eval.lm import lm_metrics, released_reconstruction
from gemmascope.eval.splice import splice
from gemmascope.export.gemma_scope import params_npz_bytes, read_params_npz
from gemmascope.export.release import run_export
from gemmascope.export.saelens import read_saelens, read_saelens_transcoder, saelens_files
from gemmascope.harvest.packing import ROLE_BOS, ROLE_EOS, ROLE_PAD, ROLE_TEXT
from gemmascope.models.capture import ActivationCapture
from gemmascope.models.loading import load_model
from gemmascope.store import ActivationStore
from gemmascope.store.synthetic import write_store
from gemmascope.sweep.grid import plan_jobs
from tests.lm_reference import hooked_loss

LAYER = 2
NEVER = 1e30  # a threshold no pre-activation reaches: the latents never fire


# --- independent references -------------------------------------------------------------

def reference_loss(loaded, ids: np.ndarray, role: np.ndarray, layer: int, predict) -> tuple[float, int]:
    """Summed next-token loss (TEXT positions predicting TEXT/EOS) and its token count, with
    the output of post_feedforward_layernorm replaced at TEXT positions by predict(x), x the
    output of pre_feedforward_layernorm in the same pass: two plain torch forward hooks."""
    block = loaded.decoder_layers[layer]
    text = torch.as_tensor(role == ROLE_TEXT)
    seen = {}

    def keep(module, args, output):
        seen["x"] = output

    def swap(module, args, output):
        return torch.where(text[..., None], predict(seen.pop("x").double()).to(output.dtype), output)

    return hooked_loss(loaded, ids, role, [(block.pre_feedforward_layernorm, keep),
                                           (block.post_feedforward_layernorm, swap)])


def transcode(arrays: dict[str, np.ndarray], x):
    """The transcoder of SPEC.md 5 on raw x (numpy or torch, float64)."""
    p = {k: (torch.as_tensor(v, dtype=torch.float64) if isinstance(x, torch.Tensor) else v.astype(np.float64))
         for k, v in arrays.items()}
    pre = x @ p["W_enc"] + p["b_enc"]
    y = (pre * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]
    return y + x @ p["W_skip"] if "W_skip" in p else y


def affine_fit(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (W, b) with y ~ x @ W + b, W penalised by ridge * ||W||^2.

    With fewer rows than d_in + 1 the plain fit interpolates them: spliced on the same
    tokens it reproduces the MLP exactly, and the KL is rounding noise of either sign."""
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = ridge * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    solution = np.linalg.solve(design.T @ design + penalty, design.T @ y) if ridge else \
        np.linalg.lstsq(design, y, rcond=None)[0]
    return solution[:-1], solution[-1]


def random_transcoder(rng, d_in: int, d_sae: int, d_out: int, *, skip: bool, scale: float = 1.0):
    arrays = {"W_enc": rng.normal(size=(d_in, d_sae)) * scale / np.sqrt(d_in), "W_dec": rng.normal(size=(d_sae, d_out)),
              "b_enc": rng.normal(size=d_sae) * 0.1, "b_dec": rng.normal(size=d_out),
              "threshold": rng.uniform(0.2, 1.2, size=d_sae)}
    if skip:
        arrays["W_skip"] = rng.normal(size=(d_in, d_out)) * 0.3
    return {k: v.astype(np.float32) for k, v in arrays.items()}


# --- splicing into the real model ---------------------------------------------------------

@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="tiny-gemma2"))


@pytest.fixture(scope="module")
def batch():
    """Three sequences: BOS, text, EOS, then padding in the second."""
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 5000, size=(3, 24))
    role = np.full((3, 24), ROLE_TEXT, np.int8)
    role[:, 0], ids[:, 0] = ROLE_BOS, 2
    role[1, 15], ids[1, 15] = ROLE_EOS, 1
    role[1, 16:], ids[1, 16:] = ROLE_PAD, 0
    return ids, role


@pytest.fixture(scope="module")
def captured(loaded, batch):
    """(mlp_in, mlp, res) at LAYER on the batch, float64 numpy."""
    got = ActivationCapture(loaded, [(s, LAYER) for s in ("mlp_in", "mlp", "res")])(torch.as_tensor(batch[0]))
    return tuple(got[(s, LAYER)].double().numpy() for s in ("mlp_in", "mlp", "res"))


def test_an_affine_skip_transcoder_is_spliced_in_place_of_the_mlp(loaded, batch, captured):
    """Latents that never fire and W_skip, b_dec fitted to mlp from mlp_in: the spliced loss is
    the loss with the MLP block replaced by that affine map (our own hooks), its baseline the
    MLP block zeroed, shared with an mlp SAE of the layer."""
    ids, role = batch
    x, y, _ = captured
    text = role == ROLE_TEXT
    # 58 rows, 65 unknowns per output: the ridge keeps the map from interpolating the MLP.
    W_skip, b_dec = affine_fit(x[text], y[text], ridge=100.0)
    d, rng = x.shape[-1], np.random.default_rng(1)
    arrays = {"W_enc": rng.normal(size=(d, 32)), "W_dec": rng.normal(size=(32, d)), "b_enc": np.zeros(32),
              "b_dec": b_dec, "threshold": np.full(32, NEVER), "W_skip": W_skip}
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    results = lm_metrics(loaded, [batch], {("mlp_in", LAYER, "mlp"): {"affine": released_reconstruction(arrays)},
                                           ("mlp", LAYER): {"identity": lambda a: a.clone()}})
    transcoder, sae = results[("mlp_in", LAYER, "mlp")], results[("mlp", LAYER)]
    m = transcoder.metrics("affine")

    affine = torch.as_tensor(arrays["W_skip"], dtype=torch.float64), torch.as_tensor(arrays["b_dec"], dtype=torch.float64)
    expected, tokens = reference_loss(loaded, ids, role, LAYER, lambda a: a @ affine[0] + affine[1])
    zero, _ = reference_loss(loaded, ids, role, LAYER, lambda a: torch.zeros_like(a))
    assert transcoder.tokens == tokens == 22 + 14 + 22
    assert m["spliced_loss"] * tokens == pytest.approx(expected, rel=1e-5)
    assert m["zero_ablation_loss"] * tokens == pytest.approx(zero, rel=1e-5)
    assert sae.metrics("identity")["zero_ablation_loss"] == m["zero_ablation_loss"]  # one baseline for the layer
    assert m["clean_loss"] == sae.metrics("identity")["clean_loss"]
    assert abs(sae.metrics("identity")["delta_loss"]) < 1e-6
    assert m["kl"] > 1e-4  # measured 5.7e-4: the map is not the MLP, and the KL sees it
    # Zeroing this random model's MLP lowers its loss, so the fraction recovered is only
    # checked against its definition.
    clean = m["clean_loss"] * tokens
    assert m["loss_recovered"] == pytest.approx((zero - expected) / (zero - clean), rel=1e-3)


def test_a_firing_transcoder_without_skip_is_spliced_from_the_mlp_input(loaded, batch, captured):
    ids, role = batch
    x, _, _ = captured
    arrays = random_transcoder(np.random.default_rng(2), x.shape[-1], 48, x.shape[-1], skip=False, scale=4.0)
    f = transcode({**arrays, "W_dec": np.eye(48, dtype=np.float32), "b_dec": np.zeros(48, np.float32)}, x)
    l0 = float(np.mean(np.sum(f[role == ROLE_TEXT] != 0, axis=-1)))
    assert 2 < l0 < 40  # latents do fire, not all of them
    (result,) = lm_metrics(loaded, [batch], {("mlp_in", LAYER, "mlp"): {
        "tc": released_reconstruction(arrays)}}).values()
    expected, tokens = reference_loss(loaded, ids, role, LAYER, lambda a: transcode(arrays, a))
    assert result.metrics("tc")["spliced_loss"] * tokens == pytest.approx(expected, rel=1e-5)


def test_splicing_from_a_source_replaces_exactly_the_target(loaded, batch, captured):
    """The next layer receives h + T(mlp_in) at TEXT positions and the clean input elsewhere."""
    ids, role = batch
    x, y, res = captured
    replacement = torch.as_tensor(np.random.default_rng(3).normal(size=y.shape[-1:] + (y.shape[-1],)))
    inputs = {}
    handle = loaded.decoder_layers[LAYER + 1].register_forward_pre_hook(
        lambda m, args: inputs.__setitem__("x", args[0].double().numpy()))
    try:
        with splice(loaded, "mlp", LAYER, lambda a: (a.double() @ replacement).float(), source="mlp_in",
                    positions=torch.as_tensor(role == ROLE_TEXT)), torch.inference_mode():
            loaded.model.model(input_ids=torch.as_tensor(ids), use_cache=False)
    finally:
        handle.remove()
    text = (role == ROLE_TEXT)[..., None]
    expected = np.where(text, res - y + x @ replacement.numpy(), res)
    np.testing.assert_allclose(inputs["x"], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(inputs["x"], res, atol=1e-3)


# --- metrics on stored rows ----------------------------------------------------------------

D, WIDTH, ROWS, HOLDOUT = 16, 64, 6000, 5000


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store with mlp_in and mlp at layer 0 where mlp depends on mlp_in (a synthetic model)."""
    run_dir = tmp_path_factory.mktemp("transcoders")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, D)) * 2.0
    y = np.tanh(x @ rng.normal(size=(D, D)) / 2) * 3 + rng.normal(size=(ROWS, D)) * 0.1 + 0.5
    write_store(str(run_dir), {("mlp_in", 0): x.astype(np.float32), ("mlp", 0): y.astype(np.float32)})
    return run_dir


def numpy_metrics(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict:
    x, y = x.astype(np.float64), y.astype(np.float64)
    pre = x @ arrays["W_enc"].astype(np.float64) + arrays["b_enc"]
    f = pre * (pre > arrays["threshold"])
    y_hat = transcode(arrays, x)
    density = np.mean(f != 0, axis=0)
    return {"l0": np.mean(np.sum(f != 0, axis=1)), "mse": np.mean(np.sum((y - y_hat) ** 2, axis=1)),
            "fvu": np.sum((y - y_hat) ** 2) / np.sum((y - y.mean(0)) ** 2), "dead_fraction": np.mean(density == 0),
            "dense_fraction": np.mean(density > 0.1), "density": density}


@pytest.mark.parametrize("skip", [False, True])
def test_activation_metrics_score_the_prediction_against_the_target_rows(stored, skip):
    store = ActivationStore.open(str(stored))
    arrays = random_transcoder(np.random.default_rng(4), D, WIDTH, D, skip=skip, scale=2.0)
    arrays["threshold"][:3] = NEVER  # three dead latents
    start = ROWS - HOLDOUT  # 5000 rows: two blocks of the reader
    got = activation_metrics(store, "mlp_in", 0, start, ROWS, {"tc": arrays}, 0.1, target="mlp")["tc"]
    x = np.asarray(store.read("mlp_in", 0, start, ROWS))
    y = np.asarray(store.read("mlp", 0, start, ROWS))
    expected = numpy_metrics(arrays, x, y)
    assert got["eval_rows"] == HOLDOUT
    for key in ("l0", "mse", "fvu"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert got["dead_fraction"] == expected["dead_fraction"] >= 3 / WIDTH
    assert got["dense_fraction"] == expected["dense_fraction"] > 0
    density = expected["density"]
    counts, _ = np.histogram(np.log10(density[density > 0]), bins=np.linspace(-8, 0, 33))
    assert got["density_histogram"]["counts"] == counts.tolist()
    # Scored as an SAE of mlp_in instead (no target), the same arrays give another FVU.
    as_sae = activation_metrics(store, "mlp_in", 0, start, ROWS, {"tc": arrays}, 0.1)["tc"]
    assert as_sae["fvu"] != pytest.approx(got["fvu"], rel=1e-2)


# --- catalog and export of finished transcoder jobs --------------------------------------

L0 = {"w64-s0.001": 120.2, "w64-s0.01": 31.0, "w64-s0.001-skip": 80.4, "w64-s0.01-skip": 20.7,
      "mlp:w64-s0.001": 99.0}


def transcoder_config(run_dir) -> Config:
    train = TrainConfig(tokens=2048, batch_size=256, holdout_rows=HOLDOUT)
    return Config(run_dir=str(run_dir), harvest=HarvestConfig(sites=("mlp_in", "mlp"), layers=(0,)), train=train,
                  eval=EvalConfig(sequences=2, batch_size=2),
                  saes=(SAEGridEntry(sites=("mlp_in",), target="mlp", layers=(0,), widths=(WIDTH,),
                                     sparsity=(1e-3, 1e-2)),
                        SAEGridEntry(sites=("mlp_in",), target="mlp", skip=True, layers=(0,), widths=(WIDTH,),
                                     sparsity=(1e-3, 1e-2)),
                        SAEGridEntry(sites=("mlp",), layers=(0,), widths=(WIDTH,), sparsity=(1e-3,))))


def write_finished_jobs(config: Config, store: ActivationStore, make_arrays, *, metrics: dict | None = None
                        ) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every job of the config as the trainer leaves it: saes/<name>/params.npz and sae.json,
    then done.json; with `metrics` (name -> L0), a metrics.json as if eval had run."""
    written = {}
    for job in plan_jobs(config, store.model_info()):
        directory = Path(config.run_dir) / "train" / job.id
        for spec in job.saes:
            d_out = store.d_in[(spec.target, spec.layer)]
            arrays = make_arrays(spec, d_out)
            sae_dir = directory / "saes" / spec.name
            sae_dir.mkdir(parents=True)
            (sae_dir / "params.npz").write_bytes(params_npz_bytes(arrays, d_out=d_out))
            (sae_dir / "sae.json").write_text(json.dumps({
                "site": spec.site, "layer": spec.layer, "width": spec.width, "sparsity": spec.sparsity,
                "d_in": job.d_in, "scale": 1.0, "steps": 8, "target": spec.target, "skip": spec.skip}))
            if metrics is not None:
                key = spec.name if spec.transcoder else f"{spec.site}:{spec.name}"
                (sae_dir / "metrics.json").write_text(json.dumps({
                    "site": spec.site, "layer": spec.layer, "name": spec.name, "l0": metrics[key], "fvu": 0.2,
                    "sparsity": spec.sparsity, "width": spec.width}))
            written[(job.id, spec.name)] = arrays
        (directory / "done.json").write_text(json.dumps({"saes": [s.name for s in job.saes], "steps": 8}))
    return written


@pytest.fixture(scope="module")
def exported(stored, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(stored, run_dir)
    config = transcoder_config(run_dir)
    store = ActivationStore.open(str(run_dir))
    rng = np.random.default_rng(5)
    written = write_finished_jobs(config, store, lambda spec, d_out: random_transcoder(
        rng, D, spec.width, d_out, skip=spec.skip), metrics=L0)
    line = run_export(config)
    return config, run_dir, written, line


def test_the_catalog_carries_target_skip_and_loads_transcoder_arrays(exported):
    config, run_dir, written, _ = exported
    saes = {(sae.job, sae.name): sae for sae in run_saes(config, ActivationStore.open(str(run_dir)))}
    assert sorted(saes) == sorted(written)
    for (job, name), sae in saes.items():
        transcoder = job == "mlp_in-L0-to-mlp-w64"
        assert sae.target == "mlp" and sae.transcoder == transcoder and sae.skip == name.endswith("-skip")
        assert sae.site == ("mlp_in" if transcoder else "mlp") and sae.d_out == D
        arrays = sae.released()
        assert sorted(arrays) == sorted(written[(job, name)])
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], written[(job, name)][key])
    # A skip transcoder whose params.npz lost W_skip is refused, not evaluated without it.
    sae = saes[("mlp_in-L0-to-mlp-w64", "w64-s0.01-skip")]
    with pytest.raises(UserError, match="lacks W_skip"):
        replace(sae, directory=saes[("mlp_in-L0-to-mlp-w64", "w64-s0.01")].directory).released()


def test_transcoders_are_released_in_folders_of_their_own(exported):
    _, run_dir, written, line = exported
    assert "5 SAEs" in line and "4 transcoders" in line
    index = {entry["name"] if entry["target"] == entry["site"] else entry["name"] + "@tc": entry
             for entry in json.loads((run_dir / "saes" / "index.json").read_text())["saes"]}
    expected_paths = {"w64-s0.001@tc": "saes/transcoders/layer_0/width_64/average_l0_120",
                      "w64-s0.01@tc": "saes/transcoders/layer_0/width_64/average_l0_31",
                      "w64-s0.001-skip@tc": "saes/skip_transcoders/layer_0/width_64/average_l0_80",
                      "w64-s0.01-skip@tc": "saes/skip_transcoders/layer_0/width_64/average_l0_21",
                      "w64-s0.001": "saes/mlp/layer_0/width_64/average_l0_99"}
    assert {key: entry["path"] for key, entry in index.items()} == expected_paths
    # Canonical per (kind, layer, width): each kind has its own L0-closest-to-100.
    assert sorted(key for key, entry in index.items() if entry["canonical"]) == [
        "w64-s0.001", "w64-s0.001-skip@tc", "w64-s0.001@tc"]
    for key, entry in index.items():
        transcoder = key.endswith("@tc")
        assert entry["target"] == "mlp" and entry["skip"] == entry["name"].endswith("-skip")
        assert entry["site"] == ("mlp_in" if transcoder else "mlp")
        data = (run_dir / entry["path"] / "params.npz").read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = sorted(archive.namelist())
        assert names == sorted(f"{k}.npy" for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
                               + (("W_skip",) if entry["skip"] else ()))
        job = "mlp_in-L0-to-mlp-w64" if transcoder else "mlp-L0-w64"
        arrays = read_params_npz(data, key, d_out=D)
        for name, array in written[(job, entry["name"])].items():
            np.testing.assert_array_equal(arrays[name], array)
        assert json.loads((run_dir / entry["path"] / "metrics.json").read_text())["target"] == "mlp"


def saelens_forward(tensors: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> np.ndarray:
    """SAELens's JumpReLU (skip) transcoder, as its classes compute it: ReLU(pre) masked by
    pre > threshold, decode, plus x @ W_skip.T for the skip kind (W_skip [d_out, d_in])."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    out = (np.maximum(pre, 0) * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    if cfg["architecture"] == "jumprelu_skip_transcoder":
        out = out + x @ t["W_skip"].T
    return out


def test_saelens_files_of_transcoders_follow_saelens_and_round_trip(exported, stored):
    config, run_dir, written, _ = exported
    index = json.loads((run_dir / "saes" / "index.json").read_text())["saes"]
    x = np.asarray(ActivationStore.open(str(stored)).read("mlp_in", 0, 0, 500), np.float64)
    for entry in (e for e in index if e["site"] == "mlp_in"):
        folder = run_dir / entry["saelens_path"]
        assert entry["saelens_path"].startswith("saelens/skip_transcoders/" if entry["skip"] else "saelens/transcoders/")
        cfg = json.loads((folder / "cfg.json").read_text())
        tensors = load_safetensors((folder / "sae_weights.safetensors").read_bytes())
        arrays = written[("mlp_in-L0-to-mlp-w64", entry["name"])]
        assert cfg["architecture"] == ("jumprelu_skip_transcoder" if entry["skip"] else "jumprelu_transcoder")
        assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (D, WIDTH, D)
        assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
        metadata = cfg["metadata"]
        assert metadata["hook_name"] == "blocks.0.ln2.hook_normalized"
        assert metadata["hook_name_out"] == "blocks.0.hook_mlp_out" and metadata["hook_layer_out"] == 0
        assert "hook_head_index_out" in metadata and metadata["hook_head_index_out"] is None
        assert sorted(tensors) == sorted(arrays)
        if entry["skip"]:
            assert tensors["W_skip"].shape == (D, D)
            np.testing.assert_array_equal(tensors["W_skip"], arrays["W_skip"].T)
        # SAELens's forward on its files equals ours on the params.npz (positive thresholds,
        # so its ReLU changes nothing).
        np.testing.assert_allclose(saelens_forward(tensors, cfg, x), transcode(arrays, x), rtol=1e-9, atol=1e-9)
        back, site, target, layer = read_saelens_transcoder((folder / "sae_weights.safetensors").read_bytes(),
                                                            (folder / "cfg.json").read_bytes(), str(folder))
        assert (site, target, layer) == ("mlp_in", "mlp", 0)
        assert sorted(back) == sorted(arrays)
        for name in arrays:
            np.testing.assert_array_equal(back[name], arrays[name])
        # SAELens's JumpReLU SAE importer refuses it rather than reading a transcoder as an SAE.
        with pytest.raises(UserError, match="only jumprelu SAEs can be imported"):
            read_saelens((folder / "sae_weights.safetensors").read_bytes(), (folder / "cfg.json").read_bytes(), "x")


def test_saelens_transcoder_with_a_wider_output():
    """d_out != d_in (SAELens allows it): shapes and the transpose follow d_out."""
    arrays = random_transcoder(np.random.default_rng(6), 8, 32, 12, skip=True)
    weights, cfg = saelens_files(arrays, site="mlp_in", layer=3, model_name="m", context_size=8, dataset="d",
                                 target="mlp")
    tensors = load_safetensors(weights)
    assert tensors["W_skip"].shape == (12, 8) and json.loads(cfg)["d_out"] == 12
    back, *where = read_saelens_transcoder(weights, cfg, "x")
    assert where == ["mlp_in", "mlp", 3]
    np.testing.assert_array_equal(back["W_skip"], arrays["W_skip"])


# --- end to end on a harvested tiny Gemma 2: eval, export, report -------------------------

E2E_OVERRIDES = [
    "harvest.sites=[mlp_in, mlp]", "harvest.layers=[1]", "harvest.max_tokens=3000",
    "saes=[{sites: [mlp_in], target: mlp, layers: [1], widths: [64], sparsity: [1.0e-3]},"
    " {sites: [mlp_in], target: mlp, skip: true, layers: [1], widths: [64], sparsity: [1.0e-3]},"
    " {sites: [mlp], layers: [1], widths: [64], sparsity: [1.0e-3]}]",
    "train.batch_size=256", "train.tokens=2048", "train.holdout_rows=1000",
    "eval.sequences=4", "eval.batch_size=2", "report.features=4", "report.examples=3",
]
TC_JOB, SAE_JOB = "mlp_in-L1-to-mlp-w64", "mlp-L1-w64"


@pytest.fixture(scope="module")
def evaluated(ray_address, tmp_path_factory):
    """Harvest mlp_in and mlp of layer 1, then three finished SAEs of layer 1 written by hand:
    an affine skip transcoder (never-firing latents, W_skip and b_dec fitted on the training
    rows), a firing transcoder without skip, and an mlp SAE; then `gemmascope eval`."""
    from gemmascope.config import load_config
    from gemmascope.eval.evaluate import run_eval
    from gemmascope.harvest.driver import run_harvest
    from tests.harvest_helpers import ROOT

    run_dir = tmp_path_factory.mktemp("e2e")
    config = load_config(ROOT / "configs" / "tiny-gemma2.yaml", [f"run_dir={run_dir}", *E2E_OVERRIDES])
    run_harvest(config, progress=False)
    store = ActivationStore.open(str(run_dir))
    train_rows = store.n_rows - 1000
    W_skip, b_dec = affine_fit(np.asarray(store.read("mlp_in", 1, 0, train_rows), np.float64),
                               np.asarray(store.read("mlp", 1, 0, train_rows), np.float64))
    rng = np.random.default_rng(7)

    def make(spec, d_out):
        if spec.skip:
            arrays = random_transcoder(rng, 64, spec.width, d_out, skip=True)
            return {**arrays, "threshold": np.full(spec.width, NEVER, np.float32),
                    "W_skip": W_skip.astype(np.float32), "b_dec": b_dec.astype(np.float32)}
        return random_transcoder(rng, 64, spec.width, d_out, skip=False, scale=4.0)

    written = write_finished_jobs(config, store, make)
    line = run_eval(config, progress=False)
    return config, run_dir, written, line


def metrics_of(run_dir, job: str, name: str) -> dict:
    return json.loads((run_dir / "train" / job / "saes" / name / "metrics.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_eval_measures_transcoders_against_the_target_rows_and_splices_them_for_the_mlp(evaluated):
    from gemmascope.eval.evaluate import heldout_batches

    config, run_dir, written, line = evaluated
    assert "3 SAEs" in line
    store = ActivationStore.open(str(run_dir))
    start = store.n_rows - 1000
    x = np.asarray(store.read("mlp_in", 1, start, store.n_rows), np.float64)
    y = np.asarray(store.read("mlp", 1, start, store.n_rows), np.float64)
    records = {key: metrics_of(run_dir, *key) for key in written}
    for (job, name), m in records.items():
        transcoder = job == TC_JOB
        expected = numpy_metrics(written[(job, name)], x if transcoder else y, y)
        for key in ("l0", "mse", "fvu", "dead_fraction", "dense_fraction"):
            assert m[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-9), (name, key)
        assert m["eval_rows"] == 1000 and m["site"] == ("mlp_in" if transcoder else "mlp")
        if transcoder:
            assert m["target"] == "mlp" and m["skip"] == name.endswith("-skip")
        else:
            assert "target" not in m and "skip" not in m
    # One clean and one zero-ablated pass for the layer's mlp, whichever stream replaces it.
    for key in ("clean_loss", "zero_ablation_loss", "eval_tokens"):
        assert len({m[key] for m in records.values()}) == 1, key
    assert 0 < records[(TC_JOB, "w64-s0.001")]["l0"] < 64

    # The affine skip transcoder against our own hooks over the same held-out sequences.
    affine = records[(TC_JOB, "w64-s0.001-skip")]
    arrays = written[(TC_JOB, "w64-s0.001-skip")]
    loaded = load_model(config.model)
    W, b = (torch.as_tensor(arrays[k], dtype=torch.float64) for k in ("W_skip", "b_dec"))
    total, tokens = 0.0, 0
    for ids, role in heldout_batches(config, store, start):
        loss, count = reference_loss(loaded, ids, role, 1, lambda a: a @ W + b)
        total, tokens = total + loss, tokens + count
    assert affine["eval_tokens"] == tokens and affine["eval_sequences"] == 4
    assert affine["spliced_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert affine["l0"] == 0 and affine["dead_fraction"] == 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_transcoders_are_exported_and_shown_as_their_own_streams(evaluated):
    import re

    from gemmascope.report.pages import run_report

    config, run_dir, written, _ = evaluated
    run_export(config)
    index = json.loads((run_dir / "saes" / "index.json").read_text())["saes"]
    assert sorted(e["path"].split("/average_l0_")[0] for e in index) == [
        "saes/mlp/layer_1/width_64", "saes/skip_transcoders/layer_1/width_64", "saes/transcoders/layer_1/width_64"]
    run_report(config, progress=False)
    html = (run_dir / "report" / "index.html").read_text()
    for stream in ("mlp_in-&gt;mlp L1 64", "mlp_in-&gt;mlp skip L1 64", "mlp L1 64"):
        assert f"<title>{stream}: L0" in html, stream
    pages = run_dir / "report" / "features"
    assert sorted(p.stem for p in pages.glob("*.html")) == [
        "mlp-L1-w64-s0.001", "mlp_in-to-mlp-L1-w64-s0.001", "mlp_in-to-mlp-L1-w64-s0.001-skip"]
    assert 'class="feature"' not in (pages / "mlp_in-to-mlp-L1-w64-s0.001-skip.html").read_text()  # none fire
    # The firing transcoder's latents: top activations over the held-out mlp_in rows, and the
    # logit effect of the W_dec row added to the residual stream (final norm, unembedding).
    page = (pages / "mlp_in-to-mlp-L1-w64-s0.001.html").read_text()
    shown = re.findall(r'id="latent-(\d+)".*?top activation ([^<]+)</p>.*?promotes: <code>[^<]*</code> ([+-][0-9.]+)',
                       page, flags=re.DOTALL)
    assert len(shown) == 4
    store = ActivationStore.open(str(run_dir))
    x = np.asarray(store.read("mlp_in", 1, store.n_rows - 1000, store.n_rows), np.float64)
    arrays = written[(TC_JOB, "w64-s0.001")]
    pre = x @ arrays["W_enc"].astype(np.float64) + arrays["b_enc"]
    latents = pre * (pre > arrays["threshold"])
    loaded = load_model(config.model)
    unembed = loaded.model.get_output_embeddings().weight.detach().double().numpy()
    final = 1.0 + loaded.model.model.norm.weight.detach().double().numpy()
    for latent, top, promoted in shown:
        assert top == f"{latents[:, int(latent)].max():.3g}"
        assert promoted == f"{(unembed @ (arrays['W_dec'][int(latent)] * final)).max():+.2f}"
