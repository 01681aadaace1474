"""Parameter names as the user's model spells them -> the engines' checkpoint names, and the layout
check that refuses a mismatch before any byte moves.

Rules, in order, for each user name:
1. the user's hook (`name_map`): a dict or a callable; a str result is the checkpoint name, ``DROP``
   leaves the tensor out of every publish, ``None`` (or a dict miss) falls through to the rules below;
2. wrapper segments are removed: ``_orig_mod`` (torch.compile), ``_fsdp_wrapped_module`` (FSDP1),
   ``_checkpoint_wrapped_module`` (activation checkpointing) anywhere in the path, a leading
   ``module`` (DDP / DataParallel);
3. with the engines' names at hand, a name the engines lack is retried with one leading ``model.``
   removed (the user's wrapper holds the HF model as ``.model``) or added (the user holds the inner
   base model); the first candidate the engines know wins.
Two user tensors mapping to one checkpoint name is a `LayoutError` (rule ``duplicate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from wsync.transfer.meta import TensorMeta

__all__ = ["DROP", "LayoutError", "NameMap", "check_layout", "strip_wrappers"]

#: Returned by a name hook (or used as a dict value): leave this tensor out of every publish.
DROP = "\x00drop"

_ANYWHERE = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING = ("module",)

NameHook = Mapping[str, str] | Callable[[str], "str | None"]


class LayoutError(ValueError):
    """The published tensors do not match the engines' model. ``tensor`` names the tensor, ``rule``
    says what is wrong: missing | extra | dtype | shape | duplicate."""

    def __init__(self, tensor: str, rule: str, detail: str) -> None:
        super().__init__(f"{tensor}: {rule}: {detail}")
        self.tensor, self.rule, self.detail = tensor, rule, detail


def strip_wrappers(name: str) -> str:
    """Drop wrapper segments (rule 2): ``module._orig_mod.layers.0._checkpoint_wrapped_module.w``
    -> ``layers.0.w``."""
    parts = [p for p in name.split(".") if p not in _ANYWHERE]
    while len(parts) > 1 and parts[0] in _LEADING:
        parts = parts[1:]
    return ".".join(parts)


def _candidates(name: str) -> list[str]:
    out = [name]
    if name.startswith("model."):
        out.append(name[len("model."):])
    out.append("model." + name)
    return out


class NameMap:
    """Maps user names to checkpoint names (rules in the module docstring)."""

    def __init__(self, hook: NameHook | None = None) -> None:
        self.hook = hook

    def _hooked(self, name: str) -> str | None:
        if self.hook is None:
            return None
        if isinstance(self.hook, Mapping):
            return self.hook.get(name)
        return self.hook(name)

    def one(self, name: str, engine_names: set[str] | None = None) -> str:
        """The checkpoint name of one user name (``DROP`` if the hook drops it)."""
        hooked = self._hooked(name)
        if hooked is not None:
            return hooked
        stripped = strip_wrappers(name)
        if engine_names:
            for cand in _candidates(stripped):
                if cand in engine_names:
                    return cand
        return stripped

    def resolve(self, user_names: Iterable[str], engine_names: Iterable[str] | None = None) -> dict[str, str]:
        """{user name: checkpoint name} for every kept tensor, in the user's order; duplicates refused."""
        known = set(engine_names) if engine_names is not None else None
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for user in user_names:
            mapped = self.one(user, known)
            if mapped == DROP:
                continue
            if mapped in seen:
                raise LayoutError(mapped, "duplicate", f"both {seen[mapped]!r} and {user!r} map to it")
            seen[mapped] = user
            out[user] = mapped
        return out


def check_layout(published: Sequence[TensorMeta], engine: Sequence[TensorMeta]) -> None:
    """Refuse (LayoutError, first problem found) unless ``published`` holds exactly the engine's tensors
    with equal dtypes and shapes. Engine tensors the publisher lacks: ``missing``; publisher tensors the
    engine lacks: ``extra``. Checked in the publisher's order, then the engine's."""
    theirs = {m.name: m for m in engine}
    mine: dict[str, TensorMeta] = {}
    for m in published:
        if m.name in mine:
            raise LayoutError(m.name, "duplicate", "published twice")
        mine[m.name] = m
        other = theirs.get(m.name)
        if other is None:
            raise LayoutError(m.name, "extra", "the engines' model has no such tensor")
        if other.dtype != m.dtype:
            raise LayoutError(m.name, "dtype", f"publisher has {m.dtype}, engines have {other.dtype}")
        if list(other.shape) != list(m.shape):
            raise LayoutError(m.name, "shape", f"publisher has {list(m.shape)}, engines have {list(other.shape)}")
    for name in theirs:
        if name not in mine:
            raise LayoutError(name, "missing", "the engines hold it but the publisher does not publish it")
