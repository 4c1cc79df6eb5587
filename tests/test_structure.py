"""The code's shape: no import cycle between the project's modules, and util.py holding
what the design gives it (NYU loading, augmentation, plots), not the demo's rooms or the scripts'
error and file plumbing."""
import ast
import glob
import os

from helpers import ROOT

MODULES = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, '*.py'))}


def _imported(path):
    """Project modules a file imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split('.')[0])
    return found & set(MODULES)


def test_no_import_cycle_between_project_modules():
    graph = {m: _imported(p) - {m} for m, p in MODULES.items()}
    assert graph['net'] == {'cli', 'files'} and 'util' in graph['synthetic']   # the graph is real
    cycles = []

    def visit(module, path):
        for nxt in sorted(graph[module]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            else:
                visit(nxt, path + [nxt])
    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, cycles


def test_util_holds_nyu_loading_augmentation_and_plots():
    tree = ast.parse(open(MODULES['util']).read())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {'read_nyu_labeled', 'read_splits', 'augment', 'AugParams', 'plot_losses'} <= defined
    moved = {'render_room', 'make_synthetic_nyu', 'write_nyu_labeled_mat', 'UserError', 'DataError',
             'run_cli', 'atomic_write', 'load_torch_file', 'load_weights'}
    assert not defined & moved, defined & moved


def test_train_py_is_the_method_and_nothing_is_long_without_a_reason():
    """train.py reads top-down beside Sec. 3 (at most ~400 lines), and no function or
    class of the project is over ~80 lines unless its docstring says why ("Long because")."""
    assert len(open(MODULES['train']).read().splitlines()) <= 400
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and 'long because' not in (ast.get_docstring(node) or '').lower():
                    long.append(f'{name}.{node.name}: {lines} lines')
    assert not long, long
