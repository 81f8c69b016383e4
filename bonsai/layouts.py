"""The registry of on-disk layouts: one record per transformer layout and per text-encoder format.

A `TransformerLayout` owns its folder names, weight file, quantization_config.json schema (read, checked, written
with the released key names), reader, writer, stored size and hub download patterns; `find_transformer` and
`find_text_encoder` detect them in a repo folder. Adding a layout is one entry in `LAYOUTS` (docs/design.md).

Importing this module does not import torch: the CLI reads the layout names before any model is loaded, so the
readers and writers import torch and `LowBitWeight` when they run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from .config import KLEIN_4B, TransformerConfig, field_value
from .errors import BonsaiFileNotFoundError, BonsaiValueError
from .files import MANIFEST_FILE, one_line, read_json, shard_files
from .state import check_finite, check_state

if TYPE_CHECKING:
    import torch

    from .quant import LowBitWeight

GROUP_SIZE = 128
QUANT_FILE = "quantization_config.json"
GEMLITE_AUTOTUNE_FILE = "gemlite_autotune.json"
GEMLITE_KEYS = ("W_q", "scales", "zeros", "metadata", "orig_shape")  # one gemlite linear, as stored
GEMLITE_FP32, GEMLITE_FP16 = 0, 1  # gemlite DType codes
GEMLITE_MODE_FMA = 4  # W_group_mode: W = q * scales + zeros
_COMPACT_FORMAT = "bonsai-compact"


class Kind(str, Enum):
    """Binary {-1, +1} * s or ternary {-1, 0, +1} * s weights. A str, so `kind == "ternary"` holds."""

    TERNARY = "ternary"
    BINARY = "binary"

    @property
    def bits(self) -> int:
        """Bits per stored code: ternary q = t + 1 in 2 bits, binary q = (b + 1) / 2 in 1 bit."""
        return {Kind.TERNARY: 2, Kind.BINARY: 1}[self]

    @classmethod
    def from_bits(cls, bits, where: str) -> Kind:
        for kind in cls:
            if kind.bits == bits:
                return kind
        raise BonsaiValueError(f"{where}: bits must be 2 (ternary) or 1 (binary), got {bits!r}")

    @classmethod
    def parse(cls, value, where: str) -> Kind:
        """`value` as a Kind ("ternary", "binary" or a Kind); BonsaiValueError naming `where` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise BonsaiValueError(f"{where}: kind must be 'ternary' or 'binary', got {value!r}") from None

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class GemliteMeta(NamedTuple):
    """gemlite's 12 meta args (`GemLiteLinearTriton.get_meta_args`, in this order), stored per linear as the
    int32 `metadata` tensor."""

    scaled_activations: int
    W_nbits: int
    group_size: int
    unpack_mask: int
    elements_per_sample: int
    input_dtype: int
    output_dtype: int
    acc_dtype: int
    meta_dtype: int
    channel_scale_mode: int
    W_group_mode: int
    data_contiguous: int

    @classmethod
    def from_tensor(cls, metadata, where: str = "metadata") -> GemliteMeta:
        import torch

        values = [int(v) for v in torch.as_tensor(metadata).flatten().tolist()]
        if len(values) != len(cls._fields):
            raise BonsaiValueError(f"{where}: expected {len(cls._fields)} gemlite meta args, got {len(values)}")
        return cls(*values)

    @classmethod
    def released(cls, bits: int, group_size: int = GROUP_SIZE) -> GemliteMeta:
        """The released packs' meta args: 8-bit packing, fp16 activations, fp32 accumulator and scales, fma."""
        return cls(scaled_activations=0, W_nbits=bits, group_size=group_size, unpack_mask=(1 << bits) - 1,
                   elements_per_sample=8 // bits, input_dtype=GEMLITE_FP16, output_dtype=GEMLITE_FP16,
                   acc_dtype=GEMLITE_FP32, meta_dtype=GEMLITE_FP32, channel_scale_mode=0,
                   W_group_mode=GEMLITE_MODE_FMA, data_contiguous=1)

    def to_tensor(self, device=None) -> torch.Tensor:
        import torch

        return torch.tensor(self, dtype=torch.int32, device=device)


