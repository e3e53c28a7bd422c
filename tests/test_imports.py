"""The import graph of keel_jax/ is acyclic and keeps its layering (docs/DESIGN.md section 6)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "keel_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the keel_jax modules it imports anywhere in its body (lazy imports count too)."""
  modules = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from keel_jax.data import synthetic` names a module; `from keel_jax.data import TokenData` does not.
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                   for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (cycle := visit(dep)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_find_cycle_detects_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_keel_jax_import_graph_is_acyclic():
  graph = import_graph()
  assert {"keel_jax.model", "keel_jax.data.pipeline", "keel_jax.sharding"} <= set(graph)
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", ["keel_jax.sharding", "keel_jax.data.sources", "keel_jax.data.packing",
                                    "keel_jax.data.iteration", "keel_jax.data.pipeline", "keel_jax.data.synthetic",
                                    "keel_jax.tokenizer", "keel_jax.config_lib", "keel_jax.model_config"])
def test_lower_layers_do_not_import_the_model(module):
  graph = import_graph()
  reach, todo = set(), [module]
  while todo:
    for dep in graph[todo.pop()] - reach:
      reach.add(dep)
      todo.append(dep)
  assert not reach & {"keel_jax.model", "keel_jax.blocks", "keel_jax.train", "keel_jax.train_step"}, reach
