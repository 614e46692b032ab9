"""C-preprocessed rule sets: DFOS's ``<instr>.h`` → ``<instr>.RLS``.

DFOS keeps its OCA rules as C headers (``<instr>_classification.h``,
``_organisation.h``, ``_association.h``, macro files, all ``#include``d by
``<instr>.h``) and compiles them with the C preprocessor into one
``<instr>.RLS`` that ABbuilder reads (www.eso.org/~qc/dfos/OCA_syntax.html).
:func:`preprocess` does the same with the pure-Python ``pcpp`` (no compiler in
the container) or, when pcpp is missing or asked for, the system ``cpp``. The
output keeps line markers, so the parser attributes every rule and every error
to the original header and line.

Errors of the preprocessor itself (an include not found, an unterminated
``#if``) raise :class:`~shared.oca.parser.OcaSyntaxError` at the original file
and line; a syntax error in the expanded text names the original line too, and
when a macro on that line expands to nothing the message says so.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.oca.parser import OcaSyntaxError

#: Suffixes of a DFOS entry file that goes through the preprocessor.
PREPROCESSED_SUFFIXES = (".h",)
#: A directive that only a preprocessor can resolve (line markers are not).
_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(include|define|undef|if|ifdef|ifndef|elif|else|endif|error)\b",
                        re.MULTILINE)
_CPP_ERROR = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:(?P<col>\d+):)?\s*(?:fatal )?error:\s*(?P<msg>.*)$",
                        re.MULTILINE)
_IDENT = re.compile(r"[A-Za-z_]\w*")


def needs_preprocessing(path: str | os.PathLike[str], text: str | None = None) -> bool:
    """True for a ``.h`` entry file, or any rule text with ``#include``/``#define``/``#if``..."""
    path = Path(path)
    if path.suffix in PREPROCESSED_SUFFIXES:
        return True
    if text is None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return _DIRECTIVE.search(text) is not None


def _define_items(defines: Mapping[str, object] | Iterable[str] | None) -> list[tuple[str, str]]:
    """``{"A": 1, "B": None}`` or ``["A=1", "B"]`` → [(name, value)] (value "1" when none)."""
    if not defines:
        return []
    if isinstance(defines, Mapping):
        items = defines.items()
    else:
        items = (d.partition("=")[::2] if "=" in d else (d, None) for d in defines)
    return [(str(k), "1" if v is None else str(v)) for k, v in items]


def available_engines() -> list[str]:
    """The preprocessors this machine has, preferred first."""
    engines = []
    try:
        import pcpp  # noqa: F401

        engines.append("pcpp")
    except ImportError:
        pass
    if shutil.which("cpp"):
        engines.append("cpp")
    return engines


def preprocess(
    entry: str | os.PathLike[str],
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Mapping[str, object] | Iterable[str] | None = None,
    engine: str = "auto",
) -> str:
    """The rule set ``entry`` expanded by the C preprocessor, with line markers.

    Parameters
    ----------
    entry
        The entry header (``<instr>.h``) or any rule file with directives.
    include_dirs
        Searched for ``#include "..."`` after the entry's own directory.
    defines
        Macros: ``{"NAME": value}`` (None → 1) or ``["NAME=value", "NAME"]``.
    engine
        ``"pcpp"``, ``"cpp"`` or ``"auto"`` (pcpp when installed, else cpp).

    Raises
    ------
    OcaSyntaxError
        The preprocessor failed, at the original file and line; or no preprocessor.
    """
    entry = Path(entry)
    dirs = [Path(d) for d in include_dirs]
    if engine == "auto":
        engines = available_engines()
        if not engines:
            raise OcaSyntaxError(str(entry), 0, 0, "no C preprocessor: install pcpp "
                                 "(pip install pcpp) or cpp to read a preprocessed rule set")
        engine = engines[0]
    if engine == "pcpp":
        return _pcpp(entry, dirs, _define_items(defines))
    if engine == "cpp":
        return _cpp(entry, dirs, _define_items(defines))
    raise ValueError(f"unknown preprocessor {engine!r} (pcpp, cpp or auto)")


