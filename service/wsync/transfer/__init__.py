"""wsync.transfer: the pure-torch sync core (process groups, dense buckets, sparse encodings,
validation, apply, fingerprints). No Ray, no HTTP."""

from .dense import plan_buckets, recv_dense, send_dense
from .encodings import ENCODINGS, WIRE_ENCODINGS, SparseMeta, SparsePatch, decode, encode
from .fingerprint import digest, fingerprint, fingerprint_tensor
from .group import Rendezvous, SyncGroup, backend_for, free_port, open_group
from .meta import TensorMeta, TransferStats, dtype_name, param_metas, torch_dtype
from .sparse import (
    apply_patch,
    apply_patches,
    payload_bytes,
    plan_sparse,
    recv_sparse,
    recv_sparse_with_stats,
    send_sparse,
    stream_layout,
)
from .validate import (
    MetaMismatchError,
    PatchValidationError,
    check_metas,
    validate_params,
    validate_patches,
)

__all__ = [
    "Rendezvous", "SyncGroup", "open_group", "free_port", "backend_for",
    "TensorMeta", "TransferStats", "dtype_name", "torch_dtype", "param_metas",
    "plan_buckets", "send_dense", "recv_dense",
    "SparsePatch", "SparseMeta", "ENCODINGS", "WIRE_ENCODINGS", "encode", "decode", "plan_sparse",
    "send_sparse", "recv_sparse", "recv_sparse_with_stats", "apply_patch", "apply_patches",
    "payload_bytes", "stream_layout",
    "PatchValidationError", "MetaMismatchError", "validate_patches", "check_metas", "validate_params",
    "fingerprint", "fingerprint_tensor", "digest",
]
