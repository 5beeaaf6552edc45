"""Static review of a submission by allowlist: what the student's code may use, and what it may not.

Every solution cell, and every cell the student added, is read (never run) against the assignment's
``Policy``, which the source notebook declares in its metadata (``"dgm_grading"``) and the grader
reads from ``solutions/``, never from the submission. A cell is flagged when it

- imports a module beyond the policy's list (``COMMON_IMPORTS`` plus the assignment's own), or
  imports relatively;
- uses ``get_ipython``, IPython magics or shell escapes (``%``, ``%%``, ``!``); ``%matplotlib`` and
  ``%%capture`` aside, and ``%time``/``%timeit``/``%%time``, whose code is reviewed;
- reaches ``importlib``, ``types``, ``sys``, ``gc``, ``inspect``, ``ctypes`` or ``builtins``
  (``FORBIDDEN_MODULES``) by any route: an import, a name, an attribute (``torch.sys``) or a
  string (``getattr(x, "sys")``);
- reaches ``dgmlib.grading``, the test machinery;
- reads an attribute that starts with ``_`` (``__name__`` and ``__doc__`` aside) of anything but its
  own ``self``, ``cls`` or ``super()``, uses a dunder name, or a ``_`` name it did not define
  (``__builtins__``, ``_ih``); rebinds ``self`` or ``cls``;
- calls ``getattr``, ``setattr``, ``delattr`` or ``hasattr`` with a name that is not a literal
  string, uses ``vars``, ``globals``, ``locals``, ``exec``, ``eval``, ``compile`` or
  ``breakpoint``, or any of these without calling it (``run = [exec][0]``);
- assigns to, or ``setattr``-s, an attribute of an imported module (``torch.allclose = ...``);
- refers to one of the assignment's declared answers (``Policy.answers``, e.g.
  ``dgmlib.flows.AffineCoupling`` in hw2) by any route: importing it, an attribute of that name on
  anything but ``self`` (``flows.AffineCoupling``, ``F.AffineCoupling`` after ``F = flows``), or its
  name as the literal of ``getattr`` and the like (``getattr(flows, "AffineCoupling")``).

Comments, docstrings that merely mention a name, helper functions and the student's own names
(``class AffineCoupling``, ``_helper``, ``self._cache``) are never flagged.

Why not RestrictedPython: its guards (``_getattr_``, ``_write_``) act only on code that runs
compiled by it with its restricted builtins, and a Jupyter kernel that trains torch models runs
the student's cells as ordinary Python. Its compile-time policy alone forbids every name and
attribute that starts with ``_``, ``super().__init__()`` and ``self._cache`` included, so it flags
the innocent ``nn.Module`` that every assignment asks for, and it knows nothing of imports allowed,
of ``sys`` reached through ``torch.sys``, or of an assignment's answers. What is left is this walk
of the syntax tree (``ast``), with the rules above. Source: the course's issue 12.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from dgmlib.grading.untrusted import read_notebook

__all__ = ["Policy", "COMMON_IMPORTS", "FORBIDDEN_MODULES", "split_cells", "review_notebook", "review_source"]

COMMON_IMPORTS = ("math", "copy", "itertools", "functools", "collections", "dataclasses", "typing", "numpy",
                  "torch", "matplotlib", "tqdm")
"""Modules every assignment allows (with their submodules)."""

FORBIDDEN_MODULES = frozenset({"importlib", "types", "sys", "gc", "inspect", "ctypes", "builtins"})
"""Modules a solution may not reach by any route."""

_FORBIDDEN_CALLS = frozenset({"vars", "globals", "locals", "exec", "eval", "compile", "breakpoint"})
_NAME_CALLS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
_MACHINERY = frozenset({"grading", "receipts", "_checker"})
_SHELL = "get_ipython"
_HARMLESS_DUNDERS = frozenset({"__name__", "__doc__"})
_BLANK_MAGICS = ("%matplotlib", "%%time", "%%timeit", "%%capture")  # the rest of the cell is reviewed
_CODE_MAGICS = ("%timeit", "%time")  # the rest of the line is code, and is reviewed


@dataclass(frozen=True)
class Policy:
    """What an assignment allows: its imports beyond ``COMMON_IMPORTS``, and its answers.

    Attributes:
        imports: modules a student cell may import, with their submodules (``"dgmlib.flows"``).
        answers: grade_id of a solution cell (or ``"*"`` for every cell) -> dotted names that are that
            cell's answer in dgmlib or elsewhere (``"dgmlib.flows.AffineCoupling"``). Cells the student
            added are reviewed against every answer.
    """

    imports: tuple[str, ...] = ()
    answers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_notebook(cls, notebook: dict) -> Policy:
        """The policy in a notebook's ``metadata["dgm_grading"]`` (empty if there is none).

        Raises:
            TypeError: if the declaration is not ``{"imports": [str], "answers": {str: [str]}}``.
        """
        raw = notebook.get("metadata", {}).get("dgm_grading", {})
        imports, answers = raw.get("imports", []), raw.get("answers", {})
        if not (isinstance(imports, list) and all(isinstance(m, str) for m in imports) and isinstance(answers, dict)
                and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in answers.values())):
            raise TypeError('metadata["dgm_grading"] must be {"imports": [str, ...], "answers": {cell: [str, ...]}}')
        return cls(tuple(imports), {k: tuple(v) for k, v in answers.items()})

    def allows_import(self, module: str) -> bool:
        """Whether ``module`` (dotted) is, or is inside, an allowed module."""
        return any(module == m or module.startswith(m + ".") for m in (*COMMON_IMPORTS, *self.imports))

    def answers_for(self, cell: str | None) -> tuple[str, ...]:
        """The answers a cell may not use: its own and the ``"*"`` ones; all of them for an added cell."""
        if cell is None:
            return tuple(n for names in self.answers.values() for n in names)
        return (*self.answers.get("*", ()), *self.answers.get(cell, ()))


def split_cells(notebook: dict, instructor_cells: set[str] | None = None
                ) -> tuple[list[tuple[str | None, str, str]], list[str]]:
    """Split a notebook's code cells into the student's and the instructor's.

    The instructor's cells are those nbgrader restores before grading: not marked as solutions, with a
    ``grade_id`` in ``instructor_cells`` (the source notebook's non-solution cells) or, without
    ``instructor_cells``, with any nbgrader metadata (enough for a release). Everything else, solution
    cells and cells added or disguised by the student, is the student's.

    Returns:
        the student's cells as ``(grade_id or None, label, source)``, and the instructor's sources.
    """
    students, instructors = [], []
    for i, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {})
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        theirs = meta.get("grade_id") in instructor_cells if instructor_cells is not None else bool(meta)
        if theirs and not meta.get("solution", False):
            instructors.append(source)
        else:
            students.append((meta.get("grade_id"), f"#{i + 1} (added by the student)", source))
    return students, instructors


def review_notebook(notebook_path: str | Path, policy: Policy, instructor_cells: set[str] | None = None) -> list[str]:
    """Review the student's code cells of a submitted notebook (``split_cells``) against ``policy``.

    The modules that the instructor's cells import (the setup cell's ``torch``, ``flows``, ...) are
    those whose attributes the student may not assign.

    Returns:
        sorted, human-readable flags such as ``"cell coupling: refers to flows.AffineCoupling, an
        answer of this assignment (dgmlib.flows.AffineCoupling)"``; empty if nothing is flagged.
    """
    students, instructors = split_cells(read_notebook(notebook_path), instructor_cells)  # a regular file, capped
    imported: set[str] = set()
    for source in instructors:
        try:
            imported |= _imported_modules(ast.parse(source))
        except SyntaxError:
            pass
    return review_source(students, policy, imported)


def review_source(cells: list[tuple[str | None, str, str]], policy: Policy,
                  imported: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Review ``(grade_id or None, label, source)`` cells together (names defined in one count in all).

    ``imported`` names the modules imported elsewhere (the setup cell), whose attributes, like those of
    modules the cells import themselves, may not be assigned.
    """
    parsed, flags = [], []
    for grade_id, label, source in cells:
        name = grade_id or label
        kept, depth = [], 0
        for line in source.splitlines():
            stripped = line.lstrip()
            # inside brackets or after a backslash, a line that starts with % is the modulo operator
            continued = depth > 0 or bool(kept) and kept[-1].rstrip().endswith("\\")
            magic = stripped.split()[0] if stripped.startswith(("%", "!")) and not continued else ""
            depth = max(0, depth + sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}"))
            if magic in _CODE_MAGICS:
                kept.append(line[:len(line) - len(stripped)] + stripped[len(magic):].lstrip())
            elif magic:
                if magic not in _BLANK_MAGICS:
                    flags.append(f"cell {name}: IPython magic or shell command {magic!r}")
                kept.append("")
            else:
                kept.append(line)
        try:
            parsed.append((grade_id, name, ast.parse("\n".join(kept))))
        except SyntaxError:
            flags.append(f"cell {name}: does not parse")
    own = set().union(*(_defined_names(tree) for _, _, tree in parsed)) if parsed else set()
    for grade_id, name, tree in parsed:
        flags += [f"cell {name}: {f}" for f in _review_tree(tree, policy, policy.answers_for(grade_id), own,
                                                                      set(imported))]
    return sorted(set(flags))


