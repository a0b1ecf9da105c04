"""The JAX backend against transformers: every site at every layer, and the logits.

Both backends load the same checkpoint files and run the same token ids in float32; the
JAX forward must equal transformers' to float32 tolerance at `res`, `mlp`, `att`,
`mlp_in` of every layer, the scaled embedding, and the final logits. The sequences are
longer than the sliding window, so the local/global masks are exercised. Models: the
tiny random Gemma 2, the real Gemma 3 270M, and a tiny random Gemma 3 with a short
window and linearly scaled global RoPE (the 4B+ setting).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemmascope.config import ModelConfig
from gemmascope.errors import UserError
from gemmascope.models.jax_gemma.forward import JaxForward
from gemmascope.models.loading import resolve_source
from gemmascope.models.torch_forward import TorchForward

ROOT = Path(__file__).resolve().parent.parent
SITES = ("res", "mlp", "att", "mlp_in")
# max |jax - torch| / max |torch| per array, float32 on both sides.
REL_TOL = 1e-4
BOS = 2


def tiny_gemma3(directory) -> str:
    """A random Gemma 3 text model: window 16, 5:1 local/global, global RoPE scaled x8."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    config = Gemma3TextConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=16, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=1, pad_token_id=0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_source("gemma3-270m")).save_pretrained(directory)
    return str(directory)


# (source, batch, length): each length is past the model's sliding window.
CASES = {"tiny-gemma2": (2, 80), "tiny-gemma3": (2, 40), "gemma3-270m": (1, 560)}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    name = request.param
    source = tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3")) if name == "tiny-gemma3" else name
    config = ModelConfig(source=source, device="cpu", dtype="float32", backend="jax")
    jax_model = JaxForward(config)
    torch_model = TorchForward(config)
    batch, length = CASES[name]
    assert torch_model.loaded.model.config.sliding_window < length
    ids = np.random.default_rng(7).integers(3, min(5000, jax_model.arch.vocab_size), (batch, length))
    ids[:, 0] = BOS
    return name, jax_model, torch_model, ids


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def test_every_site_and_layer_matches_transformers(pair):
    name, jax_model, torch_model, ids = pair
    keys = tuple((site, layer) for layer in range(jax_model.arch.n_layers) for site in SITES) + (("embed", 0),)
    got = jax_model.run(ids, keys, "float32")
    want = torch_model.capture(ids, keys, np.arange(ids.size), "float32")
    errors = {key: relative_error(got[key].reshape(-1, got[key].shape[-1]), want[key]) for key in keys}
    worst = max(errors, key=errors.get)
    print(f"{name}: worst site error {errors[worst]:.2e} at {worst}")
    assert errors[worst] < REL_TOL, worst
    # The arrays are not trivially equal (e.g. all zero): layers differ from each other.
    assert relative_error(got[("res", 1)], got[("res", 0)]) > 0.01


def test_logits_match_transformers(pair):
    name, jax_model, torch_model, ids = pair
    with torch.inference_mode():
        want = torch_model.loaded.model(input_ids=torch.from_numpy(ids)).logits.double().numpy()
    got = jax_model.logits(ids)
    error = relative_error(got, want)
    print(f"{name}: logits error {error:.2e}")
    assert error < REL_TOL
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_capture_gathers_the_requested_rows(pair):
    _, jax_model, torch_model, ids = pair
    rows = np.array([0, 3, ids.shape[1] - 1, ids.size - 1])
    keys = (("mlp", 1), ("att", 0))
    got = jax_model.capture(ids, keys, rows, "bfloat16")
    want = torch_model.capture(ids, keys, rows, "bfloat16")
    for key in keys:
        assert got[key].shape == want[key].shape == (len(rows), want[key].shape[1])
        assert got[key].dtype == want[key].dtype
        assert relative_error(got[key].astype(np.float32), want[key].astype(np.float32)) < 1e-2


