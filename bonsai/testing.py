"""Synthetic Bonsai repos in the exact released on-disk layouts, with random values, for tests and benchmarks.

Same folder names, file names, key names, dtypes, transposes and packing as the released repos; any transformer
config (tiny for tests, `bonsai.config.KLEIN_4B` for benchmarks).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from . import files, layouts
from .config import TransformerConfig, VAEConfig
from .layouts import GROUP_SIZE, config_json
from .quant import LowBitWeight
from .quant.qwen4bit import mlx4_pack, pack_4bit_u8

TINY_TE_HIDDEN = 64
TINY_TE_LAYERS = 4  # one past the last feature layer, as in klein (27 of 36): the last layer's output is normed
TINY_FEATURE_LAYERS = (1, 2, 3)  # written into the tiny text encoder's config.json (`feature_layers`)
TINY_TRANSFORMER = TransformerConfig(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                                     joint_attention_dim=3 * TINY_TE_HIDDEN, axes_dims_rope=(8, 8, 8, 8))
TINY_VAE = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>")
HQQ_GROUP, MLX_TE_GROUP = 64, 64
# Qwen2/3's pre-tokenizer split (their tokenizer.json and transformers' Qwen2Tokenizer)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")

# A Qwen3-style template (user turns, generation prompt, empty think block when thinking is off).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


# --- transformer ------------------------------------------------------------------------------------------------


def random_transformer(config: TransformerConfig, kind: str, seed: int = 0, device=None) -> dict:
    """{diffusers key: LowBitWeight | bf16-exact float32 tensor} with roughly unit-variance activations, drawn on
    `device` (a GPU makes the 4B shapes in seconds) and returned on the CPU."""
    g = torch.Generator(device or "cpu").manual_seed(seed)
    tensors = {}
    for name, (out, k) in layouts.lowbit_linears(config).items():
        if kind == "ternary":
            codes = torch.randint(-1, 2, (out, k), generator=g, dtype=torch.int8, device=device)
        else:
            codes = torch.randint(0, 2, (out, k), generator=g, dtype=torch.int8, device=device) * 2 - 1
        # bf16 scales, as the MLX layout stores them, so every layout holds the same weight exactly.
        scales = _bf16((0.8 + 0.4 * torch.rand(out, k // GROUP_SIZE, generator=g, device=device)) / k**0.5)
        tensors[f"{name}.weight"] = LowBitWeight.from_codes(codes, scales, kind, GROUP_SIZE).to("cpu")
    for key, shape in layouts.dense_tensors(config).items():
        if len(shape) == 1:  # QK RMSNorm weights
            t = 1 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5
        tensors[key] = _bf16(t).cpu()
    return tensors


def write_transformer(folder: str | Path, layout: str, kind: str, config: TransformerConfig = TINY_TRANSFORMER,
                      seed: int = 0, device=None) -> dict:
    """Random transformer written as `layout` under folder; returns the tensors written."""
    tensors = random_transformer(config, kind, seed, device)
    out = layouts.get_layout(layout).write(folder, tensors, config, kind)
    if layout == layouts.GEMLITE.name:  # the released gemlite folders ship a (GEMV-only) autotune file
        (out / layouts.GEMLITE_AUTOTUNE_FILE).write_text("{}")
    return tensors


# --- text encoder -----------------------------------------------------------------------------------------------


def tiny_text_encoder_config(vocab_size: int, hidden: int = TINY_TE_HIDDEN, layers: int = TINY_TE_LAYERS,
                             feature_layers: tuple[int, ...] | None = None):
    """A narrow Qwen3 config; `feature_layers` (if given) is stored in it, as bonsai reads it from config.json."""
    import transformers

    extra = {} if feature_layers is None else {"feature_layers": list(feature_layers)}
    return transformers.Qwen3Config(**extra,
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=1024, architectures=["Qwen3ForCausalLM"])


def random_text_encoder(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense Qwen3ForCausalLM state dict (no lm_head: tied), fp16-exact float32 values."""
    g = torch.Generator().manual_seed(seed)
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                       f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                       f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,),
                       f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                       f"{p}.mlp.down_proj.weight": (h, f), f"{p}.input_layernorm.weight": (h,),
                       f"{p}.post_attention_layernorm.weight": (h,)})
    state = {}
    for key, shape in shapes.items():
        t = 1 + 0.1 * torch.randn(shape, generator=g) if len(shape) == 1 else torch.randn(shape, generator=g)
        t = t if len(shape) == 1 or "embed" in key else t / shape[1] ** 0.5
        state[key] = t.half().float()
    return state


