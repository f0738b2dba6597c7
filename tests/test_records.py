import json

import pytest

from ds_cl.evaluation.io import EvalInputError, read_jsonl
from ds_cl.training.records import check_objects, parse_jsonl


def test_line_separator_inside_a_json_string_is_not_a_line_break():
    text = json.dumps({"input": "a\u2028b"}, ensure_ascii=False) + "\n\n" + json.dumps({"input": "c"}) + "\n"
    assert parse_jsonl(text, "f.jsonl") == [(1, {"input": "a\u2028b"}), (3, {"input": "c"})]


def test_a_json_array_under_a_jsonl_name_is_named_as_such():
    """One line or pretty-printed, a .json file's content in a .jsonl file; a line that is a list stays a line's error."""
    for text in ('[{"input": "a"}, {"input": "b"}]\n', json.dumps([{"input": "a"}, {"input": "b"}], indent=2)):
        with pytest.raises(ValueError, match=r"^f\.jsonl holds one JSON array of 2 items, not one JSON object per line"):
            parse_jsonl(text, "f.jsonl")
    with pytest.raises(ValueError, match=r"^f\.jsonl:2: expected a JSON object per line, got list$"):
        parse_jsonl('{"input": "a"}\n["input"]\n', "f.jsonl")
    with pytest.raises(ValueError, match=r"f\.jsonl:1: expected a JSON object per line, got list$"):
        parse_jsonl('["input"]\n["output"]\n', "f.jsonl")


def test_json_array_items_that_are_not_objects_are_named():
    assert check_objects([{"a": 1}], "f.json") == [{"a": 1}]
    with pytest.raises(ValueError, match=r"^f\.json: item 2 of 3 is a null \(null\), not a JSON object"):
        check_objects([{"a": 1}, None, {}], "f.json")
    with pytest.raises(ValueError, match=r"^f\.json: item 1 of 1 is a list \(\[0, 0, .{50}\.\.\.\), not"):
        check_objects([[0] * 40], "f.json")


def test_evaluation_reader_names_file_and_line_of_non_utf8(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(EvalInputError, match=r"r\.jsonl:2: not UTF-8"):
        read_jsonl(p)


def test_metrics_truncation_on_resume_survives_a_torn_line_and_is_atomic(tmp_path):
    """A run killed mid-write leaves half a JSON line; --resume drops it with the steps after the checkpoint,
    and rewrites the file through a temporary (no half-written metrics.jsonl if killed again)."""
    import json

    from ds_cl.training.outputs import MetricsLog

    log = MetricsLog(tmp_path, rank=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
