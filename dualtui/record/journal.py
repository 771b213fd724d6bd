"""The recording's journal, and the one way a bundle is composed from it.

A recording's spool (`.NAME.safetensors.spool-*` beside the output) is a journal: at start, at
bounded intervals while training (`Recorder(journal_every=..., journal_seconds=...)`) and when
the recording ends, everything needed to build a bundle of the steps completed so far reaches
disk: the pattern chunks, the initial and current weights of every recorded layer, the
per-step optimizer scalars, the training tables, the query sets, and `journal.json` naming
them (renamed into place last). `compose` turns a journal state into the bundle's manifest and
tensors; `Recorder.close` and `dualtui recover` (after SIGKILL, the OOM killer, a scheduler's
grace period) both go through it, so a recovered bundle is built exactly like a normal one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..bundle.manifest import APPROXIMATE_VERSION, VERSION, LayerSpec, Manifest, QuerySetSpec
from ..engine.verify import add_patterns
from ..bundle.writer import BundleWriter, OutputError
from .coefficients import StepRecord, coefficients
from .distributed import SPOOL_RANK, merge, rank_spools
from .errors import RecorderError

_SPEC_KEYS = ("name", "kind", "in_features", "out_features", "bias", "patterns", "chunks")


def steps_json(steps: list[StepRecord]) -> list[list]:
    return [[s.lr, s.momentum, s.dampening, s.nesterov, s.weight_decay, s.maximize, s.active, s.scale]
            + ([s.rule, s.precondition] if s.rule != "sgd" else []) for s in steps]


def steps_from_json(rows: list[list]) -> list[StepRecord]:
    return [StepRecord(float(r[0]), float(r[1]), float(r[2]), bool(r[3]), float(r[4]), bool(r[5]), bool(r[6]), float(r[7]),
                       str(r[8]) if len(r) > 8 else "sgd", float(r[9]) if len(r) > 9 else 1.0) for r in rows]


def bias_chain(C: np.ndarray, bias_steps: list[StepRecord], name: str,
               failures: list[str]) -> tuple[float | None, np.ndarray | None]:
    """The bias's initial factor and, when its coefficient chain differs from the weight's, the
    per-step ratio of its coefficient to the weight's (docs/format.md: layer/<L>/bias_scale)."""
    if not bias_steps:
        return None, None
    a_b, C_b = coefficients(bias_steps)
    if np.array_equal(C_b, C):
        return a_b, None
    ratio = np.ones(len(C), dtype=np.float64)
    nz = C != 0
    ratio[nz] = C_b[nz] / C[nz]
    stuck = ~nz & (C_b != 0)
    if stuck.any():  # cannot happen with a trained weight; say so rather than hide it
        failures.append(f"layer {name!r}: the bias moved at steps where the weight did not "
                        f"(first: step {int(np.nonzero(stuck)[0][0])}); its dual form is incomplete")
        ratio[stuck] = 0.0
    ratio[~nz & (C_b == 0)] = 0.0
    return a_b, ratio


def residual_summary(spec: LayerSpec, static: dict[str, np.ndarray], chunks: Iterable[dict[str, np.ndarray]],
                     C: np.ndarray, bias_ratio: np.ndarray | None) -> dict[str, float]:
    """What the patterns of an approximate recording leave out of the learned change: the
    residual W_T − w0 − Σ v kᵀ (and the bias's), in float64 (docs/format.md `dual_form`)."""
    L = spec.name
    weight, w0 = (static[f"layer/{L}/{n}"].astype(np.float64) for n in ("weight", "w0"))
    learned = np.zeros_like(weight)
    bias_sum = np.zeros(spec.out_features)
    for chunk in chunks:
        v = np.asarray(chunk["values"], dtype=np.float64) * C[np.asarray(chunk["step"])][:, None]
        keys = np.asarray(chunk["keys"])
        add_patterns(spec.kind, learned, keys if spec.kind == "embedding" else keys.astype(np.float64), v)
        if spec.bias:
            bias_sum += (bias_ratio[np.asarray(chunk["step"])] if bias_ratio is not None else np.ones(len(v))) @ v
    res_sq = float(((weight - w0 - learned) ** 2).sum())
    change_sq = float(((weight - w0) ** 2).sum())
    if spec.bias:
        bias, b0 = (static[f"layer/{L}/{n}"].astype(np.float64) for n in ("bias", "b0"))
        res_sq += float(((bias - b0 - bias_sum) ** 2).sum())
        change_sq += float(((bias - b0) ** 2).sum())
    return {"residual_norm": res_sq ** 0.5, "learned_change_norm": change_sq ** 0.5,
            "explained": 1.0 - (res_sq / change_sq) ** 0.5 if change_sq > 0 else 1.0}


