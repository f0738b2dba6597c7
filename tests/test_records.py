import json

import pytest

from ds_cl.evaluation.io import EvalInputError, read_jsonl
from ds_cl.training.records import parse_jsonl


def test_line_separator_inside_a_json_string_is_not_a_line_break():
    text = json.dumps({"input": "a\u2028b"}, ensure_ascii=False) + "\n\n" + json.dumps({"input": "c"}) + "\n"
    assert parse_jsonl(text, "f.jsonl") == [(1, {"input": "a\u2028b"}), (3, {"input": "c"})]


def test_evaluation_reader_names_file_and_line_of_non_utf8(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(EvalInputError, match=r"r\.jsonl:2: not UTF-8"):
        read_jsonl(p)
