"""CounterFact loading/validation/subsampling and hijack schemes (exact prompt strings)."""
import gzip
import json

import pytest

from assocmem.config import ConfigError
from assocmem.hijack.counterfact import load_counterfact, parse_records, select
from assocmem.hijack.schemes import _names, custom_scheme, hijack_prompt, load_schemes
from assocmem.hijack.testing import records


def test_fixture_records_parse_and_format():
    ds = parse_records(records())
    assert [r.case_id for r in ds.records] == list(range(7))
    r0 = ds.records[0]
    assert r0.text == "The mother tongue of Danielle Darrieux is"
    assert (r0.target_new, r0.target_true, r0.relation_id) == ("English", "French", "P103")
    assert r0.paraphrase_prompts[0].endswith("Danielle Darrieux, a native")


@pytest.mark.parametrize("path,value,field", [
    (("requested_rewrite", "target_new", "str"), "", "requested_rewrite.target_new.str"),
    (("requested_rewrite", "target_true"), None, "requested_rewrite.target_true.str"),
    (("requested_rewrite", "prompt"), "The mother tongue of X is", "requested_rewrite.prompt"),
    (("requested_rewrite", "subject"), 7, "requested_rewrite.subject"),
    (("requested_rewrite", "relation_id"), 103, "requested_rewrite.relation_id"),
    (("paraphrase_prompts",), "not a list", "paraphrase_prompts"),
])
def test_malformed_record_names_case_id_and_field(path, value, field):
    raw = records()
    node = raw[3]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        parse_records(raw, source="fixture.json")
    assert "case_id=3" in str(e.value) and f"field {field}:" in str(e.value)
    assert "--skip-invalid" in str(e.value)
    ds = parse_records(raw, skip_invalid=True)
    assert len(ds) == 6 and 3 not in [r.case_id for r in ds.records]
    assert "case_id=3" in ds.skipped[0]


def test_missing_case_id_and_duplicates():
    raw = records()
    del raw[1]["case_id"]
    with pytest.raises(ConfigError, match=r"case_id=\? \(item 1\): field case_id"):
        parse_records(raw)
    raw = records() + records()[:1]
    with pytest.raises(ConfigError, match="case_id=0: field case_id: duplicate"):
        parse_records(raw)


