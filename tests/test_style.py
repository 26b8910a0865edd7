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


# Third-party packages imported inside functions on purpose: importing any of them costs from a second (openai, numpy
# through the modules that need them) to ten (torch, transformers, trl), or only one command needs it. Keeping them
# out of module level keeps `knowtuning --help`, `knowtuning plan`, the training launcher and the report fast.
LAZY = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed", "numpy",
        "openai", "matplotlib", "nltk", "rouge_score", "bert_score", "gguf", "papermill", "nbformat",
        "jupyter_server_mathjax", "genai_prices", "fastcore"}


def test_function_level_imports_are_deliberate():
    """An import inside a function body is of a LAZY package, or of a knowtuning module that imports one at its top
    (directly or through its own imports), or of a module whose top-level import would close a cycle; never of the
    standard library or of anything else, never a repeat of a module-level binding (issue 35). The command line
    (cli.py) may import any knowtuning module inside its commands: each command imports what it runs, and `knowtuning
    --help` answers in 0.2 s instead of 0.4 s (measured 2026-12-07 with every command's modules at its top)."""
    import sys
    mods = {p.stem: ast.parse(p.read_text()) for p in (ROOT / "knowtuning").glob("*.py") if not p.stem.startswith("_")}

    def target(n):  # (knowtuning module or None, top-level package name)
        name = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
        if isinstance(n, ast.ImportFrom) and n.level:
            return name, "knowtuning"
        return (name.split(".")[1] if name.startswith("knowtuning.") else None), name.split(".")[0]

    tops = {m: [target(n) for n in t.body if isinstance(n, (ast.Import, ast.ImportFrom))] for m, t in mods.items()}
    deps = {m: {k for k, _ in ts if k in mods} for m, ts in tops.items()}

    def closure(m):
        seen, todo = set(), [m]
        while todo:
            for d in deps[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    heavy = {m: any(p in LAZY for x in {m} | closure(m) for _, p in tops[x]) for m in mods}
    bad = []
    for m, t in mods.items():
        bound = {a.asname or a.name.split(".")[0] for n in t.body if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names}
        for f in [f for f in ast.walk(t) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for n in [n for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]:
                kt, pkg = target(n)
                names = {a.asname or a.name.split(".")[0] for a in n.names}
                ok = (pkg in LAZY if pkg not in ("knowtuning",) and pkg not in sys.stdlib_module_names else
                      pkg == "knowtuning" and (m == "cli" or kt == m or heavy.get(kt, False) or m in closure(kt)))
                if not ok or names & bound:
                    bad.append(f"{m}.py:{n.lineno} {ast.unparse(n)}")
    assert not bad, "imports inside functions that belong at the module's top (edit the notebooks):\n" + "\n".join(bad)


def test_report_reads_the_summary_by_attribute():
    """In report.py, a function that takes the `Summary` reads its records by attribute (issue 35): no `.get` with a
    literal key, which is how an untyped record's field is read and how a misspelt one goes unnoticed. A lookup in a
    map (`x.systems.get(s)`, by a system or aspect held in a variable) and module constants are fine."""
    tree = ast.parse((ROOT / "knowtuning" / "report.py").read_text())
    consts = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    bad = []
    for f in [n for n in tree.body if isinstance(n, ast.FunctionDef)]:
        if not any(a.annotation is not None and ast.unparse(a.annotation) == "Summary" for a in f.args.args):
            continue
        for c in ast.walk(f):
            if (isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "get" and c.args
                    and isinstance(c.args[0], ast.Constant) and isinstance(c.args[0].value, str)
                    and not (isinstance(c.func.value, ast.Name) and c.func.value.id in consts)):
                bad.append(f"{f.name}:{c.lineno} {ast.unparse(c)}")
    assert not bad, bad