def test_a_harvest_builds_only_the_layers_it_needs(tmp_path):
    config = ModelConfig(source="tiny-gemma2", device="cpu", dtype="float32", backend="jax")
    shallow, full = JaxForward(config, last_layer=1), JaxForward(config)
    assert sorted(k for k in shallow.params if k.startswith("layers_")) == ["layers_0", "layers_1"]
    assert "norm" not in shallow.params and "norm" in full.params
    ids = np.full((3, 20), 7)
    ids[:, 0] = BOS
    keys = (("res", 1), ("mlp_in", 0))
    a, b = shallow.run(ids, keys, "float32"), full.run(ids, keys, "float32")
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key])
    # Short batches are padded to a power of two: few programs, at most 2x the work.
    assert [full.padded_rows(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


# --------------------------------------------------------------------------- bad checkpoints


def _read_safetensors(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def checkpoint_copy(tmp_path):
    target = tmp_path / "checkpoint"
    shutil.copytree(resolve_source("tiny-gemma2"), target)
    return target


def _load(directory) -> JaxForward:
    return JaxForward(ModelConfig(source=str(directory), device="cpu", backend="jax"))


def test_missing_tensor_is_named(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    header, data = _read_safetensors(file)
    del header["model.layers.2.mlp.down_proj.weight"]
    _write_safetensors(file, header, data)
    with pytest.raises(UserError, match=r"tensor model\.layers\.2\.mlp\.down_proj\.weight is missing"):
        _load(checkpoint_copy)


def test_wrong_shape_is_named(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    header, data = _read_safetensors(file)
    entry = header["model.layers.1.self_attn.k_proj.weight"]
    entry["shape"] = entry["shape"][::-1]  # the same bytes read transposed
    _write_safetensors(file, header, data)
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \[64, 32\], "
                                         r"expected \[32, 64\]"):
        _load(checkpoint_copy)


def test_truncated_file_is_named(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(UserError, match=r"model\.safetensors: tensor .* extends past the end of the file"):
        _load(checkpoint_copy)


def test_sharded_checkpoint_with_index_loads_the_same(checkpoint_copy):
    """Hub checkpoints of 2B and up come as several files and an index; split ours in two."""
    file = checkpoint_copy / "model.safetensors"
    header, data = _read_safetensors(file)
    header.pop("__metadata__", None)
    names = sorted(header)
    parts, weight_map = [names[: len(names) // 2], names[len(names) // 2:]], {}
    for number, part in enumerate(parts, 1):
        shard_name = f"model-0000{number}-of-00002.safetensors"
        offset, chunks, shard_header = 0, [], {}
        for name in part:
            begin, end = header[name]["data_offsets"]
            chunks.append(data[begin:end])
            shard_header[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
            weight_map[name] = shard_name
        _write_safetensors(checkpoint_copy / shard_name, shard_header, b"".join(chunks))
    file.unlink()
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    split = _load(checkpoint_copy)
    whole = JaxForward(ModelConfig(source="tiny-gemma2", device="cpu", backend="jax"))
    ids = np.arange(3, 43)[None, :]
    ids[0, 0] = BOS
    keys = (("res", 3),)
    np.testing.assert_array_equal(split.run(ids, keys, "float32")[keys[0]], whole.run(ids, keys, "float32")[keys[0]])


def test_missing_weights_file_is_named(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json"):
        _load(checkpoint_copy)


# --------------------------------------------------------------------------- sharding


def test_tensor_parallel_equals_data_parallel():
    """8 CPU devices: tensor parallel 2 x data 4 against data 8, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "jax_tensor_parallel.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"1": {"data": 8, "model": 1}, "2": {"data": 4, "model": 2}}
    assert report["q_proj_shape"] == [64, 64] and report["q_proj_shard"] == [32, 64]  # heads split
    assert report["down_proj_shard"] == [64, 64]  # [d_model, d_ff / 2]
    assert report["shapes"] == [[5, 48, 64]]  # padding rows dropped
    assert report["max_relative_error"] < 1e-5


def test_tensor_parallel_degree_follows_device_memory():
    """Gemma 2 9B in bfloat16 (~18.5 GB of weights) on hosts of 8 devices."""
    import jax
    from transformers import Gemma2Config

    from gemmascope.models.jax_gemma.architecture import from_hf_config
    from gemmascope.models.jax_gemma.model import GemmaModel
    from gemmascope.models.jax_gemma.sharding import choose_tensor_parallel, per_device_bytes

    hf = Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256)
    arch = from_hf_config("gemma-2-9b", hf)
    module = GemmaModel(arch, arch.n_layers, jax.numpy.bfloat16)
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros((1, 1), "int32"),
                                                  (), "float32", True))["params"]
    total = per_device_bytes(expected, 1)
    assert 18.0e9 < total < 19.0e9
    gib = 2**30
    assert choose_tensor_parallel(arch, 8, expected, 80 * gib) == 1   # H100: fits whole
    assert choose_tensor_parallel(arch, 8, expected, 16 * gib) == 4   # TPU v5e (16 GiB): 1/2 still > 8 GiB
    assert choose_tensor_parallel(arch, 8, expected, None) == 1       # CPU: no memory figure
    # The embedding stays whole on every device: a degree never divides it away.
    assert per_device_bytes(expected, 8) > 256000 * 3584 * 2


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_harvest_names_the_bad_tensor_before_starting_workers(checkpoint_copy, tmp_path, backend):
    """transformers alone would fill a missing tensor with random values and harvest on."""
    from tests.harvest_helpers import cli

    file = checkpoint_copy / "model.safetensors"
    header, data = _read_safetensors(file)
    del header["model.layers.3.post_feedforward_layernorm.weight"]
    _write_safetensors(file, header, data)
    result = cli("harvest", str(ROOT / "configs" / "tiny-gemma2.yaml"), f"run_dir={tmp_path / 'run'}",
                 f"model.source={checkpoint_copy}", f"model.backend={backend}", "--no-progress")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "tensor model.layers.3.post_feedforward_layernorm.weight is missing" in last, result.stderr[-2000:]
    assert not (tmp_path / "run" / "activations" / "ledger.json").exists()


def test_bfloat16_forward_stays_within_bfloat16_error_of_float32():
    """The dtype accelerators harvest in: each backend's bfloat16 run against its own
    float32 run, and the two bfloat16 runs against each other, at every site and layer."""
    ids = np.random.default_rng(11).integers(3, 5000, (2, 80))
    ids[:, 0] = BOS
    keys = tuple((site, layer) for layer in range(4) for site in SITES)
    rows = np.arange(ids.size)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = ModelConfig(source="tiny-gemma2", device="cpu", dtype=dtype, backend="jax")
        runs[("jax", dtype)] = JaxForward(config).capture(ids, keys, rows, "float32")
        runs[("torch", dtype)] = TorchForward(config).capture(ids, keys, rows, "float32")
    for key in keys:
        for backend in ("jax", "torch"):
            error = relative_error(runs[(backend, "bfloat16")][key], runs[(backend, "float32")][key].astype(np.float64))
            assert 1e-4 < error < 0.05, (backend, key, error)  # bfloat16 really ran, and ran right
        assert relative_error(runs[("jax", "bfloat16")][key], runs[("torch", "bfloat16")][key]) < 0.05, key


@pytest.mark.parametrize("size", ["2b", "9b", "27b"])
def test_released_gemma2_shapes_match_transformers(size):
    """Every parameter of the released 2B / 9B / 27B (SPEC.md section 8) exists in the
    Flax tree under the checkpoint's name with transformers' shape (built on the meta
    device: shapes only, no memory)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from gemmascope.models.jax_gemma.architecture import from_hf_config
    from gemmascope.models.jax_gemma.model import expected_params
    from gemmascope.models.jax_gemma.weights import flatten_tree, hf_name

    dims = {"2b": (2304, 26, 8, 4, 256, 9216, 256), "9b": (3584, 42, 16, 8, 256, 14336, 256),
            "27b": (4608, 46, 32, 16, 128, 36864, 144)}[size]
    d_model, layers, heads, kv_heads, head_dim, d_ff, scalar = dims
    hf = Gemma2Config(vocab_size=256000, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=d_ff,
                      query_pre_attn_scalar=scalar)
    with torch.device("meta"):
        reference = {name: tuple(p.shape) for name, p in Gemma2ForCausalLM(hf).named_parameters()}
    reference.pop("lm_head.weight", None)  # tied to the embedding
    ours = {hf_name(path): tuple(leaf.shape)
            for path, leaf in flatten_tree(expected_params(from_hf_config(size, hf), layers, np.float32)).items()}
    assert ours == reference
    print(f"gemma-2-{size}: {sum(int(np.prod(s)) for s in ours.values()):,} parameters")
