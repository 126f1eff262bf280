"""The assessment line, its parser and the two dialogue formats (align/assessment.py)."""
import pytest

from illume_jax.align import assessment as A

GOOD = A.Assessment({"object": "yes", "count": "none", "color": "yes", "spatial": "none"})
BAD = A.Assessment({"object": "yes", "count": "yes", "color": "no", "spatial": "none"}, "The square is BLUE, not red!")


def test_format_is_plain_words_and_round_trips():
    assert A.format_assessment(GOOD) == ("object yes, count none, color yes, spatial none. "
                                         "it matches the description. overall yes")
    text = A.format_assessment(BAD)
    assert text == "object yes, count yes, color no, spatial none. the square is blue, not red. overall no"
    assert A.parse_assessment(text) == A.Assessment(BAD.ratings, "the square is blue, not red")
    assert not BAD.consistent and GOOD.consistent


@pytest.mark.parametrize("reply", [
    "Object: yes; Count: YES; Colour = no; spatial relation: N/A. The square is blue, not red. Overall: no",
    "Sure!\nobject yes, count yes, color no, spatial na.\nthe square is blue, not red. overall no\n",
])
def test_parser_tolerates_judge_chatter(reply):
    a = A.parse_assessment(reply)
    assert a.ratings == BAD.ratings and a.rationale == "the square is blue, not red"


@pytest.mark.parametrize("reply,why", [
    ("object yes, count yes", "no rating for"),
    ("object yes, count yes, color yes, spatial none. fine. overall no", "says overall 'no'"),
    ("object yes, object no, count yes, color yes, spatial none", "twice"),
    ("", "no rating for"),
])
def test_parser_rejects_what_is_not_an_assessment(reply, why):
    with pytest.raises(A.AssessmentParseError, match=why):
        A.parse_assessment(reply)


def test_bad_ratings_are_refused():
    with pytest.raises(ValueError, match="exactly"):
        A.Assessment({"object": "yes"})
    with pytest.raises(ValueError, match="one of"):
        A.Assessment({"object": "maybe", "count": "yes", "color": "yes", "spatial": "yes"})


def test_dialogue_formats():
    good = A.good_dialogue("a blue triangle", "g.png", GOOD)
    assert good["images"] == ["g.png"] and [t["from"] for t in good["conversations"]] == ["human", "gpt"]
    assert good["conversations"][0]["value"] == "<image>\n" + A.assess_question("a blue triangle")
    bad = A.bad_dialogue("a red square", "g.png", BAD, "fix.png")
    assert bad["images"] == ["g.png", "fix.png"]
    assert [t["from"] for t in bad["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert bad["conversations"][2]["value"] == "Generate a corrected image of a red square"
    assert bad["conversations"][3]["value"] == "<image>"
    assert not A.parse_assessment(bad["conversations"][1]["value"]).consistent
    # Every judge is told the same format the parser reads.
    assert all(d in A.JUDGE_SYSTEM for d in A.DIMENSIONS) and "overall" in A.JUDGE_SYSTEM
