"""Prove primal == dual for every layer of a bundle, streaming its patterns once, in float64."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..bundle.reader import Bundle
from .tied import partner_learned

# The format's tolerance (docs/format.md section 7): max abs error <= 1e-4 * max(1, max|weight|)
# for float32 storage, 1e-10 * max(1, max|weight|) for float64 storage.
F32_RELATIVE_TOLERANCE = 1e-4
F64_RELATIVE_TOLERANCE = 1e-10
# Unit roundoff (half the machine epsilon) and smallest subnormal of each dtype.
_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
_SUBNORMAL = {"F64": 2.0**-1074, "F32": 2.0**-149, "F16": 2.0**-24, "BF16": 2.0**-133}
# training.compute_dtype (mixed precision: what autograd computed the gradients in)
_COMPUTE = {"float16": "F16", "bfloat16": "BF16"}


@dataclass
class LayerCheck:
    name: str
    kind: str
    storage_dtype: str
    patterns: int
    weight_max_abs_error: float
    bias_max_abs_error: float | None
    output_max_abs_error: float | None  # primal vs dual on the test queries
    tolerance: float
    rounding_bound: float  # what rounding keys/values to the storage dtype can explain
    ok: bool
    # The residual W_T − w0 − Σ v kᵀ (with the bias's): what no pattern explains. Rounding-level in
    # an exact bundle; in an approximate one (Adam: docs/format.md `dual_form`) the part of the
    # learned change the recorded patterns leave out.
    approximate: bool = False
    residual_norm: float = 0.0  # Frobenius, weight and bias together
    learned_change_norm: float = 0.0  # ‖W_T − w0‖ (and the bias's)
    explained: float = 1.0  # 1 − residual_norm / learned_change_norm
    output_residual_share: float | None = None  # ‖residual · q‖ / ‖(W_T − w0) · q‖ over every query row


@dataclass
class ChecksumCheck:
    """The per-tensor checksums of the manifest, recomputed (bundle/checksums.py)."""

    algorithm: str | None  # None: the bundle stores none (or they were skipped)
    checked: int = 0
    changed: list[str] = field(default_factory=list)  # stored bytes differ from what the writer hashed
    missing: list[str] = field(default_factory=list)  # hashed by the writer, gone from the bundle
    unlisted: list[str] = field(default_factory=list)  # in the bundle, unknown to the writer (added later)
    skipped: bool = False  # --no-checksums

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.unlisted)

    @property
    def problems(self) -> list[str]:
        return ([f"tensor {n!r} changed since it was written" for n in self.changed]
                + [f"tensor {n!r} is missing (the writer stored it)" for n in self.missing]
                + [f"tensor {n!r} was added after the bundle was written" for n in self.unlisted])


def verify_checksums(bundle: Bundle) -> ChecksumCheck:
    """Recompute every tensor's checksum, streaming each tensor's bytes once."""
    stored = bundle.manifest.checksums
    if stored is None:
        return ChecksumCheck(None)
    algorithm, digests = stored["algorithm"], stored["tensors"]
    check = ChecksumCheck(algorithm)
    present = set(bundle.tensor_names)
    for name, digest in digests.items():
        if name not in present:
            check.missing.append(name)
            continue
        check.checked += 1
        if bundle.digest(name, algorithm) != digest:
            check.changed.append(name)
    check.unlisted = sorted(present - set(digests))
    return check


@dataclass
class VerifyReport:
    path: str
    layers: list[LayerCheck] = field(default_factory=list)
    # The recorder's attribution check as the manifest records it (None: a version-1 bundle,
    # recorded before the check existed).
    attribution: dict | None = None
    not_covered: list[str] | None = None
    checksums: ChecksumCheck = field(default_factory=lambda: ChecksumCheck(None))

    @property
    def ok(self) -> bool:
        """Every checksum matches, every layer within tolerance, and no failed attribution
        check in the recording."""
        return (self.checksums.ok and all(layer.ok for layer in self.layers)
                and not (self.attribution or {}).get("failed"))

    @property
    def approximate(self) -> bool:
        """The bundle's dual form is approximate (Adam): its layers' `ok` means the residual is as
        recorded, not primal == dual."""
        return any(layer.approximate for layer in self.layers)

    def to_json(self) -> dict:
        return {"bundle": self.path, "ok": self.ok, "exact": not self.approximate,
                "layers": [asdict(layer) for layer in self.layers],
                "attribution": self.attribution if self.attribution is not None else
                {"checked": False, "reason": "recorded before the attribution check existed (format version 1)"},
                "not_covered": self.not_covered,
                "checksums": {**asdict(self.checksums), "ok": self.checksums.ok}}


def add_patterns(kind: str, learned: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
    """learned += Σ_t v_t k_tᵀ in the stored layout (docs/format.md 4a), float64: linear and conv
    [out, in]; embedding rows by token id; elementwise Σ v ⊙ k."""
    if kind == "elementwise":
        learned += (values * keys).sum(axis=0)
    elif kind == "embedding":
        np.add.at(learned, keys, values)
    else:
        learned += values.T @ keys


def verify_layer(bundle: Bundle, layer: str, rows: int = 1 << 15) -> LayerCheck:
    """Recompute weight (and the test outputs) from w0 + Σ v kᵀ and compare with the primal."""
    spec = bundle.layer_spec(layer)
    emb = spec.kind == "embedding"
    weight = bundle.array(f"layer/{layer}/weight").astype(np.float64)
    w0 = bundle.array(f"layer/{layer}/w0").astype(np.float64)
    learned = np.zeros_like(weight)  # Σ_t v_t k_tᵀ, in the stored layout
    magnitude = np.zeros_like(weight)  # Σ_t |v_t| |k_t|ᵀ: scale of the rounding error
    bias_sum = np.zeros(spec.out_features)
    abs_key_sum = np.zeros(weight.shape[0] if emb else spec.in_features)
    # Every query row of every query set (docs/format.md section 7).
    sets = [bundle.queries(n) for n in bundle.query_set_names]
    query_rows = [qs.bundle.array(qs.row_name(layer, "query")) for qs in sets]
    queries = np.concatenate(query_rows) if query_rows else np.zeros((0,) if emb else (0, spec.in_features), dtype=np.int64 if emb else np.float32)
    dual_out = None
    if not emb and queries.shape[0]:
        q = queries.astype(np.float64)
        dual_out = np.zeros((q.shape[0], spec.out_features))
    bias_scale = bundle.bias_scale(layer)  # the bias's own chain, when it has one
    elementwise = spec.kind == "elementwise"
    if elementwise:
        dual_out = None  # y = γ ⊙ q + β: the outputs follow from the sums below
    for chunk in bundle.chunks(layer, rows):
        v = chunk.values.astype(np.float64)
        bias_term = bias_scale[chunk.step] if bias_scale is not None else np.ones(len(v))
        k = chunk.keys if emb else chunk.keys.astype(np.float64)
        add_patterns(spec.kind, learned, k, v)
        add_patterns(spec.kind, magnitude, k if emb else np.abs(k), np.abs(v))
        if emb:
            np.add.at(abs_key_sum, chunk.keys, 1.0)
        else:
            abs_key_sum += np.abs(k).sum(axis=0)
            if spec.bias:
                bias_sum += bias_term @ v
        if not (emb or elementwise):
            if dual_out is not None:
                # Σ_t α_t v_t over the chunk, in blocks of query rows so that α stays ~64 MB.
                step = max(1, (8 << 20) // max(k.shape[0], 1))
                for lo in range(0, q.shape[0], step):
                    alpha = k @ q[lo : lo + step].T  # [n, rows]
                    if spec.bias:
                        alpha += bias_term[:, None]
                    dual_out[lo : lo + step] += alpha.T @ v
    tied = partner_learned(bundle, layer)  # the other use of a tied weight updates it too
    if tied is not None:
        learned = learned + tied[0]
        magnitude = magnitude + tied[1]
        if dual_out is not None:
            dual_out += q @ tied[0].T
    reconstructed = w0 + learned
    weight_err = float(np.abs(weight - reconstructed).max(initial=0.0))
    bias_err = None
    if spec.bias:
        bias = bundle.array(f"layer/{layer}/bias").astype(np.float64)
        b0 = bundle.array(f"layer/{layer}/b0").astype(np.float64)
        bias_err = float(np.abs(bias - (b0 + bias_sum)).max(initial=0.0))
    out_err = None
    if elementwise and queries.shape[0]:
        q = queries.astype(np.float64)
        primal = q * weight + (bias if spec.bias else 0.0)
        dual = q * (w0 + learned) + ((b0 + bias_sum) if spec.bias else 0.0)
        out_err = float(np.abs(primal - dual).max(initial=0.0))
    elif emb and queries.shape[0]:
        out_err = float(np.abs(weight[queries] - reconstructed[queries]).max(initial=0.0))
    elif dual_out is not None:
        primal = q @ weight.T
        dual = q @ w0.T + dual_out
        if spec.bias:
            primal += bias
            dual += b0
        out_err = float(np.abs(primal - dual).max(initial=0.0))

    storage = bundle.storage_dtype(layer) if spec.patterns else bundle.info(f"layer/{layer}/weight").dtype
    scale = max(1.0, float(np.abs(weight).max(initial=0.0)))
    tolerance = (F64_RELATIVE_TOLERANCE if storage == "F64" else F32_RELATIVE_TOLERANCE) * scale
    # Rounding keys and values to the storage dtype moves each product by at most
    # ~2u|v||k| (+ underflow of tiny values): the honest allowance for float16/bfloat16. Under
    # mixed precision each step's gradient was itself rounded by a half-precision matmul:
    # at most u|Σ v kᵀ| <= u Σ|v||k| more.
    rounding = 0.0
    compute = _COMPUTE.get(str(bundle.manifest.training.get("compute_dtype")))
    if storage not in ("F32", "F64") or compute:
        u = (_ROUNDOFF[storage] if storage not in ("F32", "F64") else 0.0) + (_ROUNDOFF[compute] if compute else 0.0)
        sub = max(_SUBNORMAL[storage], _SUBNORMAL[compute] if compute else 0.0)
        keys_scale = abs_key_sum[:, None] if emb else (abs_key_sum if elementwise else abs_key_sum[None, :])
        rounding = float((2.05 * u * magnitude + sub * keys_scale).max(initial=0.0))
        tolerance += rounding
    # Outputs are compared at the scale of the outputs themselves.
    out_tol = tolerance
    if out_err is not None and not emb and queries.shape[0]:
        out_tol = tolerance * max(1.0, float(np.abs(queries).sum(axis=1).max(initial=0.0)) + (1.0 if spec.bias else 0.0))
    ok = weight_err <= tolerance and (bias_err is None or bias_err <= tolerance) and (out_err is None or out_err <= out_tol)
    res_sq = float(((weight - reconstructed) ** 2).sum())
    change_sq = float(((weight - w0) ** 2).sum())
    if spec.bias:
        res_sq += float(((bias - b0 - bias_sum) ** 2).sum())
        change_sq += float(((bias - b0) ** 2).sum())
    out_share = None
    if dual_out is not None:
        out_change = float(np.linalg.norm(primal - (q @ w0.T + (b0 if spec.bias else 0.0))))
        out_share = float(np.linalg.norm(primal - dual)) / out_change if out_change > 0 else 0.0
    check = LayerCheck(layer, spec.kind, storage, spec.patterns, weight_err, bias_err, out_err, tolerance, rounding, ok,
                       residual_norm=res_sq ** 0.5, learned_change_norm=change_sq ** 0.5,
                       explained=1.0 - (res_sq / change_sq) ** 0.5 if change_sq > 0 else 1.0,
                       output_residual_share=out_share)
    if bundle.manifest.approximate:
        # primal == dual is not the claim here: the bundle says what the patterns leave out, and
        # that statement (the recorder's residual) is what is checked, to the same tolerance.
        stated = bundle.manifest.dual_form.get("layers", {}).get(layer, {}).get("residual_norm")
        check.approximate = True
        check.ok = stated is None or abs(stated - check.residual_norm) <= tolerance * max(1.0, check.learned_change_norm)
    return check


def verify_bundle(bundle: Bundle, check_contents: bool = True, checksums: bool = True) -> VerifyReport:
    """Recompute the checksums, validate contents (ids, order, finiteness; raises BundleError),
    then check every layer. A bundle whose bytes are not what its writer wrote is reported as
    such and its layers are not checked: any number computed from it would mislead."""
    nc = bundle.manifest.extra.get("not_covered")
    report = VerifyReport(str(bundle.path), attribution=bundle.manifest.attribution,
                          not_covered=list(nc) if isinstance(nc, list) else None)
    if checksums:
        report.checksums = verify_checksums(bundle)
        if not report.checksums.ok:
            return report
    else:
        report.checksums = ChecksumCheck(None, skipped=True)
    if check_contents:
        bundle.validate_contents()
    for spec in bundle.manifest.layers:
        report.layers.append(verify_layer(bundle, spec.name))
    return report
