"""Flags for every script (rporec.py, data.py, bench.py): `--section.field VALUE` over a tree of config
dataclasses, typed by their annotations, with --help built from each field's comment and allowed values.
Torch-free, so that `python data.py` starts fast and `python rporec.py --help` answers from the flag table
(answer_early) before torch loads."""
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import typing


def field_comments(cls):
    """{field: its '# comment'} read from the dataclass source, continuation lines joined."""
    out, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#=]*=[^#]*(?:#\s?(.*))?$", line)  # a field, its comment here or below
        if m:
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
        elif last and re.match(r"\s+#", line):
            out[last] = (out[last] + " " + line.strip().lstrip("#").strip()).strip()
        elif not line.strip().startswith("#"):
            last = None
    return out


def _comments(cls):
    """A config class's field comments: from its source, or from the flag table it was rebuilt from."""
    fields = dataclasses.fields(cls)
    if fields and "comment" in fields[0].metadata:
        return {f.name: f.metadata["comment"] for f in fields}
    return field_comments(cls)


def _convert(text, kind, flag):
    """A flag's text as the field's annotated type (bool, int, float, str, tuple[int, ...], X | None)."""
    args = typing.get_args(kind)
    if type(None) in args:
        if text.lower() == "none":
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if typing.get_origin(kind) is tuple:
            return tuple(int(v) for v in text.split(","))
        return kind(text)
    except ValueError:
        name = "true/false" if kind is bool else f"a {getattr(kind, '__name__', kind)}"
        raise SystemExit(f"error: --{flag} takes {name}, got {text!r}") from None


def parse_flags(cfg, argv, bare="run"):
    """{"section.field": value} from --section.field VALUE (or =VALUE) over the dataclass sections of cfg.
    Fields of section `bare` also work bare (--model). A bare boolean flag means true."""
    args = []  # (text, glued): glued values came as --flag=VALUE and may start with --
    for a in argv:
        split = a.startswith("--") and "=" in a
        args += [(p, k == 1) for k, p in enumerate(a.split("=", 1) if split else [a])]
    flags = {}
    while args:
        key, _ = args.pop(0)
        if not key.startswith("--"):
            raise SystemExit(f"error: unexpected argument {key!r}; flags look like --grpo.beta 0.001")
        key = key[2:].replace("-", "_")
        sec, _, name = (key if "." in key else f"{bare}.{key}").partition(".")
        section = getattr(cfg, sec, None)
        if not dataclasses.is_dataclass(section) or name not in {f.name for f in dataclasses.fields(section)}:
            near = difflib.get_close_matches(key, flag_names(cfg, bare), n=1, cutoff=0.6)
            hint = f"did you mean --{near[0]}? " if near else ""
            raise SystemExit(f"error: unknown flag --{key}; {hint}--help lists every flag")
        if f"{sec}.{name}" in flags:
            raise SystemExit(f"error: --{key} is given twice; pass it once")
        kind = typing.get_type_hints(type(section))[name]
        missing = not args or (args[0][0].startswith("--") and not args[0][1])  # `--stage --resume`: no stage
        if kind is bool and missing:
            flags[f"{sec}.{name}"] = True
            continue
        if missing:
            raise SystemExit(f"error: --{key} needs a value (e.g. --{key} {_example(section, name)}); a value that "
                             f"starts with -- is written --{key}=VALUE")
        flags[f"{sec}.{name}"] = _convert(args.pop(0)[0], kind, key)
    return flags


def flag_names(cfg, bare="run"):
    """Every flag of a config tree as parse_flags takes it: "section.field", and "field" for the bare section."""
    out = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            out += [f"{section.name}.{f.name}"] + ([f.name] if section.name == bare else [])
    return out


def _example(section, name):
    """A field's default, as a flag value."""
    value = getattr(section, name)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value if value not in ("", None) else "VALUE"


def apply(cfg, values):
    """Set {"section.field": value} (parse_flags' result, or a preset) on the dataclass sections of cfg."""
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def help_text(cfg, bare="run"):
    """Every flag with its default, its allowed values and its field comment, grouped by section."""
    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        notes, kinds = _comments(type(obj)), typing.get_type_hints(type(obj))
        lines.append(f"\n[{section.name}]")
        for f in dataclasses.fields(obj):
            flag = f"--{f.name}" if section.name == bare else f"--{section.name}.{f.name}"
            rule = f.metadata.get("allowed")
            allowed = f"  ({rule.describe(kinds[f.name])})" if rule is not None else ""
            lines.append(f"  {flag} {getattr(obj, f.name)!r}{allowed}\n      {notes.get(f.name, '')}")
    return "\n".join(lines)


