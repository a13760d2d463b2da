"""Data sources: scikit-learn's handwritten digits (built in), and the files ``--data`` reads
(class-per-folder images, JSONL/CSV text, precomputed features)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HeadgraftError, InputError
from .registry import Registry


@dataclass
class Split:
    """Train and test tensors of one data set: float32 inputs, int64 class indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]

    def select(self, classes: list[int], part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.x_train, self.y_train) if part == "train" else (self.x_test, self.y_test)
        mask = torch.isin(y, torch.tensor(classes))
        return x[mask], y[mask]


def digits(test_size: float = 0.3, random_state: int = 0) -> Split:
    """scikit-learn's digits (1797 8x8 images, 10 classes), scaled to [0, 1], with a fixed
    stratified train/test split (70/30, ``random_state=0``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError:
        raise HeadgraftError(
            "the built-in digits data needs scikit-learn; pip install 'headgraft[data]'"
        ) from None
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=random_state
    )
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Split(f(xtr), g(ytr), f(xte), g(yte), [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- files (--data)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TEXT_COLUMNS = ("text", "label")


class DataSource:
    """Examples read from disk, yielded in batches of ``(inputs, label names)`` (or dict
    batches with ``labels``), as ``add_classes(examples=...)`` and ``ClassStats.collect`` take.

    Attributes:
        kind: ``images``, ``text`` or ``features``.
        path: where the examples come from.
        classes: the class names found, in order.
        batch_size: examples per batch.
    """

    kind = ""

    def __init__(self, path: Path, names: Sequence[str], batch_size: int) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, not {batch_size}")
        self.path = path
        self.names = list(names)  # one label name per example
        self.classes = list(dict.fromkeys(self.names))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.names)

    def counts(self) -> dict[str, int]:
        """Examples per class."""
        return {c: self.names.count(c) for c in self.classes}

    def _chunks(self) -> Iterator[range]:
        for i in range(0, len(self.names), self.batch_size):
            yield range(i, min(i + self.batch_size, len(self.names)))

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, examples={len(self)}, "
            f"classes={self.classes[:10]})"
        )


def image_transform(model: Any, arch: str | None = None) -> Callable[[Any], torch.Tensor]:
    """The eval preprocessing for ``model``: timm's own (``resolve_data_config``) for models
    with a ``pretrained_cfg``; for ``--arch torchvision:NAME`` the transforms of NAME's default
    weights (defined in code, nothing is downloaded); else a 224-pixel ImageNet
    resize/crop/normalise."""
    if arch is not None and arch.startswith("torchvision:"):
        try:
            from torchvision.models import get_model_weights

            return get_model_weights(arch.partition(":")[2]).DEFAULT.transforms()
        except (ModuleNotFoundError, ValueError, KeyError, AttributeError):
            pass  # an architecture without published weights: the ImageNet default below
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        try:
            from timm.data import create_transform, resolve_data_config

            return create_transform(**resolve_data_config({}, model=model))
        except ModuleNotFoundError:
            pass
    try:
        from torchvision import transforms as T
    except ModuleNotFoundError:
        raise HeadgraftError(
            "image folders need torchvision; pip install 'headgraft[vision]'"
        ) from None
    return T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


class ImageFolder(DataSource):
    """A class-per-folder image directory: ``root/<class>/<image>``."""

    kind = "images"

    def __init__(
        self, root: Path, batch_size: int, transform: Callable | None = None, processor: Any = None
    ) -> None:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise InputError(
                f"{root} has no class folders; put each class's images in a "
                f"folder named after it ({root}/cat/1.jpg)"
            )
        self.files: list[Path] = []
        names: list[str] = []
        for d in class_dirs:
            files = sorted(
                f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )
            if not files:
                raise InputError(
                    f"class folder {d} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove it"
                )
            self.files += files
            names += [d.name] * len(files)
        super().__init__(root, names, batch_size)
        self.transform = transform
        self.processor = processor

    def _open(self, f: Path) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(f) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"{f} is not a readable image ({e}); replace or remove it") from None

    def __iter__(self) -> Iterator[Any]:
        for idx in self._chunks():
            images = [self._open(self.files[i]) for i in idx]
            names = [self.names[i] for i in idx]
            if self.processor is not None:
                pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
                yield {"pixel_values": pixels, "labels": names}
            else:
                assert self.transform is not None
                yield torch.stack([self.transform(img) for img in images]), names


class TextFile(DataSource):
    """A JSONL or CSV file with ``text`` and ``label`` columns, tokenised per batch."""

    kind = "text"

    def __init__(self, path: Path, batch_size: int, tokenizer: Any) -> None:
        rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
        if not rows:
            raise InputError(f"{path} has no examples; add lines with 'text' and 'label'")
        missing = [c for c in TEXT_COLUMNS if c not in rows[0]]
        if missing:
            raise InputError(
                f"{path} has no {', '.join(missing)} column (it has: "
                f"{', '.join(map(str, rows[0]))}); name them text and label"
            )
        for i, r in enumerate(rows):
            if not isinstance(r.get("text"), str) or r.get("label") in (None, ""):
                raise InputError(
                    f"{path}, example {i + 1}: needs a string 'text' and a "
                    "'label'; fix or remove that line"
                )
        self.texts = [r["text"] for r in rows]
        super().__init__(path, [str(r["label"]) for r in rows], batch_size)
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[Any]:
        for idx in self._chunks():
            batch = dict(
                self.tokenizer(
                    [self.texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt"
                )
            )
            batch["labels"] = [self.names[i] for i in idx]
            yield batch


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {n}: not JSON ({e.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {n}: expected an object with text and label")
        rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class FeatureFile(DataSource):
    """Arrays in a ``.safetensors`` or ``.npz`` file: precomputed head inputs
    (``features [N, d]``) or model inputs (``inputs [N, ...]``, for models that take a
    tensor), with ``labels [N]``. Integer labels index ``classes`` (stored in the file: an npz
    array, or safetensors metadata as a JSON list), else the label list given to
    :func:`load_data`."""

    kind = "features"

    def __init__(self, path: Path, batch_size: int, labels: Sequence[str] | None) -> None:
        features, raw, classes, self.key = _read_features(path)
        if self.key == "inputs":
            if len(features) == 0 or not features.is_floating_point():
                raise InputError(f"{path}: 'inputs' must be a non-empty float array, not "
                                 f"{features.dtype} {tuple(features.shape)}")
        elif features.dim() != 2 or not features.is_floating_point():
            raise InputError(
                f"{path}: 'features' must be a float [N, d] array, not "
                f"{features.dtype} {tuple(features.shape)}"
            )
        if len(raw) != len(features):
            raise InputError(
                f"{path} has {len(features)} features but {len(raw)} labels; give one label per row"
            )
        if raw and isinstance(raw[0], str):
            names = [str(x) for x in raw]
        else:
            table = classes or (list(labels) if labels is not None else None)
            bad = [int(i) for i in raw if not 0 <= int(i) < (len(table) if table else 1 << 62)]
            if bad:
                raise InputError(
                    f"{path}: label index {bad[0]} is outside the "
                    f"{len(table or [])} class names; store 'classes' in the file"
                )
            names = [table[int(i)] if table else str(int(i)) for i in raw]
        super().__init__(path, names, batch_size)
        self.features = features.float()

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def __iter__(self) -> Iterator[Any]:
        for idx in self._chunks():
            yield self.features[idx.start : idx.stop], self.names[idx.start : idx.stop]


def _read_features(path: Path) -> tuple[torch.Tensor, list[Any], list[str] | None, str]:
    """(array, raw labels, class names or None, key): key is ``features`` or ``inputs``."""
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise InputError(f"{path} is not a readable .npz of plain arrays ({e})") from None
        key = next((k for k in ("features", "inputs") if k in arrays), None)
        if key is None or "labels" not in arrays:
            raise InputError(
                f"{path} needs arrays 'features' (head inputs) or 'inputs' (model inputs) and "
                f"'labels' (has: {', '.join(arrays)})"
            )
        labels = arrays["labels"]
        raw = [str(x) for x in labels] if labels.dtype.kind in "US" else labels.tolist()
        classes = [str(x) for x in arrays["classes"]] if "classes" in arrays else None
        return torch.from_numpy(np.ascontiguousarray(arrays[key])), raw, classes, key
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            key = next((k for k in ("features", "inputs") if k in keys), None)
            if key is None or "labels" not in keys:
                raise InputError(
                    f"{path} needs tensors 'features' (head inputs) or 'inputs' (model inputs) "
                    f"and 'labels' (has: {', '.join(sorted(keys))})"
                )
            features, labels = f.get_tensor(key), f.get_tensor("labels")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from None
    classes = None
    for name in ("classes", "labels"):  # not `key`: that names the tensor read above
        try:
            value = json.loads(meta.get(name, "null"))
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            classes = value
            break
    if labels.is_floating_point():
        raise InputError(f"{path}: 'labels' must be integer class indices, not {labels.dtype}")
    return features, labels.flatten().tolist(), classes, key


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class DataFormat:
    """How to recognise one kind of ``--data`` path and open it for a loaded model."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[[Path, Any, Sequence[str] | None, int], DataSource]


