"""Hypothesis strategies of bad input: the repository's real configs, mutated so they are invalid.

Every strategy draws a `Case` that is invalid by construction (the test oracle below says
which values each field's type accepts, independently of the loader), together with the
fragments its error line must contain: the dotted key, and what was wrong where that is
fixed. The bases are configs/tiny-gemma2.yaml (with a grid its 4-layer model can plan)
and configs/demo.yaml, both valid as they are.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from hypothesis import assume
from hypothesis import strategies as st

from gemmascope.config import Config, SAEGridEntry
from gemmascope.models.sites import SITES

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny-gemma2.yaml"
DEMO = ROOT / "configs" / "demo.yaml"
# The tiny file's default grid asks for layer 6 of a 4-layer model; this one plans.
TINY_GRID = [{"sites": ["res"], "layers": [1], "widths": [256], "sparsity": [1e-3], "tokens": 65536}]
MODEL_LAYERS = {"tiny": 4, "demo": 18}
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def bases() -> dict[str, dict]:
    tiny = yaml.safe_load(TINY.read_text())
    tiny["saes"] = TINY_GRID
    return {"tiny": tiny, "demo": yaml.safe_load(DEMO.read_text())}


BASES = bases()


@dataclass(frozen=True)
class Field:
    """One key of a config: its place in the YAML mapping and its type hint."""

    path: tuple  # e.g. ("saes", 0, "widths")
    hint: Any

    @property
    def key(self) -> str:
        """As error messages name it: saes[0].widths."""
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
        return text


def config_fields(cls: type = Config, prefix: tuple = ()) -> list[Field]:
    """Every field, sections and grid entries included (they can have a wrong type too)."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        if field.name == "origin":  # set by the loader from the file name
            continue
        hint, path = hints[field.name], (*prefix, field.name)
        found.append(Field(path, hint))
        if dataclasses.is_dataclass(hint):
            found += config_fields(hint, path)
        elif hint == tuple[SAEGridEntry, ...]:
            found += [Field((*path, 0), SAEGridEntry), *config_fields(SAEGridEntry, (*path, 0))]
    return found


FIELDS = config_fields()
SECTIONS = [()] + [f.path for f in FIELDS if dataclasses.is_dataclass(f.hint)]


def accepts(hint: Any, value: Any) -> bool:
    """Whether a value has a type the field takes (the spec the loader implements)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (Union, types.UnionType):
        return any(accepts(arm, value) for arm in args)
    if origin is tuple:
        return isinstance(value, list) and all(accepts(args[0], v) for v in value)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is float:
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return numeric or (isinstance(value, str) and bool(SCIENTIFIC.fullmatch(value.strip())))
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def arms(hint: Any) -> tuple:
    """The alternatives of a union, or the hint alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def scalar_kinds(hint: Any) -> set:
    """The numeric types a field holds, directly or as list items: {int}, {float} or none."""
    kinds = set()
    for arm in arms(hint):
        inner = typing.get_args(arm)[0] if typing.get_origin(arm) is tuple else arm
        if inner in (int, float):
            kinds.add(inner)
    return kinds


def numeric_fields(kind: type) -> list[Field]:
    return [f for f in FIELDS if kind in scalar_kinds(f.hint)]


def in_list(field: Field, value: Any) -> Any:
    """The value where the field takes it: alone, or as the item of a one-item list."""
    return [value] if any(typing.get_origin(arm) is tuple for arm in arms(field.hint)) else value


@dataclass(frozen=True)
class Case:
    """One bad input: a base config, edits to its mapping or text, overrides, expected fragments."""

    kind: str
    base: str
    sets: tuple = ()  # ((path, value), ...) applied to the base mapping
    text: bytes | None = None  # the whole file instead of the edited base
    overrides: tuple = ()
    expect: tuple = ()  # fragments of the error line besides the config file's name


def set_path(data: dict, path: tuple, value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=2),
    max_leaves=5,
)
BASE = st.sampled_from(sorted(BASES))
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
ODD_NAME = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)


def known_keys(section: tuple) -> set[str]:
    return {f.path[-1] for f in FIELDS if f.path[:-1] == section} | ({"origin"} if not section else set())


def section_key(section: tuple, name: str) -> str:
    return Field((*section, name), None).key


@st.composite
def unknown_key(draw) -> Case:
    section = draw(st.sampled_from(SECTIONS))
    odd = draw(st.booleans())
    name = draw((ODD_NAME if odd else NAME).filter(lambda n: n not in known_keys(section)))
    expect = ("unknown key",) if odd else (section_key(section, name), "unknown key")
    return Case("unknown key", draw(BASE), sets=(((*section, name), draw(ANY_VALUE)),), expect=expect)


