"""One model-config type for every Llama generation, read from HF config.json, GGUF metadata or a llama2.c header.

Standard library and numpy only: the runtime reads the same type from an export or artifact directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llamac.errors import InputError

ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


_REQUIRED = object()


def _int(d: dict[str, Any], key: str, default: Any = _REQUIRED, null_is_default: bool = False) -> int:
    """An integer field of config.json: true, 2.5 or "4" would otherwise become 1, 2 or 4 without a word."""
    v = d.get(key, default)
    if v is None and null_is_default:
        v = default
    if v is _REQUIRED:
        raise InputError(f"config.json lacks {key!r}")
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise InputError(f"config.json: {key} must be an integer, got {v!r}")
    return int(v)


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3"|"freq_factors", ...} with the HF keys (freq_factors: GGUF rope_freqs).
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = dataclasses.field(default_factory=lambda: [2])
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if int(self.max_position_embeddings) <= 0:
            raise InputError(f"model config: the context (max_position_embeddings) must be positive, got "
                             f"{self.max_position_embeddings}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not 0 < float(getattr(self, name)) < math.inf:      # NaN fails too
                raise InputError(f"model config: {name} must be a positive number, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"model config: {self.num_heads} heads are not a multiple of {self.num_kv_heads} kv heads")
        if self.head_dim % 2:
            raise InputError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ROPE_TYPES[1:]:
            raise InputError(f"unsupported rope scaling type {self.rope_scaling.get('rope_type')!r} "
                             f"(supported: linear, llama3)")

    # ---- our own serialization (also valid HF config.json, so transformers loads an export dir) ----
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        return d

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type", "llama")
        if model_type != "llama" or (archs and not any(a == "LlamaForCausalLM" for a in archs)):
            raise InputError(f"unsupported architecture {archs or model_type!r}: llamac exports LlamaForCausalLM models")
        if d.get("hidden_act", "silu") != "silu":
            raise InputError(f"unsupported activation {d['hidden_act']!r} (Llama uses silu)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise InputError("unsupported: attention or MLP bias (Llama models have none)")
        try:
            hidden, heads = _int(d, "hidden_size"), _int(d, "num_attention_heads")
            rope_theta, scaling = _read_rope(d)
            eos = d.get("eos_token_id", 2)
            return cls(
                vocab_size=_int(d, "vocab_size"),
                hidden_size=hidden,
                num_layers=_int(d, "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=_int(d, "num_key_value_heads", heads, null_is_default=True),
                head_dim=_int(d, "head_dim", hidden // heads if heads > 0 else 0, null_is_default=True),
                intermediate_size=_int(d, "intermediate_size"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
                max_position_embeddings=_int(d, "max_position_embeddings", 2048),
            )
        except KeyError as e:
            raise InputError(f"config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise InputError(f"config.json has a malformed value: {e}") from None

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise InputError(f"{path}: no config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: not a model config (a JSON object is expected)")
        return cls.from_hf_dict(d)

    # ---- RoPE frequencies (the one place that interprets rope_scaling) ----
    def rope_inv_freq(self) -> np.ndarray:
        """Per-pair inverse frequencies [head_dim/2] (float64), with the scaling applied, in HF's rotate-half layout."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        s = self.rope_scaling
        if s is None:
            return inv
        kind = s["rope_type"]
        if kind == "linear":
            return inv / float(s["factor"])
        if kind == "freq_factors":
            return inv / np.asarray(s["factors"], dtype=np.float64)
        # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        orig = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen > orig / low, inv / factor, inv)
        mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        return np.where(mid, blended, out)


def _read_rope(d: dict[str, Any]) -> tuple[float, dict | None]:
    """Both spellings: transformers-5 `rope_parameters` (theta inside) and older `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form; Llama has one type
        params = params["full_attention"]
    scaling = dict(params) if isinstance(params, dict) else (dict(d["rope_scaling"]) if d.get("rope_scaling") else None)
    theta = float((params or {}).get("rope_theta", d.get("rope_theta", 10000.0)))
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES[1:]:
        raise InputError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")
    keys = {"linear": ("factor",), "freq_factors": ("factors",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise InputError(f"rope scaling {kind!r} lacks {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": kind}
    for k in keys:
        v = scaling[k]
        out[k] = int(v) if k.startswith("original") else [float(f) for f in v] if k == "factors" else float(v)
    return theta, out


def llama3_scaling_from_factors(factors: np.ndarray, inv_freq: np.ndarray) -> dict | None:
    """GGUF stores llama3 scaling as per-pair divisors (rope_freqs); recover the HF parameters when they fit exactly."""
    factors = np.asarray(factors, dtype=np.float64)
    for orig in [2 ** k for k in range(4, 19)]:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            s = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": low,
                 "high_freq_factor": high, "original_max_position_embeddings": orig}
            wavelen = 2 * math.pi / inv_freq
            smooth = (orig / wavelen - low) / (high - low)
            f = s["factor"]
            expected = np.where(wavelen < orig / high, 1.0,
                                np.where(wavelen > orig / low, f, 1.0 / ((1 - smooth) / f + smooth)))
            if np.allclose(expected, factors, rtol=1e-5, atol=0):
                return s
    return None