def _pcpp(entry: Path, dirs: list[Path], defines: list[tuple[str, str]]) -> str:
    try:
        import pcpp
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise OcaSyntaxError(str(entry), 0, 0, "pcpp is not installed (pip install pcpp)") from e

    errors: list[tuple[str, int, str]] = []

    class _Pre(pcpp.Preprocessor):
        def on_error(self, file, line, msg):
            errors.append((file, line, msg.strip()))

    pre = _Pre()
    pre.line_directive = "#line"
    pre.add_path(str(entry.parent))
    for d in dirs:
        pre.add_path(str(d))
    pre.rewrite_paths = []  # (after add_path) keep paths as found: errors name the real files
    for name, value in defines:
        pre.define(f"{name} {value}")
    try:
        text = entry.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise OcaSyntaxError(str(entry), 0, 0, f"cannot read rule file: {e.strerror}") from e
    pre.parse(text, str(entry))
    out = io.StringIO()
    pre.write(out)
    if errors:
        file, line, msg = errors[0]
        raise OcaSyntaxError(file, line, 1, f"preprocessor: {msg}")
    return out.getvalue()


def _cpp(entry: Path, dirs: list[Path], defines: list[tuple[str, str]]) -> str:
    cpp = shutil.which("cpp")
    if cpp is None:
        raise OcaSyntaxError(str(entry), 0, 0, "cpp is not installed")
    # -x c: OCA is no C, but C tokenisation keeps "strings" and drops // and /* */;
    # no -P: the line markers are what map errors back to the headers.
    argv = [cpp, "-x", "c", "-undef", "-nostdinc", "-w", "-I", str(entry.parent)]
    for d in dirs:
        argv += ["-I", str(d)]
    for name, value in defines:
        argv.append(f"-D{name}={value}")
    argv.append(str(entry))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        m = _CPP_ERROR.search(done.stderr)
        if m:
            raise OcaSyntaxError(m.group("file"), int(m.group("line")), int(m.group("col") or 1),
                                 f"preprocessor: {m.group('msg')}")
        raise OcaSyntaxError(str(entry), 0, 0, f"preprocessor: {done.stderr.strip()[:500]}")
    return done.stdout


def empty_macros(
    entry: str | os.PathLike[str],
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    defines: Mapping[str, object] | Iterable[str] | None = None,
) -> set[str]:
    """Names of object-like macros that expand to nothing (``#define FILTERS``),
    read from the entry and the headers it includes (for error messages)."""
    seen: set[Path] = set()
    empty: set[str] = {name for name, value in _define_items(defines) if value == ""}
    todo = [Path(entry)]
    dirs = [Path(d) for d in include_dirs]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for m in re.finditer(r'^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(?![\w(])[ \t]*(.*)$', text,
                             re.MULTILINE):
            body = re.sub(r"/\*.*?\*/|//.*", "", m.group(2)).strip()
            (empty.add if not body else empty.discard)(m.group(1))
        for m in re.finditer(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', text, re.MULTILINE):
            for d in [path.parent, *dirs]:
                if (d / m.group(1)).is_file():
                    todo.append(d / m.group(1))
                    break
    return empty


def explain_empty_macro(error: OcaSyntaxError, macros: set[str],
                        include_dirs: Iterable[str | os.PathLike[str]] = ()) -> OcaSyntaxError:
    """The error with a note when its original line uses a macro that expands to nothing."""
    if not macros or error.line <= 0:
        return error
    candidates = [Path(error.path), *(Path(d) / Path(error.path).name for d in include_dirs)]
    for path in candidates:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        if error.line <= len(lines):
            used = [w for w in _IDENT.findall(lines[error.line - 1]) if w in macros]
            if used:
                names = ", ".join(dict.fromkeys(used))
                return OcaSyntaxError(
                    error.path, error.line, error.column,
                    f"{error.message} (macro {names} on this line expands to nothing)")
        break
    return error
