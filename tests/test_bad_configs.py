"""Every config value of the wrong type or out of range: one line naming the file and the field, on the torch and
MLX backends (issue 12, item 4). Values are set in the tiny repos' own config files."""

from __future__ import annotations

import math

import pytest

from badfiles import BACKENDS, copy_repo, edit_json, load, one_line_error, write_repos
from bonsai import layouts
from bonsai.config import TransformerConfig, VAEConfig, check_value
from bonsai.errors import BonsaiValueError


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return write_repos(tmp_path_factory.mktemp("repos"))


def transformer_config(repo):
    return layouts.find_transformer(repo)[1] / "config.json"


def quant_config(repo):
    return layouts.find_transformer(repo)[1] / layouts.QUANT_FILE


def te_config(repo):
    return layouts.find_text_encoder(repo)[1] / "config.json"


def vae_config(repo):
    return repo / "vae" / "config.json"


def scheduler_config(repo):
    return repo / "scheduler" / "scheduler_config.json"


TRANSFORMER = [
    ("num_layers", "1", "num_layers must be an integer, got '1'"),
    ("num_layers", None, "num_layers must be an integer, got None"),
    ("num_layers", True, "num_layers must be an integer, got True"),
    ("num_layers", 1.0, "num_layers must be an integer, got 1.0"),
    ("num_layers", 10**9, "num_layers must be in [0, 128], got 1000000000"),
    ("mlp_ratio", [3.0], "mlp_ratio must be a number, got [3.0]"),
    ("mlp_ratio", -1.0, "mlp_ratio must be in [0, 16], got -1.0"),
    ("eps", math.nan, "eps must be a finite number, got nan"),
    ("axes_dims_rope", 8, "axes_dims_rope must be a list of integers, got 8"),
    ("axes_dims_rope", [8, 8, "8", 8], "axes_dims_rope must be a list of integers, got [8, 8, '8', 8]"),
    ("guidance_embeds", 0, "guidance_embeds must be true or false, got 0"),
    ("out_channels", "128", "out_channels must be an integer or null, got '128'"),
    ("attention_head_dim", {"a": 1}, "attention_head_dim must be an integer, got {'a': 1}"),
]
VAE = [
    ("block_out_channels", "16", "block_out_channels must be a list of integers, got '16'"),
    ("block_out_channels", [16, 16.0, 32, 32], "block_out_channels must be a list of integers, got [16, 16.0, 32, 32]"),
    ("block_out_channels", [], "block_out_channels must list 1 to 8 channel counts, got ()"),
    ("layers_per_block", 1.0, "layers_per_block must be an integer, got 1.0"),
    ("norm_num_groups", 7, "norm_num_groups must divide every entry of block_out_channels (16, 16, 32, 32)"),
    ("patch_size", [2], "patch_size must be a list of 2 integers, got [2]"),
    ("batch_norm_eps", "1e-4", "batch_norm_eps must be a number, got '1e-4'"),
    ("act_fn", None, "act_fn must be a string, got None"),
    ("latent_channels", 0, "latent_channels must be in [1, 65536], got 0"),
]
SCHEDULER = [
    ("shift", "3", "shift must be a number, got '3'"),
    ("use_dynamic_shifting", "true", "use_dynamic_shifting must be true or false, got 'true'"),
    ("max_image_seq_len", None, "max_image_seq_len must be an integer, got None"),
    ("shift", 0, "shift must be > 0, got 0"),
]
TEXT_ENCODER = [
    ("num_hidden_layers", "4", "num_hidden_layers must be an integer, got '4'"),
    ("hidden_size", None, "hidden_size must be an integer, got None"),
    ("vocab_size", ..., "missing field vocab_size"),
    ("num_key_value_heads", 3, "num_key_value_heads must divide num_attention_heads=2, got 3"),
    ("rms_norm_eps", [1e-6], "rms_norm_eps must be a number, got [1e-06]"),
    ("head_dim", None, "head_dim must be an integer, got None"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("feature_layers", "1,2,3", "feature_layers must be a list of integers, got '1,2,3'"),
    ("max_length", 100000, "max_length must be in [1, 512], got 100000"),
    ("layer_types", ["sliding_attention"] * 4, "layer_types must be 'full_attention'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope_parameters must use the default RoPE"),
]


def _rejected(repos, tmp_path, layout, config_file, field, value, message, backend="torch"):
    """The repo of `layout` with `field` of `config_file` set to `value` fails to load with `message` (one line,
    the config file named first)."""
    repo = copy_repo(repos[layout], tmp_path / "repo")
    file = config_file(repo)
    edit_json(file, **{field: value})
    one_line_error(lambda: load(repo, backend), f"{file}: {message}", expected=BonsaiValueError)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, value, message", TRANSFORMER)
def test_transformer_config_values(repos, tmp_path, backend, field, value, message):
    layout = "mlx" if backend == "mlx" else "gemlite"  # the MLX backend's own reader, the torch pickle reader
    _rejected(repos, tmp_path, layout, transformer_config, field, value, message, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, value, message", VAE)
def test_vae_config_values(repos, tmp_path, backend, field, value, message):
    _rejected(repos, tmp_path, "compact", vae_config, field, value, message, backend)


@pytest.mark.parametrize("field, value, message", SCHEDULER)
def test_scheduler_config_values(repos, tmp_path, field, value, message):
    _rejected(repos, tmp_path, "unpacked", scheduler_config, field, value, message)


# every text-encoder format on torch; the MLX backend's native 4-bit reader and its dense path (HQQ via bonsai)
TE_CASES = [("gemlite", "torch"), ("mlx", "torch"), ("unpacked", "torch")] + [
    (layout, "mlx") for layout in ("mlx", "gemlite") if "mlx" in BACKENDS]


@pytest.mark.parametrize("layout, backend", TE_CASES)
@pytest.mark.parametrize("field, value, message", TEXT_ENCODER)
def test_text_encoder_config_values(repos, tmp_path, layout, backend, field, value, message):
    _rejected(repos, tmp_path, layout, te_config, field, value, message, backend)


QUANT = [
    ("gemlite", "bits", True, "bits must be an integer, got True"),
    ("gemlite", "bits", "2", "bits must be an integer, got '2'"),
    ("gemlite", "group_size", 128.0, "group_size must be an integer, got 128.0"),
    ("gemlite", "packing_bitwidth", 8.0, "packing_bitwidth must be an integer, got 8.0"),
    ("gemlite", "solver", 2, "solver must be a string, got 2"),
    ("mlx", "bits", [2], "bits must be an integer, got [2]"),
    ("mlx", "group_size", None, "group_size must be an integer, got None"),
    ("compact", "group_size", "128", "group_size must be an integer, got '128'"),
    ("compact", "kind", 2, "kind must be a string, got 2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, field, value, message", QUANT)
def test_quantization_config_values(repos, tmp_path, backend, layout, field, value, message):
    _rejected(repos, tmp_path, layout, quant_config, field, value, message, backend)


MLX_QUANT = [
    ({"bits": "4", "group_size": 64}, "quantization: bits must be an integer, got '4'"),
    ([4, 64], "quantization must be an object, got [4, 64]"),
    ({"bits": 4, "group_size": 0}, "quantization bits must be one of (2, 3, 4, 5, 6, 8) and group_size one of "
                                   "(32, 64, 128), got bits=4 group_size=0"),
    (None, 'quantized tensors need a "quantization": {"bits", "group_size"} entry'),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value, message", MLX_QUANT)
def test_mlx_text_encoder_quantization_entry(repos, tmp_path, backend, value, message):
    _rejected(repos, tmp_path, "mlx", te_config, "quantization", value, message, backend)


def test_config_json_that_is_not_an_object_or_not_utf8(repos, tmp_path):
    repo = copy_repo(repos["gemlite"], tmp_path / "repo")
    file = transformer_config(repo)
    file.write_text("[1, 2]")
    one_line_error(lambda: load(repo), f"{file} must hold a JSON object, got list")
    file.write_bytes(b'{"num_layers": "\xff"}')
    one_line_error(lambda: load(repo), f"{file} is not UTF-8 text")
    file.write_text('{"num_layers": 1,')
    one_line_error(lambda: load(repo), f"{file} is not valid JSON")


def test_check_value_reads_json_types():
    assert check_value(3, float, "x") == 3 and check_value(2.5, float, "x") == 2.5
    assert check_value([1, 2], tuple[int, ...], "x") == (1, 2)
    assert check_value([1, 2], tuple[int, int], "x") == (1, 2)
    assert check_value(None, int | None, "x") is None
    for value, hint, message in [(True, int, "x must be an integer, got True"),
                                 (math.inf, float, "x must be a finite number, got inf"),
                                 ([1, 2, 3], tuple[int, int], "x must be a list of 2 integers, got [1, 2, 3]"),
                                 ("a", bool, "x must be true or false, got 'a'"),
                                 ("a" * 200, int, "x must be an integer, got 'aaaa")]:
        msg = one_line_error(lambda: check_value(value, hint, "x"), message)
        assert len(msg) < 120  # long values are cut


def test_defaults_still_valid():
    # the dataclass defaults (klein 4B, the FLUX.2 VAE) pass the invariants that files are held to
    assert TransformerConfig().inner_dim == 3072 and VAEConfig().scale_factor == 8
