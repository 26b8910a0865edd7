import json
import pytest
from conftest import kt
from knowtuning.data import load_dataset, DataError

@pytest.mark.parametrize("name,n", [("dolly_train", 4000), ("dolly_test", 200), ("medquad_train", 1000),
                                    ("medquad_test", 200), ("lima_test", 300)])
def test_release_splits_by_name(release, name, n):
    assert len(load_dataset(name)) == n

def test_release_dataset_info_is_readable(release):
    # the upstream registry points at sub-folders we do not have; our loader names the missing file
    with pytest.raises(DataError, match="dolly/dolly_train.json: no such file"):
        load_dataset(str(release / "dataset_info.upstream.json") + ":dolly_train")

@pytest.mark.parametrize("content,expect", [
    ('[{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": "B"', "bad.json: not valid JSON"),
    (json.dumps([{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "input": ""}]), "bad.json: record 1: field 'output': missing"),
    (json.dumps([{"instruction": "Q", "output": 3.5}]), "bad.json: record 0: field 'output': expected a string, got float"),
])
def test_bad_files_name_file_record_field(tmp_path, content, expect):
    p = tmp_path / "bad.json"; p.write_text(content)
    with pytest.raises(DataError) as e: load_dataset(str(p))
    assert expect in str(e.value)
    r = kt("data", p)                       # and the CLI says the same, with exit code 2
    assert r.returncode == 2 and expect in r.stderr

def test_lenient_mode_skips_and_reports(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q2", "output": 7}\n{"instruction": "Q3", "output": "C"}\n')
    r = kt("data", p, "--lenient", check=True)
    assert "2 records, 1 skipped" in r.stdout and "skipped record 1: field 'output'" in r.stdout
