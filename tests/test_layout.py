"""The shape a learner meets: zip2zip.py defines every module-level function above its first use
(read top to bottom, nothing is used before it is explained) and reads in one sitting (at most 750
lines, the reading budget: the evaluation API, file loading and input checks live in evals/, data/
and lib/), and the top level holds at most seven .py files: the method and the scripts people run
most."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_zip2zip_defines_each_name_above_its_first_use():
    with open(os.path.join(ROOT, "zip2zip.py")) as f:
        tree = ast.parse(f.read())
    defined = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    first_use = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in defined:
            first_use[node.id] = min(first_use.get(node.id, node.lineno), node.lineno)
    early = {name for name, line in first_use.items() if line < defined[name]}
    assert early == set(), early


def test_zip2zip_fits_the_reading_budget():
    with open(os.path.join(ROOT, "zip2zip.py")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 750, f"zip2zip.py is {len(lines)} lines, over its budget of 750"
    assert max(map(len, lines)) <= 120


def test_the_top_level_holds_at_most_seven_python_files():
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert len(top) <= 7, top
