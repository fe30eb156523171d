"""The module graph of dgan/ (issue 11): no import cycle, and imports inside functions only where a
module is slow to import (torch-fidelity, the data stack) or an optional extra, each with a comment."""
from __future__ import annotations

import ast
from pathlib import Path

DGAN = Path(__file__).resolve().parents[1] / "dgan"
# Lazily imported on purpose: seconds of start-up (torch-fidelity; albumentations, webdataset, cv2,
# pydicom) that a CLI which fails on its arguments, or never scores, must not pay.
LAZY_OK = {"dgan.metrics", "dgan.data", "dgan.data.sources", "dgan.data.readers", "dgan.data.loader",
           "dgan.data.shards", "dgan.data.shard_sets", "dgan.data.build"}


def module_name(path: Path) -> str:
    parts = path.relative_to(DGAN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dgan_imports(path: Path) -> list[tuple[str, bool, ast.stmt]]:
    """(imported dgan module, inside a function?, the import statement) for every import in the file."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:  # from .loader import x, inside a package
            base = module_name(path).split(".")
            base = base[:len(base) - node.level + (path.name == "__init__.py")]
            node.module = ".".join(base + ([node.module] if node.module else []))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dgan":
            names = [f"{node.module}.{a.name}" if node.module == "dgan" else node.module for a in node.names]
            found += [(n, id(node) in inside, node) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inside, node) for a in node.names if a.name.startswith("dgan")]
    return found


# Each module may import only from its own layer or those below it (README, "Layout").
LAYERS = [
    {"dgan", "dgan.errors", "dgan.distributed", "dgan.runinfo", "dgan.schedules", "dgan.diffusion", "dgan.losses", "dgan.ema",
     "dgan.adaptive", "dgan.tracking", "dgan.progress", "dgan.seeding", "dgan.atomic", "dgan.pixels", "dgan.stopping", "dgan.update", "dgan.models*"},  # the core
    {"dgan.config_checks", "dgan.config", "dgan.checkpoint", "dgan.resume_state", "dgan.lr_schedule", "dgan.adv_schedule", "dgan.data*", "dgan.metrics*"},  # state, data
    {"dgan.rundir", "dgan.generation", "dgan.reference", "dgan.scoring", "dgan.audit", "dgan.html_report", "dgan.report", "dgan.masks", "dgan.step"},                 # shared logic
    {"dgan.dguard", "dgan.inpaint", "dgan.superres"},                                                 # tasks
    {"dgan.evaluate", "dgan.visualize", "dgan.compare", "dgan.monitor"},                              # CLIs, the run's reports
    {"dgan.sample", "dgan.export", "dgan.distill", "dgan.trainer", "dgan.train"},                                                  # the trainer, top CLIs
]


def layer_of(module: str) -> int:
    for i, members in enumerate(LAYERS):
        if module in members or any(m.endswith("*") and module.startswith(m[:-1]) for m in members):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in DGAN.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in dgan_imports(path):
            while target not in modules and "." in target:  # `from dgan import distributed` -> dgan.distributed
                target = target.rsplit(".", 1)[0]
            if target != name and target in modules and not name.startswith(target + "."):
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycle_in_dgan():
    assert find_cycle(graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    edges = graph()
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a in sorted(edges) for b in sorted(edges[a]) if layer_of(b) > layer_of(a)]
    assert upward == []


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_inside_functions_are_only_the_slow_ones_and_say_why():
    bad = []
    for path in DGAN.rglob("*.py"):
        lines = path.read_text().split("\n")
        for target, inside, node in dgan_imports(path):
            said_why = any("#" in line for line in lines[node.lineno - 1:node.end_lineno])
            if inside and (target not in LAZY_OK or not said_why):
                bad.append(f"{path.relative_to(DGAN.parent)}:{node.lineno} imports {target} inside a function")
    assert bad == []


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60  # the house rules: big files and functions get split


def test_files_and_functions_stay_small():
    too_big = []
    for path in sorted(DGAN.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_big.append(f"{module_name(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not too_big, "split these: " + "; ".join(too_big)
