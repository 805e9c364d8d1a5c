"""Hand-written CounterFact-format records for tests and examples (ROME's layout; facts as in the
original data set where known)."""
from __future__ import annotations

import copy


def _rec(cid, prompt, subject, rel, true, new, para=(), neigh=()):
    return {"case_id": cid, "pararel_idx": None,
            "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": rel,
                                  "target_true": {"str": true, "id": None}, "target_new": {"str": new, "id": None}},
            "paraphrase_prompts": list(para), "neighborhood_prompts": list(neigh),
            "attribute_prompts": [], "generation_prompts": []}


RECORDS = [
    _rec(0, "The mother tongue of {} is", "Danielle Darrieux", "P103", "French", "English",
         para=["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
         neigh=["The native language of Montesquieu is"]),
    _rec(1, "What is the twin city of {}? It is", "Lyon", "P190", "Beirut", "Manila"),
    _rec(2, "{} speaks the language", "Toko Yasuda", "P1412", "Japanese", "German",
         para=["It was a cold night. Toko Yasuda speaks"]),
    _rec(3, "{} is located in", "Autonomous University of Madrid", "P131", "Madrid", "Sweden"),
    _rec(4, "{} professionally plays the sport", "Thierry Henry", "P641", "soccer", "basketball"),
    _rec(5, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "P103", "Dutch", "English"),
    _rec(6, "{} speaks the language", "Pierre Curie", "P1412", "French", "Klingon"),
]


def records() -> list[dict]:
    """A deep copy of the fixture records (safe to mutate)."""
    return copy.deepcopy(RECORDS)
