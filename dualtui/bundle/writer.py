"""Write bundles: per-pattern data spooled to disk in chunks while recording, then one
streaming pass that lays out the final file(s) under a temporary name and renames them.

Memory stays bounded by one chunk per layer however long training runs, and a crash never
leaves a half-written file under the final name. The spool is a journal: `write_journal`
makes everything needed to build a bundle of the steps so far reach disk (chunks, arrays, and
`journal.json` listing them, renamed into place last), so a process killed with SIGKILL can be
finished by `dualtui recover` (record/journal.py). A sharded set is replaced atomically: each
write tags its shards with a generation, and the index, renamed last, names them.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..units import human_bytes
from . import checksums
from .manifest import METADATA_KEY, LayerSpec, Manifest
from .reader import INDEX_SUFFIX
from .safetensors_io import DTYPES, PendingTensor, iter_rows, write_file

# numpy dtype of a spooled array -> safetensors dtype name
_NP_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
             np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("uint8"): "U8",
             np.dtype("int8"): "I8", np.dtype("int16"): "I16", np.dtype("bool"): "BOOL"}
STORAGE_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}
JOURNAL = "journal.json"
LOCK_SUFFIX = ".lock"


class OutputError(Exception):
    """The output cannot be written (missing folder, no permission, disk full, busy): one line."""


def check_output(path: str | os.PathLike, estimate: int | None = None) -> list[str]:
    """Refuse an output path that cannot be written, before anything trains; returns warnings
    (too little free space for the estimated size)."""
    path = BundleWriter.output_of(path)
    if path.suffix != ".safetensors":
        raise OutputError(f"{path}: a bundle path must end in .safetensors")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name ending in .safetensors")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"{path}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder {parent} is not writable")
    warnings = []
    if estimate:
        free = shutil.disk_usage(parent).free
        # the patterns are written twice (the spool, then the bundle) before the spool goes
        if free < 2 * estimate:
            warnings.append(f"{parent} has {human_bytes(free)} free; this recording needs about {human_bytes(2 * estimate)} "
                            f"while it runs ({human_bytes(estimate)} for the bundle)")
    return warnings


def exists_bundle(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + ".index.json").exists()


def partial_path(path: Path) -> Path:
    """Where a partial recording goes when a bundle is already at `path`: NAME.partial.safetensors."""
    return path.with_name(path.name[: -len(".safetensors")] + ".partial.safetensors")


def _is_full(e: OSError) -> bool:
    """ENOSPC, a quota, or numpy's short write ("N requested and M written", no errno)."""
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or (e.errno is None and "requested and" in str(e))


def _disk_full(e: OSError, path: Path, needed: int | None) -> OutputError:
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path(".")).free
    need = f"about {human_bytes(needed)} needed, " if needed else ""
    return OutputError(f"no space left on the device writing {path}: {need}{human_bytes(free)} free")
# Rows copied at a time when laying out the final file: bounds memory during finalize.
COPY_ROWS = 1 << 15


def _cast(a: np.ndarray, st_dtype: str) -> np.ndarray:
    """Cast float data to a storage dtype; bfloat16 rounds to nearest even from float32 bits."""
    if st_dtype == "BF16":
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        out = (rounded >> 16).astype(np.uint16)
        nan = np.isnan(a)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    return np.ascontiguousarray(a, dtype=DTYPES[st_dtype])


@dataclass
class _LayerSpool:
    spec: LayerSpec
    fields: tuple[str, ...]
    buffers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    buffered_rows: int = 0
    buffered_bytes: int = 0
    chunk_files: list[dict[str, Path]] = field(default_factory=list)
    chunk_rows: list[int] = field(default_factory=list)


