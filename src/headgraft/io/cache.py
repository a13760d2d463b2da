"""A feature cache: the head inputs of file data, stored once per model, preprocessing and data.

Computing head inputs runs the frozen backbone over every example, the slow part of ``stats``,
``add --data`` and the frozen regime of ``learn``. The cache stores them as safetensors files,
one per key made of

* the model: the bytes, dtypes and shapes of every ``state_dict`` tensor except the head's
  own, the module tree outside the head (class names and ``extra_repr``: kernel sizes, pooling,
  norm eps), a Hugging Face config without its label fields, the head path(s) and the model
  class, so a grown head (more rows) finds the features of the model it grew from;
* the preprocessing: the transform or image processor of an image folder, the tokenizer of a
  text file, and the versions of the libraries that run them and the model;
* the data: the SHA-256 of every image file (with its path relative to the folder, which
  names its class) or of the data file, never modification times; plus the batch size and
  the device type, since either may change the last bits of a forward pass.

A second run on the same model and files runs no forward at all; one changed image or weight
makes a new key. Entries hold the exact float32 tensors that were computed (bit-identical);
an unreadable or mismatched entry is ignored and rewritten, and a cache folder that cannot be
written only costs the speed-up (a warning), never the command.

Example:
    >>> src = cached(load_data("imgs/", loaded=loaded), FeatureCache())
    >>> stats = ClassStats.collect(model, src)      # computes and stores the features
    >>> stats = ClassStats.collect(model, src)      # reads them back: no forward
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import Registry

CACHE_ENV = "HEADGRAFT_CACHE"
FORMAT = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_LABEL_FIELDS = ("id2label", "label2id", "num_labels", "_name_or_path", "problem_type")
_VERSIONED = ("torch", "torchvision", "timm", "transformers", "tokenizers", "pillow")
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$HEADGRAFT_CACHE``, else ``$XDG_CACHE_HOME/headgraft/features`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headgraft" / "features"


# ----------------------------------------------------------------------------- fingerprints


def _under(name: str, paths: Sequence[str]) -> bool:
    """Whether a module or tensor name lies in one of the head paths (dot boundaries)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in paths)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.is_meta or t.numel() == 0:
        return memoryview(b"")
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _clean(text: str) -> str:
    return _ADDRESS.sub("", text)


