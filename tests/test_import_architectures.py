"""`gemmascope import` of SAEs that are not plain JumpReLU SAEs: SAELens "standard" (ReLU) and
"topk" SAEs, SAELens JumpReLU (skip) transcoders, and Gemma Scope transcoder folders.

References are independent of the code under test: the SAELens files are written here by
hand (safetensors + json from known arrays, W_skip as SAELens keeps it, [d_out, d_in]), the
Gemma Scope params.npz with np.savez, and the expected latents, outputs and metrics are
computed in numpy from SAELens's definitions (standard: relu(x' @ W_enc + b_enc) with
x' = x - b_dec when apply_b_dec_to_input; topk: each row's k largest pre-activations, then
ReLU; JumpReLU transcoder: relu(pre) * (pre > threshold) @ W_dec + b_dec (+ x @ W_skip.T)).
What is checked is what eval uses: the catalog's RunSAE, its arrays, `activation_metrics`
and `released_reconstruction`; and, end to end on a harvested tiny Gemma 2, `eval` itself.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from gemmascope.cli import main
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.eval.activations import activation_metrics
from gemmascope.eval.catalog import imported_saes
from gemmascope.eval.lm import released_reconstruction
from gemmascope.export.importers import load_released, run_import
from gemmascope.store import ActivationStore
from gemmascope.store.synthetic import write_store
from tests.lm_reference import hooked_loss

D, WIDTH, ROWS, LAYER, K = 16, 32, 3000, 1, 5
HOOKS = {"res": f"blocks.{LAYER}.hook_resid_post", "mlp_in": f"blocks.{LAYER}.ln2.hook_normalized",
         "mlp": f"blocks.{LAYER}.hook_mlp_out"}


# --- files written by hand, and SAELens's definitions in numpy -------------------------------

def random_sae(rng, d_in: int = D, d_sae: int = WIDTH, d_out: int | None = None, *, skip: bool = False,
               threshold: bool = False) -> dict[str, np.ndarray]:
    """Arrays with a large b_dec (so applying it to the input or not matters) and mixed-sign
    pre-activations (so ReLU matters)."""
    d_out = d_in if d_out is None else d_out
    arrays = {"W_enc": rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in), "W_dec": rng.normal(size=(d_sae, d_out)),
              "b_enc": rng.normal(size=d_sae) * 0.3, "b_dec": rng.normal(size=d_out) * 2.0}
    if threshold:
        arrays["threshold"] = rng.uniform(0.1, 1.0, size=d_sae)
    if skip:
        arrays["W_skip"] = rng.normal(size=(d_out, d_in)) * 0.3  # SAELens: [d_out, d_in]
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def saelens_folder(folder: Path, tensors: dict[str, np.ndarray], cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def standard_cfg(site: str, *, apply_b_dec: bool = True, **extra) -> dict:
    return {"architecture": "standard", "d_in": D, "d_sae": WIDTH, "dtype": "float32",
            "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
            "metadata": {"hook_name": HOOKS[site], "model_name": "gemma-2-2b"}, **extra}


def transcoder_cfg(skip: bool, d_out: int = D) -> dict:
    return {"architecture": "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder", "d_in": D,
            "d_sae": WIDTH, "d_out": d_out, "dtype": "float32", "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {"hook_name": HOOKS["mlp_in"], "hook_name_out": HOOKS["mlp"], "hook_layer_out": LAYER}}


def pre_activations(t: dict[str, np.ndarray], x: np.ndarray, apply_b_dec: bool) -> np.ndarray:
    t = {k: v.astype(np.float64) for k, v in t.items()}
    return ((x - t["b_dec"]) if apply_b_dec else x) @ t["W_enc"] + t["b_enc"]


def reference_standard(t, x, apply_b_dec: bool) -> tuple[np.ndarray, np.ndarray]:
    f = np.maximum(pre_activations(t, x, apply_b_dec), 0)
    return f, f @ t["W_dec"].astype(np.float64) + t["b_dec"]


def reference_topk(t, x, k: int, apply_b_dec: bool) -> tuple[np.ndarray, np.ndarray]:
    pre = pre_activations(t, x, apply_b_dec)
    f = np.zeros_like(pre)
    for row in range(len(pre)):
        kept = np.argsort(-pre[row], kind="stable")[:k]
        f[row, kept] = np.maximum(pre[row, kept], 0)
    return f, f @ t["W_dec"].astype(np.float64) + t["b_dec"]


def reference_saelens_transcoder(t, x) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's JumpReLU (skip) transcoder: no input bias; x @ W_skip.T on its [d_out, d_in] W_skip."""
    t64 = {k: v.astype(np.float64) for k, v in t.items()}
    pre = x @ t64["W_enc"] + t64["b_enc"]
    f = np.maximum(pre, 0) * (pre > t64["threshold"])
    y = f @ t64["W_dec"] + t64["b_dec"]
    return f, (y + x @ t64["W_skip"].T) if "W_skip" in t else y


