"""Nothing runs that should not: no unpickling, loopback-only local clusters, no path
escapes from the run directory, credentials never written to outputs or logs."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import read_params_npz
from tests.harvest_helpers import ROOT, cli

SOURCES = sorted((ROOT / "gemmascope").rglob("*.py"))


class _Payload:
    """Unpickling this runs `touch` on a file: the test checks that never happens."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_sources_never_load_untrusted_data_with_code_execution():
    forbidden = {
        r"allow_pickle\s*=\s*True": "np.load with pickles",
        r"\bpickle\.loads?\(": "pickle",
        r"\byaml\.load\(": "yaml.load (use yaml.safe_load)",
        r"\btorch\.load\(": "torch.load",
        r"trust_remote_code\s*=\s*True": "remote code",
        r"shell\s*=\s*True": "a shell",
        r"(?<![.\w])(eval|exec)\(": "eval/exec",
    }
    found = [f"{path.relative_to(ROOT)}:{n}: {what}" for path in SOURCES
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for pattern, what in forbidden.items() if re.search(pattern, line)]
    assert not found, found


def test_a_params_npz_carrying_a_pickle_is_refused_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        member = io.BytesIO()
        np.lib.format.write_array(member, np.array([_Payload(target)], dtype=object), allow_pickle=True)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            archive.writestr(f"{name}.npy", member.getvalue())
    with pytest.raises(UserError, match="evil.npz: not a params.npz"):
        read_params_npz(buffer.getvalue(), "evil.npz")
    assert not target.exists()


def test_a_pickled_model_checkpoint_is_not_loaded(tmp_path):
    """A model folder holding only pytorch_model.bin (a pickle) is refused; its code never runs."""
    from transformers import Gemma2Config

    from gemmascope.config import ModelConfig
    from gemmascope.models.loading import load_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8).save_pretrained(model_dir)
    target = tmp_path / "pwned"
    torch.save({"payload": _Payload(target)}, model_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load safetensors weights"):
        load_model(ModelConfig(source=str(model_dir)))
    assert not target.exists()


@pytest.mark.parametrize("part", ["../outside", "a/../../outside", ".."])
def test_paths_cannot_climb_out_of_the_run(tmp_path, part):
    with pytest.raises(UserError, match="may not be '..'"):
        storage.join(str(tmp_path / "run"), "imported", part)


def test_import_name_cannot_escape_the_run(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    result = cli("import", str(config), "--source", str(tmp_path / "nowhere"), "--name", "../../escaped")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_local_cluster_runs_no_dashboard_and_requires_a_token(ray_address):
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    assert is_token_auth_enabled()


def test_credentials_are_not_written_to_outputs_or_logs(ray_address, tmp_path):
    """Harvest and train with credentials in the environment; the sentinel appears nowhere."""
    import os

    sentinel = "gemmascope-secret-4242"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "harvest.layers=[1]", "harvest.sites=[res]", "harvest.max_tokens=3000",
                 "saes=[{sites: [res], layers: [1], widths: [64], sparsity: [1.0e-2], tokens: 2560}]",
                 "train.batch_size=256", "train.norm_sample_rows=512", "train.shuffle_rows=1024",
                 "train.holdout_rows=0", "train.log_every=5"]
    secrets = {"HF_TOKEN": sentinel, "GOOGLE_APPLICATION_CREDENTIALS_JSON": sentinel, "GCS_TOKEN": sentinel}
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update(secrets)
    try:
        tiny = str(ROOT / "configs" / "tiny-gemma2.yaml")
        harvest = cli("harvest", tiny, *overrides, "--ray-address", ray_address, "--no-progress")
        train = cli("train", tiny, *overrides, "--job", "res-L1-w64", "--no-progress")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert harvest.returncode == 0, harvest.stderr[-2000:]
    assert train.returncode == 0, train.stderr[-2000:]
    texts = [harvest.stdout, harvest.stderr, train.stdout, train.stderr]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    import ray

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    files += [p for p in session.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if sentinel.encode() in p.read_bytes()]
    assert not leaks and not any(sentinel in text for text in texts), leaks
