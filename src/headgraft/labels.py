"""Label names <-> output indices, kept in step with the head's rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .errors import LabelError


def _as_names(labels: Iterable[object], what: str) -> list[str]:
    if isinstance(labels, str):
        raise LabelError(f"{what} must be a list of names, not the string {labels!r}; "
                         f"pass [{labels!r}] or split it on commas")
    names = [str(x) for x in labels]
    if not names:
        raise LabelError(f"{what} is empty; pass at least one label name")
    if any(not n.strip() for n in names):
        raise LabelError(f"{what} contains an empty name; give every class a non-empty name")
    seen: set[str] = set()
    dup = sorted({n for n in names if n in seen or seen.add(n)})
    if dup:
        raise LabelError(f"{what} names {', '.join(map(repr, dup))} more than once; "
                         "give each class a distinct name")
    return names


class LabelMap(Sequence[str]):
    """An ordered, immutable list of class names; index i is output row i.

    Growing is append-only (``extend``), so an old class keeps its index forever; ``remove``
    returns a new map plus the indices of the rows that survive.
    """

    def __init__(self, names: Iterable[object]) -> None:
        self._names = tuple(_as_names(names, "labels"))
        self._index = {n: i for i, n in enumerate(self._names)}

    @classmethod
    def default(cls, num_classes: int) -> LabelMap:
        """Names ``"0" .. "n-1"``, used when a model carries no label names."""
        return cls(str(i) for i in range(num_classes))

    @classmethod
    def from_id2label(cls, id2label: dict) -> LabelMap:
        """From a Hugging Face style ``{index: name}`` mapping (keys may be strings)."""
        items = sorted((int(k), str(v)) for k, v in id2label.items())
        if [k for k, _ in items] != list(range(len(items))):
            raise LabelError("id2label indices are not 0..n-1; fix the model config's id2label")
        return cls(v for _, v in items)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self._names))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self._index)

    def index(self, name: object, start: int = 0, stop: int | None = None) -> int:  # noqa: ARG002
        """The output index of ``name``; unknown names list the known ones."""
        try:
            return self._index[str(name)]
        except KeyError:
            known = ", ".join(self._names[:20]) + (" ..." if len(self._names) > 20 else "")
            raise LabelError(f"unknown label {name!r}; the model's labels are: {known}") from None

    def extend(self, new: Iterable[object]) -> LabelMap:
        """A new map with ``new`` appended; names already present are an error."""
        new_names = _as_names(new, "new labels")
        clash = [n for n in new_names if n in self._index]
        if clash:
            raise LabelError(f"label(s) {', '.join(map(repr, clash))} already exist in the model; "
                             "choose new names or remove the old class first")
        return LabelMap([*self._names, *new_names])

    def remove(self, names: Iterable[object]) -> tuple[LabelMap, list[int]]:
        """A new map without ``names``, and the old indices of the rows that are kept."""
        gone = _as_names(names, "labels to remove")
        drop = {self.index(n) for n in gone}
        keep = [i for i in range(len(self)) if i not in drop]
        if not keep:
            raise LabelError("cannot remove every class; a head needs at least one label left")
        return LabelMap(self._names[i] for i in keep), keep

    def __getitem__(self, i):  # type: ignore[override]
        return self._names[i]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._index

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LabelMap):
            return self._names == other._names
        if isinstance(other, (list, tuple)):
            return list(self._names) == [str(x) for x in other]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._names)

    def __repr__(self) -> str:
        return f"LabelMap({list(self._names)!r})"

    def to_dict(self) -> dict[str, object]:
        return {"labels": list(self._names)}


# ----------------------------------------------------------------------------- labels on models

LABELS_ATTR = "headgraft_labels"


def model_labels(model, head: str | None = None) -> LabelMap:
    """The label names of ``model``'s outputs.

    Read from ``config.id2label`` (Hugging Face), the names headgraft stored on the model, or
    timm's ``pretrained_cfg['label_names']``; otherwise ``"0" .. "n-1"``.
    """
    from .heads import find_head

    n = find_head(model, head).num_classes
    # a Hugging Face config is what users (and save_pretrained) edit, so it wins
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label and len(id2label) == n:
        return LabelMap.from_id2label(id2label)
    stored = getattr(model, LABELS_ATTR, None)
    if stored is not None and len(stored) == n:
        return LabelMap(stored)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("label_names") and len(cfg["label_names"]) == n:
        return LabelMap(cfg["label_names"])
    return LabelMap.default(n)


def set_model_labels(model, labels: LabelMap) -> None:
    """Write ``labels`` everywhere the model's ecosystem keeps class names and counts."""
    n = len(labels)
    setattr(model, LABELS_ATTR, labels.names)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "id2label"):
        config.id2label = labels.id2label
        config.label2id = labels.label2id
        if getattr(config, "num_labels", n) != n:
            config.num_labels = n
    for attr in ("num_labels", "num_classes"):
        if isinstance(getattr(model, attr, None), int) and not isinstance(
            getattr(type(model), attr, None), property
        ):
            setattr(model, attr, n)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        cfg["num_classes"] = n
        if "label_names" in cfg:
            cfg["label_names"] = labels.names
