"""Checkpoint files: read state dicts safely, find the head's tensors, rewrite heads by streaming.

Three formats are registered in ``FORMATS``: a ``.safetensors`` file, a sharded Hugging Face
checkpoint (``model.safetensors.index.json``) and a PyTorch file (``.pt/.pth/.bin/.ckpt``, read
with ``torch.load(weights_only=True)``; pickles that it rejects need ``trust_pickle``).

Growing the head of a safetensors file never loads the model: the new header is written, the
unchanged tensors' bytes are copied range by range (in the kernel where the header padding
keeps them aligned, else through a small buffer) and only the head tensors are materialised,
so peak memory is about one head, not the model. Label names travel in
the safetensors metadata under ``labels`` (a JSON list) and in a torch state dict's
``_metadata[""]["headgraft_labels"]``.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AmbiguousHeadError, HeadNotFoundError, InputError, UnsafeFileError
from ..labels import LabelMap, set_model_labels
from ..registry import Registry
from .atomic import atomic_dir, atomic_path

LABELS_KEY = "labels"  # safetensors metadata: a JSON list of class names, one per head row
TORCH_LABELS_KEY = "headgraft_labels"  # torch state dicts: in _metadata[""]
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".h5", ".msgpack", ".gguf", ".onnx")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def clean_name(name: str) -> str:
    """A state-dict key without wrapper prefixes: ``module.`` (DataParallel/DDP, as timm's
    ``clean_state_dict``) and ``_orig_mod.`` (``torch.compile``)."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name.replace("_orig_mod.", "")


def _labels_from_json(value: str | None) -> list[str] | None:
    if not value:
        return None
    try:
        names = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].strip() if text else type(e).__name__