def _defined_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):  # the import itself is reviewed on its own
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def _is_own(node: ast.AST) -> bool:
    """``self``, ``cls`` or ``super()``: objects whose private attributes are the student's own."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _review_tree(tree: ast.AST, policy: Policy, answers: tuple[str, ...], own: set[str],
                 imported: set[str]) -> list[str]:
    flags: list[str] = []
    answer_names = {a.rsplit(".", 1)[-1]: a for a in answers}
    modules = _imported_modules(tree) | (imported - (own - _imported_modules(tree)))

    def answer(name: str, how: str) -> None:
        if name in answer_names:
            flags.append(f"{how}, an answer of this assignment ({answer_names[name]})")

    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_import(alias.name, policy, flags)
                if (alias.asname or alias.name) in ("self", "cls"):
                    flags.append(f"imports {alias.name} as {alias.asname}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                flags.append(f"relative import from {'.' * node.level}{node.module or ''}")
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                _check_import(node.module if alias.name == "*" else full, policy, flags)
                if full in answers:
                    flags.append(f"imports {alias.name}, an answer of this assignment ({full})")
                if alias.name.startswith("_"):
                    flags.append(f"imports the private name {full}")
                if (alias.asname or alias.name) in ("self", "cls"):
                    flags.append(f"imports {full} as {alias.asname}")
        elif isinstance(node, ast.Name):
            # the student's own names never excuse these: `def f(grading=None)` elsewhere changes nothing
            if node.id == _SHELL:
                flags.append(f"uses {_SHELL}")
            elif node.id in FORBIDDEN_MODULES:
                flags.append(f"uses {node.id}")
            elif node.id in _MACHINERY:
                flags.append(f"uses {node.id} (the test machinery)")
            elif node.id.startswith("__") or node.id.startswith("_") and node.id not in own:
                flags.append(f"uses the name {node.id}, which it did not define")
            elif node.id in _FORBIDDEN_CALLS | _NAME_CALLS and id(node) not in called and node.id not in own:
                flags.append(f"uses {node.id} without calling it")
            if node.id in ("self", "cls") and isinstance(node.ctx, (ast.Store, ast.Del)):
                flags.append(f"assigns {node.id}, which stands for the student's own object")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_MODULES or node.attr == _SHELL:
                flags.append(f"reaches {ast.unparse(node)}")
            elif node.attr in _MACHINERY:
                flags.append(f"reaches {ast.unparse(node)} (the test machinery)")
            elif node.attr.startswith("_") and not _is_own(node.value) and node.attr not in _HARMLESS_DUNDERS:
                flags.append(f"reads the private attribute {ast.unparse(node)}")
            if not _is_own(node.value):
                answer(node.attr, f"refers to {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if text in FORBIDDEN_MODULES or text in _MACHINERY or text == _SHELL:
                flags.append(f"names {text!r} in a string")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in own:
            func = node.func.id
            if func in _FORBIDDEN_CALLS:
                flags.append(f"calls {func}()")
            if func in _NAME_CALLS:
                attr = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
                    flags.append(f"calls {func}() with a name that is not a literal string")
                else:
                    answer(attr.value, f"names {attr.value!r} in {func}()")
                    if attr.value.startswith("_") and not (node.args and _is_own(node.args[0])):
                        flags.append(f"calls {func}() on the private attribute {attr.value!r}")
                if func in ("setattr", "delattr") and node.args and not _is_own(node.args[0]):
                    flags.append(f"{func} on {ast.unparse(node.args[0])}")
        if isinstance(node, (ast.Assign, ast.Delete, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:  # `plt.rcParams[...] = ...` sets a value, not a module attribute
                for t in ast.walk(target) if isinstance(target, (ast.Tuple, ast.List)) else [target]:
                    if isinstance(t, ast.Attribute) and _root_name(t) in modules:
                        flags.append(f"assigns {ast.unparse(t)}")
    return flags


def _check_import(module: str, policy: Policy, flags: list[str]) -> None:
    top = module.split(".")[0]
    if top in FORBIDDEN_MODULES or any(part in FORBIDDEN_MODULES for part in module.split(".")):
        flags.append(f"imports {module}")
    elif not policy.allows_import(module):
        flags.append(f"imports {module}, which this assignment does not allow")
    elif re.search(r"(^|\.)_", module):
        flags.append(f"imports the private module {module}")
