"""Helpers for training tests: synthetic stores and small configs written as YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from gemmascope.config import Config, SAEGridEntry, TrainConfig
from gemmascope.store.synthetic import write_store
from gemmascope.typed_yaml import to_mapping


def small_config(run_dir, *, widths=(128,), sparsity=(0.03,), steps=300, batch=1024, **train) -> Config:
    defaults = dict(tokens=steps * batch, batch_size=batch, lr=3e-3, lr_warmup_steps=20,
                    sparsity_warmup_steps=max(1, steps // 4), threshold_lr=1e-2, norm_sample_rows=4096,
                    shuffle_rows=8192, checkpoint_every=10**6, log_every=max(1, steps // 4),
                    dead_window_tokens=10**6)
    defaults.update(train)
    return Config(run_dir=str(run_dir), saes=(SAEGridEntry(sites=("res",), layers=(0,), widths=tuple(widths),
                                                           sparsity=tuple(sparsity)),),
                  train=TrainConfig(**defaults))


def job_id(config: Config) -> str:
    """The id of a single-job config's job (e.g. res-L0-w128)."""
    from gemmascope.store import ActivationStore
    from gemmascope.sweep.grid import plan_jobs

    (job,) = plan_jobs(config, ActivationStore.open(config.run_dir).model_info())
    return job.id


def write_yaml(config: Config, path: Path) -> str:
    data = to_mapping(config)
    data.pop("origin")
    path.write_text(yaml.safe_dump(data))
    return str(path)


def gaussian_store(run_dir, n_rows=16384, d_in=32, seed=0, **kwargs) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n_rows, d_in)).astype(np.float32) * 3.0
    write_store(str(run_dir), {("res", 0): rows}, **kwargs)
    return rows


def load_params(run_dir, name: str, job: str) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / "train" / job / "saes" / name / "params.npz") as data:
        return {k: data[k] for k in data.files}


def committed_steps(run_dir, job: str) -> list[int]:
    """A job's committed checkpoints: a step directory counts once its manifest is written
    (Orbax creates the directory a few ms before)."""
    checkpoints = Path(run_dir) / "train" / job / "checkpoints"
    if not checkpoints.exists():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()
                  and (p / "checksums.json").exists())


def assert_same_grads(got, expected_grads, rtol: float = 1e-4) -> None:
    """Every gradient field of `got` equals `expected_grads`' (None where it is None, and
    each expected one non-zero, so the comparison has something to check)."""
    for field in expected_grads._fields:
        expected = getattr(expected_grads, field)
        if expected is None:
            assert getattr(got, field) is None, field
            continue
        expected = np.asarray(expected)
        assert np.abs(expected).max() > 0, field
        np.testing.assert_allclose(np.asarray(getattr(got, field)), expected, rtol=rtol,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=field)


def assert_same_trained_params(dense_params, sparse_params, initial_params) -> None:
    """Two paths' parameters after training agree, and training moved every one of them."""
    for dense_p, sparse_p, initial in zip(dense_params, sparse_params, initial_params, strict=True):
        for field in dense_p._fields:
            if getattr(dense_p, field) is None:
                continue
            assert not np.allclose(getattr(dense_p, field), getattr(initial, field)), field
            np.testing.assert_allclose(getattr(sparse_p, field), getattr(dense_p, field), rtol=1e-4, atol=1e-6,
                                       err_msg=field)


def train_both_ways(group, config, state, rows, steps: int = 5, target_mean_square: float = 2.0):
    """(dense state, its last metrics, sparse state, its last metrics): `steps` training steps
    from `state` on the same rows, without and with the sparse path allowed."""
    import jax

    from gemmascope.train.group import make_train_step

    dense_step = jax.jit(make_train_step(group, config, scale=1.0, target_mean_square=target_mean_square))
    sparse_step = jax.jit(make_train_step(group, config, scale=1.0, target_mean_square=target_mean_square,
                                          use_sparse=True))
    dense_state, sparse_state = state, state
    for _ in range(steps):
        dense_state, dense_metrics = dense_step(dense_state, rows)
        sparse_state, sparse_metrics = sparse_step(sparse_state, rows)
    return dense_state, dense_metrics, sparse_state, sparse_metrics
