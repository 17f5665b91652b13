"""A named choice users can set three ways — the machinery behind the backend and the implementation.

    setting = Setting("backend", ("auto", "triton", "reference"), env_var="FUSED_LORA_BACKEND")
    setting.get()                  # scoped, else process-wide, else the environment variable, else "auto"
    setting.set("reference")       # the whole process (None: back to the environment / auto)
    with setting.use("triton"): …  # this thread or asyncio task only, restored on exit

Read at every call, so a test or a script can switch without re-importing anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator


class Setting:
    def __init__(self, name: str, choices: tuple[str, ...], env_var: str) -> None:
        self.name, self.choices, self.env_var = name, choices, env_var
        self._process: str | None = None
        self._scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"fused_lora_{name}", default=None)

    def check(self, value, where: str | None = None) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise ValueError(f"{where or self.name} must be one of {self.choices}, got {value!r}")
        return value

    def set(self, value: str | None) -> None:
        self._process = None if value is None else self.check(value)

    def get(self) -> str:
        scoped = self._scoped.get()
        if scoped is not None:
            return scoped
        if self._process is not None:
            return self._process
        return self.check(os.environ.get(self.env_var, "auto").strip().lower() or "auto", self.env_var)

    @contextlib.contextmanager
    def use(self, value: str) -> Iterator[None]:
        token = self._scoped.set(self.check(value))
        try:
            yield
        finally:
            self._scoped.reset(token)