def reference_gemma_scope_transcoder(a, x) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md 5 on a Gemma Scope params.npz: W_skip [d_in, d_out] there."""
    a64 = {k: v.astype(np.float64) for k, v in a.items()}
    pre = x @ a64["W_enc"] + a64["b_enc"]
    f = pre * (pre > a64["threshold"])
    y = f @ a64["W_dec"] + a64["b_dec"]
    return f, (y + x @ a64["W_skip"]) if "W_skip" in a else y


def expected_metrics(f: np.ndarray, y_hat: np.ndarray, y: np.ndarray) -> dict:
    error = np.sum((y - y_hat) ** 2)
    return {"l0": np.mean(np.sum(f != 0, axis=1)), "mse": error / len(y),
            "fvu": error / np.sum((y - y.mean(0)) ** 2)}


def savez_release(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (folder / "params.npz").write_bytes(buffer.getvalue())
    return folder


# --- a synthetic run with res, mlp_in and mlp at layer 1 ------------------------------------

@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("imports") / "run"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, D)) * 2.0
    y = np.tanh(x @ rng.normal(size=(D, D)) / 2) * 3 + rng.normal(size=(ROWS, D)) * 0.1 + 0.5
    res = rng.normal(size=(ROWS, D)) * 1.5 + 1.0
    write_store(str(run_dir), {("res", LAYER): res.astype(np.float32), ("mlp_in", LAYER): x.astype(np.float32),
                               ("mlp", LAYER): y.astype(np.float32)})
    return run_dir


@pytest.fixture
def run(stored, tmp_path) -> tuple[Config, Path]:
    """A fresh copy of the run's store for each test (imports write under RUN/imported)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(stored, run_dir)
    return Config(run_dir=str(run_dir)), run_dir


def rows(run_dir: Path, site: str) -> np.ndarray:
    return np.asarray(ActivationStore.open(str(run_dir)).read(site, LAYER, 0, ROWS), np.float64)


def the_import(config: Config, name: str):
    (sae,) = [s for s in imported_saes(config) if s.name == name]
    return sae


def measured(run_dir: Path, sae) -> dict:
    """What eval measures on the stored rows, from the catalog's RunSAE as eval builds it."""
    store = ActivationStore.open(str(run_dir))
    topk = {sae.directory: sae.k} if sae.k is not None else None
    return activation_metrics(store, sae.site, sae.layer, 0, ROWS, {sae.directory: sae.released()}, 0.1, topk,
                              target=sae.target)[sae.directory]