def compose(state: dict, specs: list[LayerSpec], get: Callable[[str], np.ndarray | None],
            chunks: Callable[[str], Iterable[dict[str, np.ndarray]]] | None = None
            ) -> tuple[Manifest, dict[str, np.ndarray], Callable]:
    """The bundle of a journal state: manifest, static tensors and the value transform.
    `get(key)` returns a journaled array (None when absent); `chunks(layer)` the spooled raw
    patterns (for the residual of an approximate recording)."""
    f64 = state["storage_dtype"] == "float64"
    cast = (lambda a: np.asarray(a, dtype=np.float64)) if f64 else (lambda a: np.asarray(a, dtype=np.float32))  # noqa: E731
    static: dict[str, np.ndarray] = {}
    coeffs: dict[str, np.ndarray] = {}
    bias_ratios: dict[str, np.ndarray | None] = {}
    failures = list(state.get("check_failures", []))
    for spec in specs:
        L = spec.name
        lay = state["layers"][L]
        a, C = coefficients(steps_from_json(lay["steps"]))
        coeffs[L] = C
        static[f"layer/{L}/weight"] = cast(get(f"now/{L}/w"))
        static[f"layer/{L}/w0"] = cast(a * np.asarray(get(f"init/{L}/w"), dtype=np.float64))
        if spec.bias:
            a_b, ratio = bias_chain(C, steps_from_json(lay["bias_steps"]), L, failures)
            static[f"layer/{L}/bias"] = cast(get(f"now/{L}/b"))
            static[f"layer/{L}/b0"] = cast((a if a_b is None else a_b) * np.asarray(get(f"init/{L}/b"), dtype=np.float64))
            bias_ratios[L] = ratio
            if ratio is not None:
                static[f"layer/{L}/bias_scale"] = ratio
                spec.extra["bias_scale"] = True
        spec.extra.update(lay.get("spec_extra", {}))
    query_sets = [QuerySetSpec(**{k: v for k, v in q.items() if k != "extra"}) for q in state.get("query_sets", [])]
    for q in query_sets:
        for key in state["query_arrays"][q.name]:
            static[key] = get(key)
    static["train/label"] = np.asarray(get("train/label"), dtype=np.int64)
    static["train/task"] = np.asarray(get("train/task"), dtype=np.int64)
    train_input = get("train/input")
    if train_input is not None:
        static["train/input"] = train_input
    label_ids = [static["train/label"]] + [static[f"queries/{q.name}/{f}"] for q in query_sets
                                           for f in ("label", "prediction", "target")]
    task_ids = [static["train/task"]] + [static[f"queries/{q.name}/task"] for q in query_sets]
    labels_n = int(max(x.max(initial=-1) for x in label_ids)) + 1
    tasks_n = int(max(x.max(initial=-1) for x in task_ids)) + 1
    classes = state["classes"] if state["classes"] is not None else [str(i) for i in range(max(labels_n, 1))]
    tasks = state["tasks"] if state["tasks"] is not None else (["all"] if tasks_n <= 1 else [f"task {i}" for i in range(tasks_n)])
    training = {**state["training"], "steps": state["step"]}
    for key in ("interrupted", "compute_dtype", "skipped_steps", "recovered"):
        if state.get(key):
            training[key] = state[key]
    if failures:
        training["check_failures"] = failures
    extra = {"not_covered": state["not_covered"], **state["extra"]}
    version = VERSION
    if state.get("dual_form") is not None:  # an adaptive optimizer (record/adaptive.py)
        dual_form = dict(state["dual_form"])
        if not dual_form["exact"]:
            version = APPROXIMATE_VERSION
            if chunks is not None:
                dual_form["layers"] = {spec.name: residual_summary(spec, static, chunks(spec.name), coeffs[spec.name],
                                                                   bias_ratios.get(spec.name)) for spec in specs}
        extra["dual_form"] = dual_form
    manifest = Manifest(layers=specs, tasks=tasks, classes=classes, input=state["input"], optimizer=state["optimizer"],
                        training=training, version=version, extra=extra, query_sets=query_sets,
                        attribution=state["attribution"])

    def transform(layer: str, raw: np.ndarray, steps: np.ndarray) -> np.ndarray:
        return raw.astype(np.float64) * coeffs[layer][steps][:, None]

    return manifest, static, transform


def find_spools(path: Path) -> list[Path]:
    """The spools of recordings to `path` (a spool folder itself, or an output path); of a
    data-parallel recording, one (its rank 0's) stands for all its ranks."""
    path = Path(path)
    if path.is_dir() and (path / "journal.json").exists():
        return [path]
    name = path.name[: -len(".index.json")] if path.name.endswith(".index.json") else path.name
    found, runs = [], set()
    for p in sorted(path.parent.glob(f".{name}.spool-*")):
        if not (p / "journal.json").exists():
            continue
        m = SPOOL_RANK.search(p.name)
        if m is not None:
            if m["run"] in runs:
                continue
            runs.add(m["run"])
        found.append(p)
    return found


