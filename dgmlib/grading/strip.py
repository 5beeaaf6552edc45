"""dgmlib without the answers: the library a judged assignment's kernel imports.

When an assignment is judged in the grader (``solutions/ASSIGNMENT/judge.py``), nothing in the kernel
needs dgmlib's reference for the names the students write, and a kernel that has it can call it, read
its source or copy its code objects. So ``dgm grade`` makes, once per assignment, a copy of the installed
dgmlib package in which every declared answer (``review.Policy.answers``, all groups) is withheld, and the
sandbox mounts that copy at the package's own path (``DGM_STRIPPED_LIBRARY``,
``dgmlib.grading.sandbox``): whatever route the kernel takes to ``import dgmlib``, it gets the copy.

How an answer is withheld (``strip_source``; the module is rewritten with ``ast``):

- a function (``dgmlib.vq.nearest_code``): the same ``def`` and signature, no decorators and no docstring,
  whose body calls ``_dgm_withheld("dgmlib.vq.nearest_code")``, which raises ``RuntimeError("... is withheld
  while grading: write your own")``; the helper is written into each rewritten module;
- a class (``dgmlib.flows.AffineCoupling``): the same ``class`` statement with its bases and keywords
  (``isinstance``, ``issubclass`` and dgmlib's own subclasses still work), whose whole body is an
  ``__init__`` that raises (a ``NamedTuple``, which cannot define one, gets a raising ``__new__`` after it);
- a method (``dgmlib.vae.VAE.elbo``): its body becomes the raise; ``staticmethod``, ``classmethod`` and
  ``property`` decorators stay, others go. An inherited method is withheld where it is defined, in the
  first base class of the same module that defines it (``VAE.elbo`` is ``LatentVariableModel.elbo``, so
  ``HierarchicalVAE.elbo`` goes with it).

Aliases (``MaskedConv2d`` imported by ``dgmlib.vae``) point to the stripped object and stay. Names outside
dgmlib (``torch.func.jacrev``), names that are not a ``def`` or ``class`` of their module (re-exports
such as ``dgmlib.units.dequantized_nll``), and modules are left alone. A rewritten module is printed back
by ``ast.unparse``: its comments go with the bodies, so nothing of an answer's text remains. Bytecode
caches are not copied (they hold the original bodies); the copy is compiled afresh.
Source: the course's issue 26.
"""

from __future__ import annotations

import ast
import compileall
import shutil
from collections.abc import Iterable
from pathlib import Path

import dgmlib

__all__ = ["stripped_copy", "strip_source", "WITHHELD"]

WITHHELD = "_dgm_withheld"
"""Name of the raising helper written into every rewritten module."""

_HELPER = (f"def {WITHHELD}(name):\n"
           f"    raise RuntimeError(f'{{name}} is withheld while grading: write your own')\n")
_DESCRIPTORS = frozenset({"staticmethod", "classmethod", "property"})


def stripped_copy(answers: Iterable[str], dest: Path) -> Path:
    """Copy the installed dgmlib package to ``dest/dgmlib`` with every answer in ``answers`` withheld.

    Args:
        answers: dotted names (``"dgmlib.flows.AffineCoupling"``, ``"dgmlib.vae.VAE.elbo"``); those outside
            dgmlib or not defined by a ``def`` or ``class`` of their module are ignored.
        dest: the folder to put the copy in (``DGM_STRIPPED_LIBRARY``); an older copy there is replaced.

    Returns:
        the copied package folder, ``dest/dgmlib``.

    Raises:
        OSError: if the copy cannot be written.
    """
    package = Path(dgmlib.__file__).resolve().parent
    target = Path(dest) / "dgmlib"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    for path, names in _by_module(answers, target).items():
        source = path.read_text()
        stripped = strip_source(source, names)
        if stripped != source:
            path.write_text(stripped)
    compileall.compile_dir(target, quiet=2)  # the kernel cannot write its caches: spare it the compiling
    return target


def _by_module(answers: Iterable[str], package: Path) -> dict[Path, dict[str, str]]:
    """Module file -> {qualified name in it -> answer}, for the answers that name something of dgmlib."""
    found: dict[Path, dict[str, str]] = {}
    for answer in answers:
        parts = answer.split(".")
        if parts[0] != "dgmlib":
            continue
        for i in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module of the package
            inside = parts[1:i]
            modules = [package.joinpath(*inside, "__init__.py")]
            if inside:
                modules.append(package.joinpath(*inside[:-1], inside[-1] + ".py"))
            module = next((m for m in modules if m.is_file()), None)
            if module is not None:
                found.setdefault(module, {})[".".join(parts[i:])] = answer
                break
    return found


