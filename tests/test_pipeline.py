"""End to end on the shared smoke run (tests/conftest.py: LLM roles on loopback, two training processes, killed and
resumed): nothing finished is redone, the report leads with the probes, nothing lands outside the run folder, a rerun
does no work. The docs site (slow tier) runs the single-process smoke preset on SmolLM2."""
import csv, json, os, re, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import ROOT, BIN, SECRET, kt, builds

TABLES = ["table_probe", "table_probe_atoms", "table_metrics", "table_diffs", "table_judge", "table_facts", "table_ablation"]
SYSTEMS = ["sft", "knowtuning", "rlaif", "facttune", "wo_factuality"]

def test_a_killed_run_resumes_without_redoing_finished_stages(smoke_run):
    k, run = smoke_run.killed, smoke_run.dir
    assert not k.trainers, k.trainers                                     # no process of the run outlived the kill
    assert {"ka", "kc"} <= set(k.builds) and not k.report and k.partial
    after = builds(run)
    for s, b in k.builds.items(): assert after[s] == b, (s, b, after[s])  # not rebuilt
    out = smoke_run.resumed.stdout + smoke_run.resumed.stderr
    assert "IPKernelApp" not in out                                       # kernel chatter goes to the step logs
    assert (run / "notebooks" / "13_train.log").exists()
    for nb in ("11_ka", "12_kc", "13_train", "14_baselines", "07_generate", "16_evaluate", "17_report"):
        assert (run / "notebooks" / f"{nb}.ipynb").exists()
    assert {"train_sft", "train_ka", "train_knowtuning", "train_rlaif", "train_facttune", "train_wo_factuality",
            "samples_sft", "prefs_rlaif", "prefs_facttune", "gen_knowtuning", "eval", "report"} <= set(after)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    for s in ("sft", "ka", "knowtuning", "wo_factuality", "rlaif", "facttune"):        # train and baselines steps
        assert (stages[f"train_{s}"]["processes"], stages[f"train_{s}"]["effective_batch"]) == (2, 2), s
    # the killed training resumed from the newest complete checkpoint it had, on both ranks (the line is `_resume`'s)
    text = "".join(nb.read_text() for nb in (run / "notebooks").glob("*.ipynb"))
    resumed = set(re.findall(r"rank ([01]): resuming from (checkpoint-\d+)", text))
    assert resumed == {("0", smoke_run.killed.checkpoint), ("1", smoke_run.killed.checkpoint)}, resumed
    print(f"resumed run: {smoke_run.resume_s:.0f} s")

def test_the_console_shows_progress_inside_the_long_steps(smoke_run):
    "Not a tty: at least one progress-bar line inside train, baselines and generate, before their timing line."
    from knowtuning.pipeline import ProgressRelay
    lines = smoke_run.resumed.stdout.splitlines()
    for step in ("train", "baselines", "generate"):
        i = next(n for n, l in enumerate(lines) if l.startswith("[") and f"] {step} " in l)
        j = next(n for n in range(i, len(lines)) if " s   elapsed " in lines[n])
        bars = [l for l in lines[i + 1 : j + 1] if l.startswith("    ") and l.strip()]  # bars and phase lines
        assert bars, (step, lines[i : j + 1])
        assert len(bars) < 40, (step, len(bars))                # a line every 30 s, not every update
    assert "\r" not in smoke_run.resumed.stdout and "\x1b[" not in smoke_run.resumed.stdout

def test_the_report_leads_with_the_probes(smoke_run):
    rep = smoke_run.dir / "report"
    for t in TABLES:
        for ext in ("md", "csv", "tex"): assert (rep / f"{t}.{ext}").stat().st_size > 50, t
    assert (rep / "judge.png").exists() and (rep / "judge.svg").exists()
    assert (rep / "probe.png").stat().st_size > 5000
    report = (rep / "report.md").read_text()
    assert report.index("Knowledge-comparison probe") < report.index("Automatic metrics") and "**Probes (demo_test" in report
    probe = list(csv.DictReader(open(smoke_run.dir / "eval" / "probe.csv")))
    assert {r["model"] for r in probe} == {"base", "ka", *SYSTEMS}  # every trained system, ka included
    assert {r["aspect"] for r in probe} == {"completeness", "factuality", "logicality"}
    text = (rep / "table_judge.md").read_text()
    assert "preset smoke" in text and "student tiny-random" in text and "llm:judge-m" in text

