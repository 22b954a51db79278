import pytest

from core.errors import ConfigError, UnknownName
from core.registry import ParamSpec, Registry


@pytest.fixture()
def reg():
    r = Registry("pruning method")
    for name in ("semdedup", "dbp", "random", "ssp"):
        r.register(name, summary=name, params=(ParamSpec("eps", "float", 0.05, min=0.0, max=1.0),))(object())
    return r


def test_unknown_name_lists_alternatives_and_suggests(reg):
    with pytest.raises(UnknownName) as err:
        reg.get("semdup")
    msg = str(err.value)
    assert msg.startswith("pruning method 'semdup' not found")
    assert "did you mean 'semdedup'" in msg
    assert "available: dbp, random, semdedup, ssp" in msg


def test_register_twice_fails(reg):
    with pytest.raises(ValueError):
        reg.register("dbp")(object())


def test_iteration_is_sorted_and_len(reg):
    assert [e.name for e in reg] == ["dbp", "random", "semdedup", "ssp"]
    assert len(reg) == 4 and "dbp" in reg and "nope" not in reg


def test_validate_params_fills_defaults_and_refuses_unknown(reg):
    entry = reg.entry("dbp")
    assert entry.validate_params({}) == {"eps": 0.05}
    assert entry.validate_params({"eps": "0.2"}) == {"eps": 0.2}
    with pytest.raises(ConfigError, match="unknown parameter"):
        entry.validate_params({"epsilon": 0.1})


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (ParamSpec("k", "int", 10, min=1), "7", 7),
        (ParamSpec("k", "int", 10, min=1), 3.0, 3),
        (ParamSpec("f", "bool", False), "yes", True),
        (ParamSpec("f", "bool", True), "off", False),
        (ParamSpec("m", "choice", "hard", choices=("hard", "easy")), "easy", "easy"),
        (ParamSpec("p", "path", None), 5, "5"),
    ],
)
def test_param_coercion(spec, value, expected):
    assert spec.validate(value) == expected


@pytest.mark.parametrize(
    ("spec", "value", "fragment"),
    [
        (ParamSpec("k", "int", 10, min=1), 0, ">= 1"),
        (ParamSpec("k", "int", 10, max=5), 6, "<= 5"),
        (ParamSpec("k", "int", 10), 2.5, "must be a int"),
        (ParamSpec("k", "int", 10), True, "must be a int"),
        (ParamSpec("x", "float", 1.0), "nan", "must be a float"),
        (ParamSpec("x", "float", 1.0), "abc", "must be a float"),
        (ParamSpec("f", "bool", False), "maybe", "must be a bool"),
        (ParamSpec("m", "choice", "hard", choices=("hard", "easy")), "medium", "one of hard, easy"),
        (ParamSpec("r", "str", None, required=True), None, "required"),
    ],
)
def test_param_rejections(spec, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        spec.validate(value)