DATA_FORMATS: Registry[DataFormat] = Registry("data format")


def _open_images(path: Path, loaded: Any, labels: Sequence[str] | None, bs: int) -> DataSource:
    if loaded is None:
        return ImageFolder(path, bs, image_transform(None))
    model = loaded.require_model(f"image data ({path})")
    if loaded.processor is not None:
        return ImageFolder(path, bs, processor=loaded.processor)
    return ImageFolder(path, bs, image_transform(model, getattr(loaded, "arch", None)))


def _open_text(path: Path, loaded: Any, labels: Sequence[str] | None, bs: int) -> DataSource:
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            f"text data ({path}) is tokenised with the model folder's tokenizer; "
            "pass a Hugging Face model folder that has one"
        )
    loaded.require_model(f"text data ({path})")
    return TextFile(path, bs, tokenizer)


def _open_features(path: Path, loaded: Any, labels: Sequence[str] | None, bs: int) -> DataSource:
    src = FeatureFile(path, bs, labels)
    if src.key == "inputs":  # model inputs: only a whole model can take them
        if loaded is not None:
            loaded.require_model(f"model inputs ({path})")
        return src
    if loaded is not None:
        from .heads import is_head_module

        if loaded.model is not None and not is_head_module(loaded.model):
            raise InputError(
                f"{path} holds head inputs ('features'), which feed the head directly; graft "
                "the weights file itself (MODEL = the .safetensors/.pt file), or store model "
                "inputs under 'inputs', or give images or text"
            )
        d = loaded.find_head().in_features
        if src.dim != d:
            raise InputError(
                f"{path} has features of size {src.dim} but the head reads {d}; "
                "compute the features with the model this head belongs to"
            )
    return src