def _read(spool: Path) -> dict:
    try:
        journal = BundleWriter.read_journal(spool)
    except (OSError, ValueError) as e:
        raise RecorderError(f"{spool}: its journal cannot be read ({e})") from None
    if journal.get("format") != "dualtui.journal":
        raise RecorderError(f"{spool}: not a dualtui recording journal")
    return journal


_STORAGE = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}


def write_merged(spools: list[Path], target: Path, *, partial: bool, state_update: dict | None = None,
                 max_shard_bytes: int = 4 << 30) -> tuple[Path, dict]:
    """One bundle from the journals of a data-parallel recording's ranks (distributed.merge):
    the ranks' spools stay (the caller removes them once this returns)."""
    journals = [_read(sp) for sp in spools]

    def loader(spool: Path) -> Callable:
        return lambda file, mmap=False: np.load(spool / file, mmap_mode="r" if mmap else None, allow_pickle=False)

    loaders = [loader(sp) for sp in spools]
    writer = BundleWriter(target, storage_dtype=_STORAGE[journals[0]["storage"]], max_shard_bytes=max_shard_bytes)
    try:
        state, tables, base = merge(journals, writer, loaders)
        state.update(state_update or {})
        # the test-side query sets are rank 0's (the ranks' models are the same)
        state["query_sets"] = journals[0]["state"].get("query_sets", [])
        state["query_arrays"] = journals[0]["state"].get("query_arrays", {})
        specs = [writer.layers[name].spec for name in state["layer_order"]]

        def get(key: str) -> np.ndarray | None:
            if key in tables:
                return tables[key]
            source = 0 if key.startswith("queries/") else base
            file = journals[source]["arrays"].get(key)
            return None if file is None else loaders[source](file)

        manifest, static, transform = compose(state, specs, get, writer.iter_chunks)
        return writer.finalize(manifest, static, transform, partial=partial), state
    except BaseException:
        writer.discard()
        raise


def recover(path: Path, out: Path | None = None) -> tuple[Path, dict]:
    """Write the bundle of the journaled steps of a recording that never finished. Returns the
    bundle's path and the journal state. A bundle already at the output is never replaced: the
    recovered one goes to NAME.partial.safetensors then."""
    spools = find_spools(path)
    if not spools:
        raise RecorderError(f"{path}: no recording journal here (a spool .NAME.safetensors.spool-*/journal.json)")
    if len(spools) > 1:
        raise RecorderError(f"{path}: {len(spools)} unfinished recordings to this output; name one: "
                            + ", ".join(str(s) for s in spools))
    spool = spools[0]
    ranks = rank_spools(spool)
    if ranks is not None:  # a data-parallel recording: its ranks' journals become one bundle
        first = _read(ranks[0])
        state = {"recovered": f"from the journals of {len(ranks)} ranks (the recording never finished)",
                 "interrupted": first["state"].get("interrupted") or "not finished (recovered from its journal)"}
        target = Path(out) if out is not None else Path(first["output"])
        written, merged = write_merged(ranks, target, partial=True, state_update=state)
        for r in ranks:
            shutil.rmtree(r, ignore_errors=True)
        return written, merged
    journal = _read(spool)
    state = journal["state"]
    target = Path(out) if out is not None else Path(journal["output"])
    writer = BundleWriter(target, storage_dtype=_STORAGE[journal["storage"]], spool=spool)  # also refuses a recording still running
    writer.adopt(journal)
    specs = [writer.layers[name].spec for name in state["layer_order"]]
    arrays = journal["arrays"]

    def get(key: str) -> np.ndarray | None:
        file = arrays.get(key)
        return None if file is None else writer.load_array(file)

    state = {**state, "recovered": f"from the journal at step {state['step']} (the recording never finished)"}
    state["interrupted"] = state.get("interrupted") or "not finished (recovered from its journal)"
    manifest, static, transform = compose(state, specs, get, writer.iter_chunks)
    try:
        return writer.finalize(manifest, static, transform, partial=True), state
    except OutputError:
        writer.release()
        raise


def state_of_check(check: Any) -> dict:
    """The attribution check's progress, for a resumed recording to continue it."""
    return {"steps": list(check.steps), "layer_error": dict(check.layer_error), "tolerance": check.tolerance,
            "skipped": dict(check.skipped), "not_reached": sorted(check.not_reached), "reached": sorted(check.reached),
            "input_rule": check.input_rule, "output_rule": check.output_rule, "failure": check.failure,
            "coupled": sorted(check.coupled), "coupling": list(check.coupling)}


def restore_check(check: Any, d: dict) -> None:
    check.steps = list(d["steps"])
    check.layer_error = dict(d["layer_error"])
    check.tolerance = d["tolerance"]
    check.skipped = dict(d["skipped"])
    check.not_reached = set(d["not_reached"])
    check.reached = set(d["reached"])
    check.input_rule, check.output_rule, check.failure = d["input_rule"], d["output_rule"], d["failure"]
    check.coupled, check.coupling = set(d["coupled"]), list(d["coupling"])


