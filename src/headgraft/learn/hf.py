"""Hugging Face ``Trainer`` integration: distillation and old-row freezing in ``train()``.

``GraftCallback`` turns an ordinary ``Trainer`` run on a grafted model into one that does not
forget: when training starts it freezes the head's old rows inside the Trainer's own
optimizer (gradients masked, rows restored after every step, so AdamW's weight decay cannot
move them) and snapshots a frozen teacher; on every training forward pass it adds
``DistillationLoss(student old logits, teacher old logits)`` to the loss the model returns.
Nothing else about the run changes: same arguments, datasets, logging, checkpoints.

``GraftTrainer`` is the same as a ``Trainer`` subclass, for runs whose loss the model does not
compute itself (label smoothing, ``compute_loss_func``).

Keep some old-class examples in the training set (an :class:`ExemplarMemory`, or replayed
features): distillation and frozen rows keep the *old* logits, but only old examples teach
the *new* rows where the old classes lie.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..features import logits_of
from ..heads import find_head, get_module
from ..layers import SplitHead
from .freeze import FrozenRows, freeze_old_rows
from .losses import DistillationLoss

try:
    from transformers import Trainer, TrainerCallback
except ModuleNotFoundError as e:  # pragma: no cover - the hf extra is not installed
    raise ModuleNotFoundError(
        "headgraft.learn.hf needs transformers (and accelerate for Trainer); "
        "pip install 'headgraft[hf]'",
        name=e.name,
    ) from None

_NOT_INPUTS = ("labels", "label", "num_items_in_batch", "return_loss")


def _num_old(model: nn.Module, head: str | None, teacher: nn.Module | None) -> int | None:
    h = find_head(model, head)
    module = get_module(model, h.path)
    if isinstance(module, SplitHead):
        return module.num_old
    if teacher is not None:
        return find_head(teacher).num_classes
    return None


def _with_loss(output: Any, term: torch.Tensor) -> Any | None:
    """``output`` with ``term`` added to its loss, or None when it carries no loss."""
    if isinstance(output, Mapping) or hasattr(output, "loss"):
        loss = output.get("loss") if isinstance(output, Mapping) else output.loss
        if loss is None:
            return None
        output["loss"] = loss + term  # ModelOutput and dict both take item assignment
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if output[0].dim() == 0 and len(output) > 1:  # (loss, logits, ...)
            return (output[0] + term, *output[1:])
    return None


class GraftCallback(TrainerCallback):
    """Add distillation and old-row freezing to an ordinary ``Trainer`` run.

    Example:
        >>> model = headgraft.add_classes(model, ["refund", "invoice"], examples=shots)
        >>> trainer = Trainer(model=model, args=args, train_dataset=new_plus_exemplars,
        ...                   callbacks=[GraftCallback(num_old=5)])
        >>> trainer.train()

    Args:
        teacher: the model before grafting (or any model whose first ``num_old`` logits are
            the old classes'); default: a frozen copy of the grafted model taken when training
            starts, whose old logits are exactly the pre-graft model's.
        num_old: the number of old classes (rows first in the head); read from a split head
            or from ``teacher`` when omitted.
        freeze_old: keep the old rows bit-identical in the Trainer's optimizer.
        alpha: weight of the distillation term (0: freezing only, no teacher).
        temperature: distillation temperature.
        head: dotted path of the head, when it cannot be found automatically.
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        *,
        num_old: int | None = None,
        freeze_old: bool = True,
        alpha: float = 1.0,
        temperature: float = 2.0,
        head: str | None = None,
    ) -> None:
        self.teacher = teacher
        self.num_old = num_old
        self.freeze_old = bool(freeze_old)
        self.loss = DistillationLoss(num_old, temperature=temperature, alpha=alpha)
        self.head = head
        self.frozen: FrozenRows | None = None
        self.pending: torch.Tensor | None = None  # a term the model's output had no loss for
        self.require_loss = True
        self._hook: Any = None
        self._teacher: nn.Module | None = None

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise InputError("GraftCallback got no model from the Trainer; pass model= to it")
        n = self.num_old if self.num_old is not None else _num_old(model, self.head, self.teacher)
        if n is None:
            raise InputError(
                "GraftCallback needs num_old (the number of old classes) for a fused head; "
                "pass num_old= or the pre-graft model as teacher="
            )
        self.num_old = n
        self.loss.num_old = n
        if self.freeze_old:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            if inner is None:
                raise InputError(
                    "the Trainer has no optimizer yet; use GraftCallback with "
                    "Trainer.train(), which creates it"
                )
            self.frozen = freeze_old_rows(model, inner, n, head=self.head)
        if self.loss.alpha > 0:
            device = next(model.parameters()).device
            teacher = self.teacher if self.teacher is not None else copy.deepcopy(model)
            self._teacher = teacher.to(device).eval().requires_grad_(False)
            self._hook = model.register_forward_hook(self._distil, with_kwargs=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        return control

    def close(self) -> None:
        """Remove the hooks (the Trainer calls this through ``on_train_end``)."""
        if self.frozen is not None:
            self.frozen.remove()
            self.frozen = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._teacher = None
        self.pending = None

    # ------------------------------------------------------------------ the loss term

    def term(self, student_logits: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The distillation term for one batch, running the teacher on the same inputs."""
        assert self._teacher is not None
        inputs = {k: v for k, v in kwargs.items() if k not in _NOT_INPUTS}
        with torch.no_grad():
            teacher_logits = logits_of(self._teacher(*args, **inputs))
        return self.loss(student_logits, teacher_logits)

    def _distil(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not module.training or self._teacher is None:
            return None
        term = self.term(logits_of(output), args, kwargs)
        changed = _with_loss(output, term)
        if changed is None:
            if self.require_loss:
                raise InputError(
                    "the model returned no loss, so GraftCallback cannot add distillation; "
                    "put 'labels' in the batches, or use headgraft.learn.hf.GraftTrainer"
                )
            self.pending = term
            return None
        return changed


class GraftTrainer(Trainer):
    """A ``Trainer`` with :class:`GraftCallback` built in, also for losses the model does not
    compute (``label_smoother``, ``compute_loss_func``): the distillation term is added to
    whatever loss the Trainer computes.

    Args:
        teacher, num_old, freeze_old, alpha, temperature, head: as for :class:`GraftCallback`.
        *args, **kwargs: the ordinary ``Trainer`` arguments.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        num_old: int | None = None,
        freeze_old: bool = True,
        alpha: float = 1.0,
        temperature: float = 2.0,
        head: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.graft = GraftCallback(
            teacher,
            num_old=num_old,
            freeze_old=freeze_old,
            alpha=alpha,
            temperature=temperature,
            head=head,
        )
        self.graft.require_loss = False
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.graft]
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.graft.pending = None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.graft.pending is None:
            return result
        term, self.graft.pending = self.graft.pending, None
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term