# --- the key inventory every transformer layout stores ------------------------------------------------------------


def lowbit_linears(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """The quantized linears: module name -> (out, in)."""
    d, f = config.inner_dim, config.mlp_hidden_dim
    shapes = {}
    for i in range(config.num_layers):
        p = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            shapes[f"{p}.attn.{name}"] = (d, d)
        for ff in ("ff", "ff_context"):
            shapes[f"{p}.{ff}.linear_in"] = (2 * f, d)
            shapes[f"{p}.{ff}.linear_out"] = (d, f)
    for i in range(config.num_single_layers):
        p = f"single_transformer_blocks.{i}.attn"
        shapes[f"{p}.to_qkv_mlp_proj"] = (3 * d + 2 * f, d)
        shapes[f"{p}.to_out"] = (d, d + f)
    return shapes


def dense_tensors(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every other tensor of the transformer: key -> shape (9 linears and the QK-norm vectors)."""
    d, hd = config.inner_dim, config.attention_head_dim
    shapes = {
        "x_embedder.weight": (d, config.in_channels),
        "context_embedder.weight": (d, config.joint_attention_dim),
        "time_guidance_embed.timestep_embedder.linear_1.weight": (d, config.timestep_guidance_channels),
        "time_guidance_embed.timestep_embedder.linear_2.weight": (d, d),
        "double_stream_modulation_img.linear.weight": (6 * d, d),
        "double_stream_modulation_txt.linear.weight": (6 * d, d),
        "single_stream_modulation.linear.weight": (3 * d, d),
        "norm_out.linear.weight": (2 * d, d),
        "proj_out.weight": (config.out_dim, d),
    }
    for i in range(config.num_layers):
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"transformer_blocks.{i}.attn.{n}.weight"] = (hd,)
    for i in range(config.num_single_layers):
        for n in ("norm_q", "norm_k"):
            shapes[f"single_transformer_blocks.{i}.attn.{n}.weight"] = (hd,)
    return shapes


def check_transformer_tensors(tensors: dict, config: TransformerConfig, source) -> None:
    """Strict: exactly the keys and shapes `config` implies; the non-quantized ones dense float tensors."""
    import torch

    dense = dense_tensors(config)
    expected = {**{f"{k}.weight": v for k, v in lowbit_linears(config).items()}, **dense}
    check_state(source, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    for key in dense:
        if not isinstance(tensors[key], torch.Tensor):
            raise BonsaiValueError(f"{source}: {key} must be a dense tensor")
        if not tensors[key].is_floating_point():
            raise BonsaiValueError(f"{source}: {key} must be a float tensor, got {tensors[key].dtype}")
    check_finite(source, {key: tensors[key] for key in dense})


def config_json(config: TransformerConfig) -> dict:
    """The transformer's config.json (diffusers keys)."""
    d = {"_class_name": "Flux2Transformer2DModel", **asdict(config)}
    d["axes_dims_rope"] = list(config.axes_dims_rope)
    return d


def pack_sizes(config: TransformerConfig = KLEIN_4B) -> dict[Kind, dict[str, int]]:
    """Bytes of the transformer tensors in each layout (headers and pickle overhead excluded)."""
    params = sum(o * i for o, i in lowbit_linears(config).values())
    dense16 = 2 * sum(math.prod(s) for s in dense_tensors(config).values())
    return {kind: {layout.name: layout.linear_bytes(kind, params) + dense16 for layout in LAYOUTS} for kind in Kind}


# --- quantization_config.json schemas -----------------------------------------------------------------------------


def _read_released_quant(path: Path) -> tuple[Kind, dict]:
    """The released schema (gemlite and MLX): bits 1 or 2, group_size 128, solver agreeing with bits."""
    file = path / QUANT_FILE
    q = read_json(file)
    bits = field_value(q, ("bits", "nbits"), int, file)
    group = field_value(q, ("group_size", "groupSize"), int, file, GROUP_SIZE)
    kind = Kind.from_bits(bits, str(file))
    if group != GROUP_SIZE:
        raise BonsaiValueError(f"{file}: group_size must be {GROUP_SIZE}, got {group!r}")
    solver = field_value(q, "solver", str, file)
    if solver is not None and (solver == Kind.TERNARY) != (kind is Kind.TERNARY):
        raise BonsaiValueError(f"{file}: solver {solver!r} disagrees with bits {bits}")
    return kind, {**q, "bits": bits, "group_size": group}


def _write_released_quant(kind: Kind, n_linears: int, n_dense: int) -> dict:
    return {"bits": kind.bits, "group_size": GROUP_SIZE, "solver": kind.value, "quantized_count": n_linears,
            "skipped_count": n_dense}


def _read_gemlite_quant(path: Path) -> tuple[Kind, dict]:
    kind, q = _read_released_quant(path)
    file = path / QUANT_FILE
    if path.name != GEMLITE.folder(kind):
        raise BonsaiValueError(f"{file}: bits {q['bits']} disagrees with the folder name {path.name}")
    packing = field_value(q, "packing_bitwidth", int, file, 8)
    if packing not in (8, 32):
        raise BonsaiValueError(f"{file}: packing_bitwidth must be 8 or 32, got {packing!r}")
    return kind, {**q, "packing_bitwidth": packing}


def _write_gemlite_quant(kind: Kind, n_linears: int, n_dense: int) -> dict:
    fmt = {Kind.TERNARY: "gemlite-int2-ternary-g128", Kind.BINARY: "gemlite-int1-g128"}[kind]
    return {"format": fmt, **_write_released_quant(kind, n_linears, n_dense), "input_dtype": "fp16",
            "output_dtype": "fp16"}


def _read_compact_quant(path: Path) -> tuple[Kind, dict]:
    file = path / QUANT_FILE
    q = read_json(file)
    fmt, kind = field_value(q, "format", str, file), field_value(q, "kind", str, file)
    if fmt != _COMPACT_FORMAT or kind not in tuple(Kind) or field_value(q, "group_size", int, file) != GROUP_SIZE:
        raise BonsaiValueError(f"{file}: expected format {_COMPACT_FORMAT!r}, kind ternary|binary and group_size "
                               f"{GROUP_SIZE}, got {q}")
    return Kind(kind), q


def _write_compact_quant(kind: Kind, n_linears: int, n_dense: int) -> dict:
    return {"format": _COMPACT_FORMAT, "kind": kind.value, "group_size": GROUP_SIZE}


# --- readers: transformer folder -> (kind, {diffusers key: LowBitWeight | tensor}, quant_config) ------------------


def _to(state: dict, device) -> dict:
    import torch

    return state if device is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def check_gemlite_linear(source, parts: Mapping) -> None:
    """Raise (check_state's message) unless one linear's gemlite tensors include every one of GEMLITE_KEYS."""
    given = dict.fromkeys((k for k in parts if k in GEMLITE_KEYS), ())
    check_state(source, dict.fromkeys(GEMLITE_KEYS, ()), given, "gemlite linear")


def split_gemlite_state(state: Mapping, source, extra: tuple[str, ...] = ()) -> tuple[dict[str, dict], dict]:
    """A flat gemlite state dict -> ({linear: {leaf: tensor}}, {key: value} of everything else).

    A linear is a key prefix with any of GEMLITE_KEYS as leaves (each must then have all of them); `extra` leaves
    (e.g. "bias", gemlite >= 0.6's "meta_scale") join a linear that has a W_q.
    """
    groups: dict[str, dict] = {}
    rest = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in GEMLITE_KEYS or (leaf in extra and f"{prefix}.W_q" in state):
            groups.setdefault(prefix, {})[leaf] = value
        else:
            rest[key] = value
    for prefix, parts in groups.items():
        check_gemlite_linear(f"{source}: {prefix}", parts)
    return groups, rest


def _read_gemlite(path: Path, config: TransformerConfig, device=None):
    import torch

    from .files import load_torch_file
    from .quant import LowBitWeight

    kind, q = _read_gemlite_quant(path)
    wq_dtype = {8: torch.uint8, 32: torch.int32}[q["packing_bitwidth"]]
    file = path / GEMLITE.weight_file
    state = _to(load_torch_file(file), device)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BonsaiValueError(f"{file}: {key} is a {type(value).__name__}, expected a tensor")
    groups, tensors = split_gemlite_state(state, file)
    for prefix, parts in groups.items():
        where = f"{file}: {prefix}"
        if parts["W_q"].dtype != wq_dtype:
            raise BonsaiValueError(f"{where}.W_q is {parts['W_q'].dtype}, but packing_bitwidth "
                                   f"{q['packing_bitwidth']} means {wq_dtype}")
        meta = GemliteMeta.from_tensor(parts["metadata"], f"{where}.metadata")
        if (meta.W_nbits, meta.group_size) != (q["bits"], q["group_size"]):
            raise BonsaiValueError(f"{where}.metadata says {meta.W_nbits}-bit group {meta.group_size}, "
                                   f"{QUANT_FILE} says {q['bits']}-bit group {q['group_size']}")
        tensors[f"{prefix}.weight"] = LowBitWeight.from_gemlite(**parts, name=where)
    return kind, tensors, q


def _read_mlx(path: Path, config: TransformerConfig, device=None):
    from .files import read_safetensors
    from .quant import LowBitWeight

    kind, q = _read_released_quant(path)
    file = path / MLX.weight_file
    raw = read_safetensors(file, device)
    tensors = {}
    linears = lowbit_linears(config)
    for key, value in raw.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in linears:
            if leaf in ("scales", "biases"):
                continue
            parts = {n: raw.get(f"{prefix}.{n}") for n in ("weight", "scales", "biases")}
            missing = [n for n, t in parts.items() if t is None]
            if missing:
                raise BonsaiValueError(f"{file}: {prefix} misses {missing}")
            bits = parts["weight"].shape[1] * 32 // linears[prefix][1]
            if bits != q["bits"]:
                raise BonsaiValueError(f"{file}: {prefix}.weight {tuple(parts['weight'].shape)} is {bits}-bit for "
                                       f"in={linears[prefix][1]}, {QUANT_FILE} says {q['bits']}-bit")
            tensors[key] = LowBitWeight.from_mlx(**parts, bits=bits, group_size=q["group_size"],
                                                 name=f"{file}: {prefix}")
        else:
            tensors[key] = value
    return kind, tensors, q


def _read_compact(path: Path, config: TransformerConfig, device=None):
    from .files import read_safetensors
    from .quant import LowBitWeight

    kind, q = _read_compact_quant(path)
    file = path / COMPACT.weight_file
    raw = read_safetensors(file, device)
    linears = lowbit_linears(config)
    tensors = {}
    for key, value in raw.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in linears:
            if leaf != "codes":
                continue
            if f"{prefix}.scales" not in raw:
                raise BonsaiValueError(f"{file}: {prefix} misses scales")
            tensors[f"{prefix}.weight"] = LowBitWeight.from_compact(
                value, raw[f"{prefix}.scales"], kind, linears[prefix][1], GROUP_SIZE, name=f"{file}: {prefix}")
        else:
            tensors[key] = value
    return kind, tensors, q


def _read_unpacked(path: Path, config: TransformerConfig, device=None):
    """Dense diffusers transformer: each big linear must be exactly s * codes per group (packed losslessly)."""
    import torch

    from .files import read_safetensors
    from .quant import LowBitWeight

    file = path / UNPACKED.weight_file
    raw = read_safetensors(file, device)
    stated = _manifest_kind(path)
    linears = lowbit_linears(config)
    tensors, has_zero = {}, False
    for key, value in raw.items():
        if key.removesuffix(".weight") not in linears:
            tensors[key] = value
            continue
        check_finite(file, {key: value}, require_float=True)
        # Ternary quantization reproduces binary weights exactly too; zeros alone tell the kinds apart.
        w = LowBitWeight.quantize(value.float(), Kind.TERNARY, GROUP_SIZE)
        if not torch.equal(w.dequantize(value.dtype), value):
            raise BonsaiValueError(f"{file}: {key} is not exactly s * {{-1, 0, +1}} per group of {GROUP_SIZE}; "
                                   "bonsai packs the unpacked release losslessly and will not round it")
        tensors[key], has_zero = w, has_zero or bool((w.codes == 0).any())
    kind = stated or (Kind.TERNARY if has_zero else Kind.BINARY)
    if kind is Kind.BINARY:
        if has_zero:
            raise BonsaiValueError(f"{path.parent / MANIFEST_FILE} says binary, but {file} has zero codes")
        tensors = {k: LowBitWeight.from_codes(v.codes, v.scales, kind, GROUP_SIZE) if isinstance(v, LowBitWeight)
                   else v for k, v in tensors.items()}
    return kind, tensors, {"bits": kind.bits, "group_size": GROUP_SIZE}


def _manifest_kind(path: Path) -> Kind | None:
    """The kind manifest.json's model_version states (e.g. "ternary g128 (bf16 master)"), if it states one."""
    manifest = path.parent / MANIFEST_FILE
    version = str(read_json(manifest).get("model_version", "")) if manifest.is_file() else ""
    stated = [k for k in Kind if k.value in version]
    return stated[0] if len(stated) == 1 else None


def unpacked_kind(path: Path, config: TransformerConfig) -> Kind | str:
    """Kind of a dense release without reading it all: the manifest's, else judged from its first quantized
    linear ("dense" when that is not low-bit)."""
    import torch
    from safetensors import safe_open

    from .quant import LowBitWeight

    if stated := _manifest_kind(path):
        return stated
    linears = list(lowbit_linears(config))
    if not linears:
        return "dense"
    key = f"{linears[0]}.weight"
    file = path / UNPACKED.weight_file
    index = file.with_name(file.name + ".index.json")
    if not file.is_file() and index.is_file():
        shard_files(file)  # checks the weight_map
        name = read_json(index)["weight_map"].get(key)
        if name is None:
            raise BonsaiValueError(f"{index}: weight_map names no file for {key}")
        file = path / name
    if not file.is_file():
        raise BonsaiFileNotFoundError(f"missing file {file}")
    try:
        with safe_open(file, "pt") as f:
            w = f.get_tensor(key)
    except Exception as e:  # SafetensorError, OSError, or a missing key: one line naming the file
        raise BonsaiValueError(f"{file}: cannot read {key} ({one_line(e)})") from None
    q = LowBitWeight.quantize(w.float(), Kind.TERNARY, GROUP_SIZE)
    if not torch.equal(q.dequantize(w.dtype), w):
        return "dense"
    return Kind.TERNARY if bool((q.codes == 0).any()) else Kind.BINARY


def _dense_bf16(weight: LowBitWeight) -> dict:
    import torch

    return {"weight": weight.dequantize(torch.bfloat16)}


# --- the records ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # one record per layout: identity is equality
class TransformerLayout:
    """One on-disk transformer layout.

    folders: transformer folder name per kind (detection tries them in this order).
    text_encoders: names of the `TEXT_ENCODERS` its repos ship (bonsai.testing writes the first).
    read_quant: transformer folder -> (kind, checked quantization_config); None: the layout has no such file.
    write_quant: (kind, number of low-bit linears, number of dense tensors) -> quantization_config.json.
    reader: (transformer folder, config, device) -> (kind, {diffusers key: LowBitWeight | tensor}, quant_config).
    pack: one LowBitWeight -> {leaf: tensor} as stored under "<linear>.<leaf>".
    linear_bytes: (kind, number of low-bit parameters) -> bytes of their stored codes and scales.
    """

    name: str
    folders: Mapping[Kind, str]
    weight_file: str
    text_encoders: tuple[str, ...]
    read_quant: Callable[[Path], tuple[Kind, dict]] | None
    write_quant: Callable[[Kind, int, int], dict] | None
    reader: Callable[[Path, TransformerConfig, Any], tuple[Kind, dict, dict]]
    pack: Callable[[LowBitWeight], dict]
    linear_bytes: Callable[[Kind, int], int]

    @property
    def dirs(self) -> tuple[str, ...]:
        """The folder names, each once, in detection order."""
        return tuple(dict.fromkeys(self.folders.values()))

    @property
    def packed(self) -> bool:
        """Low-bit linears with a quantization_config.json (the dense `unpacked` layout is not)."""
        return self.read_quant is not None

    def folder(self, kind) -> str:
        return self.folders[Kind.parse(kind, f"{self.name} layout")]

    def read(self, path: str | Path, config: TransformerConfig, device=None) -> tuple[Kind, dict, dict]:
        """A transformer folder of this layout -> (kind, tensors, quant_config), strictly checked against config.

        device: where the stored tensors are read and converted (a GPU unpacks and checks 4B codes in a fraction
        of the CPU's time); the result lives there.
        """
        path = Path(path)
        kind, tensors, quant_config = self.reader(path, config, device)
        check_transformer_tensors(tensors, config, path / self.weight_file)
        return kind, tensors, quant_config

    def write(self, folder: str | Path, tensors: dict, config: TransformerConfig, kind) -> Path:
        """Write {key: LowBitWeight | tensor} into folder/<this layout's folder>/; returns that folder."""
        import torch

        from .files import save_tensors
        from .quant import LowBitWeight

        kind = Kind.parse(kind, "kind")
        out = Path(folder) / self.folder(kind)
        out.mkdir(parents=True, exist_ok=True)
        flat: dict[str, torch.Tensor] = {}
        n_linears = 0
        for key, value in tensors.items():
            if not isinstance(value, LowBitWeight):
                # Released files keep the non-quantized tensors in 16-bit.
                flat[key] = value.to(torch.bfloat16).contiguous()
                continue
            if value.kind != kind:
                raise BonsaiValueError(f"{key}: a {value.kind} weight in a {kind} model")
            n_linears += 1
            prefix = key.removesuffix(".weight")
            flat.update({f"{prefix}.{leaf}": t for leaf, t in self.pack(value).items()})
        (out / "config.json").write_text(json.dumps(config_json(config), indent=2))
        if self.write_quant is not None:
            q = self.write_quant(kind, n_linears, len(tensors) - n_linears)
            (out / QUANT_FILE).write_text(json.dumps(q, indent=2))
        save_tensors(flat, out / self.weight_file)
        return out

    def peek_kind(self, path: str | Path, config: TransformerConfig) -> Kind | str:
        """The kind from the folder's config files (a dense layout: `unpacked_kind`), without loading it."""
        path = Path(path)
        return self.read_quant(path)[0] if self.read_quant is not None else unpacked_kind(path, config)

    def hub_patterns(self) -> list[str]:
        """allow_patterns for huggingface_hub: the transformer folder(s) and the text encoder(s) its repos ship
        (every backend reads every text-encoder format: bonsai.weights dequantizes either 4-bit pack)."""
        te = [p for name in self.text_encoders for p in get_text_encoder(name).hub_patterns()]
        return [f"{d}/*" for d in self.dirs] + te


@dataclass(frozen=True)
class TextEncoderFormat:
    """One released text-encoder format: its folder (holding config.json) and weight file.

    tokenizer: its tokenizer folder relative to `folder` ("." = the folder itself); None: it ships none.
    """

    name: str
    folder: str
    weight_file: str
    tokenizer: str | None

    def hub_patterns(self) -> list[str]:
        nested = self.tokenizer not in (None, ".")
        return [f"{self.folder}/*"] + ([f"{self.folder}/{self.tokenizer}/*"] if nested else [])


def _both(name: str) -> Mapping[Kind, str]:
    return MappingProxyType(dict.fromkeys(Kind, name))


GEMLITE = TransformerLayout(
    "gemlite", MappingProxyType({Kind.TERNARY: "transformer-gemlite-int2", Kind.BINARY: "transformer-gemlite-int1"}),
    "state_dict.pt", ("hqq",), _read_gemlite_quant, _write_gemlite_quant, _read_gemlite,
    pack=lambda w: w.to_gemlite(),
    linear_bytes=lambda kind, n: n * kind.bits // 8 + 2 * 4 * (n // GROUP_SIZE))  # fp32 scales + zeros
MLX = TransformerLayout(
    "mlx", _both("transformer-packed-mflux"), "diffusion_pytorch_model.safetensors", ("mlx",),
    _read_released_quant, _write_released_quant, _read_mlx,
    pack=lambda w: w.to_mlx(),
    linear_bytes=lambda kind, n: n * kind.bits // 8 + 2 * 2 * (n // GROUP_SIZE))  # bf16 scales + biases
COMPACT = TransformerLayout(
    "compact", _both("transformer-compact"), "model.safetensors", ("hqq", "mlx", "dense"),  # as converted from
    _read_compact_quant, _write_compact_quant, _read_compact,
    pack=lambda w: w.to_compact(),
    linear_bytes=lambda kind, n: (-(-n // 5) if kind is Kind.TERNARY else n // 8) + 2 * (n // GROUP_SIZE))
UNPACKED = TransformerLayout(
    "unpacked", _both("transformer"), "diffusion_pytorch_model.safetensors", ("dense",),
    None, None, _read_unpacked, pack=_dense_bf16, linear_bytes=lambda kind, n: 2 * n)

LAYOUTS = (GEMLITE, MLX, COMPACT, UNPACKED)  # detection order: packed layouts before the dense transformer/

TE_HQQ = TextEncoderFormat("hqq", "text_encoder-hqq-4bit", "qmodel.pt", "tokenizer")
TE_MLX = TextEncoderFormat("mlx", "text_encoder-mlx-4bit", "model.safetensors", ".")
TE_DENSE = TextEncoderFormat("dense", "text_encoder", "model.safetensors", None)
TEXT_ENCODERS = (TE_HQQ, TE_MLX, TE_DENSE)  # detection order


# --- lookup and detection ---------------------------------------------------------------------------------------


def get_layout(name: str, where: str = "layout") -> TransformerLayout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise BonsaiValueError(f"{where} must be one of {[layout.name for layout in LAYOUTS]}, got {name!r}")


def get_text_encoder(name: str, where: str = "text encoder") -> TextEncoderFormat:
    for fmt in TEXT_ENCODERS:
        if fmt.name == name:
            return fmt
    raise BonsaiValueError(f"{where} must be one of {[fmt.name for fmt in TEXT_ENCODERS]}, got {name!r}")


def find_transformer(folder: str | Path, layout: str | None = None) -> tuple[TransformerLayout, Path]:
    """-> (layout, transformer folder) of a repo folder; packed layouts win over the dense `transformer/`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BonsaiFileNotFoundError(f"model folder {folder} does not exist")
    candidates = (get_layout(layout),) if layout else LAYOUTS
    for found in candidates:
        for sub in found.dirs:
            if (folder / sub).is_dir():
                return found, folder / sub
    expected = ", ".join(f"{sub}/" for found in candidates for sub in found.dirs)
    raise BonsaiFileNotFoundError(f"{folder} holds no transformer folder (expected one of {expected})")


def find_text_encoder(folder: str | Path) -> tuple[TextEncoderFormat, Path]:
    """-> (format, text-encoder folder) of a repo folder: the first format whose folder has a config.json."""
    folder = Path(folder)
    for fmt in TEXT_ENCODERS:
        if (folder / fmt.folder / "config.json").is_file():
            return fmt, folder / fmt.folder
    expected = ", ".join(f"{fmt.folder}/config.json" for fmt in TEXT_ENCODERS)
    raise BonsaiFileNotFoundError(f"{folder} holds no text encoder (expected one of {expected})")


__all__ = ["Kind", "GemliteMeta", "TransformerLayout", "TextEncoderFormat", "LAYOUTS", "TEXT_ENCODERS", "GEMLITE",
           "MLX", "COMPACT", "UNPACKED", "TE_HQQ", "TE_MLX", "TE_DENSE", "GROUP_SIZE", "GEMLITE_KEYS", "get_layout",
           "get_text_encoder", "find_transformer", "find_text_encoder", "lowbit_linears", "dense_tensors",
           "pack_sizes", "split_gemlite_state"]
