"""The package as a map of its processes: no import cycles, and no PyTorch or MONAI where a
receiver or the main process runs."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import dicom_node
from tests.support.peers import start_node, wait_for, write_node_config

PACKAGE = Path(dicom_node.__file__).parent


def modules() -> list[str]:
    return sorted(name for _, name, _ in pkgutil.walk_packages([str(PACKAGE)], "dicom_node."))


def imported(name: str) -> set[str]:
    """The node's modules that ``name`` imports, wherever in it (a function's import counts)."""
    path = PACKAGE.parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
    known, found = set(modules()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dicom_node"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dicom_node"))
    return {module for module in found if module in known and module != name}


def test_every_module_imports_and_none_is_in_an_import_cycle():
    for name in modules():
        importlib.import_module(name)
    graph = {name: imported(name) for name in modules()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "visiting"
        for successor in sorted(graph[name]):
            if state.get(successor) == "visiting":
                cycle = path[path.index(successor):] + [successor]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if successor not in state:
                visit(successor, [*path, successor])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_only_the_worker_side_imports_torch_or_monai():
    """Statically: outside dicom_node.compute (but its pure geometry and pixels), no module
    imports PyTorch or MONAI, at the top or in a function."""
    allowed = {"dicom_node.compute.worker", "dicom_node.compute.bundle", "dicom_node.compute.resampling",
               "dicom_node.compute.argmax", "dicom_node.compute.tiled_transpose", "dicom_node.compute.job_memory",
               "dicom_node.compute.runtime.runner"}
    for name in modules():
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if name in allowed or not path.exists():
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) (torch|monai)\b", text, re.MULTILINE), f"{name} imports torch or MONAI"
        if name.startswith(("dicom_node.ingest", "dicom_node.state", "dicom_node.results", "dicom_node.bundle_info")):
            assert not imported(name) & allowed, f"{name} imports the worker side: {sorted(imported(name) & allowed)}"


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_receivers_and_the_main_process_never_load_torch_or_monai(tmp_path, node_port):
    """Read from each process's memory maps: PyTorch's libraries are mapped once it is
    imported, and MONAI imports PyTorch, so no PyTorch means no MONAI either. The worker, which
    has both, shows that the check sees them."""
    config = write_node_config(tmp_path / "node", node_port, destinations=[], pipelines=[], receivers=2,
                               min_free_disk_mb=0)
    node = start_node(config, node_port)
    try:
        receivers = wait_for(lambda: [int(pid) for pid in re.findall(r"receiver process (\d+) serving", node.log())
                                      if "listening as" in node.log()], 30, "both receivers")
        assert len(receivers) == 2
        [worker] = wait_for(node.ready_workers, 120, "the worker to be ready")
        assert "site-packages/torch/" in mapped_libraries(worker)
        for pid in [node.process.pid, *receivers]:
            assert "site-packages/torch/" not in mapped_libraries(pid), f"process {pid} has PyTorch loaded"
    finally:
        node.stop()
