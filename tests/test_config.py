import dataclasses

import pytest

from assocmem.config import ConfigError, build, config_hash, load_yaml, parse_dotlist, replace, to_dict
from assocmem.registry import config_from, get_task

LCA = get_task("lca")


def test_dotlist_parsing_types():
    d = parse_dotlist(["task.m=6", "optim.lr=1e-2", "model.W_V=identity", "optim.betas=[0.9, 0.95]", "seed=3"])
    assert d == {"task": {"m": 6}, "optim": {"lr": 0.01, "betas": [0.9, 0.95]}, "model": {"W_V": "identity"},
                 "seed": 3}


def test_defaults_and_overrides_validate():
    cfg = config_from(LCA, parse_dotlist(["task.m=7", "optim.lr=0.001"]))
    assert cfg.task.m == 7 and cfg.optim.lr == 0.001 and cfg.model.d_model == 64
    assert isinstance(cfg.optim.betas, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task.m = 5


@pytest.mark.parametrize("items,needle", [
    (["task.m=99"], "task.m: 99 is not allowed (allowed: int in [2, 10])"),
    (["model.nope=1"], "model.nope: unknown key (allowed: d_model, W_V, embeddings, attention, path)"),
    (["model.W_V=random"], "model.W_V: 'random' is not allowed (allowed: one of trained, identity)"),
    (["task.m=six"], "task.m: expected an integer"),
    (["optim.lr=true"], "optim.lr: expected a number"),
    (["task=3"], "task: expected a group of keys"),
    (["task.cluster=6", "task.m=6"], "task.cluster: 6 is not allowed (allowed: 0 <= c < task.m=6)"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["nokey"], "overrides are written key=value"),
])
def test_errors_name_the_key_and_allowed_values(items, needle):
    with pytest.raises(ConfigError) as e:
        config_from(LCA, parse_dotlist(items))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_hash_is_content_based_and_stable():
    a = config_from(LCA, parse_dotlist(["task.m=6", "seed=0"]))
    b = config_from(LCA, {"seed": 0, "task": {"m": 6}})
    assert config_hash("lca", a) == config_hash("lca", b)
    assert config_hash("lca", a) != config_hash("lca", replace(a, seed=1))
    assert config_hash("lca", a) != config_hash("other", a)
    assert build(type(a), to_dict(a)) == a


def test_yaml_layer(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {m: 5, L: 32}\noptim:\n  lr: 0.001\n")
    cfg = config_from(LCA, load_yaml(p), parse_dotlist(["task.L=16"]))
    assert (cfg.task.m, cfg.task.L, cfg.optim.lr) == (5, 16, 0.001)
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_seed_streams_are_distinct_and_overridable():
    cfg = config_from(LCA, parse_dotlist(["seed=4", "seeds.eval=123"]))
    s = cfg.seeds.resolve(cfg.seed)
    assert s.eval == 123 and len({s.task, s.init, s.train}) == 3
    assert cfg.seeds.resolve(5).init != s.init


def test_unreadable_yaml_and_duplicate_overrides_are_one_line_errors(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"seed: 1 # caf\xe9\n")
    for path, needle in ((tmp_path / "latin1.yaml", "not UTF-8"), (tmp_path, "is a folder")):
        with pytest.raises(ConfigError, match=needle) as e:
            load_yaml(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="task.m: given twice"):
        parse_dotlist(["task.m=3", "seed=1", "task.m=4"])
