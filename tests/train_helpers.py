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