def _is_linear(key: str) -> bool:
    return key.startswith("model.layers.") and key.endswith("_proj.weight")


def hqq_linear_state(w: torch.Tensor, group_size: int = HQQ_GROUP) -> dict:
    """One linear as hqq 0.2.8 serializes a 4-bit HQQLinear (min/max affine, fp16 meta, '4bit_u8')."""
    out, k = w.shape
    rows = w.float().reshape(-1, group_size)  # [out*in/g, g]
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-4).half()
    zero = (-lo / scale.float()).half()
    q = torch.round(rows / scale.float() + zero.float()).clamp(0, 15).to(torch.uint8)
    return {"W_q": pack_4bit_u8(q), "nbits": 4, "group_size": group_size, "shape": torch.Size([out, k]),
            "scale": scale, "zero": zero, "axis": 1, "packing": "4bit_u8", "unpack_view_dtype": torch.uint8,
            "view_as_float": False, "quant_scale": False, "quant_zero": False, "compute_dtype": torch.float16,
            "offload_meta": False, "stores_quant_config": True, "channel_wise": True, "optimize": True,
            "round_zero": True}


def write_hqq_text_encoder(folder: Path, config, state: dict) -> Path:
    """text_encoder-hqq-4bit/{qmodel.pt, config.json}: 4-bit g64 linears, fp16 embedding and norms.

    A linear's value may already be its serialized HQQ dict (`hqq_linear_state`'s form), written as is."""
    out = folder / layouts.TE_HQQ.folder
    out.mkdir(parents=True, exist_ok=True)
    qmodel = {}
    for key, t in state.items():
        leaf = key.removesuffix(".weight")
        if _is_linear(key):
            qmodel[leaf] = t if isinstance(t, dict) else hqq_linear_state(t)
        else:
            qmodel[leaf] = {"weight": t.half()}
    # hqq serializes every leaf; the tied lm_head shares the embedding's storage, so torch.save stores it once.
    qmodel["lm_head"] = {"weight": qmodel["model.embed_tokens"]["weight"]}
    torch.save(qmodel, out / layouts.TE_HQQ.weight_file)
    (out / "config.json").write_text(config.to_json_string())
    return out


def write_mlx_text_encoder(folder: Path, config, state: dict) -> Path:
    """text_encoder-mlx-4bit/: mlx-community layout, affine 4-bit g64 linears and embedding, bf16 norms.

    A 2-D value may already be its MLX form ({"weight", "scales", "biases"}), written as is."""
    from safetensors.torch import save_file

    out = folder / layouts.TE_MLX.folder
    out.mkdir(parents=True, exist_ok=True)
    flat = {}
    for key, t in state.items():
        if isinstance(t, dict):
            flat.update({f"{key.removesuffix('.weight')}.{n}": v for n, v in t.items()})
        elif t.ndim == 2:
            prefix = key.removesuffix(".weight")
            flat.update({f"{prefix}.{n}": v for n, v in mlx4_pack(t, MLX_TE_GROUP).items()})
        else:
            flat[key] = t.to(torch.bfloat16)
    save_file(flat, out / layouts.TE_MLX.weight_file, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": {k: layouts.TE_MLX.weight_file for k in flat}}
    (out / f"{layouts.TE_MLX.weight_file}.index.json").write_text(json.dumps(index))
    cfg = {**config.to_dict(), "quantization": {"group_size": MLX_TE_GROUP, "bits": 4}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def write_dense_text_encoder(folder: Path, config, state: dict) -> Path:
    from safetensors.torch import save_file

    out = folder / layouts.TE_DENSE.folder
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, out / layouts.TE_DENSE.weight_file)
    (out / "config.json").write_text(config.to_json_string())
    return out


# --- tokenizer --------------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer with Qwen's special tokens, chat template, normalizer and pre-tokenizer (those
    transformers >= 5 rebuilds for a Qwen2Tokenizer whatever tokenizer.json says); returns its vocab size."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    n = len(vocab)
    added = {t: n + i for i, t in enumerate(SPECIAL_TOKENS + ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "padding_side": "right", "add_prefix_space": False, "errors": "replace",
        "model_max_length": 131072, "split_special_tokens": False}, indent=2))
    return n + len(added)


