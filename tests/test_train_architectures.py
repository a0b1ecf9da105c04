"""SAE architectures beyond JumpReLU through config -> plan -> train -> export.

The math of each rule is tested against numpy references in test_architectures.py; here
the same rules run inside the grouped trainer, its checkpoints and its exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gemmascope.config import Config, SAEGridEntry, TrainConfig, load_config
from gemmascope.errors import ConfigError, UserError
from gemmascope.eval.activations import activation_metrics
from gemmascope.eval.catalog import run_saes
from gemmascope.eval.lm import released_reconstruction
from gemmascope.export.gemma_scope import read_params_npz
from gemmascope.export.release import run_export
from gemmascope.models.loading import ModelInfo
from gemmascope.store import ActivationStore
from gemmascope.store.synthetic import sparse_dictionary_data, write_store
from gemmascope.sweep.grid import plan_jobs
from gemmascope.train import arch
from gemmascope.train import trainer as trainer_module
from gemmascope.train.group import Group, init_state, member_steps
from gemmascope.train.release import release_decode, release_encode
from gemmascope.train.trainer import train_job
from tests.train_helpers import load_params

INFO = ModelInfo("test", "gemma2", 4, 64, 4, 16, 1000)


def _plan(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return plan_jobs(load_config(path), INFO)


def test_every_architecture_is_named_by_its_own_knob_and_shares_the_streams_job(tmp_path):
    jobs = _plan(tmp_path, """
saes:
  - {sites: [res], layers: [1], widths: [1024], sparsity: [1.0e-3]}
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [small, 45, big]}
  - {sites: [res], layers: [1], widths: [1024], architecture: topk, k: [32]}
  - {sites: [res], layers: [1], widths: [1024], architecture: batchtopk, k: [32]}
  - {sites: [res], layers: [1], widths: [1024], architecture: matryoshka_batchtopk, k: [16]}
  - {sites: [res], layers: [1], widths: [1024], architecture: relu_l1, sparsity: [0.01]}
""")
    (job,) = jobs
    assert job.id == "res-L1-w1k"  # the batch is read once for every architecture of the stream
    assert [s.name for s in job.saes] == ["w1024-s0.001", "w1024-l0_15", "w1024-l0_45", "w1024-l0_120",
                                          "w1024-k32", "w1024-btk32", "w1024-mbtk16", "w1024-l1_0.01"]
    assert [s.architecture for s in job.saes][:2] == ["jumprelu", "jumprelu_target_l0"]
    from gemmascope.sweep.plan import plan

    (entry,) = plan(load_config(tmp_path / "c.yaml"), INFO)["jobs"]
    assert entry["architectures"] == ["batchtopk", "jumprelu", "jumprelu_target_l0", "matryoshka_batchtopk",
                                      "relu_l1", "topk"]


def test_a_batchtopk_sae_that_never_kept_an_activation_is_refused_by_name(tmp_path):
    """No kept minimum was ever folded in (weight 0): exporting would write a NaN threshold."""
    from gemmascope.train import arch
    from gemmascope.train.group import Group
    from gemmascope.train.trainer import _write_sae

    job = _plan(tmp_path, "saes:\n  - {sites: [res], layers: [1], widths: [64], architecture: batchtopk, k: [4]}\n")[0]
    group = Group.of(64, [(64, 4.0)], ["batchtopk"])
    params = arch.init_sae(jax.random.key(0), 64, 64)
    with pytest.raises(UserError, match=r"res-L1-w64 w64-btk4: no batch kept a positive activation"):
        _write_sae(load_config(tmp_path / "c.yaml"), str(tmp_path / "job"), job, group, 0, params,
                   arch.ThresholdEstimate.zero(), 10, 1.0)
    assert not (tmp_path / "job").exists()


def test_a_label_and_its_number_are_the_same_sae(tmp_path):
    with pytest.raises(ConfigError, match=r"SAE w1024-l0_45 is already in saes\[0\]"):
        _plan(tmp_path, """
