"""The package's layering, read from the source with ``ast`` (imports inside functions included).

* no import cycle among ``lava_peft`` modules (the same graph as the project's stop hook:
  ``from a import b`` names module ``a.b`` when that is a module, else ``a``);
* nothing under ``lava_peft/methods/`` reaches (directly or through other modules) the module
  defining ``AdaptedModel``, the trainer, the CLI or the HF PEFT interop;
* no module is over 600 lines;
* every registered method has rows in the shared contract matrix (``tests/test_contract.py``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import lava_peft as lp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lava_peft"
MAX_LINES = 600
ABOVE_METHODS = ("lava_peft.model", "lava_peft.train.trainer", "lava_peft.cli", "lava_peft.interop")


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = Path(folder) / f
                name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def import_graph(mods: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every ``import`` statement anywhere in the file."""
    mods = _modules() if mods is None else mods
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in mods else source)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                found = _resolve(target, mods)
                if found is not None and found != module:
                    graph[module].add(found)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _path_to(graph, start: str, goal: str) -> list[str]:
    """One import chain ``start -> ... -> goal`` (for the failure message)."""
    parents, todo = {start: None}, [start]
    while todo:
        cur = todo.pop(0)
        if cur == goal:
            chain = []
            while cur is not None:
                chain.append(cur)
                cur = parents[cur]
            return chain[::-1]
        for nxt in sorted(graph[cur]):
            if nxt not in parents:
                parents[nxt] = cur
                todo.append(nxt)
    return []


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "lava_peft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import lava_peft.a\nfrom .. import a\n")
    mods = {"lava_peft": pkg / "__init__.py", "lava_peft.a": pkg / "a.py", "lava_peft.sub": pkg / "sub" / "__init__.py",
            "lava_peft.sub.b": pkg / "sub" / "b.py"}
    graph = import_graph(mods)
    assert graph == {"lava_peft": {"lava_peft.a"}, "lava_peft.a": {"lava_peft.sub.b"}, "lava_peft.sub": set(),
                     "lava_peft.sub.b": {"lava_peft.a"}}
    assert "lava_peft.a" in reachable(graph, "lava_peft.a")  # a -> sub.b -> a is a cycle


def test_no_import_cycles():
    graph = import_graph()
    cyclic = sorted(m for m in graph if m in reachable(graph, m))
    assert not cyclic, "import cycles through " + ", ".join(
        f"{m} ({' -> '.join(_path_to(graph, m, m) or [m])})" for m in cyclic[:3])


def test_methods_stay_below_the_model():
    graph = import_graph()
    for module in graph:
        if module == "lava_peft.methods" or module.startswith("lava_peft.methods."):
            bad = sorted(set(ABOVE_METHODS) & reachable(graph, module))
            assert not bad, f"{module} reaches {bad}: " + " -> ".join(_path_to(graph, module, bad[0]))


def test_protocol_layer_is_the_bottom():
    """The protocol (config, errors, methods/base, methods/factors) imports no other lava_peft layer."""
    graph = import_graph()
    allowed = {"lava_peft.config", "lava_peft.errors", "lava_peft.fused_linear", "lava_peft.methods.base",
               "lava_peft.methods.factors"}
    for module in ("lava_peft.config", "lava_peft.errors", "lava_peft.methods.base", "lava_peft.methods.factors"):
        assert reachable(graph, module) <= allowed, (module, sorted(reachable(graph, module) - allowed))


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_registered_method_has_contract_rows():
    spec = importlib.util.spec_from_file_location("contract_matrix", ROOT / "tests" / "test_contract.py")
    contract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contract)
    covered = {make().method for make in contract.CONFIGS.values()}
    missing = sorted(set(lp.registered_methods()) - covered)
    assert not missing, f"registered methods without rows in tests/test_contract.py: {missing}"


def _method_constants(path: Path, names: set[str], compared_only: bool = False) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if compared_only:  # only names a comparison (``== "x"``, ``in ("x", ...)``) uses: a switch on the method
        nodes = (c for n in ast.walk(tree) if isinstance(n, ast.Compare) for side in [n.left, *n.comparators]
                 for c in ast.walk(side))
    return sorted({(n.lineno, n.value) for n in nodes if isinstance(n, ast.Constant) and n.value in names})


def test_generic_layers_name_no_method():
    """The layers, the model, files, interop and the CLI dispatch through the registry, never on a method name."""
    names = set(lp.registered_methods())
    generic = ["model.py", "layers.py", "inject.py", "interop.py", "hotswap.py", "diagnostics.py", "adapter_files.py",
               "commands/evaluate.py", "commands/inspect.py"]
    found = {f: hits for f in generic if (hits := _method_constants(PACKAGE / f, names))}
    found.update({f: hits for f in ["cli.py", "commands/train.py"]
                  if (hits := _method_constants(PACKAGE / f, names, compared_only=True))})
    assert not found, f"method names outside the registry: {found}"


def test_registry_hooks_cover_the_cli_and_peft():
    """Every `lava train` method builds its config through its own hooks; PEFT hooks name real functions."""
    from lava_peft.config import config_class, method_hook
    from lava_peft.commands.train import adapter_methods, train_options

    assert set(adapter_methods()) == {"dylora", "lava", "lora", "lowbit", "mosa", "shira", "sft"}
    options = train_options()
    for method in adapter_methods():
        cls = config_class(method)
        assert set(cls.cli_options) <= set(options)
        for hook in (cls.cli_prepare, cls.peft_export, cls.peft_import):
            if hook is not None:
                assert callable(method_hook(hook)), (method, hook)
    assert config_class("shira").peft_type == "SHIRA" and config_class("sft").peft_type is None


def test_private_model_methods_stay_private():
    """Nothing outside model.py calls a private method of ``AdaptedModel`` (tools use plan/commit/check_known/
    replace_adapter/check_fingerprint/sampler_state)."""
    private = {name for name in vars(lp.AdaptedModel) if name.startswith("_") and not name.startswith("__")}
    assert "_apply_active" in private
    hits = []
    for module, path in _modules().items():
        if module == "lava_peft.model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not hits, f"private AdaptedModel methods used outside model.py: {hits}"


def test_adapter_folders_are_read_and_written_only_by_adapter_files():
    """The atomic-folder primitives of io.py are used by adapter_files.py alone (the checkpoint code included)."""
    primitives = {"atomic_directory", "read_adapter_files", "tensors_from_bytes"}
    hits = []
    for module, path in _modules().items():
        if module in ("lava_peft.io", "lava_peft.adapter_files"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            names += [node.attr] if isinstance(node, ast.Attribute) else []
            hits += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in primitives]
    assert not hits, f"adapter folders handled outside adapter_files.py: {hits}"


def test_factor_variants_use_the_hook_not_shadowing_properties():
    """DyLoRA / MoSA / low-bit change their factors through ``effective_factors()``; no class replaces a
    stored factor (``lora_A`` …) by a property, and every factor variant implements the hook itself."""
    import inspect

    from lava_peft.config import adapter_class
    from lava_peft.methods.factorized import FactorizedAdapter

    for method in lp.registered_methods():
        registered = adapter_class(method)
        for cls in {registered, *getattr(registered, "variants", {}).values()}:
            for name in ("lora_A", "lora_B", "lava_U", "lava_V", "lava_P"):
                assert not isinstance(inspect.getattr_static(cls, name, None), property), (cls, name)
        if issubclass(registered, FactorizedAdapter):
            assert "effective_factors" in vars(registered), f"{method} does not implement effective_factors()"