# ----------------------------------------------------------------------------- safetensors bytes


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors header; ``begin``/``end`` are offsets into the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of a safetensors file."""

    path: Path
    data_start: int
    entries: dict[str, TensorEntry]  # in data order
    metadata: dict[str, str]


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(
        f"{path} is not a valid safetensors file ({why}); it is truncated or "
        "corrupt: re-download or re-export it"
    )


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check a safetensors header (offsets contiguous, file not truncated)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, f"only {size} bytes")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not JSON: {_first_line(e)}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise InputError(
                f"{path}: tensor {name!r} has dtype {dtype}, which headgraft does "
                "not handle; convert the file to a standard dtype first"
            )
        numel = 1
        for d in shape:
            numel *= int(d)
        if end - begin != numel * DTYPES[dtype].itemsize:
            raise _corrupt(path, f"tensor {name!r} has {end - begin} bytes for shape {shape}")
        entries.append(TensorEntry(name, dtype, tuple(int(d) for d in shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise _corrupt(path, f"tensor {e.name!r} does not start where the previous one ends")
        pos = e.end
    if 8 + n + pos != size:
        raise _corrupt(path, f"the header describes {8 + n + pos} bytes but the file has {size}")
    return SafetensorsHeader(
        path, 8 + n, {e.name: e for e in entries}, {str(k): str(v) for k, v in metadata.items()}
    )


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors order, without a copy when it is already contiguous
    on the CPU."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


_CHUNK = 1 << 20  # the buffered copy's buffer: small enough to stay in the CPU cache
_WRITEBACK = 64 << 20  # start writing back every 64 MiB, so the final fsync has little left
# Input and output bytes at the same offset modulo _ALIGN are "aligned". Measured on ext4
# (Linux 6.18, 1 GiB in the page cache): copy_file_range runs at `cp`'s speed when the offsets
# agree modulo 64 KiB, 1.4x slower when they differ by 4 KiB and 2-3x slower at a sub-page
# shift (large page-cache folios split in two, presumably); the buffered copy is ~15% faster
# aligned. File systems that share blocks (btrfs, xfs) need the alignment to share them.
_ALIGN = max(mmap.PAGESIZE, 64 << 10)
_ALIGN_FROM = 8 << 20  # shorter runs copy in milliseconds: not worth up to 64 KiB of padding
_IN_KERNEL = hasattr(os, "copy_file_range")  # Linux; elsewhere every run is buffered


@dataclass(frozen=True)
class _Run:
    """``length`` unchanged bytes, copied from input file offset ``src`` to output ``dst``."""

    src: int
    dst: int
    length: int

    @property
    def aligned(self) -> bool:
        return (self.src - self.dst) % _ALIGN == 0


def _start_writeback(fd: int, begin: int, end: int) -> None:
    """Start writing ``fd``'s freshly written bytes ``[begin, end)`` back to disk now.

    DONTNEED starts the writeback of dirty pages and drops only clean ones, so the disk works
    while the copy goes on instead of all at the final fsync (which durability requires).
    """
    if end > begin and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_buffered(src: int, dst: int, run: _Run) -> None:
    """Copy a run through one reused 1 MiB buffer: any alignment, any file system."""
    buf = memoryview(bytearray(min(_CHUNK, max(run.length, 1))))
    offset, pos, end = run.src, run.dst, run.src + run.length
    flushed = pos
    while offset < end:
        n = os.preadv(src, [buf[: min(len(buf), end - offset)]], offset)
        if n == 0:
            raise OSError(f"unexpected end of the input file at byte {offset}")
        _write_all(dst, buf[:n], pos)
        offset += n
        pos += n
        if pos - flushed >= _WRITEBACK:
            _start_writeback(dst, flushed, pos)
            flushed = pos


def _copy_in_kernel(src: int, dst: int, run: _Run) -> int:
    """Copy an aligned run with ``os.copy_file_range`` and return the bytes copied.

    Fewer than ``run.length`` when the kernel refuses (another file system, no support, an
    I/O error): the caller copies the rest through a buffer, where a real error shows again.
    """
    # the bytes up to the first _ALIGN boundary alone, so that every later call starts on one
    # on both sides (file systems that share blocks refuse unaligned ranges)
    head = min(run.length, -run.dst % _ALIGN)
    done = 0
    flushed = run.dst
    try:
        while done < run.length:
            limit = head - done if done < head else _WRITEBACK
            n = os.copy_file_range(
                src, dst, min(limit, run.length - done), run.src + done, run.dst + done
            )
            if n == 0:
                break
            done += n
            if run.dst + done - flushed >= _WRITEBACK:
                _start_writeback(dst, flushed, run.dst + done)
                flushed = run.dst + done
    except OSError:
        pass
    return done


def _copy_run(src: int, dst: int, run: _Run) -> None:
    """Copy a run of unchanged bytes: in the kernel when aligned, else through a buffer."""
    done = _copy_in_kernel(src, dst, run) if _IN_KERNEL and run.aligned else 0
    if done < run.length:
        _copy_buffered(src, dst, _Run(run.src + done, run.dst + done, run.length - done))


def _header_padding(size: int, data_start: int, runs: Sequence[_Run]) -> int:
    """How many spaces follow a ``size``-byte JSON header.

    To a multiple of 8, as the safetensors writer pads; and, when the longest unchanged run
    is worth it, on to the output data start that puts that run at the same offset modulo
    ``_ALIGN`` (64 KiB) as in the input (``data_start``), so the kernel copies it whole pages
    at a time. Readers accept trailing spaces in the header.
    """
    pad = -size % 8
    if not runs:
        return pad
    longest = max(runs, key=lambda r: r.length)
    start = (data_start + longest.src - longest.dst) % _ALIGN  # data offsets in the runs
    if longest.length < _ALIGN_FROM or start % 8:  # short, or an input not 8-byte aligned
        return pad
    return (start - 8 - size) % _ALIGN


def rewrite_safetensors(
    header: SafetensorsHeader,
    dst: str | os.PathLike[str],
    replace: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Write ``header.path`` to ``dst`` with some tensors replaced (any shape, same names).

    Unchanged tensors keep their order and are copied as raw byte ranges, the longest of them
    at the same offset modulo 64 KiB as in the input (the header is padded with spaces);
    replaced tensors go to the end of the data, where their new size shifts nothing. Memory
    use is the replaced tensors plus a 1 MiB buffer.
    """
    unknown = [k for k in replace if k not in header.entries]
    if unknown:
        raise InputError(f"cannot replace tensor(s) {', '.join(unknown)}: not in {header.path}")
    new_header: dict[str, Any] = {"__metadata__": dict(metadata)}
    runs: list[_Run] = []  # data offsets: input data -> output data, in output order
    pos = 0
    for e in header.entries.values():
        if e.name in replace:
            continue
        n = e.end - e.begin
        new_header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + n],
        }
        if runs and runs[-1].src + runs[-1].length == e.begin:
            runs[-1] = _Run(runs[-1].src, runs[-1].dst, runs[-1].length + n)
        else:
            runs.append(_Run(e.begin, pos, n))
        pos += n
    kept = pos
    blobs = []
    for name, t in replace.items():
        if t.dtype not in DTYPE_NAMES:
            raise InputError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        blob = _tensor_bytes(t)
        new_header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + len(blob)],
        }
        blobs.append(blob)
        pos += len(blob)
    head = json.dumps(new_header, separators=(",", ":")).encode()
    head += b" " * _header_padding(len(head), header.data_start, runs)
    start = 8 + len(head)
    src_fd = os.open(header.path, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(dst_fd, len(head).to_bytes(8, "little") + head, 0)
            for r in runs:
                _copy_run(src_fd, dst_fd, _Run(header.data_start + r.src, start + r.dst, r.length))
            at = start + kept
            for blob in blobs:
                _write_all(dst_fd, blob, at)
                at += len(blob)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _safetensors_metadata(base: Mapping[str, str], labels: Sequence[str]) -> dict[str, str]:
    meta = dict(base)
    meta.setdefault("format", "pt")  # transformers refuses files without it
    meta[LABELS_KEY] = json.dumps(list(labels))
    return meta


# ----------------------------------------------------------------------------- torch files


def load_torch_file(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on the CPU, ``weights_only`` unless the caller trusts the file.

    Zip-format files are memory-mapped, so a large checkpoint is not read into memory at once.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and magic[:1] != b"\x80":
        raise InputError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a "
            "pickle); pass a file written by torch.save"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        if not trust_pickle and "Unsupported global" in text:
            reason = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            raise UnsafeFileError(
                f"{path} holds a pickled object ({reason}) that safe loading refuses; it could "
                "run code, so headgraft does not load it: pass --trust-pickle (trust_pickle=True) "
                "only if you trust the file's source, or re-save its state_dict as safetensors"
            ) from None
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint "
            f"({_first_line(e)}); it is corrupt or not a state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); "
            "it is truncated or corrupt: re-download or re-export it"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: Any, path: str | os.PathLike[str] = "") -> tuple[tuple[str, ...], Any]:
    """Find the state dict inside a training checkpoint, the way timm's loader does.

    Returns the key path (``("state_dict",)``, ``("model",)`` or ``()``) and the state dict.
    A pickled ``nn.Module`` (only loadable with ``trust_pickle``) becomes its ``state_dict()``.
    """
    keys: tuple[str, ...] = ()
    while True:
        if isinstance(obj, nn.Module):
            return keys, obj.state_dict()
        if _is_state_dict(obj):
            return keys, obj
        if isinstance(obj, Mapping):
            key = next(
                (k for k in STATE_DICT_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None
            )
            if key is not None:
                obj, keys = obj[key], (*keys, key)
                continue
            found = ", ".join(map(str, list(obj)[:8]))
            raise InputError(
                f"{path} holds no state dict (top-level keys: {found}); save "
                "model.state_dict(), or a dict with it under 'state_dict' or 'model'"
            )
        raise InputError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save "
            "model.state_dict() instead"
        )


def _rebuild(obj: Any, keys: tuple[str, ...], inner: Any) -> Any:
    if not keys:
        return inner
    out = dict(obj)
    out[keys[0]] = _rebuild(obj[keys[0]], keys[1:], inner)
    return out


# ----------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A weights file opened for reading: names, shapes, single tensors, labels; and a writer
    that produces the same format with some tensors replaced."""

    format = ""
    output_is_dir = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw: dict[str, str] = {}  # clean name -> name in the file

    def names(self) -> list[str]:
        """Tensor names, with wrapper prefixes removed."""
        return list(self._raw)

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, keyed by clean name (loads the whole file)."""
        raise NotImplementedError

    def labels(self) -> list[str] | None:
        """Class names stored with the weights, if any."""
        return None

    def write(
        self,
        out: str | os.PathLike[str],
        replace: Mapping[str, torch.Tensor],
        labels: Sequence[str],
        *,
        force: bool = False,
        row_map: Sequence[int | None] | None = None,
    ) -> None:
        """Write a copy with the tensors ``replace`` (clean names) and ``labels``, atomically.

        ``row_map`` says, for every row of the new head, which old row it came from (None for
        a new row); it is used to grow optimizer states stored in the same file.
        """
        raise NotImplementedError

    def _check_replace(self, replace: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in replace if k not in self._raw]
        if missing:
            raise InputError(f"{self.path} has no tensor(s) {', '.join(missing)}")


class SafetensorsCheckpoint(Checkpoint):
    """One ``.safetensors`` file; only the header is read until a tensor is asked for."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.header = read_header(path)
        self._raw = {clean_name(n): n for n in self.header.entries}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header.entries[self._raw[name]].shape

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt", device="cpu") as f:
            return f.get_tensor(self._raw[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        sd = load_file(str(self.path))
        return {clean_name(k): v for k, v in sd.items()}

    def labels(self) -> list[str] | None:
        return _labels_from_json(self.header.metadata.get(LABELS_KEY))

    def write(self, out, replace, labels, *, force=False, row_map=None) -> None:  # noqa: ANN001
        self._check_replace(replace)
        raw = {self._raw[k]: v for k, v in replace.items()}
        with atomic_path(out, force=force) as tmp:
            rewrite_safetensors(
                self.header, tmp, raw, _safetensors_metadata(self.header.metadata, labels)
            )


class ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded checkpoint: ``*.safetensors.index.json`` plus its shards.

    The output is a folder: shards holding head tensors are rewritten by streaming, the other
    shards and the folder's small files (config, tokenizer) are copied, the index and
    ``config.json``'s ``id2label``/``label2id`` are updated.
    """

    format = "safetensors-index"
    output_is_dir = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.folder = path.parent
        try:
            index = json.loads(path.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
            raise InputError(
                f"{path} is not a valid safetensors index (no weight_map); "
                "re-create it with save_pretrained"
            ) from None
        self.index = index
        self.weight_map = {str(k): str(v) for k, v in weight_map.items()}
        self.shards: dict[str, SafetensorsHeader] = {}
        for shard in dict.fromkeys(self.weight_map.values()):
            file = self.folder / shard
            if not file.is_file():
                raise InputError(
                    f"shard {shard} listed in {path.name} is missing; download "
                    "every shard into the same folder"
                )
            self.shards[shard] = read_header(file)
        for name, shard in self.weight_map.items():
            if name not in self.shards[shard].entries:
                raise InputError(
                    f"{path.name} puts {name!r} in {shard}, which lacks it; "
                    "re-create the index with save_pretrained"
                )
        self._raw = {clean_name(n): n for n in self.weight_map}

    def _entry(self, name: str) -> TensorEntry:
        raw = self._raw[name]
        return self.shards[self.weight_map[raw]].entries[raw]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        raw = self._raw[name]
        with safe_open(str(self.folder / self.weight_map[raw]), "pt", device="cpu") as f:
            return f.get_tensor(raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for shard in self.shards:
            sd.update({clean_name(k): v for k, v in load_file(str(self.folder / shard)).items()})
        return sd

    def config(self) -> dict[str, Any] | None:
        file = self.folder / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{file} is not valid JSON; fix or remove it") from None

    def labels(self) -> list[str] | None:
        cfg = self.config()
        if cfg and isinstance(cfg.get("id2label"), dict) and cfg["id2label"]:
            return LabelMap.from_id2label(cfg["id2label"]).names
        for h in self.shards.values():
            names = _labels_from_json(h.metadata.get(LABELS_KEY))
            if names:
                return names
        return None

    def write(self, out, replace, labels, *, force=False, row_map=None) -> None:  # noqa: ANN001
        self._check_replace(replace)
        by_shard: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in replace.items():
            raw = self._raw[name]
            by_shard.setdefault(self.weight_map[raw], {})[raw] = t
        with atomic_dir(out, force=force) as tmp:
            for item in sorted(self.folder.iterdir()):
                if (
                    not item.is_file()
                    or item.name.startswith(".")
                    or item == self.path
                    or item.name == "config.json"
                    or item.name in by_shard
                    or (item.name.endswith(WEIGHT_SUFFIXES) and item.name not in self.shards)
                ):
                    continue  # rewritten below, hidden temp files, or stray weight files
                shutil.copyfile(item, tmp / item.name)
            for shard, tensors in by_shard.items():
                header = self.shards[shard]
                rewrite_safetensors(
                    header, tmp / shard, tensors, _safetensors_metadata(header.metadata, labels)
                )
            index = json.loads(json.dumps(self.index))
            meta = index.setdefault("metadata", {})
            for name, t in replace.items():
                old = self._entry(name)
                if isinstance(meta.get("total_size"), int):
                    meta["total_size"] += t.numel() * t.element_size() - (old.end - old.begin)
                if isinstance(meta.get("total_parameters"), int):
                    meta["total_parameters"] += t.numel() - _numel(old)
            (tmp / self.path.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            cfg = self.config()
            if cfg is not None:
                lm = LabelMap(labels)
                cfg["id2label"] = {str(k): v for k, v in lm.id2label.items()}
                cfg["label2id"] = lm.label2id
                if "num_labels" in cfg:
                    cfg["num_labels"] = len(lm)
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _numel(e: TensorEntry) -> int:
    n = 1
    for d in e.shape:
        n *= d
    return n


class TorchCheckpoint(Checkpoint):
    """A file written by ``torch.save``: a state dict, or a training checkpoint holding one
    (under ``state_dict``/``model``/...) next to optimizer state, epoch and so on."""

    format = "torch"

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self.obj = load_torch_file(path, trust_pickle=trust_pickle)
        self.keys, sd = unwrap_state_dict(self.obj, path)
        self.sd = sd
        self._raw = {clean_name(k): k for k in sd if isinstance(sd[k], torch.Tensor)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[self._raw[name]].shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self.sd[self._raw[name]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.sd[raw] for k, raw in self._raw.items()}

    def labels(self) -> list[str] | None:
        meta = getattr(self.sd, "_metadata", None) or {}
        names = (meta.get("") or {}).get(TORCH_LABELS_KEY)
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return names
        return None

    def write(self, out, replace, labels, *, force=False, row_map=None) -> None:  # noqa: ANN001
        from .optim import grow_optimizer_state, head_param_ids

        self._check_replace(replace)
        by_raw = {self._raw[k]: v for k, v in replace.items()}
        sd: OrderedDict[str, Any] = OrderedDict((k, by_raw.get(k, v)) for k, v in self.sd.items())
        meta = {k: dict(v) for k, v in (getattr(self.sd, "_metadata", None) or {}).items()}
        meta.setdefault("", {})[TORCH_LABELS_KEY] = list(labels)
        sd._metadata = meta  # type: ignore[attr-defined]
        container = _rebuild(self.obj, self.keys, sd)
        if self.keys and row_map is not None:  # a training checkpoint: grow its optimizers
            old_shapes = [self.shape(k) for k in replace]
            for key, value in container.items():
                if isinstance(value, Mapping) and {"state", "param_groups"} <= set(value):
                    ids = head_param_ids(value, old_shapes, what=f"{self.path}[{key!r}]")
                    container[key] = grow_optimizer_state(value, params=ids, rows=row_map)
        with atomic_path(out, force=force) as tmp:
            torch.save(container, tmp)


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class CheckpointFormat:
    """How to recognise and open one kind of weights file."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[[Path, bool], Checkpoint]


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format")


def _register(fmt: CheckpointFormat, description: str) -> None:
    FORMATS.register(fmt.name, description)(fmt)


_register(
    CheckpointFormat(
        "safetensors-index",
        lambda p: p.name.endswith(INDEX_SUFFIX),
        lambda p, _t: ShardedCheckpoint(p),
    ),
    "a sharded Hugging Face checkpoint: model.safetensors.index.json and its shards",
)
_register(
    CheckpointFormat(
        "safetensors", lambda p: p.suffix == ".safetensors", lambda p, _t: SafetensorsCheckpoint(p)
    ),
    "one .safetensors file (streamed: the model is never loaded)",
)
_register(
    CheckpointFormat(
        "torch",
        lambda p: p.suffix in TORCH_SUFFIXES,
        lambda p, t: TorchCheckpoint(p, trust_pickle=t),
    ),
    ".pt/.pth/.bin/.ckpt written by torch.save (weights_only unless --trust-pickle)",
)

_DIR_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")


def checkpoint_format(path: str | os.PathLike[str]) -> str | None:
    """The registered format name of ``path``, or None."""
    p = Path(path)
    return next((n for n in FORMATS if FORMATS.get(n).matches(p)), None)


def open_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Open a weights file (or the weights of a Hugging Face folder) for reading."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist; check the path")
    if p.is_dir():
        inner = next((p / f for f in _DIR_FILES if (p / f).is_file()), None)
        if inner is None:
            raise InputError(
                f"{p} is a folder without model.safetensors(.index.json) or "
                "pytorch_model.bin; pass the weights file itself"
            )
        p = inner
    fmt = checkpoint_format(p)
    if fmt is None:
        kinds = "; ".join(f"{n}: {d}" for n, d in FORMATS.describe().items())
        raise InputError(f"cannot tell the format of {p} from its name; headgraft reads {kinds}")
    return FORMATS.get(fmt).open(p, trust_pickle)


# ----------------------------------------------------------------------------- head tensors


@dataclass(frozen=True)
class HeadTensors:
    """The tensors of one head in a checkpoint: ``prefix`` is its module path."""

    prefix: str
    weight: str
    bias: str | None
    num_classes: int
    in_features: int
    conv: bool = False  # a 1x1 convolution ([n, d, 1, 1])


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _as_head(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> HeadTensors | None:
    w = shapes.get(_join(prefix, "weight"))
    if w is None or not (len(w) == 2 or (len(w) == 4 and w[2:] == (1, 1))):
        return None
    b_name = _join(prefix, "bias")
    b = shapes.get(b_name)
    if b is not None and b != (w[0],):
        return None
    return HeadTensors(
        prefix, _join(prefix, "weight"), b_name if b is not None else None, w[0], w[1], len(w) == 4
    )


def find_head_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    head: str | None = None,
    num_classes: int | None = None,
) -> list[HeadTensors]:
    """The head's tensors in a state dict, without building the model.

    ``head`` names them (module paths such as ``fc`` or ``head,head_dist``; a trailing
    ``.weight`` is allowed). Otherwise the shape rule applies: a 2-D (or 1x1 conv) weight with a
    1-D bias of as many rows as there are labels (``num_classes``, when known) or, with no
    label count, whose output feeds no other layer.
    """
    if head is not None:
        found = []
        for p in (x.strip() for x in head.split(",") if x.strip()):
            p = clean_name(p.removesuffix(".weight"))
            h = _as_head(shapes, p)
            if h is None:
                near = [c.prefix for c in _candidates(shapes)][:6]
                what = (
                    "has no tensor " + repr(_join(p, "weight"))
                    if _join(p, "weight") not in shapes
                    else f"has {_join(p, 'weight')!r} of shape {shapes[_join(p, 'weight')]}, "
                    "not a classifier weight"
                )
                raise HeadNotFoundError(
                    f"--head {p!r}: the checkpoint {what}; heads it could mean: "
                    f"{', '.join(near) or 'none'}"
                )
            found.append(h)
        if len({h.num_classes for h in found}) > 1:
            raise HeadNotFoundError("the named heads have different class counts; name one")
        return found
    cands = _candidates(shapes)
    if num_classes is not None:
        cands = [c for c in cands if c.num_classes == num_classes]
    else:  # a classifier's outputs are read by no other layer (square layers read their own)
        read = {s[1] for s in shapes.values() if len(s) in (2, 4)}
        cands = [c for c in cands if c.num_classes not in read]
    if not cands:
        rule = (
            f"with {num_classes} rows (the label count)"
            if num_classes is not None
            else "whose output feeds no other layer"
        )
        raise HeadNotFoundError(
            f"no weight/bias pair {rule} looks like a classifier; pass --head with the "
            "head's name (e.g. fc, classifier)"
        )
    if len(cands) > 1:
        names = ", ".join(c.prefix or "<root>" for c in cands[:8])
        raise AmbiguousHeadError(
            f"several tensor pairs could be the head ({names}); pass --head with one of them "
            "(or several, comma-separated, to grow them together)"
        )
    return cands


def _candidates(shapes: Mapping[str, tuple[int, ...]]) -> list[HeadTensors]:
    out = []
    for name in shapes:
        if name == "weight" or name.endswith(".weight"):
            h = _as_head(shapes, name[: -len("weight")].rstrip("."))
            if h is not None and h.bias is not None:
                out.append(h)
    return out


class HeadStack(nn.Module):
    """The head layers of a checkpoint as a small model: features in, the first head's
    logits out (every head runs, so hooks on all of them see the features)."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.head_paths = list(heads)
        for path, module in heads.items():
            parent: nn.Module = self
            *parts, last = path.split(".")
            for part in parts:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(last, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for path in self.head_paths:
            m = self.get_submodule(path)
            w = getattr(m, "weight", None)
            y = x.to(w.dtype) if w is not None else x
            if isinstance(m, nn.Conv2d) and y.dim() == 2:
                outs.append(m(y[:, :, None, None]).flatten(1))
            else:
                outs.append(m(y))
        return outs[0]


def head_layer(weight: torch.Tensor, bias: torch.Tensor | None, conv: bool = False) -> nn.Module:
    """An ``nn.Linear`` (or 1x1 ``nn.Conv2d``) holding exactly these tensors."""
    n, d = weight.shape[:2]
    layer: nn.Module
    if conv:
        layer = nn.Conv2d(d, n, 1, bias=bias is not None, device="meta")
    else:
        layer = nn.Linear(d, n, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer


def head_model(
    ckpt: Checkpoint, heads: Sequence[HeadTensors], labels: Sequence[str] | None
) -> tuple[nn.Module, str | None]:
    """The checkpoint's head(s) as a module to graft, and the ``head`` path to pass.

    A single head at the root of the file (tensors ``weight``/``bias``) is the module itself.
    """
    layers = {}
    for h in heads:
        w = ckpt.tensor(h.weight).clone()
        b = ckpt.tensor(h.bias).clone() if h.bias else None
        layers[h.prefix] = head_layer(w, b, h.conv)
    if len(heads) == 1 and heads[0].prefix == "":
        model, path = layers[""], None
    else:
        model, path = HeadStack(layers), ",".join(h.prefix for h in heads)
    n = heads[0].num_classes
    set_model_labels(
        model, LabelMap(labels) if labels and len(labels) == n else LabelMap.default(n)
    )
    return model, path