def config_diff(old, new, allowed=()):
    """["section.field: old -> new"] over two config dicts, leaving out the `allowed` keys."""
    out = []
    for sec in sorted(set(old) | set(new)):
        for name in sorted(set(old.get(sec, {})) | set(new.get(sec, {}))):
            a, b = old.get(sec, {}).get(name), new.get(sec, {}).get(name)
            if f"{sec}.{name}" not in allowed and json.dumps(a) != json.dumps(b):
                out.append(f"{sec}.{name}: {a!r} -> {b!r}")
    return out


def changed(cfg, default):
    """["section.field=value"] for every field of cfg that differs from default's: a run's config in a line."""
    old, new = dataclasses.asdict(default), dataclasses.asdict(cfg)
    return [f"{sec}.{name}={value}" for sec in new for name, value in new[sec].items()
            if json.dumps(value) != json.dumps(old.get(sec, {}).get(name))]


# ----------------------------------------------------------------------------- allowed values of each field
def _num(x):
    return str(int(x)) if float(x).is_integer() else repr(x)


class Range:
    """A number field's allowed values: finite, from low to high, `open` naming the excluded ends ("low", "high",
    "both"); none=True also allows None."""

    def __init__(self, low=-math.inf, high=math.inf, open="", none=False):
        self.low, self.high, self.open, self.none = low, high, open, none

    def error(self, value, kind):
        if value is None and self.none:
            return None
        lo_open, hi_open = self.open in ("low", "both"), self.open in ("high", "both")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (self.low < value if lo_open else self.low <= value) and \
            (value < self.high if hi_open else value <= self.high)
        return None if ok else self.text(kind)

    def describe(self, kind=float):
        return self.text(kind)

    def text(self, kind=float):
        lo_open, hi_open = self.open in ("low", "both"), self.open in ("high", "both")
        if math.isfinite(self.low) and math.isfinite(self.high):
            span = f"in {'(' if lo_open else '['}{_num(self.low)}, {_num(self.high)}{')' if hi_open else ']'}"
        elif math.isfinite(self.low):
            span = f"{'>' if lo_open else '>='} {_num(self.low)}"
        else:
            span = f"{'<' if hi_open else '<='} {_num(self.high)}" if math.isfinite(self.high) else ""
        number = int in typing.get_args(kind) or kind is int
        text = span if number and span else f"a finite number {span}".strip()
        return text + (" (or none)" if self.none else "")


class OneOf:
    """A field that takes one of a few values."""

    def __init__(self, *choices):
        self.choices = choices

    def error(self, value, kind):
        return None if value in self.choices else self.describe(kind)

    def describe(self, kind=None):
        return f"one of {self.choices}"


class Text:
    """A string field that must not be empty (a model name, a category word, a folder)."""

    def __init__(self, what="a non-empty string"):
        self.what = what

    def error(self, value, kind):
        return None if isinstance(value, str) and value.strip() else self.describe(kind)

    def describe(self, kind=None):
        return self.what


class Own:
    """A field checked by its own code (a date, a list of terms, a path), with what that check asks."""

    def __init__(self, what):
        self.what = what

    def error(self, value, kind):
        return None

    def describe(self, kind=None):
        return self.what


ANY = None  # any value of the field's type: booleans, free text such as the prompt suffix


POSITIVE = Range(0, open="low")  # learning rates, temperatures, scales
RATE = Range(0, 1, open="low")  # a share in (0, 1]
SEED = Range(0, 2 ** 32 - 1)  # numpy seeds are 32-bit


def setting(default, allowed=ANY, rerun=False, place=False):
    """A config field: its default, the values it allows (a rule above: Range, OneOf, Text, Own or ANY, checked
    before any work), and what two runs sharing a run folder may differ in: rerun (how far a run goes, speed
    knobs) and place (where things are, not what the run is)."""
    return dataclasses.field(default=default, metadata={"allowed": allowed, "rerun": rerun, "place": place})


def sections(cfg):
    """[(section name, section)] of a config tree; a single section is its own one section."""
    if any(dataclasses.is_dataclass(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)):
        return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    return [("", cfg)]


def marked(cfg, what):
    """{"section.field"} of the fields whose setting() says `what` ("rerun" or "place")."""
    return {f"{name}.{f.name}" for name, obj in sections(cfg) for f in dataclasses.fields(obj) if f.metadata.get(what)}


def range_errors(cfg, section=None, bare=None):
    """'--flag must be ..., got value' for every field of cfg's sections whose setting() rule refuses its value;
    cfg may also be a single section, named `section` (fields of section `bare` are named bare, as parse_flags
    takes them)."""
    out = []
    for name, obj in sections(cfg):
        name = name or section
        kinds = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            rule, value = f.metadata.get("allowed"), getattr(obj, f.name)
            if rule is not None and (msg := rule.error(value, kinds[f.name])):
                out.append(f"--{f.name if name == bare else f'{name}.{f.name}'} must be {msg}, got {value!r}")
    return out