def test_optional_fields_may_be_missing(tmp_path):
    raw = records()
    for r in raw:
        for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts",
                    "pararel_idx"):
            r.pop(key)
        r["requested_rewrite"].pop("relation_id")
    p = tmp_path / "cf.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump(raw, f)
    ds = load_counterfact(p)
    assert len(ds) == 7 and ds.records[0].paraphrase_prompts == () and ds.records[0].relation_id is None


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_counterfact(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{\"a\": 1}")
    with pytest.raises(ConfigError, match="expected a JSON list"):
        load_counterfact(tmp_path / "x.json")


def test_select_is_seeded_nested_and_filters():
    ds = parse_records(records())
    a = [r.case_id for r in select(ds.records, n=4, seed=1)]
    assert a == [r.case_id for r in select(list(reversed(ds.records)), n=4, seed=1)]   # order-independent
    assert a[:2] == [r.case_id for r in select(ds.records, n=2, seed=1)]               # larger n extends
    assert sorted(r.case_id for r in select(ds.records, n=None)) == list(range(7))
    assert {r.relation_id for r in select(ds.records, "P1412")} == {"P1412"}
    with pytest.raises(ConfigError, match="relation"):
        select(ds.records, "P999")


def test_shared_counterfact_loads(shared_data):
    ds = load_counterfact(shared_data / "counterfact" / "counterfact.json.gz")
    assert len(ds) == 21919 and not ds.skipped
    r0 = ds.records[0]
    assert (r0.case_id, r0.text, r0.target_true, r0.target_new) == (
        0, "The mother tongue of Danielle Darrieux is", "French", "English")
    counts = {rel: sum(r.relation_id == rel for r in ds.records) for rel in ("P190", "P103", "P131", "P641", "P1412")}
    assert counts == {"P190": 619, "P103": 907, "P131": 714, "P641": 318, "P1412": 923}
    assert [r.case_id for r in select(ds.records, "P190", 5, 0)] == [r.case_id for r in select(ds.records, "P190", 5, 0)]


# ------------------------------------------------------------------------------------------- schemes

EXPECTED = {   # record 0 (P103): Danielle Darrieux, true French, new English
    "generic_false": "Do not think of English.",
    "generic_true": "Do not think of French.",
    "relation_false": "The mother tongue of Danielle Darrieux is not English.",
    "relation_true": "The mother tongue of Danielle Darrieux is not French.",
    "relation_true_affirmative": "The mother tongue of Danielle Darrieux is French.",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prompt_strings(name):
    book = load_schemes()
    rec = parse_records(records()).records[0]
    s, why = book.get(name).sentence(rec, book.countries)
    assert s == EXPECTED[name] and why == ""
    p = rec.text
    assert hijack_prompt(s, p, 0) == "The mother tongue of Danielle Darrieux is"
    assert hijack_prompt(s, p, 1) == f"{s} The mother tongue of Danielle Darrieux is"
    assert hijack_prompt(s, p, 2) == f"{s} {s} The mother tongue of Danielle Darrieux is"
    assert hijack_prompt(s, p, 2, sep="\n") == f"{s}\n{s}\nThe mother tongue of Danielle Darrieux is"


def test_relation_sentences_for_each_relation():
    book = load_schemes()
    recs = {}
    for r in parse_records(records()).records:
        recs.setdefault(r.relation_id, r)
    want = {"P190": "The twin city of Lyon is not Manila.",
            "P131": "Autonomous University of Madrid is not located in Sweden.",
            "P641": "Thierry Henry does not play basketball.",
            "P1412": "Toko Yasuda is not from Germany."}
    for rel, sentence in want.items():
        assert book.get("relation_false").sentence(recs[rel], book.countries) == (sentence, "")
    assert book.get("relation_true").sentence(recs["P1412"], book.countries) == ("Toko Yasuda is not from Japan.", "")


def test_p1412_skips_unknown_language_and_never_names_target():
    book = load_schemes()
    klingon = parse_records(records()).records[6]
    assert book.get("relation_false").sentence(klingon, book.countries) == (None, "no country for 'Klingon'")
    for lang, country in book.countries.items():   # whole words: "German" is not in "Germany"
        assert not _names(f"Toko Yasuda is not from {country}.", lang), lang
    assert _names("He is not from English-speaking lands.", "English") and not _names("Germany", "German")


def test_p1412_sentences_on_shared_data(shared_data):
    book = load_schemes()
    ds = load_counterfact(shared_data / "counterfact" / "counterfact.json.gz")
    import re
    made = 0
    for scheme in ("relation_false", "relation_true"):
        sch = book.get(scheme)
        for r in select(ds.records, "P1412"):
            s, _ = sch.sentence(r, book.countries)
            if s is not None:
                made += 1
                target = r.target_new if sch.target == "new" else r.target_true
                assert not re.search(rf"\b{re.escape(target.lower())}\b", s.lower())
    assert made > 1500


def test_custom_and_user_schemes(tmp_path):
    rec = parse_records(records()).records[0]
    s = custom_scheme("I love {target_true} and {subject}.")
    assert s.target == "true" and s.sentence(rec, {}) == ("I love French and Danielle Darrieux.", "")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{target_false\}.*allowed: \{subject\}"):
        custom_scheme("Do not think of {target_false}.")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"schemes": {"elephant": {"template": "Think of {target}!", "target": "new"}},
                             "countries": {"English": "Britain"}}))
    book = load_schemes(f)
    assert book.get("elephant").sentence(rec, book.countries) == ("Think of English!", "")
    assert "generic_false" in book.schemes and book.countries["English"] == "Britain"
    with pytest.raises(ConfigError, match="scheme: 'nope' is unknown"):
        book.get("nope")
    f.write_text(json.dumps({"schemes": {"x": {"template": "a", "colour": 1}}}))
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_schemes(f)


def test_fetch_original_caches_and_verifies(tmp_path, monkeypatch):
    from assocmem.hijack import counterfact as cf
    src = tmp_path / "served.json"
    src.write_text(json.dumps(records()))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="parsed into 7 records, expected 21919"):
        cf.fetch_original(cache, url=src.as_uri())
    assert not (cache / "counterfact.json").exists()
    monkeypatch.setattr(cf, "ORIGINAL_RECORDS", 7)
    path = cf.fetch_original(cache, url=src.as_uri())
    meta = json.loads((cache / "counterfact.json.meta.json").read_text())
    assert meta["records"] == 7 and meta["bytes"] == src.stat().st_size and len(meta["sha256"]) == 64
    src.unlink()                                            # reuse needs no download
    assert cf.fetch_original(cache, url=src.as_uri()) == path
    path.write_text(path.read_text().replace("Lyon", "Lyom"))
    with pytest.raises(ConfigError, match="does not match its recorded size/SHA-256"):
        cf.fetch_original(cache, url=src.as_uri())
