"""Recipe validation: each kind of mistake gives one clear error naming its place."""

import pytest
import yaml

from qatkit import RecipeError, load_recipe, parse_recipe, prepare
from qatkit.cli.main import bundled_recipes

BASE = {"name": "t", "variants": [{"name": "a", "quant": {"preset": "int8"}}]}


def with_variant(**quant):
    return {"name": "t", "variants": [{"name": "a", "quant": quant}]}


def test_bundled_recipes_are_valid():
    names = bundled_recipes()
    assert {"digits_mlp", "basic_motions_cnn"} <= set(names)
    for path in names.values():
        load_recipe(path)


def test_misspelled_key_names_key_place_and_allowed_keys():
    bad = with_variant(rules=[{"types": ["Linear"], "wieght": {"bits": 4}}])
    with pytest.raises(RecipeError) as e:
        parse_recipe(bad)
    msg = str(e.value)
    assert "variants[0].quant.rules[0].wieght" in msg
    assert "unknown key 'wieght'" in msg and "weight" in msg and "activation" in msg
    assert len(msg.splitlines()) == 1


def test_top_level_unknown_key():
    with pytest.raises(RecipeError, match="unknown key 'epochs'"):
        parse_recipe(dict(BASE, epochs=3))


def test_bad_value_names_allowed_values():
    bad = with_variant(rules=[{"weight": {"granularity": "chanel"}}])
    with pytest.raises(RecipeError) as e:
        parse_recipe(bad)
    msg = str(e.value)
    assert "variants[0].quant.rules[0].weight.granularity" in msg
    assert "'tensor'" in msg and "'channel'" in msg and "'group'" in msg and "chanel" in msg


def test_bad_registry_values():
    with pytest.raises(RecipeError, match="unknown preset 'int4'; allowed: ffn-only, int8, w4a8, w8"):
        parse_recipe(with_variant(preset="int4"))
    with pytest.raises(RecipeError, match="unknown observer 'histogram'"):
        parse_recipe(with_variant(rules=[{"weight": {"observer": "histogram"}}]))
    with pytest.raises(RecipeError, match="unknown dataset"):
        parse_recipe(dict(BASE, data={"name": "cifar"}))
    with pytest.raises(RecipeError, match="bits"):
        parse_recipe(with_variant(rules=[{"weight": {"bits": 16}}]))


def test_rule_matching_no_layer_is_an_error(tiny_mlp):
    with pytest.raises(RecipeError, match=r"rule 0 \(match=\*attention\*\) matches no layer; layers are: net.1"):
        prepare(tiny_mlp, {"rules": [{"match": "*attention*"}]})


def test_rule_shadowed_by_earlier_rule_is_an_error(tiny_mlp):
    with pytest.raises(RecipeError, match="rule 1 .* only matches layers already taken"):
        prepare(tiny_mlp, {"rules": [{"types": "Linear"}, {"match": "net.1"}]})


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    p.write_text(yaml.safe_dump(BASE))
    assert load_recipe(p).variants[0].quant.preset == "int8"


def test_duplicate_variant_names():
    with pytest.raises(RecipeError, match="repeated: a"):
        parse_recipe({"variants": [{"name": "a", "quant": {"preset": "w8"}}, {"name": "a", "quant": {"preset": "w8"}}]})