def problems(cfg, bare=None):
    """Every field's range_errors, then each section's own check() (a ValueError naming the flag): what a config
    tree cannot run with, before any work."""
    out = range_errors(cfg, bare=bare)
    for _, section in sections(cfg):
        try:
            getattr(section, "check", lambda: None)()
        except ValueError as e:
            out.append(str(e))
    return out


# ----------------------------------------------------------------------------- the flag table: --help at once
# `python rporec.py --help` and a flag error answer before torch loads (a second, not ten): the flags, their types,
# defaults, allowed values and comments are kept in a table beside the bytecode, written by every full parse and
# valid while the source files of the config classes are unchanged; without a valid table the full parse answers.
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", "flags-{}.json")
RULES = {"Range": Range, "OneOf": OneOf, "Text": Text, "Own": Own}


def _type_text(kind):
    args = typing.get_args(kind)
    if type(None) in args:
        return _type_text(next(a for a in args if a is not type(None))) + " | None"
    return "tuple[int, ...]" if typing.get_origin(kind) is tuple else kind.__name__


def _sources(cfg, presets_module):
    """{path: digest} of the files that define cfg's config classes and its presets."""
    paths = {inspect.getsourcefile(type(cfg)), inspect.getsourcefile(presets_module)}
    paths |= {inspect.getsourcefile(type(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}
    return {p: _digest(p) for p in sorted(paths)}


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def save_table(name, cfg, presets, presets_module, header, bare="run"):
    """Write the flag table of the program `name`: cfg's sections (their fields' types, defaults, rules and
    comments), the presets, --help's header line and the digests of the source files they come from. Quietly
    nothing where the folder is not writable."""
    sections = {}
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        notes, kinds = field_comments(type(obj)), typing.get_type_hints(type(obj))
        sections[section.name] = [{"name": f.name, "type": _type_text(kinds[f.name]), "default": getattr(obj, f.name),
                                   "rule": None if f.metadata.get("allowed") is None else
                                   {"kind": type(f.metadata["allowed"]).__name__, **vars(f.metadata["allowed"])},
                                   "comment": notes.get(f.name, "")} for f in dataclasses.fields(obj)]
    table = {"parser": _digest(__file__), "sources": _sources(cfg, presets_module), "bare": bare,
             "header": header, "sections": sections, "presets": presets}
    path = TABLE.format(name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False, suffix=".tmp") as f:
            json.dump(table, f)
        os.replace(f.name, path)
    except OSError:
        pass


def _rule(d):
    if d is None:
        return ANY
    d = dict(d)
    kind = RULES[d.pop("kind")]
    return kind(*d["choices"]) if kind is OneOf else kind(**d)


def load_table(name):
    """(cfg, presets, bare, header) rebuilt from the flag table of `name`, or None when there is none or its
    sources changed since it was written."""
    try:
        with open(TABLE.format(name)) as f:
            table = json.load(f)
        if table["parser"] != _digest(__file__) or any(_digest(p) != d for p, d in table["sources"].items()):
            return None  # this parser, or a config class, changed since the table was written
        presets, bare, header = table["presets"], table["bare"], table["header"]
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or from other code
        return None
    types = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple, "None": None}
    sections = []
    for sec, fields in table["sections"].items():
        cls = dataclasses.make_dataclass(sec, [(
            f["name"], eval(f["type"], types),  # noqa: S307 (our own table's type names)
            dataclasses.field(default=tuple(f["default"]) if f["type"].startswith("tuple") else f["default"],
                              metadata={"allowed": _rule(f["rule"]), "comment": f["comment"]})) for f in fields])
        sections.append((sec, cls, dataclasses.field(default_factory=cls)))
    return dataclasses.make_dataclass("Config", sections)(), presets, bare, header


def answer_early(name, argv, doc):
    """--help, and the errors of the flags themselves (unknown, repeated, mistyped, out of range), from the flag
    table alone: they answer before torch loads. Returns when there is nothing to answer, or no valid table."""
    loaded = load_table(name)
    if loaded is None:
        return
    cfg, presets, bare, header = loaded
    if "--help" in argv or "-h" in argv:
        print(doc + header)
        print(help_text(cfg, bare))
        sys.exit(0)
    given = parse_flags(cfg, argv, bare)  # exits with the error of a bad flag
    dataset = given.get(f"{bare}.dataset", getattr(getattr(cfg, bare), "dataset", None))
    apply(cfg, {**presets.get(dataset, {}), **given})
    if errors := range_errors(cfg, bare=bare):
        sys.exit(f"error: {errors[0]}")