@st.composite
def wrong_type(draw) -> Case:
    field = draw(st.sampled_from(FIELDS))
    value = draw(ANY_VALUE.filter(lambda v: not accepts(field.hint, v)))
    return Case("wrong type", draw(BASE), sets=((field.path, value),), expect=(field.key,))


@st.composite
def not_finite(draw) -> Case:
    field = draw(st.sampled_from(numeric_fields(float)))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return Case("NaN or inf", draw(BASE), sets=((field.path, in_list(field, value)),), expect=(field.key, "finite"))


@st.composite
def beyond_64_bits(draw) -> Case:
    field = draw(st.sampled_from(numeric_fields(int)))
    value = draw(st.integers(2**63, 2**200) | st.integers(-(2**200), -(2**63) - 1))
    return Case("huge int", draw(BASE), sets=((field.path, in_list(field, value)),), expect=(field.key, "64 bits"))


@st.composite
def negative(draw) -> Case:
    """No numeric field of any section takes a negative value."""
    field = draw(st.sampled_from(numeric_fields(int) + numeric_fields(float)))
    number = st.integers(-(2**63), -1)
    if float in scalar_kinds(field.hint):
        number |= st.floats(-1e300, -1e-300)
    return Case("negative", draw(BASE), sets=((field.path, in_list(field, draw(number))),), expect=(field.key,))


# Fields where 0 is meaningful (no warm-up, no hold-out, layer 0, lambda 0, dense steps only,
# no frequency penalty, no AuxK, no preemption survived).
ZERO_OK = {"harvest.layers", "saes[0].layers", "saes[0].sparsity", "train.lr_warmup_steps",
           "train.sparsity_warmup_steps", "train.holdout_rows", "train.seed", "train.adam_beta2",
           "train.sparse_max_density", "train.frequency_coefficient", "train.aux_coefficient",
           "sweep.max_preemptions"}


@st.composite
def zero(draw) -> Case:
    fields = [f for f in numeric_fields(int) + numeric_fields(float) if f.key not in ZERO_OK]
    field = draw(st.sampled_from(fields))
    value = 0.0 if float in scalar_kinds(field.hint) and draw(st.booleans()) else 0
    return Case("zero", draw(BASE), sets=((field.path, in_list(field, value)),), expect=(field.key,))


def _bad(key: str, values: st.SearchStrategy) -> st.SearchStrategy:
    path = next(f.path for f in FIELDS if f.key == key)
    return values.map(lambda v: (path, v, key))


OUT_OF_RANGE = st.one_of(
    _bad("sweep.memory_fraction", st.floats(1.0, 1e300, exclude_min=True)),
    _bad("sweep.utilisation", st.floats(1.0, 1e300, exclude_min=True)),
    _bad("train.adam_beta2", st.floats(1.0, 1e300)),
    _bad("train.sparse_max_density", st.floats(1.0, 1e300, exclude_min=True)),
    _bad("eval.dense_threshold", st.floats(1.0, 1e300)),
    _bad("train.seed", st.integers(2**32, 2**63 - 1)),
    _bad("harvest.context_length", st.just(1)),
    _bad("saes[0].tokens", st.integers(1, 1023)),  # less than one batch of either base
    _bad("saes[0].widths", st.integers(3, 2**62).filter(lambda w: w & (w - 1)).map(lambda w: [w])),
    _bad("harvest.sites", TEXT.filter(lambda s: s not in SITES).map(lambda s: ["res", s])),
    _bad("saes[0].sites", TEXT.filter(lambda s: s not in SITES).map(lambda s: [s])),
    _bad("saes[0].target", TEXT.filter(lambda s: s not in SITES and s)),
    _bad("harvest.sites", st.just(["res", "res"])),
    _bad("harvest.layers", st.integers(0, 3).map(lambda n: [n, n])),
    _bad("model.source", st.sampled_from(["", " ", "\t"])),
    _bad("run_dir", st.sampled_from(["", "  ", "a\x00b"])),
)


@st.composite
def out_of_range(draw) -> Case:
    path, value, key = draw(OUT_OF_RANGE)
    return Case("out of range", draw(BASE), sets=((path, value),), expect=(key,))


@st.composite
def unsupported_url(draw) -> Case:
    scheme = draw(st.sampled_from(["s3", "http", "https", "ftp", "hdfs", "az", "x-y"]))
    url = f"{scheme}://bucket/{draw(NAME)}"
    where = draw(st.sampled_from(["run_dir", "source.paths", "model.source", "saes[0].init_from"]))
    path = next(f.path for f in FIELDS if f.key == where)
    sets = ((path, [url]), (("source", "builtin"), None)) if where == "source.paths" else ((path, url),)
    return Case("unsupported URL", draw(BASE), sets=sets, expect=(where, "unsupported URL scheme"))


