"The exported package and README must match the notebooks (the source of truth)."
import filecmp, shutil, subprocess, sys
from pathlib import Path
import nbformat, pytest
from conftest import ROOT, BIN

def export_into(tmp: Path) -> Path:
    for d in ("nbs", "knowtuning"): shutil.copytree(ROOT / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__", "_*"))
    shutil.copytree(ROOT / "knowtuning", tmp / "knowtuning", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "settings.ini", tmp)
    r = subprocess.run([str(BIN / "nbdev_export")], cwd=tmp, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return tmp / "knowtuning"

def diff_pkg(a: Path, b: Path) -> list:
    names = sorted({p.name for p in a.glob("*.py")} | {p.name for p in b.glob("*.py")})
    return [n for n in names if not ((a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, shallow=False))]

def test_package_matches_notebooks(tmp_path):
    assert diff_pkg(ROOT / "knowtuning", export_into(tmp_path)) == [], "run nbdev_export: knowtuning/ is out of sync with nbs/"

def test_sync_check_catches_a_hand_edit(tmp_path):
    # the check above must be able to fail: edit a notebook cell and the export differs
    pkg = export_into(tmp_path)
    nb_path = tmp_path / "nbs" / "00_config.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("#| export"))
    cell.source += "\nSENTINEL = 1"
    nbformat.write(nb, nb_path)
    subprocess.run([str(BIN / "nbdev_export")], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    assert diff_pkg(ROOT / "knowtuning", pkg) == ["config.py"]

def test_readme_matches_index_notebook():
    from knowtuning.docs import readme_text
    assert (ROOT / "README.md").read_text() == readme_text(), "README.md differs from nbs/index.ipynb: run `knowtuning readme`"

def test_readme_check_catches_drift(tmp_path):
    from knowtuning.docs import readme_text
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    nb.cells[0].source += "\nsomething new"
    nbformat.write(nb, tmp_path / "index.ipynb")
    assert (ROOT / "README.md").read_text() != readme_text(tmp_path / "index.ipynb")

def test_readme_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [l.split()[0:2] for l in block] == [["make", "demo"], ["make", "test"]]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")

def _has_parameters(nb_path) -> bool:
    import json
    cells = json.loads(nb_path.read_text())["cells"]
    return any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells)

def test_every_notebook_is_listed_once_and_stage_notebooks_are_steps():
    "The docs' table of contents names every notebook once; a notebook with papermill parameters is a step of STEPS."
    from knowtuning.docs import SECTIONS
    from knowtuning.runs import STEPS
    nbs = sorted(p for p in (ROOT / "nbs").glob("*.ipynb"))
    listed = [n for _, names in SECTIONS for n in names]
    assert sorted(listed) == sorted(p.stem for p in nbs), set(listed) ^ {p.stem for p in nbs}
    steps = {s.notebook for s in STEPS}
    staged = {p.name for p in nbs if p.stem[0].isdigit() and _has_parameters(p)}  # the tutorial is no step
    assert staged - steps == set(), f"stage notebooks missing from knowtuning.runs.STEPS: {staged - steps}"
    assert steps <= {p.name for p in nbs}, steps - {p.name for p in nbs}
    numbers = [p.stem.split("_")[0] for p in nbs if p.stem[0].isdigit()]
    assert len(numbers) == len(set(numbers)), f"notebook numbers used twice: {numbers}"
