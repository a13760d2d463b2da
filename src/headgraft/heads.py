"""Where the classifier is and how to read and replace it.

Two registries live here: *head kinds* (how to read rows from a layer type and rebuild it with
other rows) and *locators* (how to find the head in a model family). ``find_head`` tries the
locators in order; the first that recognises the model decides.
"""

from __future__ import annotations

import copy
import difflib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import AmbiguousHeadError, HeadNotFoundError, UnsupportedHeadError
from .layers import CosineLinear, SplitHead
from .registry import Registry

# ----------------------------------------------------------------------------- head kinds


@dataclass(frozen=True)
class HeadKind:
    """How one layer type stores class rows.

    ``dim`` is the output dimension that indexes classes (``-1`` for linear layers on
    ``[..., features]`` inputs, ``1`` for a 1x1 convolution on ``[N, C, H, W]``).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    dim: int
    count_attr: str  # the attribute that holds the number of outputs ("out_features", ...)
    shared: tuple[str, ...] = ()  # parameters shared by every row (a cosine head's scale)


HEAD_KINDS: Registry[HeadKind] = Registry("head kind")


def _register_kind(kind: HeadKind, description: str) -> None:
    HEAD_KINDS.register(kind.name, description)(kind)


def _is_conv1x1(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d or isinstance(m, nn.Conv2d)
    ) and tuple(m.kernel_size) == (1, 1) and m.groups == 1 and tuple(m.stride) == (1, 1)


_register_kind(
    HeadKind("linear", lambda m: isinstance(m, nn.Linear), -1, "out_features"),
    "nn.Linear, with or without bias",
)
_register_kind(
    HeadKind("conv1x1", _is_conv1x1, 1, "out_channels"),
    "a 1x1 nn.Conv2d used as a classifier (SqueezeNet, timm conv heads)",
)
_register_kind(
    HeadKind("cosine", lambda m: isinstance(m, CosineLinear), -1, "out_features", ("scale",)),
    "headgraft.CosineLinear, a cosine-normalised head with a learnable scale",
)


def head_kind(module: nn.Module) -> HeadKind:
    """The registered kind of ``module``; a SplitHead reports the kind of its blocks."""
    if isinstance(module, SplitHead):
        return head_kind(module.old)
    for name in HEAD_KINDS:
        kind = HEAD_KINDS.get(name)
        if kind.matches(module):
            return kind
    raise UnsupportedHeadError(
        f"{type(module).__name__} is not a head headgraft can grow; supported kinds: "
        f"{', '.join(HEAD_KINDS.names())} (or pass path= to the Linear inside it)"
    )


def is_head_module(module: nn.Module) -> bool:
    """True for modules of a registered head kind, and for split heads."""
    if isinstance(module, SplitHead):
        return True
    return any(HEAD_KINDS.get(n).matches(module) for n in HEAD_KINDS)


def rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight as stored (rows on dim 0) and its bias (None if it has none)."""
    return module.weight, getattr(module, "bias", None)


def num_rows(module: nn.Module) -> int:
    return module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[1]


def _hook_attrs(module: nn.Module) -> list[str]:
    return [k for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)]


def transplant_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Move every hook dict of ``src`` onto ``dst`` (handles users hold keep working)."""
    for attr in _hook_attrs(src):
        setattr(dst, attr, getattr(src, attr))
        setattr(src, attr, OrderedDict())
    if hasattr(src, "_is_full_backward_hook"):
        dst._is_full_backward_hook = src._is_full_backward_hook


def check_growable(module: nn.Module, path: str) -> None:
    """Refuse heads whose rows cannot be grown exactly, saying what to do instead."""
    from torch.nn.utils import parametrize

    target = module.old if isinstance(module, SplitHead) else module
    if parametrize.is_parametrized(target):
        names = ", ".join(target.parametrizations.keys())
        raise UnsupportedHeadError(
            f"head {path!r} has parametrizations on {names}; growing them cannot keep the old "
            "rows exact. Call torch.nn.utils.parametrize.remove_parametrizations(head, name) "
            "first and re-apply the parametrization after grafting"
        )


def with_rows(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` (same class, attributes and settings) holding other rows.

    Parameters keep their ``requires_grad``; shared parameters (a cosine scale) stay the same
    object, so a split head's blocks share them. Hooks are not copied: see ``transplant_hooks``.
    """
    kind = head_kind(module)
    new = copy.copy(module)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    new._modules = OrderedDict(module._modules)
    for attr in _hook_attrs(module):
        setattr(new, attr, OrderedDict())
    old_w, old_b = rows(module)
    new._parameters["weight"] = nn.Parameter(weight, requires_grad=old_w.requires_grad)
    if old_b is not None:
        if bias is None:
            raise ValueError("the head has a bias; new rows need one too")
        new._parameters["bias"] = nn.Parameter(bias, requires_grad=old_b.requires_grad)
    setattr(new, kind.count_attr, weight.shape[0])
    return new


