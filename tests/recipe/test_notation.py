import pytest

from engine.recipe.notation import NotationError, format_line, format_notation, parse_notation, short_id

ARTICLE_TE0 = "te0: --,--,03,05,--,10,11,--,--,16,17,09a,10a,20,11a,22,23,24,25,26,27,32,--,36,--,--,41,--=19"


def _article_ids() -> list[str]:
    cells = ARTICLE_TE0.split(": ")[1].split("=")[0].split(",")
    # give the unselected positions ids of their own, in the style of the article
    return [f"_x{c}" if c != "--" else f"_u{i:02d}" for i, c in enumerate(cells)]


def test_short_id():
    assert short_id("_x03") == "03"
    assert short_id("_x09a") == "09a"
    assert short_id("m07") == "m07"
    assert short_id("_x") == "_x"


def test_article_line_round_trips():
    ids = _article_ids()
    chosen = [i for i in ids if i.startswith("_x")]
    assert format_line("te0", ids, chosen) == ARTICLE_TE0
    assert parse_notation(ARTICLE_TE0, ids) == {"te0": chosen}


def test_format_notation_orders_by_models_and_counts():
    ids = ["_x01", "_x02", "_x03", "m4"]
    text = format_notation(ids, {"te0": {"_x03", "_x01"}, "vae": ["m4"], "nsfw": []})
    assert text == "te0: 01,--,03,--=2\nvae: --,--,--,m4=1\nnsfw: --,--,--,--=0\n"
    assert parse_notation(text, ids) == {"te0": ["_x01", "_x03"], "vae": ["m4"], "nsfw": []}


def test_parse_rejects_unknown_id_and_wrong_count():
    ids = ["_x01", "_x02"]
    with pytest.raises(NotationError, match="no model with id '07'"):
        parse_notation("te0: 01,07=2", ids)
    with pytest.raises(NotationError, match="says =3 but lists 1"):
        parse_notation("te0: 01,--=3", ids)
    with pytest.raises(NotationError, match="expected"):
        parse_notation("just words", ids)


def test_parse_accepts_compact_and_commented_text():
    ids = ["_x01", "_x02", "_x03"]
    assert parse_notation("# mine\nte0:--,02,03=2\n\nunet: 03\n", ids) == {
        "te0": ["_x02", "_x03"],
        "unet": ["_x03"],
    }


def test_method_after_the_count_only_what_differs_from_its_defaults():
    from engine.recipe.notation import format_method, parse_methods

    ids = ["_x00", "_x01", "_x02"]
    ties = {"method": "ties", "base": "_x00", "trim": 0.3, "vote": "sum"}  # vote sum is ties' own default
    line = format_line("unet", ids, ["_x01", "_x02"], ties)
    assert line == "unet: --,01,02=2 ties(base=00, trim=0.3)"
    assert format_method({"method": "ties_soup", "base": "_x00", "alpha": 1, "rescale": True}) == "ties_soup(base=00)"
    assert format_method({"method": "dare", "base": "m1", "drop": 0.1, "rescale": False}) == (
        "dare(base=m1, drop=0.1, rescale=false)")
    assert format_method({"method": "mean"}) == format_method(None) == ""
    assert format_line("te0", ids, ["_x01"], {"method": "mean"}) == "te0: --,01,--=1"
    text = format_notation(ids, {"unet": ["_x01", "_x02"], "te0": ["_x01"]}, {"unet": ties})
    assert text == "unet: --,01,02=2 ties(base=00, trim=0.3)\nte0: --,01,--=1\n"
    assert parse_notation(text, ids) == {"unet": ["_x01", "_x02"], "te0": ["_x01"]}  # the method is skipped
    assert parse_methods(text) == {"unet": "ties(base=00, trim=0.3)"}
    with pytest.raises(NotationError, match="is not a number"):
        parse_notation("unet: 01=2 ties(", ids)


def test_a_method_not_known_to_the_presets_is_written_with_every_field():
    from engine.recipe.notation import format_method

    assert format_method({"method": "future", "base": "_x00", "k": 3}) == "future(base=00, k=3)"