class BundleWriter:
    """Accumulates per-pattern chunks on disk; `finalize` writes the bundle atomically.

    Values are spooled raw (the recorder's error signals) and transformed at finalize by
    `value_transform(chunk_values, chunk_steps)`, because the SGD-family coefficient of a
    step is only known once training ends.

    spool: an existing spool to continue (resume) or to finish (recover) instead of a new one;
    its journal's chunks are taken up to `chunks_upto` per layer (a resumed run drops what was
    journaled after its checkpoint).
    """

    def __init__(self, path: str | os.PathLike, *, storage_dtype: str = "float32",
                 chunk_bytes: int = 32 << 20, max_shard_bytes: int = 4 << 30, spool: Path | None = None,
                 lock: bool = True, spool_tag: str = ""):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
        self.path = self.output_of(path)
        check_output(self.path)
        self.storage = STORAGE_DTYPES[storage_dtype]
        self.chunk_bytes = chunk_bytes
        self.max_shard_bytes = max_shard_bytes
        self.lock_path = self.path.with_name(f".{self.path.name}{LOCK_SUFFIX}")
        self._locked = False
        if lock:
            self._lock()
        # The spool lives beside the output so the final rename never crosses file systems.
        try:
            self.spool = spool or Path(tempfile.mkdtemp(prefix=f".{self.path.name}.spool-{spool_tag}",
                                                           dir=self.path.parent))
        except OSError as e:
            self._unlock()
            raise OutputError(f"{self.path}: cannot create the spool beside it ({e.strerror or e})") from None
        self.layers: dict[str, _LayerSpool] = {}
        self.journaled: dict = {}  # what the last journal holds
        self.generation = 0  # of the next journal (names the files of arrays that change)
        self.failed: str | None = None  # a write failed (disk full): only abandon() is left
        self.max_example = -1  # the largest example id appended (sizes the label and task tables)

    @staticmethod
    def output_of(path: str | os.PathLike) -> Path:
        p = Path(path)
        return p.with_name(p.name[: -len(".index.json")]) if p.name.endswith(INDEX_SUFFIX) else p

    # ------------------------------------------------------------ one writer per output
    def _lock(self) -> None:
        """Two recordings to one path would race: the second is refused while the first runs
        (a lock file with its pid; a lock left by a process that is gone is taken over)."""
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock_path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise OutputError(f"{self.path}: another recording (pid {pid}) is writing it; wait for it or "
                                      f"choose another output (lock: {self.lock_path})") from None
                _remove_quietly(self.lock_path)  # stale: its process is gone
                continue
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create its lock file ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return

    def _unlock(self) -> None:
        if self._locked:
            _remove_quietly(self.lock_path)
            self._locked = False

    # ------------------------------------------------------------ recording
    def add_layer(self, spec: LayerSpec, with_position: bool = False) -> None:
        fields = ("keys", "values", "step", "example") + (("position",) if with_position else ())
        self.layers[spec.name] = _LayerSpool(spec, fields, {f: [] for f in fields})

    def append(self, layer: str, **arrays: np.ndarray) -> None:
        """Add patterns to a layer: keys, values (raw), step, example[, position] of equal length."""
        spool = self.layers[layer]
        n = None
        for f in spool.fields:
            a = arrays[f]
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"{layer}: {f} has {a.shape[0]} rows, expected {n}")
            spool.buffers[f].append(a)
            spool.buffered_bytes += a.nbytes
            if f == "example" and a.size:
                self.max_example = max(self.max_example, int(a.max()))
        spool.buffered_rows += n or 0
        if spool.buffered_bytes >= self.chunk_bytes:
            self.flush(layer)

    def flush(self, layer: str) -> None:
        spool = self.layers[layer]
        if spool.buffered_rows == 0:
            return
        index = len(spool.chunk_files)
        files = {}
        for f in spool.fields:
            name = f"{list(self.layers).index(layer)}.{index}.{f}.npy"
            self._save(name, np.concatenate(spool.buffers[f]))
            spool.buffers[f] = []
            files[f] = self.spool / name
        spool.chunk_files.append(files)
        spool.chunk_rows.append(spool.buffered_rows)
        spool.buffered_rows = spool.buffered_bytes = 0

    def flush_all(self) -> None:
        for layer in self.layers:
            self.flush(layer)

    def _save(self, name: str, array: np.ndarray) -> None:
        """np.save into the spool under a temporary name, renamed when complete."""
        tmp = self.spool / (name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())  # on disk before any journal names it (a power cut, not only SIGKILL)
            os.replace(tmp, self.spool / name)
        except OSError as e:
            _remove_quietly(tmp)
            raise self._failure(_disk_full(e, self.spool / name, array.nbytes) if _is_full(e) else
                                OutputError(f"cannot write {self.spool / name}: {e.strerror or e}")) from None

    def save_array(self, name: str, array: np.ndarray, changing: bool = False) -> str:
        """Keep an array in the spool for the journal (the recorder's weights, tables, queries).
        An array that changes during the recording (the current weights, the label table) is
        saved under a new name for every journal (`changing`): the journal on disk keeps
        naming the file of its own step until the new journal is renamed into place, so a
        SIGKILL between the two never pairs one step's patterns with another step's weights."""
        file = f"a.{name.replace('/', '~')}" + (f".g{self.generation}" if changing else "") + ".npy"
        self._save(file, np.asarray(array))
        return file

    def load_array(self, file: str) -> np.ndarray:
        return np.load(self.spool / file, allow_pickle=False)

    def write_journal(self, state: dict, arrays: dict[str, str]) -> None:
        """Flush every layer and write journal.json (renamed into place last): from here on,
        `dualtui recover` (record/journal.py) rebuilds the bundle of the steps in `state` after any crash."""
        self.flush_all()
        journal = {
            "format": "dualtui.journal", "version": 1, "output": str(self.path), "storage": self.storage,
            "generation": self.generation,
            "layers": {name: {"spec": sp.spec.to_json(), "fields": list(sp.fields),
                              "chunks": [{"files": {f: p.name for f, p in files.items()}, "rows": rows}
                                         for files, rows in zip(sp.chunk_files, sp.chunk_rows)]}
                       for name, sp in self.layers.items()},
            "arrays": arrays,
            "state": state,
        }
        tmp = self.spool / (JOURNAL + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(journal))  # one C-encoded string: json.dump's chunked encoder is ~5x slower
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.spool / JOURNAL)
        except OSError as e:
            _remove_quietly(tmp)
            raise self._failure(_disk_full(e, self.spool / JOURNAL, None) if _is_full(e) else
                                OutputError(f"cannot write {self.spool / JOURNAL}: {e.strerror or e}")) from None
        _fsync_dir(self.spool)
        # Files of the previous journal's generation that the new one no longer names are
        # dead now; the checkpoint copies ("@step") stay for a resume from that checkpoint.
        previous = self.journaled.get("arrays", {}) if self.journaled else {}
        keep = set(arrays.values())
        for file in set(previous.values()) - keep:
            if "@" not in file:
                _remove_quietly(self.spool / file)
        self.journaled = journal
        self.generation += 1

    @staticmethod
    def read_journal(spool: Path) -> dict:
        with open(spool / JOURNAL, encoding="utf-8") as f:
            return json.load(f)

    def adopt(self, journal: dict, chunks_upto: dict[str, int] | None = None) -> None:
        """Take the journal's layers and chunks (the first chunks_upto[layer] of each)."""
        for name, lay in journal["layers"].items():
            sp = _LayerSpool(LayerSpec.from_json(lay["spec"]), tuple(lay["fields"]), {f: [] for f in lay["fields"]})
            keep = lay["chunks"] if chunks_upto is None else lay["chunks"][: chunks_upto.get(name, 0)]
            for c in keep:
                sp.chunk_files.append({f: self.spool / n for f, n in c["files"].items()})
                sp.chunk_rows.append(int(c["rows"]))
                ex = np.load(sp.chunk_files[-1]["example"], mmap_mode="r")
                if ex.size:
                    self.max_example = max(self.max_example, int(ex.max()))
            self.layers[name] = sp
        self.journaled = journal
        self.generation = int(journal.get("generation", 0)) + 1

    def iter_chunks(self, layer: str) -> Iterator[dict[str, np.ndarray]]:
        """The spooled raw chunks of a layer, memory-mapped (flushes the buffer first)."""
        self.flush(layer)
        for files in self.layers[layer].chunk_files:
            yield {f: np.load(p, mmap_mode="r") for f, p in files.items()}

    def patterns(self, layer: str) -> int:
        spool = self.layers[layer]
        return sum(spool.chunk_rows) + spool.buffered_rows

    def chunk_counts(self) -> dict[str, int]:
        return {name: len(sp.chunk_files) for name, sp in self.layers.items()}

    # ------------------------------------------------------------ finalizing
    def finalize(self, manifest: Manifest, static: dict[str, np.ndarray],
                 value_transform: Callable[[str, np.ndarray, np.ndarray], np.ndarray], *, partial: bool = False,
                 keep_spool: bool = False) -> Path:
        """Write the bundle: `static` tensors (weights, queries, train/*) plus the spooled
        patterns, values passed through `value_transform(layer, values, steps)`. Returns the
        path to open (the file, or the index of a sharded set). A partial recording never
        replaces a bundle already at the path: it goes to NAME.partial.safetensors instead.
        On failure (disk full) nothing half-written is left, and the spool stays: its journal
        is what `dualtui recover` finishes. `keep_spool`: the spool stays after a successful
        write too (a checkpoint's state_dict names it: a resumed job continues it)."""
        if os.environ.get("DUALTUI_STOP_IN_FINALIZE"):  # tests only: a signal lands here, deterministically
            os.kill(os.getpid(), signal.SIGSTOP)
        self.flush_all()
        target = partial_path(self.path) if partial and exists_bundle(self.path) else self.path
        tensors: list[PendingTensor] = []
        for spec in manifest.layers:
            spool = self.layers[spec.name]
            spec.patterns = sum(spool.chunk_rows)
            spec.chunks = max(1, len(spool.chunk_rows))
            chunk_list = spool.chunk_files or [None]
            for f in spool.fields:
                for c, files in enumerate(chunk_list):
                    name = f"layer/{spec.name}/{f}" + (f"/{c}" if spec.chunks > 1 else "")
                    tensors.append(self._pattern_tensor(spec, f, name, files))
        for name, array in static.items():
            array = np.ascontiguousarray(array)
            tensors.append(PendingTensor(name, _NP_TO_ST[array.dtype], tuple(array.shape),
                                         lambda a=array: iter_rows(a, COPY_ROWS)))
        self._value_transform = value_transform
        needed = sum(t.nbytes for t in tensors)
        try:
            out = self._write(target, tensors, manifest)
        except OSError as e:
            for tmp in self.spool.glob("*.tmp"):
                _remove_quietly(tmp)
            for tmp in self.spool.glob("*.safetensors"):
                _remove_quietly(tmp)
            raise self._failure(_disk_full(e, target, needed) if _is_full(e) else
                                OutputError(f"cannot write {target}: {e.strerror or e}")) from None
        if not keep_spool:
            shutil.rmtree(self.spool, ignore_errors=True)
        self._unlock()
        return out

    def _pattern_tensor(self, spec: LayerSpec, f: str, name: str, files: dict[str, Path] | None) -> PendingTensor:
        emb = spec.kind == "embedding"
        if files is None:  # a layer that saw no patterns still gets well-formed empty tensors
            width = {"keys": None if emb else spec.in_features, "values": spec.out_features}.get(f)
            shape = (0,) if width is None else (0, width)
            dtype = "I64" if (f not in ("keys", "values") or (f == "keys" and emb)) else self.storage
            return PendingTensor(name, dtype, shape, lambda: iter(()))
        arr = np.load(files[f], mmap_mode="r")
        if f in ("step", "example", "position") or (f == "keys" and emb):
            return PendingTensor(name, "I64", tuple(arr.shape), lambda: (a.astype(np.int64) for a in iter_rows(arr, COPY_ROWS)))
        if f == "keys":
            return PendingTensor(name, self.storage, tuple(arr.shape), lambda: (_cast(a, self.storage) for a in iter_rows(arr, COPY_ROWS)))

        def values() -> Iterator[np.ndarray]:
            steps = np.load(files["step"], mmap_mode="r")
            for lo in range(0, arr.shape[0], COPY_ROWS):
                v = self._value_transform(spec.name, np.asarray(arr[lo : lo + COPY_ROWS]), np.asarray(steps[lo : lo + COPY_ROWS]))
                yield _cast(v, self.storage)

        return PendingTensor(name, self.storage, tuple(arr.shape), values)

    def _write(self, target: Path, tensors: list[PendingTensor], manifest: Manifest) -> Path:
        """Lay out the tensors in one file or a sharded set; the manifest gets each tensor's
        checksum, computed as it streams (one pass over the data)."""
        algorithm = checksums.DEFAULT

        def metadata(digests: dict[str, str]) -> dict[str, str]:
            manifest.checksums = {"algorithm": algorithm, "tensors": digests}
            return {METADATA_KEY: manifest.to_json()}

        shards: list[list[PendingTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        index_path = target.with_name(target.name + ".index.json")
        old_shards = _shards_of(index_path)
        if len(shards) == 1:
            tmp = self.spool / "bundle.safetensors.tmp"
            write_file(tmp, shards[0], {}, checksum=algorithm, finish=metadata)
            os.replace(tmp, target)
            # A sharded set of the same name would be shadowed by the file anyway; drop it.
            _remove_quietly(index_path)
            for old in old_shards:
                _remove_quietly(target.parent / old)
            _fsync_dir(target.parent)
            return target
        stem = target.name[: -len(".safetensors")]
        n = len(shards)
        gen = secrets.token_hex(4)  # this write's shards never share a name with the set it replaces
        names = [f"{stem}-{gen}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        digests: dict[str, str] = {}
        for shard_name, shard in zip(names, shards):
            digests.update(write_file(self.spool / shard_name, shard, {"format": "pt"}, checksum=algorithm))
        weight_map = {t.name: shard_name for shard_name, shard in zip(names, shards) for t in shard}
        index = {"metadata": {**metadata(digests), "total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        tmp_index = self.spool / "index.json.tmp"
        tmp_index.write_text(json.dumps(index, indent=1))
        # New shards beside the old set first, the index switched last (atomically), the old
        # set's shards removed after: a reader sees the old set or the new one, never a mix.
        moved: list[str] = []
        try:
            for shard_name in names:
                os.replace(self.spool / shard_name, target.parent / shard_name)
                moved.append(shard_name)
            _fsync_dir(target.parent)
            os.replace(tmp_index, index_path)
        except BaseException:  # the old index still rules: this write's shards are strays, remove them
            for shard_name in moved:
                _remove_quietly(target.parent / shard_name)
            raise
        _fsync_dir(target.parent)
        # `Bundle.open(NAME.safetensors)` prefers an existing single file: drop an older one.
        _remove_quietly(target)
        for old in old_shards:
            if old not in weight_map.values():
                _remove_quietly(target.parent / old)
        return index_path

    def _failure(self, err: OutputError) -> OutputError:
        self.failed = self.failed or str(err)  # the first failure is the one to report
        return err

    def abandon(self) -> str:
        """After a failed write (disk full): keep only what the last journal names, so the spool
        is a consistent, recoverable journal and takes no more room than that; release the
        output. Returns one sentence for the error message saying what is left."""
        self._unlock()
        steps = (self.journaled or {}).get("state", {}).get("step", 0)
        if not steps or not (self.spool / JOURNAL).exists():
            shutil.rmtree(self.spool, ignore_errors=True)
            return "no step had been journaled yet, so its spool was removed"
        named = {JOURNAL} | set(self.journaled.get("arrays", {}).values())
        for lay in self.journaled.get("layers", {}).values():
            for c in lay["chunks"]:
                named |= set(c["files"].values())
        for f in self.spool.iterdir():
            if f.name not in named:
                _remove_quietly(f)
        size = sum(f.stat().st_size for f in self.spool.iterdir())
        return (f"the journal of the first {steps} steps is kept in {self.spool} ({human_bytes(size)}): free some space "
                f"and run `dualtui recover {self.path}`, or delete that folder")

    def discard(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)
        self._unlock()

    def release(self) -> None:
        """Let the output go without writing (the spool stays, for `dualtui recover`)."""
        self._unlock()


def _shards_of(index_path: Path) -> list[str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        return sorted({v for v in index.get("weight_map", {}).values() if isinstance(v, str) and "/" not in v})
    except (OSError, ValueError, AttributeError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet is a zombie: gone, for a lock
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