# --- VAE --------------------------------------------------------------------------------------------------------


def _resnet(p: str, cin: int, cout: int) -> dict:
    s = {f"{p}.norm1.weight": (cin,), f"{p}.norm1.bias": (cin,), f"{p}.conv1.weight": (cout, cin, 3, 3),
         f"{p}.conv1.bias": (cout,), f"{p}.norm2.weight": (cout,), f"{p}.norm2.bias": (cout,),
         f"{p}.conv2.weight": (cout, cout, 3, 3), f"{p}.conv2.bias": (cout,)}
    if cin != cout:
        s.update({f"{p}.conv_shortcut.weight": (cout, cin, 1, 1), f"{p}.conv_shortcut.bias": (cout,)})
    return s


def _mid(p: str, c: int) -> dict:
    s = {**_resnet(f"{p}.resnets.0", c, c), **_resnet(f"{p}.resnets.1", c, c)}
    a = f"{p}.attentions.0"
    s.update({f"{a}.group_norm.weight": (c,), f"{a}.group_norm.bias": (c,)})
    for n in ("to_q", "to_k", "to_v", "to_out.0"):
        s.update({f"{a}.{n}.weight": (c, c), f"{a}.{n}.bias": (c,)})
    return s


def vae_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers AutoencoderKLFlux2 (encoder too, as the release ships it) -> shape."""
    ch, lat, n = config.block_out_channels, config.latent_channels, config.layers_per_block
    s = {"encoder.conv_in.weight": (ch[0], config.in_channels, 3, 3), "encoder.conv_in.bias": (ch[0],)}
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(n):
            s.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c))
        cin = c
        if i < len(ch) - 1:
            s.update({f"encoder.down_blocks.{i}.downsamplers.0.conv.weight": (c, c, 3, 3),
                      f"encoder.down_blocks.{i}.downsamplers.0.conv.bias": (c,)})
    s.update(_mid("encoder.mid_block", ch[-1]))
    s.update({"encoder.conv_norm_out.weight": (ch[-1],), "encoder.conv_norm_out.bias": (ch[-1],),
              "encoder.conv_out.weight": (2 * lat, ch[-1], 3, 3), "encoder.conv_out.bias": (2 * lat,),
              "quant_conv.weight": (2 * lat, 2 * lat, 1, 1), "quant_conv.bias": (2 * lat,),
              "post_quant_conv.weight": (lat, lat, 1, 1), "post_quant_conv.bias": (lat,),
              "decoder.conv_in.weight": (ch[-1], lat, 3, 3), "decoder.conv_in.bias": (ch[-1],)})
    s.update(_mid("decoder.mid_block", ch[-1]))
    rev = list(reversed(config.decoder_channels))
    cin = rev[0]
    for i, c in enumerate(rev):
        for j in range(n + 1):
            s.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c))
        cin = c
        if i < len(rev) - 1:
            s.update({f"decoder.up_blocks.{i}.upsamplers.0.conv.weight": (c, c, 3, 3),
                      f"decoder.up_blocks.{i}.upsamplers.0.conv.bias": (c,)})
    s.update({"decoder.conv_norm_out.weight": (rev[-1],), "decoder.conv_norm_out.bias": (rev[-1],),
              "decoder.conv_out.weight": (config.out_channels, rev[-1], 3, 3),
              "decoder.conv_out.bias": (config.out_channels,),
              "bn.running_mean": (4 * lat,), "bn.running_var": (4 * lat,)})
    return s


def random_vae(config: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in vae_shapes(config).items():
        if key == "bn.running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif key == "bn.running_mean":
            t = 0.3 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            norm = "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight")
            t = (1.0 if norm else 0.0) + 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = int(torch.Size(shape[1:]).numel())
            t = torch.randn(shape, generator=g) / fan_in**0.5
        state[key] = _bf16(t)
    state["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return state


def write_vae(folder: Path, config: VAEConfig = TINY_VAE, seed: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    state = random_vae(config, seed)
    out = folder / "vae"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              out / "diffusion_pytorch_model.safetensors")
    d = {"_class_name": "AutoencoderKLFlux2", **{k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in asdict(config).items()}}
    d.update(down_block_types=["DownEncoderBlock2D"] * len(config.block_out_channels), use_quant_conv=True,
             sample_size=1024, force_upcast=True, batch_norm_momentum=0.1)
    d.pop("decoder_block_out_channels")
    (out / "config.json").write_text(json.dumps(d, indent=2))
    return state


# --- whole repos ------------------------------------------------------------------------------------------------


def feature_layers(text_encoder_layers: int) -> tuple[int, ...] | None:
    n = text_encoder_layers
    if n >= 27:
        return None
    if n < 4:
        raise ValueError(f"a tiny text encoder needs at least 4 layers for its 3 feature layers, got {n}")
    return (n // 4, n // 2, 3 * n // 4)


SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                    "max_image_seq_len": 4096, "time_shift_type": "exponential"}


def write_repo(path: str | Path, layout: str = "gemlite", kind: str = "ternary",
               transformer_config: TransformerConfig = TINY_TRANSFORMER, seed: int = 0,
               vae_config: VAEConfig = TINY_VAE, text_encoder_layers: int = TINY_TE_LAYERS) -> Path:
    """A complete repo in a released layout: transformer, the layout's text encoder (its first
    `TransformerLayout.text_encoders` entry: HQQ for gemlite and compact, MLX 4-bit for mlx, dense for unpacked),
    VAE, tokenizer, scheduler, model_index.json and manifest.json (model_version and, as the packed releases list
    them, {path, size, sha256} of every file).

    A text encoder of n < 27 layers reads the features after layers (n/4, n/2, 3n/4) as klein does for n = 36,
    stated in its config.json; one of 27 or more reads klein's (9, 18, 27)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_transformer(path, layout, kind, transformer_config, seed)
    te = layouts.get_text_encoder(layouts.get_layout(layout).text_encoders[0])
    tokenizers = [path / te.folder / te.tokenizer] if te.tokenizer is not None else []
    if layout != layouts.GEMLITE.name:  # [U] whether gemlite repos have a top-level tokenizer/: we write none
        tokenizers.append(path / "tokenizer")
    for folder in tokenizers:
        vocab = write_tokenizer(folder)  # the same tokenizer in each place
    te_config = tiny_text_encoder_config(vocab, hidden=transformer_config.joint_attention_dim // 3,
                                         layers=text_encoder_layers, feature_layers=feature_layers(text_encoder_layers))
    te_state = random_text_encoder(te_config, seed + 1)
    writers = {"hqq": write_hqq_text_encoder, "mlx": write_mlx_text_encoder, "dense": write_dense_text_encoder}
    writers[te.name](path, te_config, te_state)
    write_vae(path, vae_config, seed + 2)
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "Flux2KleinPipeline", "is_distilled": True, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}, indent=2))
    files.write_manifest(path, model_version=f"{kind} g128 (bf16 master)")  # last: it hashes every other file
    return path


