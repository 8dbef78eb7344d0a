"""What travels between the server and the clients: weights as raw bytes, the run's config, normalization
stats, and the checks a returned update must pass before it is aggregated.

Only trainable weights travel, as raw little-endian bytes (`fl.transport_dtype`: float32 weights, or
bfloat16 deltas from the weights the client received, which keep small updates that bf16 weights would
round away).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from zk0lib.config import ExperimentConfig, load_config, validate

RAW = "zk0.raw"  # stype of an array holding the parameter itself
RAW_DELTA = "zk0.raw-delta"  # stype of an array holding (local - global)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def encode_arrays(
    weights: dict[str, torch.Tensor], dtype: str, reference: dict[str, torch.Tensor] | None = None
) -> ArrayRecord:
    """Named tensors -> ArrayRecord of raw bytes in `dtype`; with `reference`, the difference is sent."""
    out = OrderedDict()
    for name, w in weights.items():
        value = w.detach().to("cpu", torch.float32)
        if reference is not None:
            value = value - reference[name].to(torch.float32)
        value = value.to(TORCH_DTYPES[dtype]).contiguous()
        out[name] = Array(
            dtype=dtype,
            shape=tuple(value.shape),
            stype=RAW if reference is None else RAW_DELTA,
            data=value.view(torch.uint8).numpy().tobytes(),
        )
    return ArrayRecord(out)


def decode_arrays(record: ArrayRecord, reference: dict[str, torch.Tensor] | None = None) -> OrderedDict:
    """ArrayRecord (zk0 raw, raw-delta or Flower numpy) -> fp32 tensors; deltas are added to `reference`."""
    out = OrderedDict()
    for name, arr in record.items():
        if arr.stype in (RAW, RAW_DELTA):
            flat = torch.frombuffer(bytearray(arr.data), dtype=TORCH_DTYPES[arr.dtype])
            value = flat.reshape(tuple(arr.shape)).to(torch.float32)
            if arr.stype == RAW_DELTA:
                if reference is None:
                    raise ValueError(f"array {name} is a delta but no reference weights were given")
                value = reference[name].to(torch.float32) + value
        else:
            value = torch.from_numpy(np.array(arr.numpy(), dtype=np.float32))
        out[name] = value
    return out


def to_numpy_record(weights: dict[str, torch.Tensor]) -> ArrayRecord:
    """The form Flower's strategies aggregate: numpy float32 arrays."""
    return ArrayRecord(OrderedDict((k, Array(v.numpy())) for k, v in weights.items()))


def payload_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def config_from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """`config-json` (base64 JSON, written by `zk0 train`) wins; else `preset` plus dotted `set` overrides."""
    raw = str(run_config.get("config-json", "") or "")
    if raw:
        text = raw if raw.lstrip().startswith("{") else base64.b64decode(raw).decode()
        return validate(ExperimentConfig.from_dict(json.loads(text)))
    return load_config(str(run_config.get("preset", "demo")), str(run_config.get("set", "") or ""))


def encode_config(cfg: ExperimentConfig) -> str:
    return base64.b64encode(cfg.to_json().encode()).decode()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stats_to_record(stats: dict[str, dict[str, Any]]) -> ArrayRecord:
    """Normalization stats of the policy's features (observations and action) as named float64 arrays."""
    return ArrayRecord(
        OrderedDict(
            (f"{feat}|{stat}", Array(np.asarray(value, dtype=np.float64)))
            for feat, s in sorted(stats.items())
            if feat.startswith("observation.") or feat == "action"
            for stat, value in sorted(s.items())
        )
    )


def stats_from_record(record: ArrayRecord) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in record.items():
        feat, stat = key.split("|")
        out.setdefault(feat, {})[stat] = arr.numpy()
    return out


STATS_IN_CONFIG = "zk0.norm-stats"  # the stats record as bytes, in a train message's one ConfigRecord


def record_to_bytes(record: ArrayRecord) -> bytes:
    """An ArrayRecord of numpy arrays as .npz bytes (for a message that may carry only one ArrayRecord)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: a.numpy() for k, a in record.items()})
    return buffer.getvalue()


def record_from_bytes(raw: bytes) -> ArrayRecord:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return ArrayRecord(OrderedDict((k, Array(z[k])) for k in z.files))


def stats_digest(record: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for key, arr in record.items():
        digest.update(key.encode() + arr.data)
    return digest.hexdigest()[:16]


def check_update(arrays: ArrayRecord, global_w: dict[str, torch.Tensor]) -> str | None:
    """Why a returned update cannot be aggregated (keys, shapes, dtype), or None when it can."""
    if set(arrays.keys()) != set(global_w):
        missing, extra = set(global_w) - set(arrays.keys()), set(arrays.keys()) - set(global_w)
        return f"keys differ from the global weights ({len(missing)} missing, {len(extra)} unexpected)"
    for name, arr in arrays.items():
        if tuple(arr.shape) != tuple(global_w[name].shape):
            return f"{name}: shape {tuple(arr.shape)} != {tuple(global_w[name].shape)}"
        if arr.stype in (RAW, RAW_DELTA) and arr.dtype not in TORCH_DTYPES:
            return f"{name}: unsupported dtype {arr.dtype}"
    return None


def screen_update(
    arrays: ArrayRecord,
    global_w: dict[str, torch.Tensor],
    max_norm: float,
    reject_zero: bool = False,
    clipped_to: float | None = None,
) -> tuple[OrderedDict | None, str | None]:
    """(the client's weights, None) when an update may be aggregated, else (None, why not): same keys,
    shapes and dtypes as the global weights, finite values, ||update|| <= max_norm (and > 0 with
    `reject_zero`: Flower 1.41's DP clipping divides by the norm, flwrlabs/flower#7631; and within
    `clipped_to`, to float rounding, where the client clips its own update)."""
    problem = check_update(arrays, global_w)
    if problem is not None:
        return None, problem
    weights = decode_arrays(arrays, reference=global_w)
    if not all(torch.isfinite(w).all() for w in weights.values()):
        return None, "update has NaN or Inf values"
    norm = math.sqrt(sum(float(((w - global_w[k]) ** 2).sum()) for k, w in weights.items()))
    if norm > max_norm:
        return None, f"update norm {norm:.4g} exceeds fl.max_update_norm={max_norm:g}"
    if reject_zero and norm == 0:
        return None, "update is exactly zero (the client did not move); DP clipping cannot scale it"
    if clipped_to is not None and norm > clipped_to * (1 + 1e-4):
        return None, (
            f"update norm {norm:.6g} exceeds privacy.clipping_norm={clipped_to:g}: the client did not clip it "
            "(privacy.mode=client-clipping needs zk0's ClientApp, which runs Flower's fixedclipping_mod)"
        )
    return weights, None
