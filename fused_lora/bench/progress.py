"""A progress bar for the benchmark's long loops: tqdm on stderr when it is installed and stderr is a
terminal (so logs and tests stay clean), else nothing."""

from __future__ import annotations


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, disable=None)
