"""The package's floors point one way: no import cycles, no module importing a higher layer, and
function-local imports only where start-up order or an optional heavy dependency asks for them."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mer_jax'

# Bottom to top. A module may import its own layer and the layers below it. Longest prefix wins.
LAYERS = (
    ('base', ('mer_jax', 'mer_jax.console', 'mer_jax.errors', 'mer_jax.stages', 'mer_jax.files',
              'mer_jax.batch_contract', 'mer_jax.locks', 'mer_jax.cli')),
    ('models, losses, evaluate', ('mer_jax.models', 'mer_jax.losses', 'mer_jax.evaluate')),
    ('data', ('mer_jax.data',)),
    ('train', ('mer_jax.train',)),
    ('front ends', ('mer_jax.preprocess', 'mer_jax.ingest')),
    ('orchestration', ('mer_jax.run', 'mer_jax.config_rules', 'mer_jax.config_validation')),
    ('entry points', ('mer_jax.main', 'mer_jax.predict', 'mer_jax.bench', 'mer_jax.bench_text', 'mer_jax.experiments',
                      'mer_jax.preprocess.__main__', 'mer_jax.bundle', 'mer_jax.export')),
)
# The package itself (mer_jax/__init__.py) is its public face, `mer_jax.load` over mer_jax.predict:
# the top floor, although as a prefix 'mer_jax' places every unlisted module on the bottom one.
FACADE = 'mer_jax'
MAX_FUNCTION_LOCAL_IMPORTS = 16  # 15, and mer_jax.load keeping `import mer_jax` free of JAX


def module_files() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def imports_of(name: str, path: pathlib.Path, modules) -> list[tuple[str, bool]]:
  """(imported mer_jax module, whether the import is inside a function) for every import."""
  tree = ast.parse(path.read_text(), str(path))
  top_level = {id(node) for node in tree.body}
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parent = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parent + ([node.module] if node.module else []))
      # `from package import module` imports the module; `from module import name`, the module.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:
        target = target.rpartition('.')[0]
      if target and target != name:
        found.append((target, id(node) not in top_level))
  return found


def layer_of(name: str) -> int:
  if name == FACADE:
    return len(LAYERS) - 1
  best, best_len = None, -1
  for index, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (name == prefix or name.startswith(prefix + '.')) and len(prefix) > best_len:
        best, best_len = index, len(prefix)
  if best is None:
    raise AssertionError(f'{name} belongs to no layer; add it to LAYERS')
  return best


@pytest.fixture(scope='module')
def graph():
  modules = module_files()
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
  for name in graph:
    layer_of(name)


def test_no_module_imports_a_higher_layer(graph):
  upward = [f'{name} ({LAYERS[layer_of(name)][0]}) imports {target} '
            f'({LAYERS[layer_of(target)][0]})'
            for name, targets in graph.items() for target, _ in targets
            if layer_of(target) > layer_of(name)]
  assert not upward, '\n'.join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle among `edges`, as a closed path, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 2
    path.pop()
    return None

  for node in sorted(edges):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycles(graph):
  # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
  edges = {name: {t for t, _ in targets if not name.startswith(t + '.')}
           for name, targets in graph.items()}
  assert find_cycle(edges) is None, ' -> '.join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_layer_check_catches_an_upward_import(tmp_path):
  (tmp_path / 'mer_jax' / 'data').mkdir(parents=True)
  (tmp_path / 'mer_jax' / '__init__.py').write_text('')
  (tmp_path / 'mer_jax' / 'data' / '__init__.py').write_text('')
  bad = tmp_path / 'mer_jax' / 'data' / 'bad.py'
  bad.write_text('def f():\n  from mer_jax.train import trainer\n')
  modules = {'mer_jax.data.bad': bad, 'mer_jax.train.trainer': bad}
  [(target, local)] = imports_of('mer_jax.data.bad', bad, modules)
  assert (target, local) == ('mer_jax.train.trainer', True)
  assert layer_of(target) > layer_of('mer_jax.data.bad')


def test_function_local_imports_are_few():
  local = []
  for path in sorted(PACKAGE.rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    local += [f'{path.relative_to(PACKAGE.parent)}:{node.lineno}' for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level
              and not (isinstance(node, ast.ImportFrom) and node.module == '__future__')]
  assert len(local) <= MAX_FUNCTION_LOCAL_IMPORTS, '\n'.join(local)
