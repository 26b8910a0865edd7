"The notebooks read as the house style asks: short exported cells, each definition followed by its use, short lines."
import ast, io, json, re, tokenize
from pathlib import Path
from conftest import ROOT

NBS = sorted((ROOT / "nbs").glob("*.ipynb"))


def cells(path):
    return [(c.get("id"), c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def exported(src: str) -> bool:
    return src.startswith("#| export")


def test_cell_ids_unique():
    for p in NBS:
        ids = [i for i, _, _ in cells(p)]
        assert len(ids) == len(set(ids)), f"{p.name}: duplicate cell ids {sorted({i for i in ids if ids.count(i) > 1})}"


def test_export_cells_at_most_40_lines():
    big = [(p.name, i, s.count("\n") + 1) for p in NBS for i, k, s in cells(p)
           if k == "code" and exported(s) and s.count("\n") + 1 > 40]
    assert big == [], f"export cells over 40 lines (split them): {big}"


def test_package_lines_at_most_120_characters():
    # nbdev writes `__all__` wrapped at 120 characters *before* prefixing `__all__ = ` (nbdev 2.4 and 3.3 alike); those
    # generated lines are the only exception
    long = []
    for f in sorted((ROOT / "knowtuning").glob("*.py")):
        if f.name == "_modidx.py":
            continue
        in_all = False
        for n, line in enumerate(f.read_text().splitlines(), 1):
            in_all = line.startswith("__all__ = [") or (in_all and line.startswith(" " * 11))
            if len(line) > 120 and not in_all:
                long.append(f"{f.name}:{n}")
    assert long == [], f"lines over 120 characters (edit the notebooks): {long}"


def test_no_semicolon_statements():
    found = []
    for f in sorted((ROOT / "knowtuning").glob("*.py")):
        for t in tokenize.generate_tokens(io.StringIO(f.read_text()).readline):
            if t.type == tokenize.OP and t.string == ";":
                found.append(f"{f.name}:{t.start[0]}")
    assert found == [], f"`;` statement chains: {found}"


def defined_names(src: str) -> list[str]:
    "Public functions and classes a cell defines (not `@patch` methods, which extend a class already shown)."
    tree = ast.parse(re.sub(r"^\s*[%!].*$", "", src, flags=re.M))
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            decos = [ast.unparse(d) for d in node.decorator_list]
            if not any(d.startswith("patch") for d in decos):
                out.append(node.name)
    return out


def test_definitions_are_followed_by_their_use():
    # fastcore's style: a definition, then its use; at least 80% of exported functions and classes are used by a
    # later cell of their notebook (an example, a test, or the stage that calls them)
    used, total, unused = 0, 0, []
    for p in NBS:
        cs = cells(p)
        for k, (_, kind, src) in enumerate(cs):
            if kind != "code" or not exported(src):
                continue
            later = "\n".join(s for _, kd, s in cs[k + 1:] if kd == "code")
            for name in defined_names(src):
                total += 1
                if re.search(rf"\b{re.escape(name)}\b", later):
                    used += 1
                else:
                    unused.append(f"{p.stem}.{name}")
    assert total > 100 and used / total >= 0.8, f"{used}/{total} used after their definition; not: {unused}"


def test_exported_functions_take_at_most_4_positional_parameters():
    "A call with five or more positional arguments cannot be read without the signature: the rest are keyword-only."
    bad = []
    for f in sorted((ROOT / "knowtuning").glob("*.py")):
        t = ast.parse(f.read_text())
        names = next((ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign)
                      and getattr(n.targets[0], "id", "") == "__all__"), [])
        bad += [f"{f.name}: {n.name}" for n in t.body if isinstance(n, ast.FunctionDef) and n.name in names
                and len(n.args.posonlyargs + n.args.args) > 4]
    assert bad == [], f"exported functions with more than 4 positional parameters (make the rest keyword-only): {bad}"