for _fmt, _desc in (
    (
        DataFormat("images", lambda p: p.is_dir(), _open_images),
        "a folder with one sub-folder of images per class",
    ),
    (
        DataFormat("text", lambda p: p.suffix in (".jsonl", ".csv"), _open_text),
        "a .jsonl or .csv file with text and label columns (needs a model with a tokenizer)",
    ),
    (
        DataFormat("features", lambda p: p.suffix in (".safetensors", ".npz"), _open_features),
        "a .safetensors or .npz file with labels [N] and features [N, d] (head inputs) or "
        "inputs [N, ...] (model inputs)",
    ),
):
    DATA_FORMATS.register(_fmt.name, _desc)(_fmt)


def load_data(
    path: str | os.PathLike[str],
    *,
    loaded: Any = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 64,
) -> DataSource:
    """Open ``--data``: an image folder, a JSONL/CSV text file or a features file.

    Args:
        path: the data.
        loaded: the ``headgraft.io.sources.Loaded`` model the data is for (its tokenizer,
            preprocessing and head size are used and checked).
        labels: the classes the data may use (old and new); any other class is an error.
            Integer labels in a features file without class names index this list.
        batch_size: examples per batch.

    Raises:
        InputError: a missing path, an unknown class, an empty class folder, features whose
            size is not the head's, or a file without the needed columns.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"--data {p} does not exist; check the path")
    fmt = next((DATA_FORMATS.get(n) for n in DATA_FORMATS if DATA_FORMATS.get(n).matches(p)), None)
    if fmt is None:
        kinds = "; ".join(DATA_FORMATS.describe().values())
        raise InputError(f"cannot read --data {p}; give {kinds}")
    src = fmt.open(p, loaded, labels, batch_size)
    if labels is not None:
        allowed = set(labels)
        unknown = [c for c in src.classes if c not in allowed]
        if unknown:
            raise InputError(
                f"the data has class(es) {', '.join(map(repr, unknown[:5]))} that are neither "
                f"existing nor new labels; add them to --labels or remove them from {p}"
            )
    return src