# ----------------------------------------------------------------------------- module paths


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (``classifier.6``); a clear error if there is none."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, [n for n, _ in model.named_modules() if n], 1)
        hint = f"did you mean {close[0]!r}? (run" if close else "run"
        raise HeadNotFoundError(
            f"the model has no module {path!r}; {hint} `headgraft inspect` or "
            "print(model) to see its module names" + (")" if close else "")
        ) from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` (dot-separated, Sequential indices allowed)."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


# ----------------------------------------------------------------------------- Head


@dataclass
class Head:
    """A located classification head.

    Attributes:
        path: dotted module path of the (first) head.
        module: the head module itself.
        in_features: size of the feature vector the head reads.
        num_classes: number of output classes (rows).
        kind: the registered head kind (``linear``, ``conv1x1``, ``cosine``).
        paths: every head that must grow together (DeiT's ``head`` and ``head_dist``).
        locator: which locator found it.
    """

    path: str
    module: nn.Module
    in_features: int
    num_classes: int
    kind: str
    paths: tuple[str, ...] = field(default=())
    locator: str = "path"

    @property
    def is_split(self) -> bool:
        return isinstance(self.module, SplitHead)

    def to_dict(self) -> dict[str, object]:
        w = self.module.weight
        return {
            "path": self.path,
            "paths": list(self.paths),
            "kind": self.kind,
            "layout": "split" if self.is_split else "fused",
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "dtype": str(w.dtype).removeprefix("torch."),
            "device": str(w.device),
            "bias": getattr(self.module, "bias", None) is not None,
            "locator": self.locator,
        }


def _make_head(model: nn.Module, paths: list[str], locator: str) -> Head:
    modules = [get_module(model, p) for p in paths]
    for p, m in zip(paths, modules):
        if not is_head_module(m):
            head_kind(m)  # raises UnsupportedHeadError naming the type
        if num_rows(m) != num_rows(modules[0]):
            raise HeadNotFoundError(
                f"heads {paths[0]!r} and {p!r} have different class counts; pass path= to "
                "choose one"
            )
    m = modules[0]
    return Head(
        path=paths[0],
        module=m,
        in_features=in_features(m),
        num_classes=num_rows(m),
        kind=head_kind(m).name,
        paths=tuple(paths),
        locator=locator,
    )


# ----------------------------------------------------------------------------- locators

Locator = Callable[[nn.Module], "list[str] | None"]
LOCATORS: Registry[Locator] = Registry("head locator")


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


@LOCATORS.register("timm", "timm models: pretrained_cfg['classifier'] (tuples grow together)")
def _locate_timm(model: nn.Module) -> list[str] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "classifier" not in cfg:
        return None
    names = cfg["classifier"]
    names = [names] if isinstance(names, str) else list(names)
    paths = [n for n in names if _exists(model, n) and is_head_module(get_module(model, n))]
    if not paths:
        if getattr(model, "num_classes", None) == 0:
            raise HeadNotFoundError(
                "this timm model has no classifier (num_classes=0); create it with "
                "num_classes=N or call model.reset_classifier(N) before grafting"
            )
        return None
    return paths


_HF_PATHS = ("classifier.out_proj", "classifier", "score", "classifier.classifier", "head")


@LOCATORS.register("transformers", "Hugging Face models: classifier, classifier.out_proj, score")
def _locate_hf(model: nn.Module) -> list[str] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "id2label"):
        return None
    n = len(config.id2label or {})
    for p in _HF_PATHS:
        if _exists(model, p):
            m = get_module(model, p)
            if is_head_module(m) and num_rows(m) == n:
                return [p]
    return None


_TORCHVISION_PATHS: dict[str, tuple[str, ...]] = {
    "ResNet": ("fc",),
    "RegNet": ("fc",),
    "GoogLeNet": ("fc", "aux1.fc2", "aux2.fc2"),
    "Inception3": ("fc", "AuxLogits.fc"),
    "ShuffleNetV2": ("fc",),
    "VGG": ("classifier.6",),
    "AlexNet": ("classifier.6",),
    "MobileNetV2": ("classifier.1",),
    "EfficientNet": ("classifier.1",),
    "MNASNet": ("classifier.1",),
    "MobileNetV3": ("classifier.3",),
    "ConvNeXt": ("classifier.2",),
    "DenseNet": ("classifier",),
    "SqueezeNet": ("classifier.1",),
    "VisionTransformer": ("heads.head",),
    "SwinTransformer": ("head",),
    "MaxVit": ("classifier.5",),
}


@LOCATORS.register("torchvision", "torchvision classification models, by family")
def _locate_torchvision(model: nn.Module) -> list[str] | None:
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    paths = _TORCHVISION_PATHS.get(type(model).__name__)
    if paths is None:
        return None
    # auxiliary heads exist only when the model was built with aux_logits=True
    found = [p for p in paths if _exists(model, p)]
    return found or None


def _fx_heads(model: nn.Module) -> list[str] | None:
    """Head-kind modules that feed the traced output directly (None if tracing fails)."""
    try:
        from torch import fx

        class HeadTracer(fx.Tracer):
            # keep heads whole: a split or cosine head is one call, not its insides
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return is_head_module(m) or super().is_leaf_module(m, qualname)

        graph = HeadTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models fall back to module order
        return None
    modules = dict(model.named_modules())
    found: list[str] = []
    seen: set[fx.Node] = set()
    out = [n for n in graph.nodes if n.op == "output"]
    stack = list(out)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and is_head_module(modules[node.target]):
            if node.target not in found:
                found.append(node.target)
            continue  # the first head on each path back from the output
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
            continue  # a parametrised non-head layer after the last head: not a classifier
        stack.extend(node.all_input_nodes)
    return found


@LOCATORS.register("generic", "any nn.Module: the last Linear/1x1-conv layer feeding the output")
def _locate_generic(model: nn.Module) -> list[str] | None:
    found = _fx_heads(model)
    if found is None:
        candidates = [
            n for n, m in model.named_modules()
            if n and is_head_module(m) and not _inside_split(n, model)
        ]
        found = candidates[-1:]
    if len(found) > 1:
        raise AmbiguousHeadError(
            f"several layers feed the output ({', '.join(found)}); pass path= "
            "(or --head) to choose the classifier"
        )
    return found or None


def _inside_split(name: str, model: nn.Module) -> bool:
    parent, _, _ = name.rpartition(".")
    return bool(parent) and isinstance(get_module(model, parent), SplitHead)


def _auto_path(model: nn.Module) -> str | None:
    """The head paths the locators find on their own, for "did you mean" hints."""
    try:
        return ",".join(find_head(model).paths)
    except HeadNotFoundError:
        return None


def find_head(model: nn.Module, path: str | None = None) -> Head:
    """Locate the classification head of ``model``.

    Args:
        model: the classifier.
        path: dotted path of the head (``"fc"``, ``"classifier.6"``); found automatically
            when omitted, by the first locator in ``LOCATORS`` that recognises the model.

    Raises:
        HeadNotFoundError: no head, or ``path`` names a module that is not a head.
        AmbiguousHeadError: several modules could be the head; pass ``path``.
    """
    if path is not None:
        paths = [p.strip() for p in path.split(",") if p.strip()]
        for p in paths:
            m = get_module(model, p)
            if not is_head_module(m):
                inner = [n for n, c in m.named_modules() if n and is_head_module(c)]
                guess = f"{p}.{inner[-1]}" if inner else _auto_path(model)
                hint = f"; did you mean {guess!r}?" if guess else ""
                raise HeadNotFoundError(
                    f"module {p!r} is a {type(m).__name__}, not a classification head "
                    f"(supported: {', '.join(HEAD_KINDS.names())}){hint}"
                )
        return _make_head(model, paths, "path")
    if isinstance(model, SplitHead) or is_head_module(model):
        return _make_head(model, [""], "self")
    for name in LOCATORS:
        paths = LOCATORS.get(name)(model)
        if paths:
            return _make_head(model, paths, name)
    raise HeadNotFoundError(
        f"no classification head found in {type(model).__name__}; pass path= (or --head) "
        "with the dotted name of its final Linear layer"
    )
