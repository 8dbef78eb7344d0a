"""Failure injection for the fault-tolerance tests (fl.inject_failure; refused unless ZK0_ENABLE_FAULT_INJECTION=1)."""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import torch
from flwr.app import Array, ArrayRecord

from zk0lib.config import ExperimentConfig, parse_faults
from zk0lib.fl.transport import TORCH_DTYPES


def injected_fault(cfg: ExperimentConfig, partition_id: int, server_round: int) -> str | None:
    """Carry out fl.inject_failure for this client and round (tests only; validate() guards it).

    raise: the client raises; exit: its process dies; hang: it answers after fl.round_timeout_s;
    nan / shape: it returns a poisoned update (returned, for the caller to apply)."""
    if not cfg.fl.inject_failure:
        return None
    modes = [m for m, p, r in parse_faults(cfg.fl.inject_failure) if p == partition_id and r == server_round]
    if not modes:
        return None
    mode = modes[0]
    if mode == "raise":
        raise RuntimeError(
            f"injected failure: client {partition_id} raises in round {server_round} (fl.inject_failure)"
        )
    if mode == "exit":
        os._exit(17)
    if mode == "hang":
        time.sleep(cfg.fl.round_timeout_s + 5)
    return mode


def corrupt(arrays: ArrayRecord, mode: str) -> ArrayRecord:
    """A poisoned copy of an update: NaN in its first tensor, or its first tensor with one row too many."""
    out = OrderedDict(arrays.items())
    name, first = next(iter(out.items()))
    value = torch.frombuffer(bytearray(first.data), dtype=TORCH_DTYPES[first.dtype]).reshape(tuple(first.shape))
    if mode == "nan":
        value = value.clone()
        value.view(-1)[0] = float("nan")
    else:
        value = torch.cat([value, value[:1]]) if value.dim() else value.reshape(1).repeat(2)
    out[name] = Array(
        dtype=first.dtype, shape=tuple(value.shape), stype=first.stype, data=value.view(torch.uint8).numpy().tobytes()
    )
    return ArrayRecord(out)
