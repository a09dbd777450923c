"""Optional layers: what each needs beyond the core (jax, numpy), and one clear error when
it is missing.

    pip install revlearn            the core: train, the rules, the methods, the checkers,
                                    data, models, spaces
    pip install 'revlearn[lab]'     + the meta loop, the experiments and the command line's
                                    `list` / `run` / `plot` (optax, matplotlib, rich)
"""

from __future__ import annotations

import importlib.util

__all__ = ["LAB", "require"]

#: The lab layer's third-party modules.
LAB = ("optax", "matplotlib", "rich")


def require(where: str, extra: str = "lab", modules: tuple[str, ...] = LAB) -> None:
    """Raise ImportError (one line naming the install command) if a module of `extra` is
    missing; `where` names what needs it."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{where} is part of revlearn's {extra} layer and needs "
                          f"{', '.join(missing)}: pip install 'revlearn[{extra}]'")