# Lines that no YAML document may contain at column 0, wherever they are inserted.
BROKEN_LINES = ["]", "key: value: other", "\tkey: 1", "*undefined_alias", "'unterminated",
                "@at", "{a: 1", "`tick", "? [a", "a: 'b"]


@st.composite
def malformed_yaml(draw) -> Case:
    base = draw(BASE)
    lines = yaml.safe_dump(BASES[base], sort_keys=False).splitlines()
    at = draw(st.integers(0, len(lines)))
    lines.insert(at, draw(st.sampled_from(BROKEN_LINES)))
    return Case("malformed YAML", base, text="\n".join(lines).encode(), expect=("not valid YAML",))


@st.composite
def random_text(draw) -> Case:
    text = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=60))
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = "invalid"
    # Nothing (all defaults) or known keys alone could be a valid config.
    assume(parsed is not None and not (isinstance(parsed, dict) and set(parsed) <= known_keys(())))
    return Case("random text", "tiny", text=text.encode())


@st.composite
def not_a_mapping(draw) -> Case:
    value = draw(ANY_VALUE.filter(lambda v: v is not None and not isinstance(v, dict)))
    return Case("not a mapping", "tiny", text=yaml.safe_dump(value).encode(),
                expect=("expected a mapping at the top level",))


@st.composite
def binary_garbage(draw) -> Case:
    """Bytes that are not UTF-8, or UTF-8 with control characters YAML refuses."""
    data = draw(st.binary(max_size=200))
    at = draw(st.integers(0, len(data)))
    poison = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xfe\xfe", b"\x00", b"\x07", b"\x1b"]))
    return Case("binary garbage", "tiny", text=data[:at] + poison + data[at:])


@st.composite
def bad_override(draw) -> Case:
    base = draw(BASE)
    choice = draw(st.sampled_from(["unknown", "no equals", "not YAML", "into a scalar", "empty part"]))
    if choice == "unknown":
        section = draw(st.sampled_from([s for s in SECTIONS if not any(isinstance(p, int) for p in s)]))
        name = draw(NAME.filter(lambda n: n not in known_keys(section)))
        return Case("bad override", base, overrides=(f"{section_key(section, name)}=1",),
                    expect=(section_key(section, name), "unknown key"))
    if choice == "no equals":
        text = draw(TEXT.filter(lambda t: "=" not in t and not t.startswith("-")))
        return Case("bad override", base, overrides=(text,), expect=("expected key=value",))
    plain = [f for f in FIELDS if not any(isinstance(p, int) for p in f.path)]
    if choice == "not YAML":  # read as a string, which these fields do not take
        field = draw(st.sampled_from([f for f in plain if not accepts(f.hint, "[1,")]))
        value = draw(st.sampled_from(["[1,", "{a", "'x", "a: b: c", "@", "]["]))
        return Case("bad override", base, overrides=(f"{field.key}={value}",), expect=(field.key,))
    if choice == "into a scalar":
        field = draw(st.sampled_from([f for f in plain if not dataclasses.is_dataclass(f.hint)]))
        return Case("bad override", base, overrides=(f"{field.key}.{draw(NAME)}=1",), expect=(field.key,))
    key = draw(st.sampled_from(["harvest..layers", ".run_dir", "train.", ".", " "]))
    return Case("bad override", base, overrides=(f"{key}=1",), expect=("empty",))


@st.composite
def model_range(draw) -> Case:
    """Layers the model does not have: only commands that look at the model can tell."""
    base = draw(BASE)
    layer = draw(st.integers(MODEL_LAYERS[base], 2**40))
    if draw(st.booleans()):
        layers = [3, 6, layer] if base == "demo" else [layer]
        return Case("layer past the model", base, sets=((("harvest", "layers"), layers),),
                    expect=("harvest.layers", "out of range"))
    return Case("layer past the model", base, sets=((("saes", 0, "layers"), [layer]),),
                expect=("saes[0].layers", "out of range"))


CONFIG_CASES = {
    "unknown key": unknown_key(),
    "wrong type": wrong_type(),
    "NaN or inf": not_finite(),
    "huge int": beyond_64_bits(),
    "negative": negative(),
    "zero": zero(),
    "out of range": out_of_range(),
    "unsupported URL": unsupported_url(),
    "malformed YAML": malformed_yaml(),
    "random text": random_text(),
    "not a mapping": not_a_mapping(),
    "binary garbage": binary_garbage(),
    "bad override": bad_override(),
}