def _disagree(q, pair, systems, aspects):
    "The page's filter, written out again from its definition (nbs/17_report.ipynb, The answer browser)."
    if any(q["judge"][p][a]["verdict"] != "tie" for p in ([pair] if pair else q["judge"]) if p in q["judge"]
           for a in aspects):
        return True
    models = pair.split("|") if pair else systems
    for a in aspects:
        m = [q["probe"][x][a] for x in models if a in q["probe"].get(x, {})]
        if any(v > 0 for v in m) and any(v < 0 for v in m):
            return True
    return False

def test_the_answer_browser_opens_from_disk_and_its_filters_work(smoke_run, tmp_path):
    "report/answers.html from file:// in headless Chromium: every answer, facts by verdict, judge orders, filters."
    import html, re
    from urllib.parse import quote
    from conftest import chromium
    page = smoke_run.dir / "report" / "answers.html"
    assert "(answers.html)" in (smoke_run.dir / "report" / "report.md").read_text()        # linked from the report
    data = json.loads(page.read_text().split('id="data">')[1].split("</script>")[0].replace("<\\/", "</"))
    name, qs = next(iter(data["sets"].items()))
    dom = chromium(page.as_uri() + f"#set={name}", tmp_path)
    assert f'data-shown="{len(qs)}"' in dom and html.escape(qs[0]["question"]) in dom, dom[-1500:]
    assert set(re.findall(r'data-system="([^"]+)"', dom)) == set(SYSTEMS)                   # all systems side by side
    if any(a["facts"] for q in qs for a in q["answers"].values()):                         # facts by verdict
        assert re.search(r'<li class="(supported|unsupported|undecidable)"', dom)
    else:  # the random student's answers have no sentence to decompose: the colouring on a page with facts
        from knowtuning.report import answers_html
        q = {**qs[0], "answers": {"sft": {"text": "x", "abstained": True, "facts": [["a", "supported"],
             ["b", "unsupported"], ["c", "undecidable"]]}}}
        (tmp_path / "facts.html").write_text(answers_html({**data, "sets": {name: [q]}, "systems": ["sft"]}, "t"))
        d2 = chromium((tmp_path / "facts.html").as_uri(), tmp_path)
        assert all(f'<li class="{v}" title="{v}">{t}</li>' in d2 for t, v in q["answers"]["sft"]["facts"]), d2[-800:]
        assert ">abstained<" in d2
    assert "knowtuning first" in dom and re.search(r"<td>(knowtuning|sft|tie|failed)</td>", dom)  # both orders
    pair = "knowtuning|sft"
    assert pair in data["pairs"]
    dom = chromium(page.as_uri() + f"#set={name}&pair={quote(pair)}", tmp_path)
    assert set(re.findall(r'data-system="([^"]+)"', dom)) == {"knowtuning", "sft"}          # the pair only
    want = sum(_disagree(q, pair, data["systems"], data["aspects"]) for q in qs)
    dom = chromium(page.as_uri() + f"#set={name}&pair={quote(pair)}&disagree=1", tmp_path)
    assert f'data-shown="{want}"' in dom, (want, re.findall(r'data-shown="\d+"', dom))
    shot = tmp_path / "answers.png"
    chromium(page.as_uri() + f"#set={name}&pair={quote(pair)}", tmp_path, "--window-size=1280,2000",
             f"--screenshot={shot}")
    assert shot.stat().st_size > 20000                                                      # a rendered page