def model_fingerprint(model: nn.Module, paths: Sequence[str]) -> str:
    """SHA-256 of everything in ``model`` that shapes the input of the head at ``paths``.

    The head's own parameters are left out: growing it (``add_classes``) or training it
    (frozen regime) keeps the fingerprint, and so the cached features, of the backbone.
    """
    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n{json.dumps(list(paths))}\n".encode())
    for name, module in model.named_modules():
        if name and _under(name, paths):
            continue
        kind = type(module)
        extra = _clean(module.extra_repr())
        h.update(f"m {name} {kind.__module__}.{kind.__qualname__} {extra}\n".encode())
    for name, t in model.state_dict().items():
        if _under(name, paths):
            continue
        h.update(f"t {name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_dict", None)):
        settings = {
            k: v
            for k, v in config.to_dict().items()
            if k not in _LABEL_FIELDS and not k.startswith("headgraft")
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a preprocessing object, complete enough to tell two apart:
    public attributes recursively, tensors in full precision (a ``repr`` rounds them to four
    digits), functions by their bytecode, constants and closure. Code a transform calls by
    name (a method of its class) is identified by the class name and library versions only."""
    if depth > 8:
        return _clean(repr(obj))
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, torch.Tensor):
        return {
            "tensor": str(obj.dtype),
            "values": [repr(v) for v in obj.flatten().tolist()],
            "shape": list(obj.shape),
        }
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=str)}
    if isinstance(obj, (set, frozenset)):
        return sorted((describe(v, depth + 1) for v in obj), key=repr)
    if isinstance(obj, functools.partial):
        return {"partial": describe(obj.func, depth + 1), "args": describe(obj.args, depth + 1),
                "keywords": describe(obj.keywords, depth + 1)}  # fmt: skip
    code = getattr(obj, "__code__", None)
    if code is not None:  # a function (T.Lambda's): its bytecode, constants and closure
        cells = [c.cell_contents for c in (getattr(obj, "__closure__", None) or ())]
        return {
            "function": f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}",
            "code": hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest(),
            "defaults": describe(getattr(obj, "__defaults__", None), depth + 1),
            "closure": describe(cells, depth + 1),
        }
    kind = type(obj)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if callable(obj) and not hasattr(obj, "__dict__"):  # a builtin: its own name
        return f"{getattr(obj, '__module__', None) or kind.__module__}." + getattr(
            obj, "__qualname__", kind.__qualname__
        )
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        state = {
            k: describe(v, depth + 1)
            for k, v in sorted(vars(obj).items())
            if not k.startswith("_") and k != "training"
        }
        return {"type": name, "state": state, "repr": _clean(repr(obj))}
    return {"type": name, "repr": _clean(repr(obj))}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ----------------------------------------------------------------------------- data kinds


@dataclass(frozen=True)
class CacheableKind:
    """How one kind of data source (``DataSource.kind``) is identified in a cache key."""

    key: Callable[[Any], dict[str, Any]]
    applies: Callable[[Any], bool] = lambda source: True


SOURCE_KEYS: Registry[CacheableKind] = Registry("cacheable data kind")


def _images_key(source: Any) -> dict[str, Any]:
    processor = source.processor
    if processor is not None:
        to_dict = getattr(processor, "to_dict", None)
        prep = describe(to_dict()) if callable(to_dict) else describe(processor)
    else:
        prep = describe(source.transform)
    root = Path(source.path)
    files = [[f.relative_to(root).as_posix(), file_sha256(f)] for f in source.files]
    return {"preprocessing": prep, "files": files}


def _tokenizer_key(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        body = backend.to_str()
    else:
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
        body = json.dumps(sorted(vocab.items()))
    return {
        "repr": _clean(repr(tokenizer)),
        "tokenizer": hashlib.sha256(body.encode()).hexdigest(),
    }


def _text_key(source: Any) -> dict[str, Any]:
    return {"preprocessing": _tokenizer_key(source.tokenizer), "file": file_sha256(source.path)}


def _inputs_key(source: Any) -> dict[str, Any]:
    return {"preprocessing": None, "file": file_sha256(source.path)}


for _name, _kind, _desc in (
    (
        "images",
        CacheableKind(_images_key),
        "image folders: the transform or image processor, and every file's SHA-256 and path",
    ),
    (
        "text",
        CacheableKind(_text_key),
        "JSONL/CSV text: the tokenizer, and the file's SHA-256",
    ),
    (
        "features",
        # head inputs ('features') feed the head directly: nothing runs, nothing to cache
        CacheableKind(_inputs_key, applies=lambda source: getattr(source, "key", "") == "inputs"),
        "model inputs ('inputs') in a .safetensors/.npz: the file's SHA-256",
    ),
):
    SOURCE_KEYS.register(_name, _desc)(_kind)


def cacheable(source: Any) -> bool:
    """Whether the head inputs of ``source`` are cached (cheap: reads no file)."""
    kind = getattr(source, "kind", "")
    return kind in SOURCE_KEYS and SOURCE_KEYS.get(kind).applies(source)


def source_key(source: Any) -> dict[str, Any] | None:
    """What identifies a data source's examples (hashes its files), or None when its
    features are not cached."""
    if not cacheable(source):
        return None
    desc = SOURCE_KEYS.get(source.kind).key(source)
    return {"kind": source.kind, "batch_size": source.batch_size, "examples": len(source), **desc}


# ----------------------------------------------------------------------------- the cache


@dataclass
class CacheReport:
    """What a cache did during one command."""

    dir: str
    hits: int = 0
    misses: int = 0
    rewritten: int = 0
    write_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class FeatureCache:
    """Head-input features of data sources, stored under ``root`` as safetensors files.

    Args:
        root: the cache folder (default: :func:`default_cache_dir`); created when first
            written.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.report = CacheReport(str(self.root))

    def key(self, model: nn.Module, paths: Sequence[str], source: Any) -> str | None:
        """The entry name for ``source``'s head inputs under ``model`` (None: not cacheable)."""
        data = source_key(source)
        if data is None:
            return None
        return self._key(model, paths, data)

    def _key(self, model: nn.Module, paths: Sequence[str], data: dict[str, Any]) -> str:
        first = next(iter(model.parameters()), None)
        device = first.device.type if first is not None else "cpu"
        parts = {
            "format": FORMAT,
            "model": model_fingerprint(model, paths),
            "paths": list(paths),
            "data": data,
            "device": device,
            "versions": _versions(),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def entry(self, key: str) -> Path:
        """The file of one entry."""
        return self.root / key[:2] / f"{key}.safetensors"

    def features(
        self,
        model: nn.Module,
        paths: Sequence[str],
        source: Any,
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{path: float32 [N, d]}`` head inputs of ``source``: read from the cache, or
        ``compute()``-d and stored (only when the files did not change while it ran)."""
        data = source_key(source)
        if data is None:
            return compute()
        key = self._key(model, paths, data)
        found = self._read(key, len(source))
        if found is not None:
            self.report.hits += 1
            return found
        self.report.misses += 1
        feats = compute()
        if source_key(source) == data:
            self._write(key, feats, len(source))
        return feats

    def _read(self, key: str, n: int) -> dict[str, torch.Tensor] | None:
        file = self.entry(key)
        if not file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                paths = json.loads(meta["paths"])
                if meta.get("key") != key or int(meta.get("format", -1)) != FORMAT:
                    raise ValueError("entry of another key or format")
                # clone: safetensors hands out memory at the file's offset (not 64-byte aligned),
                # and BLAS rounds differently on unaligned data, so every later matmul (teacher
                # logits, training) would drift in the last bits from the uncached run
                out = {p: f.get_tensor(f"f{i}").clone() for i, p in enumerate(paths)}
            for t in out.values():
                if t.dtype != torch.float32 or t.dim() != 2 or len(t) != n:
                    raise ValueError(f"a {t.dtype} {tuple(t.shape)} tensor for {n} examples")
            if not out:
                raise ValueError("no features")
            return out
        except Exception as e:  # noqa: BLE001  any unreadable entry is a miss, never a crash
            self.report.rewritten += 1
            warnings.warn(
                f"feature cache entry {file} is unreadable ({type(e).__name__}: {e}); "
                "recomputing it",
                stacklevel=3,
            )
            return None

    def _write(self, key: str, feats: dict[str, torch.Tensor], n: int) -> None:
        from safetensors.torch import save_file

        from .atomic import atomic_path

        file = self.entry(key)
        tensors = {f"f{i}": t.contiguous() for i, t in enumerate(feats.values())}
        meta = {
            "key": key,
            "format": str(FORMAT),
            "paths": json.dumps(list(feats)),
            "examples": str(n),
        }
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(file) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        except Exception as e:  # noqa: BLE001  a cache that cannot be written costs speed only
            self.report.write_errors += 1
            reason = getattr(e, "strerror", None) or str(e)
            warnings.warn(
                f"cannot write the feature cache in {self.root} ({reason}); features are "
                f"recomputed next time: pass --cache-dir to a writable folder or --no-cache",
                stacklevel=3,
            )


class CachedSource:
    """A data source whose head inputs come from a :class:`FeatureCache` when they can.

    It behaves as the source it wraps (iteration, ``names``, ``classes``, ...) and adds
    ``cached_features``, which :func:`headgraft.features.head_features` and the frozen regime
    of ``learn`` use instead of running the model.
    """

    def __init__(self, source: Any, cache: FeatureCache) -> None:
        self.wrapped = source
        self.cache = cache

    def __getattr__(self, name: str) -> Any:
        if name in ("wrapped", "cache"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.wrapped)

    def __len__(self) -> int:
        return len(self.wrapped)

    def __repr__(self) -> str:
        return f"CachedSource({self.wrapped!r}, cache={str(self.cache.root)!r})"

    def cached_features(
        self,
        model: nn.Module,
        paths: Sequence[str],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``{path: features}`` of every example, from the cache or ``compute()``."""
        return self.cache.features(model, paths, self.wrapped, compute)


def cached(source: Any, cache: FeatureCache | None) -> Any:
    """``source`` with its head inputs cached in ``cache``; unchanged when ``cache`` is None
    or the source's features are not worth caching (precomputed head inputs)."""
    if cache is None or not cacheable(source):
        return source
    return CachedSource(source, cache)
