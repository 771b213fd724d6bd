"""Bundle format v1: manifest, lazy reader (single file or sharded), streaming writer."""

from .errors import BundleError
from .manifest import FORMAT, VERSION, LayerSpec, Manifest, parse_manifest
from .reader import Bundle, PatternChunk
from .writer import STORAGE_DTYPES, BundleWriter

__all__ = ["Bundle", "BundleError", "BundleWriter", "FORMAT", "LayerSpec", "Manifest", "PatternChunk",
           "STORAGE_DTYPES", "VERSION", "parse_manifest"]