def test_nothing_is_written_outside_the_run_folder_and_the_key_nowhere(smoke_run):
    assert not smoke_run.new_outside, sorted(map(str, smoke_run.new_outside))[:10]
    assert all(a == f"Bearer {SECRET}" for a in smoke_run.server.auth)      # the key was really sent ...
    files = [p for p in smoke_run.root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "cache.sqlite" for p in files)
    assert [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []     # ... and never written anywhere
    assert SECRET not in smoke_run.resumed.stdout + smoke_run.resumed.stderr      # nor printed
    assert "KT_TEST_KEY" in (smoke_run.dir / "config.yaml").read_text()          # only the variable's name

def test_a_rerun_rebuilds_nothing_and_calls_nothing(smoke_run):
    before, n = builds(smoke_run.dir), len(smoke_run.server.requests)
    t0 = time.time()
    r = subprocess.run(smoke_run.cmd, env=smoke_run.env, cwd=smoke_run.root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert builds(smoke_run.dir) == before and len(smoke_run.server.requests) == n
    print(f"rerun of a finished smoke run: {time.time() - t0:.1f} s")

@pytest.mark.slow  # builds the site, executing the tutorial's smoke run
def test_docs_site_in_headless_chromium(tmp_path):
    "The Sphinx site, served on loopback: math typeset offline, search finds a term, no nbdev directives, a real page."
    import shutil, socket
    import matplotlib.image as mpimg
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium: pytest.skip("chromium is not installed (tools/install.sh installs Debian's chromium)")
    t0 = time.time()
    r = kt("docs", env={"KNOWTUNING_RUNS": str(tmp_path)}, timeout=2400)
    print(f"make docs: {time.time() - t0:.0f} s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    site = ROOT / "_docs"
    assert not (ROOT / "jupyter_execute").exists()       # nothing of the build lands in the checkout but _docs/
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    def dom(page):
        return subprocess.run([chromium, *flags, "--dump-dom", f"http://127.0.0.1:{port}/{page}"], capture_output=True,
                              text=True, timeout=120).stdout
    try:
        time.sleep(1)
        assert "knowtuning" in dom("index.html").lower()
        tut = dom("tutorial.html")                          # the executed tutorial, with its figures
        assert 'data-images-ok="true"' in tut, tut[-500:]
        assert int(tut.split('data-images="')[1].split('"')[0]) >= 3
        ka = dom("11_ka.html")                              # math typeset by the site's own MathJax
        assert ka.count('class="MathJax"') >= 5 and 'class="MathJax_Display"' in ka
        assert "#| export" not in ka and "default_exp" not in ka
        found = dom("search.html?q=perplexity")             # Sphinx's offline search
        assert "Search finished" in found and 'href="11_ka.html' in found, found[-1500:]
        api = dom("api.html")                               # the API reference from the docstrings
        assert "ppl_packed" in api and "one forward pass per question" in api
        for page, tables, images in (("11_ka", 1, 1), ("12_kc", 0, 0), ("13_train", 0, 1), ("17_report", 3, 1)):
            html = dom(f"{page}.html")                      # executed pages: outputs under the code
            n_out, n_tab, n_img = html.count('class="cell_output'), html.count("<table"), html.count("<img")
            print(f"{page}: {n_out} output areas, {n_tab} tables, {n_img} images")
            assert n_out >= 3 and n_tab >= tables and n_img >= images, (page, n_out, n_tab, n_img)
        assert all(f"== {a} ==" in dom("12_kc.html") for a in ("completeness", "factuality", "logicality"))
        shot = site / "11_ka.png"                           # the whole page: the perplexity table under the scorer
        subprocess.run([chromium, *flags, "--window-size=1280,9000", f"--screenshot={shot}",
                        f"http://127.0.0.1:{port}/11_ka.html"], capture_output=True, timeout=120)
        img = mpimg.imread(shot)
        assert img.shape[0] >= 9000 and img[..., :3].std() > 0.1     # a rendered page, not a blank one
    finally:
        srv.terminate()
        srv.wait()

def test_the_report_tables_say_what_summary_json_says_and_star_only_p_below_005(smoke_run):
    "Every paired difference in the diffs table against eval/summary.json: its mean, its n, its p, its star."
    summary = json.loads((smoke_run.dir / "eval" / "summary.json").read_text())
    rows = list(csv.DictReader(open(smoke_run.dir / "report" / "table_diffs.csv")))
    cols = {"Δ METEOR": "meteor", "Δ BERTScore": "bertscore", "Δ ROUGE-L": "rougeL", "Δ fact precision": "precision"}
    checked = 0
    for r in rows:
        diffs = summary["datasets"][r["dataset"]]["diffs"][r["comparison"].split(" − ")[1]]
        for col, k in cols.items():
            v = diffs[k]
            if v[0] != v[0]: continue                                   # NaN: shown as –
            cell = r[col]
            assert cell.startswith(f"{v[0]:+.4f} ({v[1]:+.4f}, {v[2]:+.4f}) n={v[3]} "), (cell, v)
            assert ("*" in cell) == (v[5] < 0.05), (cell, v)
            checked += 1
    assert checked >= 4, rows
    metrics = list(csv.DictReader(open(smoke_run.dir / "report" / "table_metrics.csv")))
    for r in metrics:
        m = summary["datasets"][r["dataset"]]["systems"][r["system"]]["meteor"]
        assert r["METEOR"] == f"{m[0]:.4f} ± {(m[2] - m[1]) / 2:.4f}", (r, m)
