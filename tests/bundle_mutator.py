"""A seeded mutator of safetensors bundles, and the properties every command must keep on
whatever it makes (issue 12). Used by tests/test_fuzz.py (a few hundred cases in CI) and
benchmarks/fuzz_bundles.py (thousands). It knows only the safetensors layout and the
manifest's JSON, never dualtui's reader, so it produces what a broken or hostile writer
would: flipped bytes, truncations, edited headers and manifests, hostile names, ids and
floats written into tensors, tensors dropped or renamed.
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path

import numpy as np

# Values a hostile manifest or header might hold, as JSON text (some are not Python-representable
# the same way: a 400-digit integer, a bare NaN).
HOSTILE_JSON = ["-1", "0", "1", "2", "9223372036854775808", "1" + "0" * 400, "1e308", "-1e308", "NaN", "Infinity",
                "0.5", "true", "null", '""', "[]", "{}", '"\\u001b]0;PWNED\\u0007"', '"[/]"', '"[bold red]x"',
                '"x/../../ESCAPED"', '"' + "A" * 5000 + '"', '[1, 2, 3]', '{"a": 1}', '"\\u001b[2J"', '"0"']
HOSTILE_NAMES = ["\x1b]0;PWNED\x07", "[/]", "[bold]x[/", "\x1b[2J\x1b[H", "a\rb", "\x9b31m", "x/../../ESCAPED",
                 "..", "\u202etxt", "\x00", "name\nsecond line"]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")  # a control byte a terminal acts on (tab and newline are fine)

# Commands run on each mutated bundle (arguments after the bundle path).
COMMANDS = [["info"], ["verify"], ["rank", "--test", "0"], ["rank", "--test", "1", "--group", "example", "--csv"],
            ["rank", "--test", "0", "--json"], ["mass", "--test", "0"], ["mass", "--test", "0", "--json"],
            ["layers", "--test", "0"], ["votes"], ["votes", "--json"], ["info", "--json"]]


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set_raw(obj, path, raw_json: str) -> str:
    """JSON text of `obj` with the value at `path` replaced by `raw_json` (verbatim text, so
    NaN and 400-digit integers get through)."""
    marker = "\u2603MARK\u2603"
    target = obj
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = marker
    return json.dumps(obj).replace(json.dumps(marker), raw_json)


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of a bundle file's bytes; returns (new bytes, what was done)."""
    header, data = split(raw)
    meta = header.get("__metadata__", {})
    manifest = json.loads(meta["dualtui"]) if "dualtui" in meta else None
    # Most mutations keep the checksums away so the mutation reaches the validation under
    # test; some keep them (verify must then say what changed).
    if manifest is not None and rng.random() < 0.8:
        manifest.pop("checksums", None)
    tensors = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["flip", "truncate", "manifest", "manifest", "manifest", "names", "tensor-values", "tensor-values",
                       "header", "drop", "rename"])

    def with_manifest(text: str) -> bytes:
        h = dict(header)
        h["__metadata__"] = {**meta, "dualtui": text}
        return join(h, data)

    if kind == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        return bytes(b), "flip"
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))], "truncate"
    if kind == "manifest" and manifest is not None:
        paths = [p for p, _ in _paths(manifest) if p]
        path = rng.choice(paths)
        return with_manifest(_set_raw(manifest, path, rng.choice(HOSTILE_JSON))), f"manifest {'.'.join(map(str, path))[:60]}"
    if kind == "names" and manifest is not None:
        name = rng.choice(HOSTILE_NAMES)
        where = rng.choice(["tasks", "classes", "vocab", "layer"])
        if where == "tasks" and manifest.get("tasks"):
            manifest["tasks"][rng.randrange(len(manifest["tasks"]))] = name
        elif where == "classes" and manifest.get("classes"):
            manifest["classes"][rng.randrange(len(manifest["classes"]))] = name
        elif where == "vocab" and manifest.get("input", {}).get("vocab"):
            manifest["input"]["vocab"][rng.randrange(len(manifest["input"]["vocab"]))] = name
        else:
            layer = rng.choice(manifest["layers"])
            old, layer["name"] = layer["name"], name
            h = {(k.replace(f"layer/{old}/", f"layer/{name}/") if k != "__metadata__" else k): v for k, v in header.items()}
            h["__metadata__"] = {**meta, "dualtui": json.dumps(manifest)}
            return join(h, data), f"names layer {name!r}"
        return with_manifest(json.dumps(manifest)), f"names {where} {name!r}"
    if kind == "tensor-values":
        name = rng.choice(tensors)
        entry = header[name]
        lo, hi = entry["data_offsets"]
        dtype = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BF16": "<u2"}.get(entry["dtype"])
        if dtype is None or hi == lo:
            return raw, "noop"
        arr = np.frombuffer(data[lo:hi], dtype=dtype).copy()
        pool = ([np.nan, np.inf, -np.inf, 1e30, -0.0] if arr.dtype.kind == "f" else
                [-1, 2**31, 2**62, -(2**63), int(arr.max(initial=0)) + 1])
        how = rng.choice(["some", "scale", "roll"])
        if how == "some":
            for _ in range(rng.randint(1, 4)):
                arr[rng.randrange(arr.size)] = rng.choice(pool) if arr.dtype.kind != "u" else rng.randrange(256)
        elif how == "scale" and arr.dtype.kind == "f":
            arr *= rng.choice([2.0, -1.0, 0.0])
        else:
            arr = np.roll(arr, rng.randint(1, 5))
        new = data[:lo] + arr.tobytes() + data[hi:]
        h = dict(header)
        if manifest is not None:
            h["__metadata__"] = {**meta, "dualtui": json.dumps(manifest)}
        return join(h, new), f"tensor-values {name} {how}"
    if kind == "header":
        name = rng.choice(tensors)
        field = rng.choice(["dtype", "shape", "data_offsets"])
        text = _set_raw(json.loads(json.dumps(header)), (name, field), rng.choice(HOSTILE_JSON + ['"F64"', '"I8"', "[0, 0]", "[-1]"]))
        return join(text, data), f"header {name} {field}"
    if kind == "drop":
        name = rng.choice(tensors)
        h = {k: v for k, v in header.items() if k != name}
        return join(h, data), f"drop {name}"
    if kind == "rename":
        name = rng.choice(tensors)
        h = {(k + rng.choice(["x", "/0", "/../x"]) if k == name else k): v for k, v in header.items()}
        return join(h, data), f"rename {name}"
    return raw, "noop"


def check(result, cmd: list[str]) -> str | None:
    """What is wrong with one command's result (None: nothing). `result`: click's Result."""
    out = result.output  # stdout and stderr, as a terminal would show them
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {result.exception.__class__.__name__}: {str(result.exception)[:120]}"
    if "Traceback" in out:
        return "printed a traceback"
    if result.exit_code not in (0, 1, 2, 3):
        return f"exit code {result.exit_code}"
    text = out if "--json" not in cmd else result.stderr  # --json escapes per JSON
    if CONTROL.search(text):
        return f"control byte in the output: {CONTROL.search(text).group()!r}"
    if "--json" in cmd and result.exit_code in (0, 1) and result.stdout.strip():
        try:
            json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as e:
            return f"not strict JSON: {str(e)[:80]}"
    if result.exit_code == 3 and len(result.stderr.strip().splitlines()) != 1:
        return "an invalid bundle did not give exactly one line"
    return None


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}