def reconstruct(sae, x: np.ndarray) -> np.ndarray:
    """What eval splices into the model, from the catalog's RunSAE."""
    return released_reconstruction(sae.released(), sae.k)(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def assert_matches(got: dict, expected: dict) -> None:
    for key in ("l0", "mse", "fvu"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


# --- SAELens standard (ReLU) -----------------------------------------------------------------

@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_a_standard_sae_is_imported_as_relu(run, tmp_path, apply_b_dec):
    config, run_dir = run
    t = random_sae(np.random.default_rng(1))
    source = saelens_folder(tmp_path / "standard", t, standard_cfg("res", apply_b_dec=apply_b_dec))
    line = run_import(config, str(source), name="relu")
    assert "ReLU SAE" in line
    record = json.loads((run_dir / "imported" / "relu" / "imported.json").read_text())
    assert record["architecture"] == "relu" and (record["site"], record["layer"], record["width"]) == ("res", 1, 32)
    assert "k" not in record and "target" not in record
    sae = the_import(config, "relu")
    assert (sae.architecture, sae.k, sae.transcoder, sae.skip) == ("relu", None, False, False)
    arrays = sae.released()
    assert sorted(arrays) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert np.all(arrays["threshold"] == 0)  # JumpReLU at threshold 0 is ReLU
    x = rows(run_dir, "res")
    f, x_hat = reference_standard(t, x, apply_b_dec)
    assert 0 < np.mean(f > 0) < 1  # ReLU cuts some, not all
    got = measured(run_dir, sae)
    assert_matches(got, expected_metrics(f, x_hat, x))
    np.testing.assert_allclose(reconstruct(sae, x[:200]), x_hat[:200], rtol=1e-4, atol=1e-3)
    # The other reading of apply_b_dec_to_input gives other numbers: the flag is honoured.
    _, other = reference_standard(t, x, not apply_b_dec)
    assert got["mse"] != pytest.approx(expected_metrics(f, other, x)["mse"], rel=1e-2)


def test_an_older_saelens_cfg_without_architecture_is_a_standard_sae(run, tmp_path):
    config, run_dir = run
    t = random_sae(np.random.default_rng(2))
    cfg = standard_cfg("res")
    del cfg["architecture"], cfg["apply_b_dec_to_input"]  # SAELens's defaults: standard, True
    cfg["activation_fn_str"] = "relu"
    run_import(config, str(saelens_folder(tmp_path / "old", t, cfg)), name="old")
    sae = the_import(config, "old")
    x = rows(run_dir, "res")
    assert sae.architecture == "relu"
    assert_matches(measured(run_dir, sae), expected_metrics(*reference_standard(t, x, True), x))


# --- SAELens topk ------------------------------------------------------------------------------

def test_a_topk_sae_keeps_its_saelens_files_and_is_measured_with_its_k(run, tmp_path):
    config, run_dir = run
    t = random_sae(np.random.default_rng(3))
    source = saelens_folder(tmp_path / "topk", t, standard_cfg("res", architecture="topk", k=K))
    line = run_import(config, str(source))
    assert f"TopK SAE (k={K}" in line
    (folder,) = (run_dir / "imported").iterdir()
    assert folder.name.startswith(f"res-L1-w32-k{K}-")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "imported.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["apply_b_dec_to_input"] is False
    record = json.loads((folder / "imported.json").read_text())
    assert record["architecture"] == "topk" and record["k"] == K
    sae = the_import(config, folder.name)
    assert (sae.architecture, sae.k) == ("topk", K)
    x = rows(run_dir, "res")
    f, x_hat = reference_topk(t, x, K, apply_b_dec=True)
    got = measured(run_dir, sae)
    assert_matches(got, expected_metrics(f, x_hat, x))
    assert got["l0"] <= K and got["l0"] > K - 1  # a few rows have fewer than k positive
    np.testing.assert_allclose(reconstruct(sae, x[:200]), x_hat[:200], rtol=1e-4, atol=1e-3)
    assert np.mean(np.sum(reference_standard(t, x, True)[0] > 0, axis=1)) > 2 * K  # k is what keeps it sparse


def test_an_older_saelens_topk_as_a_standard_sae_with_activation_kwargs(run, tmp_path):
    config, run_dir = run
    t = random_sae(np.random.default_rng(4))
    cfg = standard_cfg("res", apply_b_dec=False, activation_fn_str="topk", activation_fn_kwargs={"k": 3})
    run_import(config, str(saelens_folder(tmp_path / "old-topk", t, cfg)), name="old-topk")
    sae = the_import(config, "old-topk")
    x = rows(run_dir, "res")
    assert (sae.architecture, sae.k) == ("topk", 3)
    assert_matches(measured(run_dir, sae), expected_metrics(*reference_topk(t, x, 3, apply_b_dec=False), x))


@pytest.mark.parametrize("k", [0, 33, 2.5, "8", None])
def test_a_topk_sae_needs_an_integer_k_within_its_width(run, tmp_path, k):
    config, run_dir = run
    cfg = standard_cfg("res", architecture="topk", k=k)
    if k is None:
        del cfg["k"]
    source = saelens_folder(tmp_path / "bad-k", random_sae(np.random.default_rng(5)), cfg)
    with pytest.raises(UserError, match=f"{source}: k=.*integer k from 1 to its width 32"):
        run_import(config, str(source))
    assert not (run_dir / "imported").exists()


# --- transcoders -------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_a_saelens_jumprelu_transcoder_is_measured_against_the_target_rows(run, tmp_path, skip):
    config, run_dir = run
    t = random_sae(np.random.default_rng(6), threshold=True, skip=skip)
    source = saelens_folder(tmp_path / "tc", t, transcoder_cfg(skip))
    line = run_import(config, str(source))
    assert ("skip transcoder (mlp_in -> mlp)" if skip else "transcoder (mlp_in -> mlp)") in line
    (folder,) = (run_dir / "imported").iterdir()
    assert folder.name.startswith("mlp_in-to-mlp-L1-w32-" + ("skip-" if skip else ""))
    record = json.loads((folder / "imported.json").read_text())
    assert (record["site"], record["target"], record["skip"], record["d_out"]) == ("mlp_in", "mlp", skip, D)
    sae = the_import(config, folder.name)
    assert (sae.site, sae.target, sae.skip, sae.d_out, sae.transcoder) == ("mlp_in", "mlp", skip, D, True)
    x, y = rows(run_dir, "mlp_in"), rows(run_dir, "mlp")
    f, y_hat = reference_saelens_transcoder(t, x)
    got = measured(run_dir, sae)
    assert_matches(got, expected_metrics(f, y_hat, y))
    np.testing.assert_allclose(reconstruct(sae, x[:200]), y_hat[:200], rtol=1e-4, atol=1e-3)
    if skip:  # W_skip as SAELens stores it, applied untransposed, would predict something else
        wrong = y_hat - x @ t["W_skip"].T.astype(np.float64) + x @ t["W_skip"].astype(np.float64)
        assert got["fvu"] != pytest.approx(expected_metrics(f, wrong, y)["fvu"], rel=1e-2)


@pytest.mark.parametrize("skip", [False, True])
def test_a_gemma_scope_transcoder_folder_reads_mlp_in_and_predicts_mlp(run, tmp_path, skip):
    config, run_dir = run
    a = random_sae(np.random.default_rng(7), threshold=True)
    if skip:
        a["W_skip"] = (np.random.default_rng(8).normal(size=(D, D)) * 0.3).astype(np.float32)  # ours: [d_in, d_out]
    kind = "skip_transcoders" if skip else "transcoders"
    source = savez_release(tmp_path / "release" / kind / "layer_1" / "width_32" / "average_l0_9", a)
    run_import(config, str(source), name="gs")  # no --site, --layer: the folders say
    sae = the_import(config, "gs")
    assert (sae.site, sae.layer, sae.target, sae.skip, sae.d_out) == ("mlp_in", 1, "mlp", skip, D)
    x, y = rows(run_dir, "mlp_in"), rows(run_dir, "mlp")
    f, y_hat = reference_gemma_scope_transcoder(a, x)
    assert_matches(measured(run_dir, sae), expected_metrics(f, y_hat, y))
    np.testing.assert_allclose(reconstruct(sae, x[:200]), y_hat[:200], rtol=1e-4, atol=1e-3)
    # A folder whose kind and params.npz disagree is refused, naming the file.
    other = "transcoders" if skip else "skip_transcoders"
    wrong = savez_release(tmp_path / "release" / other / "layer_1" / "width_32" / "average_l0_9", a)
    with pytest.raises(UserError, match=f"{wrong}/params.npz: a {other} folder, but params.npz "
                                        f"{'has' if skip else 'lacks'} W_skip"):
        run_import(config, str(wrong))


def test_a_gemma_scope_transcoder_whose_folders_do_not_say_takes_target(run, tmp_path):
    config, run_dir = run
    a = random_sae(np.random.default_rng(9), threshold=True)
    source = savez_release(tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_1" / "width_32" / "average_l0_9", a)
    with pytest.raises(UserError, match="pass --site and --layer"):
        run_import(config, str(source))
    assert main(["import", str(Path(__file__).parent.parent / "configs" / "tiny-gemma2.yaml"), f"run_dir={run_dir}",
                 "--source", str(source), "--site", "mlp_in", "--target", "mlp", "--name", "tc"]) == 0
    sae = the_import(config, "tc")
    assert (sae.site, sae.layer, sae.target, sae.skip) == ("mlp_in", 1, "mlp", False)
    x, y = rows(run_dir, "mlp_in"), rows(run_dir, "mlp")
    assert_matches(measured(run_dir, sae), expected_metrics(*reference_gemma_scope_transcoder(a, x), y))
    # --target is for params.npz: a SAELens SAE says itself what it is.
    saelens = saelens_folder(tmp_path / "std", random_sae(np.random.default_rng(1)), standard_cfg("mlp_in"))
    with pytest.raises(UserError, match="a SAELens relu SAE, not a transcoder"):
        run_import(config, str(saelens), target="mlp")


def test_transcoder_streams_and_widths_are_checked(run, tmp_path, tmp_path_factory):
    config, run_dir = run
    rng = np.random.default_rng(10)
    narrow = saelens_folder(tmp_path / "narrow", random_sae(rng, d_out=12, threshold=True, skip=True),
                            transcoder_cfg(True, d_out=12))
    with pytest.raises(UserError) as caught:
        run_import(config, str(narrow))
    assert str(caught.value) == (f"{narrow}/sae_weights.safetensors: d_out 12 (W_dec) does not match the store's "
                                 f"mlp L1 activations (16)")
    wide = savez_release(tmp_path / "x" / "transcoders" / "layer_1" / "width_32" / "average_l0_3",
                         random_sae(rng, d_in=12, threshold=True))
    with pytest.raises(UserError, match=f"{wide}/params.npz: d_in 12 \\(W_enc\\) does not match the store's "
                                        "mlp_in L1 activations \\(16\\)"):
        run_import(config, str(wide))
    # A run that harvested the input but not the target.
    only_input = tmp_path_factory.mktemp("only-input")
    write_store(str(only_input), {("mlp_in", LAYER): np.ones((512, D), np.float32)})
    source = saelens_folder(tmp_path / "tc", random_sae(rng, threshold=True), transcoder_cfg(False))
    with pytest.raises(UserError, match=f"{source}/sae_weights.safetensors: target site 'mlp' layer 1 was not "
                                        f"harvested into .*harvested: mlp_in L1"):
        run_import(Config(run_dir=str(only_input)), str(source))
    # A skip transcoder's params.npz cannot pose as an SAE of one site.
    skip = savez_release(tmp_path / "y", {**random_sae(rng, threshold=True), "W_skip": np.eye(D, dtype=np.float32)})
    with pytest.raises(UserError, match="has W_skip, so it is a skip transcoder, but reads and predicts mlp"):
        run_import(config, str(skip), site="mlp", layer=1, target="mlp")
    assert not (run_dir / "imported").exists()


# --- what cannot be imported -------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["gated", "batchtopk", "jumprelu_topk_mix", "transcoder"])
def test_other_architectures_are_one_line_errors_listing_what_is_supported(run, tmp_path, architecture):
    config, run_dir = run
    t = random_sae(np.random.default_rng(11))
    if architecture == "gated":
        t.update(r_mag=np.zeros(WIDTH, np.float32), b_gate=np.zeros(WIDTH, np.float32),
                 b_mag=np.zeros(WIDTH, np.float32))
    source = saelens_folder(tmp_path / architecture, t, standard_cfg("res", architecture=architecture, k=8))
    with pytest.raises(UserError) as caught:
        run_import(config, str(source))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"{source}: SAELens architecture {architecture!r} cannot be imported; supported: jumprelu, "
                       "standard, topk, jumprelu_transcoder, jumprelu_skip_transcoder")
    assert not (run_dir / "imported").exists()


def test_training_still_starts_only_from_jumprelu_saes(tmp_path):
    source = saelens_folder(tmp_path / "topk", random_sae(np.random.default_rng(12)),
                            standard_cfg("res", architecture="topk", k=K))
    with pytest.raises(UserError, match="a topk SAE; only a JumpReLU SAE can be used here"):
        load_released(str(source))
    assert load_released(str(source), every_kind=True).k == K
    transcoder = savez_release(tmp_path / "transcoders" / "layer_1" / "width_32" / "average_l0_4",
                               random_sae(np.random.default_rng(12), threshold=True))
    with pytest.raises(UserError, match=r"a transcoder \(mlp_in -> mlp\); only a JumpReLU SAE can be used here"):
        load_released(str(transcoder))


# --- idempotence -------------------------------------------------------------------------------

def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_importing_again_is_a_no_op_and_a_name_holds_one_sae(run, tmp_path):
    config, run_dir = run
    rng = np.random.default_rng(13)
    sources = {
        "relu": saelens_folder(tmp_path / "relu", random_sae(rng), standard_cfg("res")),
        "topk": saelens_folder(tmp_path / "topk", random_sae(rng), standard_cfg("res", architecture="topk", k=K)),
        "tc": saelens_folder(tmp_path / "tc", random_sae(rng, threshold=True, skip=True), transcoder_cfg(True)),
    }
    for source in sources.values():
        run_import(config, str(source))
    names = sorted(p.name for p in (run_dir / "imported").iterdir())
    assert len(names) == 3
    before = files_under(run_dir / "imported")
    for source in sources.values():
        assert "already in the run" in run_import(config, str(source))
    assert files_under(run_dir / "imported") == before
    # The default name is the stream's and the content's: another k is another SAE and name.
    t = random_sae(np.random.default_rng(14))
    for k in (4, 6):
        run_import(config, str(saelens_folder(tmp_path / f"k{k}", t, standard_cfg("res", architecture="topk", k=k))))
    assert len(list((run_dir / "imported").iterdir())) == 5
    # A different SAE under a taken name is refused, whatever the kinds.
    relu = next(n for n in names if n.startswith("res-") and "-k" not in n)
    topk = next(n for n in names if f"-k{K}-" in n)
    tc = next(n for n in names if n.startswith("mlp_in-to-mlp-L1-w32-skip-"))
    for name, other in ((topk, sources["relu"]), (relu, sources["topk"]), (tc, sources["topk"]),
                        (topk, tmp_path / "k4")):
        with pytest.raises(UserError, match=f"another SAE was imported under the name '{name}'"):
            run_import(config, str(other), name=name)
    after = files_under(run_dir / "imported")
    assert {path: data for path, data in after.items() if path.split("/")[0] in names} == before


# --- end to end: `gemmascope import` then `gemmascope eval` on a harvested tiny Gemma 2 -------

E2E_OVERRIDES = [
    "harvest.sites=[res, mlp_in, mlp]", "harvest.layers=[1]", "harvest.max_tokens=3000",
    "saes=[{sites: [res], layers: [1], widths: [64], sparsity: [1.0e-3]}]",
    "train.batch_size=256", "train.tokens=2048", "train.holdout_rows=1000",
    "eval.sequences=4", "eval.batch_size=2",
]
HOLDOUT, E2E_D = 1000, 64


def reference_spliced_loss(loaded, ids: np.ndarray, role: np.ndarray, predict, *, source=None, target=None):
    """Summed next-token loss (TEXT positions predicting TEXT/EOS) and its count, with `target`'s
    output (default: decoder layer 1's output, the `res` site) replaced at TEXT positions by
    predict(x), x that output itself or `source`'s output in the same pass: plain torch hooks."""
    from gemmascope.harvest.packing import ROLE_TEXT

    text = torch.as_tensor(role == ROLE_TEXT)
    seen = {}

    def keep(module, args, output):
        seen["x"] = output

    def swap(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        x = seen.pop("x") if source is not None else tensor
        new = torch.where(text[..., None], torch.as_tensor(predict(x.double().numpy())).to(tensor.dtype), tensor)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    hooks = [(target or loaded.decoder_layers[LAYER], swap)]
    return hooked_loss(loaded, ids, role, hooks + ([(source, keep)] if source is not None else []))


@pytest.fixture(scope="module")
def imported_and_evaluated(ray_address, tmp_path_factory):
    """Harvest res, mlp_in and mlp of layer 1; import with the CLI a SAELens standard SAE and a
    topk SAE of res, a SAELens JumpReLU skip transcoder and a Gemma Scope transcoders/ folder;
    then `gemmascope eval`."""
    from gemmascope.config import load_config
    from gemmascope.harvest.driver import run_harvest
    from tests.harvest_helpers import ROOT

    tmp = tmp_path_factory.mktemp("import-e2e")
    run_dir = tmp / "run"
    yaml = str(ROOT / "configs" / "tiny-gemma2.yaml")
    config = load_config(yaml, [f"run_dir={run_dir}", *E2E_OVERRIDES])
    run_harvest(config, progress=False)
    store = ActivationStore.open(str(run_dir))
    assert {store.d_in[(s, LAYER)] for s in ("res", "mlp_in", "mlp")} == {E2E_D}
    rng = np.random.default_rng(20)
    res_scale = float(np.sqrt(np.mean(np.asarray(store.read("res", LAYER, 0, 500), np.float64) ** 2)))
    standard = random_sae(rng, E2E_D, 128)
    standard["W_enc"] /= res_scale
    standard["W_dec"] *= res_scale * 0.05
    standard["b_dec"] *= res_scale * 0.05
    topk = {**standard, "b_enc": standard["b_enc"] + np.float32(0.5)}
    skip_tc = random_sae(rng, E2E_D, 128, threshold=True, skip=True)
    skip_tc["W_enc"] *= 4
    gemma_tc = random_sae(rng, E2E_D, 128, threshold=True)
    gemma_tc["W_enc"] *= 4
    sources = {
        "standard": saelens_folder(tmp / "standard", standard, {**standard_cfg("res"), "d_in": E2E_D, "d_sae": 128}),
        "topk": saelens_folder(tmp / "topk", topk, {**standard_cfg("res", architecture="topk", k=K),
                                                    "d_in": E2E_D, "d_sae": 128}),
        "skip_tc": saelens_folder(tmp / "skip_tc", skip_tc, {**transcoder_cfg(True, d_out=E2E_D), "d_in": E2E_D,
                                                             "d_sae": 128}),
        "gemma_tc": savez_release(tmp / "release" / "transcoders" / "layer_1" / "width_128" / "average_l0_20",
                                  gemma_tc),
    }
    for name, source in sources.items():
        assert main(["import", yaml, f"run_dir={run_dir}", *E2E_OVERRIDES, "--source", str(source),
                     "--name", name]) == 0
    from gemmascope.eval.evaluate import run_eval

    line = run_eval(config, progress=False)
    arrays = {"standard": standard, "topk": topk, "skip_tc": skip_tc, "gemma_tc": gemma_tc}
    return config, run_dir, arrays, line


def e2e_metrics(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "imported" / name / "metrics.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_imported_kinds_are_evaluated_as_what_they_are(imported_and_evaluated):
    from gemmascope.eval.evaluate import heldout_batches
    from gemmascope.models.loading import load_model

    config, run_dir, arrays, line = imported_and_evaluated
    assert "4 SAEs" in line
    store = ActivationStore.open(str(run_dir))
    start = store.n_rows - HOLDOUT
    held = {s: np.asarray(store.read(s, LAYER, start, store.n_rows), np.float64) for s in ("res", "mlp_in", "mlp")}
    references = {
        "standard": lambda x: reference_standard(arrays["standard"], x, True),
        "topk": lambda x: reference_topk(arrays["topk"], x, K, True),
        "skip_tc": lambda x: reference_saelens_transcoder(arrays["skip_tc"], x),
        "gemma_tc": lambda x: reference_gemma_scope_transcoder(arrays["gemma_tc"], x),
    }
    records = {name: e2e_metrics(run_dir, name) for name in references}
    for name, record in records.items():
        transcoder = name.endswith("_tc")
        x, y = (held["mlp_in"], held["mlp"]) if transcoder else (held["res"], held["res"])
        f, y_hat = references[name](x)
        expected = expected_metrics(f, y_hat, y)
        for key in ("l0", "mse", "fvu"):
            assert record[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (name, key)
        assert record["eval_rows"] == HOLDOUT and record["job"] == "imported" and record["sparsity"] is None
        assert 0 < record["l0"] < 128, name
    assert records["standard"]["architecture"] == "relu" and "k" not in records["standard"]
    assert records["topk"]["architecture"] == "topk" and records["topk"]["k"] == K
    assert K - 1 < records["topk"]["l0"] <= K
    for name, skip in (("skip_tc", True), ("gemma_tc", False)):
        m = records[name]
        assert (m["site"], m["target"], m["skip"], m["architecture"]) == ("mlp_in", "mlp", skip, "jumprelu")
    for name in ("standard", "topk"):
        assert "target" not in records[name] and records[name]["site"] == "res"
    for key in ("clean_loss", "eval_tokens"):
        assert len({m[key] for m in records.values()}) == 1, key

    # Spliced losses against our own hooks over the same held-out sequences: the ReLU SAE in
    # place of the layer's output, the skip transcoder in place of the MLP block's output.
    loaded = load_model(config.model)
    block = loaded.decoder_layers[LAYER]
    for name, hooks in (("standard", {}), ("topk", {}),
                        ("skip_tc", {"source": block.pre_feedforward_layernorm,
                                     "target": block.post_feedforward_layernorm})):
        total, tokens = 0.0, 0
        for ids, role in heldout_batches(config, store, start):
            flat = lambda x, name=name: references[name](x.reshape(-1, E2E_D))[1].reshape(x.shape)  # noqa: E731
            loss, count = reference_spliced_loss(loaded, ids, role, flat, **hooks)
            total, tokens = total + loss, tokens + count
        assert records[name]["eval_tokens"] == tokens
        assert records[name]["spliced_loss"] == pytest.approx(total / tokens, rel=1e-4), name


@pytest.mark.ray
@pytest.mark.slow
def test_imported_kinds_are_indexed_by_export_with_what_they_are(imported_and_evaluated):
    from gemmascope.export.release import run_export

    config, run_dir, _, _ = imported_and_evaluated
    assert "+ 4 imported" in run_export(config)
    index = {e["name"]: e for e in json.loads((run_dir / "saes" / "index.json").read_text())["saes"]}
    assert index["topk"]["k"] == K and index["standard"]["architecture"] == "relu"
    assert (index["skip_tc"]["target"], index["skip_tc"]["skip"]) == ("mlp", True)
    assert (index["gemma_tc"]["target"], index["gemma_tc"]["skip"]) == ("mlp", False)
    # A TopK import has no params.npz: the index points at its SAELens files, as for a trained one.
    assert (index["topk"]["path"], index["topk"]["saelens_path"]) == (None, "imported/topk")
    assert all(entry["path"] == f"imported/{name}" for name, entry in index.items() if name != "topk")
    from gemmascope.report.pages import run_report

    run_report(config, progress=False)
    page = (run_dir / "report" / "index.html").read_text()
    assert all(name in page for name in index)
