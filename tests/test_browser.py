"Pages in headless Chromium: the docs' offline MathJax loads every file it asks for."
import subprocess, sys
from pathlib import Path
from conftest import ROOT, BIN, StaticSite, chromium, chromium_or_skip


def test_docs_math_pages_load_every_mathjax_file(tmp_path):
    "The probe page built without execution: typeset math, and no request the offline MathJax cannot answer."
    from knowtuning.docs import stage_site

    chromium_or_skip()
    src, out = tmp_path / "src", tmp_path / "site"
    pages = {p: ROOT / "nbs" / f"{p}.ipynb" for p in ("index", "15_probe")}  # the page the issue saw
    stage_site(src, pages, execution='\nnb_execution_mode = "off"\n', api=False)  # no autodoc: 20 s of imports
    r = subprocess.run([str(BIN / "sphinx-build"), "-b", "html", "-q", str(src), str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    site = StaticSite(out, tmp_path)
    try:
        for page in ("15_probe",):
            dom = chromium(site.url(f"{page}.html"), tmp_path)
            assert dom.count('class="MathJax"') >= 3 and "File failed to load" not in dom, (page, dom[-800:])
        assert site.failed() == [], site.failed()
    finally:
        site.close()