# --- full-size repos (benchmarks) ------------------------------------------------------------------------------

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)
FULL_TE_LAYERS = 27  # the features read hidden states 9, 18 and 27: the release's later layers are never run


def random_text_encoder_packed(config, fmt: str, seed: int = 0, device=None) -> dict:
    """A Qwen3 state dict with random 4-bit codes straight in the serialized form of `fmt` ("hqq": HQQLinear
    states; "mlx": MLX affine dicts, the embedding quantized too) or random bf16 tensors ("dense"); quantizing
    2.7B random weights would take minutes, drawing codes takes seconds."""
    g = torch.Generator(device or "cpu").manual_seed(seed)
    h, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    template = hqq_linear_state(torch.zeros(1, HQQ_GROUP))

    def linear(out_f, in_f, quantize=True):
        if fmt == "dense" or not quantize and fmt == "hqq":
            return (torch.randn(out_f, in_f, generator=g, device=device) / in_f**0.5).to(torch.bfloat16).cpu()
        codes = torch.randint(0, 256, (out_f * in_f // 2,), generator=g, device=device, dtype=torch.uint8).cpu()
        groups = out_f * in_f // HQQ_GROUP
        scale = (torch.rand(groups, generator=g, device=device) / 4 / in_f**0.5).cpu()
        if fmt == "hqq":
            return {**template, "shape": torch.Size([out_f, in_f]), "W_q": codes.view(groups // 2, HQQ_GROUP),
                    "scale": scale.half().view(groups, 1), "zero": torch.full((groups, 1), 7.5, dtype=torch.float16)}
        s = scale.to(torch.bfloat16).view(out_f, in_f // HQQ_GROUP)
        return {"weight": codes.view(torch.uint32).view(out_f, in_f // 8), "scales": s, "biases": -7.5 * s}

    state = {"model.embed_tokens.weight": linear(config.vocab_size, h, quantize=fmt == "mlx"),
             "model.norm.weight": torch.ones(h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        state.update({f"{p}.self_attn.q_proj.weight": linear(q, h), f"{p}.self_attn.k_proj.weight": linear(kv, h),
                      f"{p}.self_attn.v_proj.weight": linear(kv, h), f"{p}.self_attn.o_proj.weight": linear(h, q),
                      f"{p}.mlp.gate_proj.weight": linear(f, h), f"{p}.mlp.up_proj.weight": linear(f, h),
                      f"{p}.mlp.down_proj.weight": linear(h, f)})
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            state[f"{p}.{norm}.weight"] = torch.ones(hd)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}.{norm}.weight"] = torch.ones(h)
    return state


def write_full_size_repo(path: str | Path, layout: str, kind: str, seed: int = 0, device=None) -> Path:
    """A repo of the real shapes in `layout`: klein-4B transformer, FLUX.2 VAE, Qwen3-4B text encoder (its first
    27 layers) with random weights, a small tokenizer. For benchmarks: the files are as large as the release's."""
    import transformers

    from .config import FLUX2_VAE, KLEIN_4B

    path = write_repo(path, layout, kind, transformer_config=TINY_TRANSFORMER, seed=seed, vae_config=FLUX2_VAE)
    write_transformer(path, layout, kind, KLEIN_4B, seed, device)  # replaces the tiny one
    te = layouts.get_text_encoder(layouts.get_layout(layout).text_encoders[0])
    config = transformers.Qwen3Config(**{**QWEN3_4B, "num_hidden_layers": FULL_TE_LAYERS},
                                      architectures=["Qwen3ForCausalLM"])
    state = random_text_encoder_packed(config, te.name, seed + 1, device)
    {"hqq": write_hqq_text_encoder, "mlx": write_mlx_text_encoder, "dense": write_dense_text_encoder}[te.name](
        path, config, state)
    files.write_manifest(path, model_version=f"{kind} g128 (bf16 master)")  # the replaced files' hashes
    return path


__all__ = ["TINY_TRANSFORMER", "TINY_VAE", "TINY_FEATURE_LAYERS", "write_repo", "write_transformer",
           "random_transformer", "random_text_encoder", "random_vae", "vae_shapes", "write_tokenizer",
           "hqq_linear_state", "config_json", "write_full_size_repo"]
