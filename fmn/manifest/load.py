"""Loading a manifest, and errors a person can act on: YAML read with duplicate keys
refused, pydantic's errors turned into one line each with the field path and a hint."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from fmn.manifest.schema import (
    _TAGS,
    InvertOptions,
    InvertOverride,
    Manifest,
    ResteerOptions,
    ResteerOverride,
    _did_you_mean,
)

# ---------------------------------------------------------------------------------------
# Loading, and errors a person can act on


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (dotted field path), what, and what to do."""

    loc: str
    msg: str
    hint: str = ""

    def __str__(self) -> str:
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{self.loc}: {self.msg}{hint}"


FILE_LOC = "(file)"  # the loc of problems with the file as a whole


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` lists every reason at once."""

    def __init__(self, path: str | Path, problems: list[Problem]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__("\n".join(f"{self.path}: {p}" for p in self.problems))

    def __reduce__(self) -> tuple[type[ManifestError], tuple[Path, list[Problem]]]:
        return type(self), (self.path, self.problems)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag != "tag:yaml.org,2002:str":
                continue  # merge keys ('<<') and non-string keys
            if key_node.value in seen:
                msg = f"duplicate key {key_node.value!r}"
                raise yaml.constructor.ConstructorError(None, None, msg, key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> tuple[Any, list[Problem]]:
    """The parsed file, or the problems that stop it from being parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(FILE_LOC, "file not found", f"check the path (cwd is {Path.cwd()})")]
    except IsADirectoryError:
        return None, [Problem(FILE_LOC, "is a folder, not a file", "pass the .yaml file")]
    except (OSError, UnicodeDecodeError) as e:
        return None, [Problem(FILE_LOC, f"cannot read: {e}", "save the file as UTF-8 text")]
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e)
        duplicate = str(what).startswith("duplicate key")
        hint = "give each key once" if duplicate else "check indentation, colons and quoting there"
        return None, [Problem(FILE_LOC, f"invalid YAML{where}: {what}", hint)]
    start = "start from manifests/demo.yaml"
    if data is None:
        return None, [Problem(FILE_LOC, "the file is empty", start)]
    if not isinstance(data, dict):
        msg = f"the top level must be a mapping of keys, got a {type(data).__name__}"
        return None, [Problem(FILE_LOC, msg, f"write 'name: ...', 'concepts: ...'; {start}")]
    return data, []


def parse_manifest(
    data: Any,
    base_dir: str | Path,
    source: str | Path = "<manifest>",
    *,
    verify_images: bool = False,
) -> Manifest:
    """Validate parsed YAML; relative paths start at `base_dir`; raises ManifestError.
    Image files are checked from their headers; `verify_images` decodes them too (slower,
    finds truncated and corrupt files: `fmn validate` and the start of a build use it)."""
    context = {"base_dir": Path(base_dir), "verify_images": verify_images}
    try:
        return Manifest.model_validate(data, context=context)
    except ValidationError as e:
        raise ManifestError(source, _problems(e)) from None


def load_manifest(path: str | Path, *, verify_images: bool = False) -> Manifest:
    """Read and validate a manifest file; raises ManifestError listing every problem."""
    path = Path(path)
    data, problems = _read_yaml(path)
    if problems:
        raise ManifestError(path, problems)
    return parse_manifest(
        data, base_dir=path.resolve().parent, source=path, verify_images=verify_images
    )


# -- pydantic errors -> Problems --------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """The type behind Annotated[...] and X | None; in other unions, the model member."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        members = [_unwrap(a) for a in get_args(tp) if a is not type(None)]
        structured = [m for m in members if get_origin(m) in (list, dict) or _is_model(m)]
        return (structured or members)[0] if len(members) > 1 else members[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_at(loc: tuple[str | int, ...], root: type[BaseModel] | None = None) -> Any:
    """The declared type found by following a pydantic error location from `root`
    (default: Manifest)."""
    tp: Any = root or Manifest
    for seg in loc:
        tp = _unwrap(tp)
        if seg in _TAGS:
            continue
        if get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        elif _is_model(tp) and seg in tp.model_fields:
            tp = tp.model_fields[seg].annotation
        else:
            return None
    return _unwrap(tp)


def _description(loc: tuple[str | int, ...], root: type[BaseModel] | None = None) -> str:
    """The field's docstring, which says what the value means (for an item of a list or
    a dict, the docstring of that list or dict)."""
    while loc:
        parent = _type_at(loc[:-1], root)
        parent = {InvertOverride: InvertOptions, ResteerOverride: ResteerOptions}.get(
            parent, parent
        )
        if _is_model(parent) and loc[-1] in parent.model_fields:
            return " ".join((parent.model_fields[loc[-1]].description or "").split())
        if get_origin(parent) not in (list, dict):
            return ""
        loc = loc[:-1]
    return ""


_KIND_HINTS = {
    "images_kind": "e.g. images: data/van-gogh, or images: {generate: 16}",
    "mask_kind": "one of auto, face, attention, none, or {folder: path}",
}


def _problem(err: dict[str, Any], root: type[BaseModel] | None = None) -> Problem:
    raw_loc = tuple(err["loc"])
    # "[key]": pydantic's mark of a dict key that failed; the key itself comes before it
    loc = ".".join(str(s) for s in raw_loc if s not in _TAGS and s != "[key]") or FILE_LOC
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    msg = err["msg"].replace("Input should be", "must be")
    hint = ctx.get("hint") or _KIND_HINTS.get(kind) or _description(raw_loc, root)
    if kind == "extra_forbidden":
        parent = _type_at(raw_loc[:-1], root)
        valid = list(parent.model_fields) if _is_model(parent) else []
        msg, hint = f"unknown key {raw_loc[-1]!r}", _did_you_mean(str(raw_loc[-1]), valid)
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "literal_error":
        msg, hint = f"unknown value {value!r}", f"allowed values: {ctx['expected']}"
    elif kind == "finite_number":
        msg, hint = f"must be a finite number, got {value!r}", "NaN and infinity are not allowed"
    elif kind == "too_short" and not value:
        msg = "must not be empty"
    elif kind in ("string_type", "int_type", "int_parsing", "float_parsing", "bool_parsing"):
        msg = f"{msg}, got {value!r}"
        if kind == "string_type" and value is not None:
            hint = f"quote it in YAML: '{value}'"
    elif "ge" in ctx or "gt" in ctx or "le" in ctx or "lt" in ctx:
        msg = f"{msg}, got {value!r}"
    return Problem(loc, msg, hint)


def _problems(error: ValidationError, root: type[BaseModel] | None = None) -> list[Problem]:
    return [_problem(e, root) for e in error.errors(include_url=False)]


def option_problems(model: type[BaseModel], values: dict[str, Any]) -> list[Problem]:
    """Check values given outside a manifest (command-line options) against the fields of
    one of its models, with the same messages and hints; a Problem's loc is the field name.
    None means "not given" and is skipped."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        model.model_validate(given, context={"verify_images": True})
    except ValidationError as e:
        return _problems(e, model)
    return []
