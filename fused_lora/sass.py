"""Reading compiled kernels without a GPU: what the main loop costs per iteration, and whether the
kernel is persistent, from the SASS that Triton's bundled ``nvdisasm`` prints.

    stats = loop_stats(sass_text)
    stats.per_iteration   # instructions on the main loop's cheapest cycle (one K step)
    stats.mmas            # tensor-core instructions on it (HGMMA on sm_90a, HMMA on sm_80)
    stats.persistent      # an output store lies on a cycle: each program writes several tiles
    stats.per_tile        # persistent: instructions per output tile outside the K loop's steady state

The SASS is cut into basic blocks (at labels and after branches) with their control-flow edges. The
main loop's block is the one holding the most MMA instructions whose cheapest cycle back to itself
(Dijkstra over block sizes) stores no output — in a flattened persistent loop the epilogue, behind a
branch, holds the low-rank MMAs and the stores; one K step is that cycle, which leaves out the epilogue
and the barrier-wait retry loops. One tile's overhead is the cheapest cycle through the first output
store, less one K step when that cycle runs through the main loop's block (flattened: the K step and the
epilogue share one loop); in a nested loop it is the outer loop's body around the K loop (set-up,
pipeline fill and drain, epilogue). The numbers are for comparing builds (CI keeps them from
regressing), not cycle estimates.
"""

from __future__ import annotations

import dataclasses
import heapq
import re

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)")
_MMA = ("HGMMA", "HMMA")
_STORE = ("STG", "UTMASTG")  # plain and TMA stores of an output tile (not atomics)
_END = ("EXIT", "RET", "BRA")


@dataclasses.dataclass
class LoopStats:
    per_iteration: int = 0  # instructions on the main loop's cheapest cycle (0: no MMA loop)
    mmas: int = 0
    persistent: bool = False
    per_tile: int = 0  # persistent kernels: instructions per tile outside the K loop (0: not persistent)


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else ""


@dataclasses.dataclass
class _Block:
    ops: list[str]
    succ: list[int]


def blocks(sass: str) -> list[_Block]:
    """The basic blocks of a kernel's SASS, in order, with successor indices."""
    lines: list[tuple[str, str]] = []  # ("label", name) or ("op", text)
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            lines.append(("op", m.group(2)))
        elif m := _LABEL.match(line.strip()):
            lines.append(("label", m.group(1)))
    out: list[_Block] = []
    label_block: dict[str, int] = {}
    targets: list[tuple[int, str, bool]] = []  # (block, label, falls through too)
    current: list[str] = []

    def close(fallthrough: bool, branch: str | None = None) -> None:
        out.append(_Block(list(current), []))
        current.clear()
        targets.append((len(out) - 1, branch or "", fallthrough))

    for kind, text in lines:
        if kind == "label":
            if current:
                close(True)
            label_block[text] = len(out)
            continue
        current.append(text)
        m = _BRANCH.search(text)
        if m or _opcode(text) in ("EXIT", "RET"):
            conditional = text.startswith("@")
            close(conditional, m.group(1) if m else None)
    if current:
        close(False)
    for b, label, fallthrough in targets:
        if label and label in label_block:
            out[b].succ.append(label_block[label])
        if fallthrough and b + 1 < len(out):
            out[b].succ.append(b + 1)
    return out


def _cheapest_cycle(bs: list[_Block], start: int) -> list[int] | None:
    """Blocks of the cheapest cycle start -> ... -> start (weights: instructions), or None."""
    dist = {s: len(bs[s].ops) for s in bs[start].succ}
    prev: dict[int, int] = {s: start for s in bs[start].succ}
    heap = [(d, s) for s, d in dist.items()]
    heapq.heapify(heap)
    while heap:
        d, b = heapq.heappop(heap)
        if b == start:
            path = [start]
            node = prev[start]
            while node != start:
                path.append(node)
                node = prev[node]
            return path
        if d > dist.get(b, 1 << 60):
            continue
        for s in bs[b].succ:
            nd = d + len(bs[s].ops)
            if nd < dist.get(s, 1 << 60):
                dist[s], prev[s] = nd, b
                heapq.heappush(heap, (nd, s))
    return None


def _on_cycle(bs: list[_Block], start: int) -> bool:
    seen, stack = set(), list(bs[start].succ)
    while stack:
        b = stack.pop()
        if b == start:
            return True
        if b not in seen:
            seen.add(b)
            stack.extend(bs[b].succ)
    return False


def loop_stats(sass: str, tiles: bool = True) -> LoopStats:
    """`tiles` False: a kernel that is not a persistent walk over output tiles (the grad pass, whose x loop
    stores the packed keep bits as it streams): a store on a cycle does not make it persistent, and its
    main loop is the cycle with the most MMAs, stores and all."""
    bs = blocks(sass)
    stores = [i for i, b in enumerate(bs) if any(_opcode(op) in _STORE for op in b.ops) and _on_cycle(bs, i)]
    if not tiles:
        stores = []
    stats = LoopStats(persistent=bool(stores))
    mma_counts = [sum(_opcode(op) in _MMA for op in b.ops) for b in bs]
    ranked = sorted((n, -i) for i, n in enumerate(mma_counts) if n)
    main = None
    for _, neg in reversed(ranked):  # the block with the most MMAs on a cycle that stores nothing
        cycle = _cheapest_cycle(bs, -neg)  # (a flattened loop's epilogue, low-rank MMAs and all, stores)
        if cycle is not None and (not tiles or not any(_opcode(op) in _STORE for b in cycle for op in bs[b].ops)):
            ops = [op for b in cycle for op in bs[b].ops]
            stats.per_iteration, stats.mmas, main = len(ops), sum(_opcode(op) in _MMA for op in ops), -neg
            break
    if stores:
        cycle = _cheapest_cycle(bs, stores[0])
        if cycle is not None:
            length = sum(len(bs[b].ops) for b in cycle)
            stats.per_tile = length - (stats.per_iteration if main in cycle else 0)
    return stats