saes:
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [medium]}
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [45]}
""")


@pytest.mark.parametrize(("entry", "message"), [
    ("{architecture: topk}", r"saes\[0\].k=None: architecture topk needs k values"),
    ("{architecture: topk, k: [8], sparsity: [0.001]}", r"saes\[0\].sparsity=\[0.001\]: not a knob of "
                                                         r"architecture topk \(it takes k\)"),
    ("{k: [8]}", r"saes\[0\].k=\[8\]: not a knob of architecture jumprelu \(it takes sparsity\)"),
    ("{architecture: relu_l1}", r"saes\[0\].sparsity=None: architecture relu_l1 needs sparsity values"),
    ("{architecture: jumprelu_target_l0, l0_targets: [huge]}",
     r"saes\[0\].l0_targets=\['huge'\]: expected list of int \| 'small' \| 'medium' \| 'big'"),
    ("{architecture: jumprelu_target_l0, l0_targets: [0]}", r"saes\[0\].l0_targets\[0\]=0: must be >= 1"),
    ("{architecture: batchtopk, widths: [64], k: [65]}", r"saes\[0\].k\[0\]=65: more than the width 64"),
    ("{architecture: matryoshka_batchtopk, widths: [4], k: [2]}", r"saes\[0\].widths=\[4\]: matryoshka"),
    ("{architecture: topk, k: [8], init_from: /x}", r"saes\[0\].init_from='/x': a released JumpReLU SAE"),
    ("{architecture: sparse_magic}", r"saes\[0\].architecture='sparse_magic': expected 'jumprelu'"),
])
def test_missing_foreign_or_bad_knobs_are_one_line_errors_naming_the_key(tmp_path, entry, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"saes:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------
# The grouped step: each SAE gets jax.grad of its own arch.sae_loss
# ----------------------------------------------------------------------------------------

MIXED = Group.of(16, [(32, 1e-2), (32, 3.0), (32, 4.0), (32, 4.0), (32, 4.0), (32, 0.05)],
                 ["jumprelu", "jumprelu_target_l0", "topk", "batchtopk", "matryoshka_batchtopk", "relu_l1"])
STEP_CONFIG = TrainConfig(tokens=64 * 100, batch_size=64, shuffle_rows=64, lr=1e-3, threshold_init=0.05,
                          aux_k=8, matryoshka_levels=3, dead_window_tokens=64 * 3)


def test_group_gradients_are_jax_grad_of_each_architectures_own_loss():
    """The rules are rebuilt here from their knobs, not through the trainer's `rule`; the
    JumpReLU SAE's hand-written backward pass is held to autodiff of `arch.JumpReLU`.
    Some latents are dead, so AuxK takes part."""
    state = init_state(MIXED, STEP_CONFIG, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (64, 16)) * 0.25 + 0.1
    since_fired = tuple(jnp.where(jnp.arange(32) % 4 == 0, 10, 0).astype(jnp.int32) for _ in state.params)
    results = jax.jit(member_steps(MIXED, STEP_CONFIG))(state.params, since_fired, x, x, jnp.float32(1.0))
    dead = since_fired[0] >= 3
    aux = dict(aux_k=8, aux_coefficient=STEP_CONFIG.aux_coefficient)
    rules = [arch.JumpReLU(1e-2, STEP_CONFIG.bandwidth),
             arch.TargetL0JumpReLU(3.0, STEP_CONFIG.target_l0_coefficient, STEP_CONFIG.frequency_threshold,
                                   STEP_CONFIG.frequency_coefficient, STEP_CONFIG.bandwidth),
             arch.TopK(4, **aux), arch.BatchTopK(4, **aux), arch.MatryoshkaBatchTopK(4, (8, 16, 32), **aux),
             arch.ReLUL1(0.05)]
    for i, (result, rule_, params) in enumerate(zip(results, rules, state.params, strict=True)):
        loss_and_grad = jax.jit(jax.value_and_grad(partial(arch.sae_loss, rule_), has_aux=True))
        (loss, out), grads = loss_and_grad(params, x, dead)
        np.testing.assert_allclose(result.loss, loss, rtol=1e-6)
        np.testing.assert_allclose(result.l0, out.l0, rtol=1e-6)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"):
            got, expected = getattr(result.grads, name), getattr(grads, name)
            assert (got is None) == (expected is None) == (name == "log_threshold" and i >= 2), (i, name)
            if got is not None:
                np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * float(jnp.abs(expected).max()),
                                           err_msg=f"{MIXED.name(i)} {name}")
        if MIXED.architecture(i) in ("topk", "batchtopk", "matryoshka_batchtopk"):
            assert "auxk" in result.terms and float(result.terms["auxk"]) > 0, MIXED.name(i)


# ----------------------------------------------------------------------------------------
# End to end: one job, every architecture, on a known sparse dictionary
# ----------------------------------------------------------------------------------------

JOB = "res-L0-w128"
HELDOUT = 4096
TRUE_L0 = 3  # atoms active per row of sparse_dictionary_data


def _entry(architecture: str, **knob) -> SAEGridEntry:
    return SAEGridEntry(sites=("res",), layers=(0,), widths=(128,), architecture=architecture, **knob)


def _mixed_config(run_dir, steps: int, **train) -> Config:
    settings = dict(batch_size=512, lr=3e-3, lr_warmup_steps=20,
                    sparsity_warmup_steps=max(1, steps // 4), threshold_lr=1e-2, norm_sample_rows=4096,
                    shuffle_rows=8192, checkpoint_every=10**6, log_every=20,
                    dead_window_tokens=10**5, holdout_rows=HELDOUT, aux_k=16)
    settings.update(train)
    settings["tokens"] = steps * settings["batch_size"]
    saes = (_entry("jumprelu", sparsity=(0.03,)), _entry("jumprelu_target_l0", l0_targets=(TRUE_L0,)),
            _entry("batchtopk", k=(TRUE_L0,)), _entry("topk", k=(TRUE_L0,)), _entry("relu_l1", sparsity=(0.1,)),
            _entry("matryoshka_batchtopk", k=(TRUE_L0,)))
    return Config(run_dir=str(run_dir), saes=saes, train=TrainConfig(**settings))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixed")
    rows, _ = sparse_dictionary_data(32768, 32, 64, TRUE_L0, seed=0)
    write_store(str(run_dir), {("res", 0): rows})
    train_job(_mixed_config(run_dir, 1600), JOB, progress=False)
    records = [json.loads(line) for line in (run_dir / "train" / JOB / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows[-HELDOUT:], records


def _sae_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "train" / JOB / "saes" / name


def _released(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    return load_params(run_dir, name, JOB)


def _heldout_fvu(x: np.ndarray, released: dict, k: int | None = None) -> tuple[float, float]:
    """(L0, FVU) of released arrays on raw held-out rows."""
    f = release_encode(released, x, k)
    error = np.sum((x - release_decode(released, f)) ** 2)
    return float((f != 0).sum(axis=1).mean()), float(error / np.sum((x - x.mean(axis=0)) ** 2))


def test_every_architecture_trains_in_one_job(mixed):
    run_dir, _, records = mixed
    names = ["w128-s0.03", "w128-l0_3", "w128-k3", "w128-btk3", "w128-mbtk3", "w128-l1_0.1"]  # plan order
    assert json.loads((run_dir / "train" / JOB / "done.json").read_text())["saes"] == names
    for name in names:
        mine = [r for r in records if r["sae"] == name]
        first, last = mine[0], mine[-1]
        assert last["fvu"] < 0.5 * first["fvu"] and last["fvu"] < 0.2, (name, first["fvu"], last["fvu"])
    final = {r["sae"]: r for r in records[-6:]}
    assert final["w128-btk3"]["threshold"] > 0 and "auxk" in final["w128-k3"]
    assert final["w128-l0_3"]["l0_target"] == TRUE_L0 and final["w128-mbtk3"]["k"] == TRUE_L0
    assert final["w128-s0.03"]["lambda"] == 0.03 and "threshold" not in final["w128-s0.03"]


def test_target_l0_lands_within_10_percent_of_its_target(mixed):
    run_dir, heldout, _ = mixed
    l0, fvu = _heldout_fvu(heldout, _released(run_dir, "w128-l0_3"))
    assert abs(l0 / TRUE_L0 - 1) < 0.1, l0
    assert fvu < 0.2, fvu
    record = json.loads((_sae_dir(run_dir, "w128-l0_3") / "sae.json").read_text())
    assert record["architecture"] == "jumprelu_target_l0" and record["l0_target"] == TRUE_L0


@pytest.mark.parametrize("name", ["w128-btk3", "w128-mbtk3"])
def test_batchtopk_exported_as_jumprelu_keeps_its_batch_rules_l0(mixed, name):
    """On held-out rows the batch rule keeps exactly B*k activations; the exported global
    threshold must keep about as many, row by row on its own."""
    run_dir, heldout, _ = mixed
    released = _released(run_dir, name)
    assert np.unique(released["threshold"]).size == 1  # one global threshold, at released scale
    record = json.loads((_sae_dir(run_dir, name) / "sae.json").read_text())
    assert record["threshold"] == pytest.approx(float(released["threshold"][0]), rel=1e-6)
    pre = heldout @ released["W_enc"] + released["b_enc"]
    batch_rule = np.sort(np.maximum(pre, 0).ravel())[::-1][: len(heldout) * TRUE_L0]
    assert (batch_rule > 0).all()  # the batch rule's L0 is exactly k here
    l0, fvu = _heldout_fvu(heldout, released)
    assert abs(l0 / TRUE_L0 - 1) < 0.1, (l0, released["threshold"][0], batch_rule[-1])
    assert fvu < 0.2, fvu


def test_topk_is_exported_for_saelens_with_its_k_and_relu_l1_as_threshold_zero(mixed):
    run_dir, heldout, _ = mixed
    topk = _sae_dir(run_dir, "w128-k3")
    assert not (topk / "params.npz").exists()
    cfg = json.loads((topk / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == TRUE_L0
    weights = load_file(str(topk / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    l0, fvu = _heldout_fvu(heldout, weights, k=TRUE_L0)
    assert l0 <= TRUE_L0 and fvu < 0.2, (l0, fvu)
    assert json.loads((topk / "sae.json").read_text())["format"] == "saelens"
    relu = _released(run_dir, "w128-l1_0.1")
    assert (relu["threshold"] == 0).all()
    f = release_encode(relu, heldout)
    np.testing.assert_array_equal(f, np.maximum(heldout @ relu["W_enc"] + relu["b_enc"], 0))


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, steps: int) -> None:
    """Stop the trainer like a killed process right after its `steps`-th step (nothing after
    the last committed checkpoint survives but what a kill would leave)."""
    seen = []

    def crash_point(name: str) -> None:
        seen.append(name)
        if name == "train.step" and seen.count(name) == steps:
            raise _Killed

    monkeypatch.setattr(trainer_module, "crash_point", crash_point)


def _outputs(run_dir: Path) -> dict[str, bytes]:
    """Every exported file, and the log without its timings."""
    job = run_dir / "train" / JOB
    files = {str(p.relative_to(job)): p.read_bytes() for p in sorted((job / "saes").rglob("*")) if p.is_file()}
    timings = ("tokens_per_s", "loader_read_mib_s")
    records = [{k: v for k, v in json.loads(line).items() if k not in timings}
               for line in (job / "metrics.jsonl").read_text().splitlines()]
    return {**files, "metrics": json.dumps(records).encode()}


def test_a_killed_mixed_job_resumes_bit_identical(tmp_path, monkeypatch):
    """No JumpReLU: AuxK's dead counters, the BatchTopK threshold estimates and the Adam
    state of threshold-free parameters all go through the checkpoint."""
    saes = (_entry("jumprelu_target_l0", l0_targets=("small",)), _entry("topk", k=(4,)), _entry("batchtopk", k=(4,)),
            _entry("matryoshka_batchtopk", k=(4,)), _entry("relu_l1", sparsity=(0.05,)))
    rows, _ = sparse_dictionary_data(16384, 32, 64, TRUE_L0, seed=1)
    results = []
    for name, kill in (("straight", None), ("killed", 130)):
        run_dir = tmp_path / name
        write_store(str(run_dir), {("res", 0): rows})
        config = dataclasses.replace(_mixed_config(run_dir, 200, batch_size=256, checkpoint_every=50, log_every=25,
                                                   dead_window_tokens=256 * 20, holdout_rows=1024), saes=saes)
        if kill:
            _kill_after(monkeypatch, kill)
            with pytest.raises(_Killed):
                train_job(config, JOB, progress=False)
            monkeypatch.undo()
        result = train_job(config, JOB, progress=False)
        assert result.steps_run == (200 - 100 if kill else 200)  # resumed from the checkpoint at step 100
        results.append(_outputs(run_dir))
    straight, resumed = results
    assert sorted(straight) == sorted(resumed) and len(straight) > 10
    for name in straight:
        assert straight[name] == resumed[name], name


def test_eval_and_export_take_every_architecture(mixed, caplog):
    """Eval measures TopK with its k and BatchTopK through its exported threshold; export
    puts JumpReLU-shaped SAEs in the Gemma Scope tree and TopK in the SAELens tree only."""
    run_dir, heldout, _ = mixed
    config = _mixed_config(run_dir, 1600)
    store = ActivationStore.open(str(run_dir))
    saes = {sae.name: sae for sae in run_saes(config, store)}
    assert saes["w128-k3"].k == TRUE_L0 and saes["w128-btk3"].k is None
    released = {name: sae.released() for name, sae in saes.items()}
    measured = activation_metrics(store, "res", 0, store.n_rows - HELDOUT, store.n_rows, released, 0.1,
                                  topk={"w128-k3": TRUE_L0})
    for name, metrics in measured.items():
        l0, fvu = _heldout_fvu(heldout, released[name], saes[name].k)
        assert metrics["l0"] == pytest.approx(l0) and metrics["fvu"] == pytest.approx(fvu, rel=1e-4), name
    x = torch.from_numpy(heldout[:64])
    for name in ("w128-k3", "w128-btk3"):  # the splice's torch reconstruction is the numpy one
        expected = release_decode(released[name], release_encode(released[name], heldout[:64], saes[name].k))
        got = released_reconstruction(released[name], saes[name].k)(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    for name, sae in saes.items():
        record = {"l0": measured[name]["l0"], "fvu": measured[name]["fvu"], "name": name,
                  "architecture": sae.architecture}
        (Path(sae.directory) / "metrics.json").write_text(json.dumps(record))
    with caplog.at_level(logging.INFO, logger="gemmascope.export"):
        line = run_export(config)
    assert "6 SAEs" in line and "1 TopK in SAELens format only" in line
    assert "w128-k3 is TopK (k=3)" in caplog.text
    index = {entry["name"]: entry for entry in json.loads((run_dir / "saes" / "index.json").read_text())["saes"]}
    assert index["w128-k3"]["path"] is None and not index["w128-k3"]["canonical"]
    cfg = json.loads((run_dir / index["w128-k3"]["saelens_path"] / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == TRUE_L0
    for name in ("w128-s0.03", "w128-l0_3", "w128-btk3", "w128-mbtk3", "w128-l1_0.1"):
        assert index[name]["canonical"]  # the only SAE of its architecture at this width
        exported = read_params_npz((run_dir / index[name]["path"] / "params.npz").read_bytes(), name)
        assert all(np.array_equal(exported[key], released[name][key]) for key in exported)
    assert len(list((run_dir / "saes").rglob("params.npz"))) == 5
