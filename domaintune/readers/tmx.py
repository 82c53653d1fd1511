"""TMX (Translation Memory eXchange 1.1-1.4), what CAT tools and OPUS export, as a table.

Each ``<tu>`` is a row (``_row``: its 1-based position in the file). Each ``<tuv xml:lang="..">``
(``lang=`` in TMX 1.1) gives the column named by its language code (one spelling per file:
``EN-us`` and ``en-US`` are one column) holding the text of its ``<seg>``, stripped. Inline
codes (``<bpt>``, ``<ept>``, ``<ph>``, ``<it>``, and the deprecated ``<ut>``: the source
document's formatting) are dropped with their contents, including a ``<sub>`` inside them;
the text of ``<hi>`` (and of a ``<sub>`` met outside a code) is kept. A ``<tu>`` without some
language is a row with that column empty: the contract judges it. A second ``<tuv>`` of a
language in one ``<tu>`` is ignored.

The file is parsed with expat, safely: a DOCTYPE may name the TMX DTD but nothing external is
ever loaded, and entity declarations (the "billion laughs" bomb, external entities that read
local files) are refused, as are references to undeclared entities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.parsers import expat

import pandas as pd

from domaintune.errors import DataError

#: inline codes: markup of the source document, not text
INLINE_CODES = frozenset({"bpt", "ept", "ph", "it", "ut"})
RULE = "data.format tmx reads TMX files: <tmx><body><tu><tuv xml:lang=..><seg>text</seg>"


class _Refused(Exception):
    """Raised inside a handler: what the file does that a safe reader refuses."""


@dataclass
class _Reader:
    """expat's handlers and what they have read so far."""

    rows: list[dict[str, str]] = field(default_factory=list)
    spelling: dict[str, str] = field(default_factory=dict)  # lower-case code -> column name
    root: str | None = None
    tu: dict[str, str] | None = None
    lang: str | None = None
    seg: list[str] | None = None
    skip: int = 0  # depth inside an inline code

    def start(self, name: str, attrs: dict[str, str]) -> None:
        name = name.rpartition(":")[2]
        if self.root is None:
            self.root = name
            if name != "tmx":
                raise _Refused(f"the root element is <{name}>, not <tmx>")
        if self.skip:
            self.skip += 1
        elif name == "tu":
            self.tu = {}
        elif name == "tuv" and self.tu is not None:
            code = (attrs.get("xml:lang") or attrs.get("lang") or "").strip()
            self.lang = self.spelling.setdefault(code.lower(), code) if code else None
        elif name == "seg" and self.lang is not None:
            self.seg = []
        elif name in INLINE_CODES and self.seg is not None:
            self.skip = 1

    def end(self, name: str) -> None:
        name = name.rpartition(":")[2]
        if self.skip:
            self.skip -= 1
        elif name == "seg" and self.seg is not None:
            if self.tu is not None and self.lang is not None:
                self.tu.setdefault(self.lang, _joined(self.seg))
            self.seg = None
        elif name == "tuv":
            self.lang = None
        elif name == "tu" and self.tu is not None:
            self.rows.append(self.tu)
            self.tu = None

    def text(self, data: str) -> None:
        if self.seg is not None and not self.skip:
            self.seg.append(data)


def _joined(parts: list[str]) -> str:
    """A segment's text; a space on both sides of a dropped code counts once."""
    text = ""
    for part in parts:
        if text.endswith((" ", "\t")) and part.startswith((" ", "\t")):
            part = part.lstrip(" \t")
        text += part
    return text.strip()


def _refuse_entity(name: str, *_: object) -> None:
    raise _Refused(
        f"the XML declares entity {name!r}; rule: TMX input may not declare entities "
        "(refused: entity expansion can exhaust memory or read local files)"
    )


def _refuse_undeclared(name: str, *_: object) -> None:
    raise _Refused(
        f"reference to undeclared entity &{name};; rule: TMX text uses XML's own entities "
        "(&amp; &lt; &gt; &quot; &apos;) and character references (&#233;)"
    )


def _parser(reader: _Reader, encoding: str | None) -> expat.XMLParserType:
    p = expat.ParserCreate(encoding)
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)  # never load a DTD
    p.StartElementHandler = reader.start
    p.EndElementHandler = reader.end
    p.CharacterDataHandler = reader.text
    p.EntityDeclHandler = lambda name, *rest: _refuse_entity(name)
    p.UnparsedEntityDeclHandler = _refuse_entity
    p.ExternalEntityRefHandler = lambda context, *rest: _refuse_entity(context or "?")
    p.SkippedEntityHandler = lambda name, is_parameter: _refuse_undeclared(name)
    p.buffer_text = True
    return p


def read_tmx(data: bytes, where: str, encoding: str | None = None) -> pd.DataFrame:
    """The translation units of a TMX file: a column per language, ``_row`` per ``<tu>``.
    ``encoding`` overrides the XML declaration's (None: as declared, UTF-8 by default)."""
    if not data.strip():
        raise DataError(f"{where}: file is empty")
    reader = _Reader()
    p = _parser(reader, encoding)
    try:
        p.Parse(data, True)
    except _Refused as exc:
        raise DataError(f"{where}: line {p.CurrentLineNumber}: {exc}") from None
    except expat.ExpatError as exc:
        raise DataError(_malformed(where, exc)) from None
    except LookupError:
        if encoding is not None:
            raise DataError(f"{where}: unknown encoding {encoding!r} (data.encoding)") from None
        raise DataError(
            f"{where}: line {p.CurrentLineNumber}: the XML declaration names an unknown "
            "encoding; rule: the declaration names a real encoding (data.encoding overrides it)"
        ) from None
    except ValueError as exc:  # expat reads one-byte encodings and UTF-8/16 only
        raise DataError(
            f"{where}: line {p.CurrentLineNumber}: cannot decode the XML ({exc}); rule: TMX "
            "files are UTF-8, UTF-16 or a one-byte encoding such as ISO-8859-1 (data.encoding "
            "overrides the XML declaration)"
        ) from None
    if not reader.rows:
        raise DataError(f"{where}: no <tu> translation units; rule: {RULE}")
    if not any(reader.rows):
        raise DataError(
            f"{where}: none of the {len(reader.rows)} <tu> translation unit(s) holds a "
            f"<tuv> with a language and a <seg>; rule: {RULE}"
        )
    df = pd.DataFrame.from_records(reader.rows).astype(object)
    df = df.where(df.notna(), None)
    df["_row"] = range(1, len(df) + 1)
    return df


def _malformed(where: str, exc: expat.ExpatError) -> str:
    what = expat.ErrorString(exc.code)
    hint = " (the file ends before its elements close: truncated?)" if what in _TRUNCATED else ""
    return (
        f"{where}: line {exc.lineno}, column {exc.offset + 1}: not well-formed XML ({what})"
        f"{hint}; rule: {RULE}"
    )


_TRUNCATED = {"no element found", "unclosed token", "unclosed CDATA section"}