def strip_source(source: str, names: dict[str, str]) -> str:
    """``source`` with each qualified name of ``names`` (``"f"``, ``"C"``, ``"C.method"``) withheld.

    Args:
        source: a module's source.
        names: qualified name in the module -> the answer's full name, for the error message.

    Returns:
        the rewritten module (``ast.unparse``), or ``source`` itself if it defines none of the names.

    Raises:
        SyntaxError: if ``source`` does not parse.
    """
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    wanted = {_defining(tuple(q.split(".")), classes): full for q, full in names.items()}
    if not _strip_body(tree.body, (), wanted):
        return source
    at = 1 if tree.body and _is_docstring(tree.body[0]) else 0
    while at < len(tree.body) and isinstance(tree.body[at], ast.ImportFrom) and tree.body[at].module == "__future__":
        at += 1
    tree.body[at:at] = ast.parse(_HELPER).body
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def _defining(key: tuple[str, ...], classes: dict[str, ast.ClassDef]) -> tuple[str, ...]:
    """Where the method ``C.m`` is defined: in ``C``, else in the first of its bases, defined in the same
    module, that defines it (``VAE.elbo`` is ``LatentVariableModel.elbo``); other names unchanged."""
    if len(key) != 2 or key[0] not in classes:
        return key
    todo, seen = [key[0]], set()
    while todo:
        name = todo.pop(0)
        if name in seen or name not in classes:
            continue
        seen.add(name)
        node = classes[name]
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == key[1] for n in node.body):
            return (name, key[1])
        todo += [b.id for b in node.bases if isinstance(b, ast.Name)]
    return key


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _raise(full: str) -> list[ast.stmt]:
    return [ast.Expr(ast.Call(ast.Name(WITHHELD, ast.Load()), [ast.Constant(full)], []))]


def _strip_body(body: list[ast.stmt], prefix: tuple[str, ...], wanted: dict[tuple[str, ...], str]) -> bool:
    """Withhold, in place, the definitions of ``body`` (a module's or a class's) named in ``wanted``."""
    changed = False
    i = 0
    while i < len(body):
        node = body[i]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            key = prefix + (node.name,)
            if key in wanted and isinstance(node, ast.ClassDef):
                replacement = _withheld_class(node, wanted[key])
                body[i:i + 1] = replacement
                i += len(replacement) - 1
                changed = True
            elif key in wanted:
                node.body = _raise(wanted[key])
                node.decorator_list = [d for d in node.decorator_list if prefix and _is_descriptor(d)]
                changed = True
            elif isinstance(node, ast.ClassDef) and any(k[:len(key)] == key for k in wanted):
                changed |= _strip_body(node.body, key, wanted)
        i += 1
    return changed


def _is_descriptor(decorator: ast.expr) -> bool:
    """``@staticmethod``, ``@classmethod``, ``@property`` and ``@x.setter``-like: part of a method's signature."""
    if isinstance(decorator, ast.Name):
        return decorator.id in _DESCRIPTORS
    return isinstance(decorator, ast.Attribute) and decorator.attr in ("setter", "getter", "deleter")


def _withheld_class(node: ast.ClassDef, full: str) -> list[ast.stmt]:
    """The class statement with its bases, and nothing of its body but a raising constructor."""
    named_tuple = any(isinstance(b, ast.Name) and b.id == "NamedTuple"
                      or isinstance(b, ast.Attribute) and b.attr == "NamedTuple" for b in node.bases)
    if named_tuple:  # typing.NamedTuple refuses __init__ and __new__ in the body
        node.body, node.decorator_list = [ast.Pass()], []
        after = ast.parse(f"{node.name}.__new__ = staticmethod(lambda cls, *args, **kwargs: {WITHHELD}({full!r}))")
        return [node, *after.body]
    init = ast.parse("def __init__(self, *args, **kwargs):\n    pass").body[0]
    init.body = _raise(full)
    node.body, node.decorator_list = [init], []
    return [node]
