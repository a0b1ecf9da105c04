"""Transcoders and skip transcoders (SPEC.md 5) through the trainer: paired mlp_in -> mlp rows,
one input-derived constant, the release reparameterisation, resume, and the job record.

The reference is written from the equations in numpy: a released transcoder on raw x is
    pre = x @ W_enc + b_enc,  f = pre * (pre > threshold),  y_hat = f @ W_dec + b_dec (+ x @ W_skip)
and its errors are measured against the stored target rows, never through our own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.config import Config, HarvestConfig, SAEGridEntry, TrainConfig
from gemmascope.errors import UserError
from gemmascope.faults import CRASH_AT, CRASH_MARK
from gemmascope.store.synthetic import write_store
from gemmascope.train import arch
from gemmascope.train.group import Group, init_state, make_train_step
from gemmascope.train.release import to_release
from gemmascope.train.trainer import train_job
from tests.train_helpers import committed_steps, load_params, write_yaml

ROOT = Path(__file__).resolve().parent.parent
GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")
JOB = "mlp_in-L0-to-mlp-w128"
HELDOUT = 4096
LAMBDA = 1e-3


def transcoder_data(n_rows: int = 32768, d: int = 32, seed: int = 0):
    """x, and y = a sparse JumpReLU code of x (64 unit atoms, ~4.3 active per row) plus a dense
    linear map of x: a plain transcoder must spend latents on the linear part, a skip
    transcoder can put it in W_skip."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, d)).astype(np.float32) * 3
    encoder = rng.normal(size=(d, 64))
    encoder /= np.linalg.norm(encoder, axis=0)
    atoms = rng.normal(size=(64, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    linear = rng.normal(size=(d, d)) / np.sqrt(d) * 0.5
    pre = (x / 3) @ encoder - 1.5
    code = pre * (pre > 0)
    y = (code @ atoms * 12 + x @ linear).astype(np.float32)
    return x, y, linear, float((code > 0).sum(axis=1).mean())


def transcoder_config(run_dir, steps: int = 1000, **train) -> Config:
    settings = dict(tokens=steps * 1024, batch_size=1024, lr=3e-3, lr_warmup_steps=20,
                    sparsity_warmup_steps=steps // 4, threshold_lr=1e-2, norm_sample_rows=4096, shuffle_rows=8192,
                    checkpoint_every=10**6, log_every=steps // 4, dead_window_tokens=10**6, holdout_rows=HELDOUT)
    settings.update(train)
    block = SAEGridEntry(sites=("mlp_in",), layers=(0,), widths=(128,), sparsity=(LAMBDA,), target="mlp")
    return Config(run_dir=str(run_dir), harvest=HarvestConfig(sites=("mlp_in", "mlp"), layers=(0,)),
                  saes=(block, replace(block, skip=True)), train=TrainConfig(**settings))


def released_forward(arrays: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latents, prediction) of released transcoder arrays on raw x, in float64."""
    x = x.astype(np.float64)
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    f = pre * (pre > arrays["threshold"])
    y_hat = f @ arrays["W_dec"] + arrays["b_dec"]
    if "W_skip" in arrays:
        y_hat = y_hat + x @ arrays["W_skip"]
    return f, y_hat


def fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    y = y.astype(np.float64)
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("transcoders")
    x, y, linear, true_l0 = transcoder_data()
    write_store(str(run_dir), {("mlp_in", 0): x, ("mlp", 0): y})
    config = transcoder_config(run_dir)
    train_job(config, JOB, progress=False)
    saes = {name: load_params(run_dir, name, JOB) for name in (f"w128-s{LAMBDA:g}", f"w128-s{LAMBDA:g}-skip")}
    return {"run_dir": run_dir, "config": config, "x": x, "y": y, "linear": linear, "true_l0": true_l0, "saes": saes}


def test_skip_transcoder_finds_the_sparse_code_and_the_linear_map(trained):
    """Held-out rows, released arrays, numpy forward: the skip transcoder recovers the code's L0
    and the linear map; the plain one needs many more latents for a worse fit."""
    x, y = trained["x"][-HELDOUT:], trained["y"][-HELDOUT:]
    plain, skip = trained["saes"][f"w128-s{LAMBDA:g}"], trained["saes"][f"w128-s{LAMBDA:g}-skip"]
    assert sorted(plain) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert sorted(skip) == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc", "threshold"]
    f_skip, y_skip = released_forward(skip, x)
    f_plain, y_plain = released_forward(plain, x)
    l0_skip, l0_plain = (f_skip != 0).sum(axis=1).mean(), (f_plain != 0).sum(axis=1).mean()
    assert abs(l0_skip - trained["true_l0"]) / trained["true_l0"] < 0.25, (l0_skip, trained["true_l0"])
    skip_error = np.linalg.norm(skip["W_skip"] - trained["linear"]) / np.linalg.norm(trained["linear"])
    assert skip_error < 0.2, skip_error
    assert fvu(y, y_skip) < 0.08, fvu(y, y_skip)
    assert fvu(y, y_skip) < fvu(y, y_plain)
    assert l0_plain > 3 * l0_skip, (l0_plain, l0_skip)


def test_sae_json_and_job_record_name_the_target(trained):
    job_dir = trained["run_dir"] / "train" / JOB
    record = json.loads((job_dir / "saes" / f"w128-s{LAMBDA:g}-skip" / "sae.json").read_text())
    assert (record["site"], record["target"], record["d_in"], record["d_out"], record["skip"]) == \
        ("mlp_in", "mlp", 32, 32, True)
    # C is the input's: E||x / C||^2 = 1 over the sample, whatever the target's scale.
    x = trained["x"][: -HELDOUT]
    assert record["scale"] == pytest.approx(np.sqrt((x.astype(np.float64) ** 2).sum(axis=1).mean()), rel=0.05)
    # What a lambda means for a transcoder: its squared error is in units of E||y / C||^2.
    y = trained["y"][: -HELDOUT].astype(np.float64)
    expected = (y**2).sum(axis=1).mean() / (x.astype(np.float64) ** 2).sum(axis=1).mean()
    normalisation = json.loads((job_dir / "normalisation.json").read_text())
    assert normalisation["target_mean_square"] == pytest.approx(expected, rel=0.05)
    job = json.loads((job_dir / "job.json").read_text())
    assert (job["target"], job["d_out"]) == ("mlp", 32)
    assert job["saes"][1] == {"width": 128, "sparsity": LAMBDA, "skip": True}


def test_a_changed_grid_is_not_resumed_into_the_job(trained, tmp_path):
    """job.json belongs to one job: the same job id with another lambda for the skip transcoder is refused."""
    config = trained["config"]
    changed = replace(config, saes=config.saes[:1] + (replace(config.saes[1], sparsity=(2 * LAMBDA,)),))
    with pytest.raises(UserError, match="job was started with saes="):
        train_job(changed, JOB, progress=False)


def test_release_of_a_transcoder_equals_training_scale_times_c():
    """to_release(transcoder=True) on random params: the released forward on raw x equals C times
    the training-scale forward on x / C (no pre-encoder bias folded, W_skip unchanged)."""
    rng = np.random.default_rng(3)
    d_in, d_out, width, scale = 12, 9, 40, 7.5
    params = arch.Params(W_enc=jnp.asarray(rng.normal(size=(d_in, width)), jnp.float32),
                         b_enc=jnp.asarray(rng.normal(size=width) * 0.1, jnp.float32),
                         W_dec=jnp.asarray(rng.normal(size=(width, d_out)), jnp.float32),
                         b_dec=jnp.asarray(rng.normal(size=d_out), jnp.float32),
                         log_threshold=jnp.asarray(np.log(rng.uniform(0.05, 0.5, width)), jnp.float32),
                         W_skip=jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32))
    x = rng.normal(size=(256, d_in)) * scale
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    pre = (x / scale) @ p.W_enc + p.b_enc
    f = pre * (pre > np.exp(p.log_threshold))
    expected = scale * (f @ p.W_dec + p.b_dec + (x / scale) @ p.W_skip)
    released = to_release(params, scale, transcoder=True)
    latents, y_hat = released_forward(released, x)
    np.testing.assert_allclose(y_hat, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(latents, scale * f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture,knob", [("jumprelu", 2e-3), ("jumprelu_target_l0", 6.0), ("relu_l1", 1e-3)])
def test_transcoder_penalties_are_in_units_of_the_target_mean_square(architecture, knob):
    """A transcoder's sparsity penalty is multiplied by E||y / C||^2 (`target_mean_square`): the
    step's loss equals the numpy loss with the penalty so scaled, and a run with the factor
    equals a run whose knob (or target-L0 coefficient) is multiplied by it instead."""
    rng = np.random.default_rng(5)
    d_in, d_out, width, batch, factor = 6, 5, 24, 64, 37.0
    config = TrainConfig(tokens=10 * batch, batch_size=batch, sparsity_warmup_steps=1, threshold_init=0.05)
    group = Group.of(d_in, [(width, knob)], [architecture], d_out=d_out, skips=[True])
    state = init_state(group, config, jax.random.key(0))._replace(step=jnp.int32(1))  # past the warm-up
    rows = jnp.asarray(np.concatenate([rng.normal(size=(batch, d_in)), rng.normal(size=(batch, d_out)) * 3], 1),
                       jnp.float32)
    _, metrics = jax.jit(make_train_step(group, config, 1.0, target_mean_square=factor))(state, rows)

    p = jax.tree.map(lambda a: None if a is None else np.asarray(a, np.float64), state.params[0])
    x, y = np.asarray(rows[:, :d_in], np.float64), np.asarray(rows[:, d_in:], np.float64)
    pre = x @ p.W_enc + p.b_enc
    threshold = np.exp(p.log_threshold) if p.log_threshold is not None else np.zeros(width)
    active = pre > threshold
    f = np.where(active, pre, 0.0) if architecture != "relu_l1" else np.maximum(pre, 0.0)
    mse = np.mean(np.sum((y - f @ p.W_dec - p.b_dec - x @ p.W_skip) ** 2, axis=1))
    l0 = active.sum(axis=1).mean()
    if architecture == "jumprelu":
        penalty = knob * l0
    elif architecture == "relu_l1":
        penalty = knob * np.sum(f * np.linalg.norm(p.W_dec, axis=1), axis=1).mean()
    else:
        frequency = active.mean(axis=0)
        dense = 2 * config.target_l0_coefficient * config.frequency_coefficient / knob
        penalty = config.target_l0_coefficient * (l0 / knob - 1) ** 2 + \
            dense * np.maximum(frequency - config.frequency_threshold, 0).sum()
    assert float(metrics["loss"][0]) == pytest.approx(mse + factor * penalty, rel=1e-4)

    if architecture == "jumprelu_target_l0":
        moved = replace(config, target_l0_coefficient=config.target_l0_coefficient * factor)
        plain = make_train_step(group, moved, 1.0)
    else:
        plain = make_train_step(Group.of(d_in, [(width, knob * factor)], [architecture], d_out=d_out, skips=[True]),
                                config, 1.0)
    scaled, _ = jax.jit(make_train_step(group, config, 1.0, target_mean_square=factor))(state, rows)
    expected, _ = jax.jit(plain)(state, rows)
    for got, want in zip(jax.tree.leaves(scaled.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_killed_transcoder_job_resumes_bit_identical(trained, tmp_path):
    """SIGKILL at step 250 (checkpoint at 200) and rerun: the paired loader restarts where the
    checkpoint says, and both transcoders equal the uninterrupted run's bit for bit."""
    x, y, _, _ = transcoder_data()
    write_store(str(tmp_path), {("mlp_in", 0): x, ("mlp", 0): y})
    path = write_yaml(transcoder_config(tmp_path, checkpoint_every=100), tmp_path / "config.yaml")
    command = [GEMMASCOPE, "train", path, "--job", JOB, "--no-progress"]
    crash = {**os.environ, CRASH_AT: "train.step:250", CRASH_MARK: str(tmp_path / "crashed")}
    killed = subprocess.run(command, cwd=ROOT, env=crash, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert committed_steps(tmp_path, JOB)[-1] == 200
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for name, expected in trained["saes"].items():
        got = load_params(tmp_path, name, JOB)
        for key in expected:
            assert np.array_equal(got[key].view(np.uint32), expected[key].view(np.uint32)), (name, key)


def test_missing_target_array_is_named(tmp_path):
    x, _, _, _ = transcoder_data(n_rows=8192)
    write_store(str(tmp_path), {("mlp_in", 0): x})
    with pytest.raises(UserError, match="no activations for site 'mlp' layer 0"):
        train_job(transcoder_config(tmp_path), JOB, progress=False)


def test_a_transcoder_normalisation_without_target_mean_square_is_named(tmp_path):
    """normalisation.json of a transcoder job must say what its penalties are multiplied by;
    one without it (written by hand, or by an SAE job of the same id) is refused by name."""
    x, y, _, _ = transcoder_data(n_rows=8192)
    write_store(str(tmp_path), {("mlp_in", 0): x, ("mlp", 0): y})
    config = transcoder_config(tmp_path, steps=4, holdout_rows=1024)
    norm = tmp_path / "train" / JOB / "normalisation.json"
    norm.parent.mkdir(parents=True)
    norm.write_text(json.dumps({"scale": 1.0, "sample_rows": 10, "max_norm": 2.0, "median_norm": 1.0}))
    with pytest.raises(UserError, match=r"normalisation\.json: no target_mean_square .*delete the file"):
        train_job(config, JOB, progress=False)
    assert json.loads(norm.read_text())["scale"] == 1.0  # left as it was

