"""Frozen records of registered components and the ``register`` callables handed to hooks."""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import inspect
import re
import reprlib
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from optiflow.config import ComponentSpec
from optiflow.errors import OptiflowError
from optiflow.slots import FAMILY_KINDS, KINDS, SLOTS, family_of
from optiflow.values import MAX_INT, coerce, dashed_name, key_name, type_name

#: how deep components may nest in options: ``sam:base=[lookahead:inner=[sgd]]`` nests 2 levels
MAX_NESTING = 32
_NESTING = contextvars.ContextVar("optiflow_nesting", default=0)


class NestedTooDeep(OptiflowError):
    """A spec nests components in options deeper than :data:`MAX_NESTING` (refused before Python's stack is)."""


@dataclass(frozen=True)
class Option:
    """One keyword option a component accepts: its type, default and allowed choices."""

    name: str  #: the keyword the factory takes
    type: object  #: what a value is coerced to: ``float``, ``int``, ``bool``, ``str``, ``tuple[int, ...]``, unions
    default: object = None  #: the factory's default
    choices: tuple[object, ...] | None = None  #: the allowed values of a ``Literal[...]`` option, else None
    #: the kind of component the value names (an option annotated ``Annotated[Nested, "optimizer"]``), else None
    component_kind: str | None = None

    @property
    def type_name(self) -> str:
        """How ``optiflow list`` and errors name the type: ``float``, ``a|b``, ``list of int``, ``optimizer spec``."""
        if self.choices:
            return "|".join(map(str, self.choices))
        if self.component_kind:
            return f"{self.component_kind} spec"
        return type_name(self.type)

    def coerce(self, value: object, owner: str = "", registry: Registry | None = None) -> object:
        """Convert a raw CLI string or YAML value to this option's type, or raise OptiflowError; an option naming a
        component (``component_kind``) becomes a :class:`Nested`, found in ``registry``."""
        if self.component_kind:
            return self._nested(value, owner, registry)
        try:
            result = coerce(self.type, value)
        except (TypeError, ValueError):
            raise OptiflowError(
                f"{owner}: option '{self.name}' expects {self.type_name}, got {reprlib.repr(value)}"
            ) from None
        except OverflowError:
            raise OptiflowError(
                f"{owner}: option '{self.name}' holds a number beyond +-{MAX_INT}, got {reprlib.repr(value)}"
            ) from None
        if self.choices and result not in self.choices:
            raise OptiflowError(
                f"{owner}: option '{self.name}' must be one of {', '.join(map(str, self.choices))}; got {reprlib.repr(value)}"
            )
        return result


    def _nested(self, value: object, owner: str, registry: Registry | None) -> Nested:
        kind = self.component_kind
        if isinstance(value, Nested) and value.component.kind == kind:
            return value
        if registry is None:
            raise OptiflowError(f"{owner}: option '{self.name}' names a {kind}: build the component from "
                                "get_registry(), which finds it")
        depth = _NESTING.get() + 1
        if depth > MAX_NESTING:
            raise NestedTooDeep(f"{owner}: components nested too deep in option '{self.name}' "
                                f"(at most {MAX_NESTING} levels)")
        token = _NESTING.set(depth)
        try:
            spec = ComponentSpec.parse(value)
            component = registry.get(str(kind), spec.name)
            return Nested(component, component.resolve_options(spec.options))
        except NestedTooDeep:
            raise
        except OptiflowError as exc:
            raise OptiflowError(f"{owner}: option '{self.name}': {exc}") from None
        finally:
            _NESTING.reset(token)


@dataclass(frozen=True)
class Nested:
    """The value of an option that is itself a component, ``sam:base=[sgd:momentum=0.9,nesterov=true]``: the
    component chosen and its typed options.  A factory declares such an option ``base: Annotated[Nested,
    "optimizer"] = "sgd"`` and gets this, validated like any option, to build with ``base.build(model)``."""

    component: Component  #: the component the option names
    options: dict[str, Any] = field(default_factory=dict)  #: its typed options, defaults filled

    @property
    def name(self) -> str:
        """The chosen component's name."""
        return self.component.name

    def build(self, *context: object) -> Any:
        """The chosen component's factory called with ``context`` (what its kind takes: a model ...) and the options."""
        return self.component.factory(*context, **self.options)

    def __str__(self) -> str:
        return str(ComponentSpec(self.name, self.options))


def flat_options(prefix: str, options: dict[str, Any]) -> dict[str, Any]:
    """``{prefix.option: value}``; a :class:`Nested` option as ``prefix.option=name`` plus its own options the same
    way (``opt.base=sgd``, ``opt.base.momentum=0.9``): how a run logs its components' options."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Nested):
            flat[f"{prefix}.{key}"] = value.name
            flat.update(flat_options(f"{prefix}.{key}", value.options))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


@dataclass(frozen=True)
class Component:
    """A named, registered component: what it is, how to build it, where it came from."""

    kind: str  #: what it is: ``optimizer``, ``model``, ``activation`` ... (``optiflow.slots.KINDS``)
    name: str  #: what users type; ``plugin/name`` when another plugin had the name (or ``namespaced_only``)
    factory: Callable[..., Any]  #: builds it: ``factory(*context of its kind, **options)``
    description: str  #: one line, by default the factory's first docstring line
    options: tuple[Option, ...]  #: the factory's keyword-only parameters, typed
    plugin: str  #: the name of the plugin that registered it
    aliases: tuple[str, ...] = ()  #: other names it answers to
    #: registered with ``namespaced_only=True``: answers to ``plugin/name`` (and ``plugin/alias``) only, never
    #: to a bare name, so reusing another plugin's name on purpose is no clash
    namespaced_only: bool = False
    #: the registry holding it, where options naming a component (:class:`Nested`) find theirs
    registry: Registry | None = field(default=None, compare=False, repr=False)

    @property
    def defaults(self) -> dict[str, Any]:
        """``{option: default}`` as declared."""
        return {o.name: o.default for o in self.options}

    def resolve_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Typed options: the declared defaults updated with ``raw`` (validated)."""
        known = {o.name: o for o in self.options}
        resolved = self.defaults
        owner = f"{self.kind} '{self.name}'"
        for option in self.options:  # a component's default is a spec too: it is found and typed
            if option.component_kind and option.default is not None and option.name not in raw:
                resolved[option.name] = option.coerce(option.default, owner, self.registry)
        for key, value in raw.items():
            key = key_name(key)
            if key not in known:
                valid = ", ".join(known) or "none"
                hint = _suggest(key, known)
                raise OptiflowError(
                    f"{self.kind} '{self.name}' has no option '{key}'{hint}; valid options: {valid}"
                )
            resolved[key] = known[key].coerce(value, owner, self.registry)
        return resolved

    def build(self, *context: object, **options: object) -> Any:
        """Call the factory with the context arguments and the resolved options."""
        return self.factory(*context, **self.resolve_options(options))


@dataclass
class Registry:
    """All components by kind; filled by the registration hooks."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    aliases: dict[str, dict[str, str]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    #: (plugin, one line) for each name a plugin registered that another plugin already had
    clashes: list[tuple[str, str]] = field(default_factory=list)
    #: plugins that were skipped (failed to load or register): unknown names point at them
    skipped: list[str] = field(default_factory=list)

    def registrar(self, family: str, plugin: str) -> Callable[..., Component]:
        """The ``register`` callable handed to one plugin's registration hook of ``family``:
        it accepts only that family's kinds (the first is the default)."""
        kinds = FAMILY_KINDS[family]

        def register(
            name: str,
            factory: Callable[..., Any],
            description: str | None = None,
            *,
            kind: str | None = None,
            aliases: tuple[str, ...] | list[str] = (),
            namespaced_only: bool = False,
        ) -> Component:
            kind = kind or kinds[0]
            if kind not in KINDS:
                raise OptiflowError(f"plugin '{plugin}' registered '{name}' under unknown kind '{kind}'")
            if kind not in kinds:
                raise OptiflowError(
                    f"plugin '{plugin}' registered {kind} '{name}' from {family_of(kinds[0]).hook}; "
                    f"a {kind} is registered from {family_of(kind).hook}"
                )
            doc = (inspect.getdoc(factory) or "").strip().splitlines()
            component = Component(
                kind=kind,
                name=name,
                factory=factory,
                description=description or (doc[0] if doc else ""),
                options=_with_core_options(kind, options_of(factory, owner=f"{kind} '{name}'")),
                plugin=plugin,
                aliases=tuple(aliases),
                namespaced_only=namespaced_only,
            )
            return self.add(component)

        return register

    def add(self, component: Component) -> Component:
        """Add ``component`` and return it as stored.  A name (or alias) another plugin already
        has stays that plugin's: the newcomer keeps its other names and is always reachable as
        ``plugin/name``; the clash is recorded in ``clashes``.  A plugin registering one name
        twice is an error.  A ``namespaced_only`` component takes ``plugin/name`` alone: no bare name, no
        clash."""
        kind, table = component.kind, self.components[component.kind]
        component = replace(component, registry=self)
        if component.namespaced_only:
            self._refuse_twice(component)
            component = replace(component, name=f"{component.plugin}/{component.name}")
            table[component.name] = component
            return component
        taken = {name: found for name in (component.name, *component.aliases)
                 if (found := self._lookup(kind, name)) is not None}
        for name, existing in taken.items():
            if existing.plugin == component.plugin:
                raise OptiflowError(f"duplicate {kind} '{name}': registered twice by plugin '{component.plugin}'")
        self._refuse_twice(component)
        if taken:
            component = replace(component, aliases=tuple(a for a in component.aliases if a not in taken))
            if component.name in taken:
                component = replace(component, name=f"{component.plugin}/{component.name}")
            for name, existing in taken.items():
                self.clashes.append((component.plugin, _clash_line(kind, name, existing.plugin, component)))
        table[component.name] = component
        for alias in component.aliases:
            self.aliases[kind][alias] = component.name
        return component

    def _refuse_twice(self, component: Component) -> None:
        """A plugin registering one ``plugin/name`` twice, once namespaced-only, is an error."""
        for name in (component.name, *component.aliases):
            found = self._qualified(component.kind, f"{component.plugin}/{name}")
            if found is not None and (found.namespaced_only or component.namespaced_only):
                raise OptiflowError(f"duplicate {component.kind} '{component.plugin}/{name}': registered twice by "
                                    f"plugin '{component.plugin}'")

    def remove_plugin(self, plugin: str) -> None:
        """Drop every component a plugin registered (used when a plugin fails half-way)."""
        for kind, table in self.components.items():
            for name in [n for n, c in table.items() if c.plugin == plugin]:
                del table[name]
            self.aliases[kind] = {a: n for a, n in self.aliases[kind].items() if n in table}
        self.clashes = [(owner, line) for owner, line in self.clashes if owner != plugin]

    def _lookup(self, kind: str, name: str) -> Component | None:
        table = self.components[kind]
        return table.get(name) or table.get(self.aliases[kind].get(name, ""))

    def _qualified(self, kind: str, name: str) -> Component | None:
        """``plugin/name``: the component ``name`` (or alias) that ``plugin`` registered."""
        plugin, _, bare = name.partition("/")
        return next((c for c in self.components[kind].values()
                     if plugin_key(c.plugin) == plugin_key(plugin) and bare in (c.name.rpartition("/")[2], *c.aliases)), None)

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` (or ``plugin/name``) of ``kind``, or an OptiflowError naming close
        matches and the plugins that were skipped."""
        found = self._lookup(kind, name) or self._lookup(kind, dashed_name(name))
        if found is None and "/" in name:
            found = self._qualified(kind, name) or self._qualified(kind, dashed_name(name))
        if found is None:
            names = sorted([*self.components[kind], *self.aliases[kind]])
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            skipped = (f". Plugin {', '.join(repr(p) for p in self.skipped)} was skipped: see the warning above "
                       "or `optiflow plugins`" if self.skipped else "")
            raise OptiflowError(
                f"unknown {kind} '{name}'.{hint} Available: {', '.join(sorted(self.components[kind]))}{skipped}"
            )
        return found

    def select(self, kind: str | None = None, pattern: str = "*") -> list[Component]:
        """Components of ``kind`` (every kind when None) whose names match the glob ``pattern``, by name."""
        kinds = [kind] if kind else KINDS
        return [
            c
            for k in kinds
            for c in sorted(self.components[k].values(), key=lambda c: c.name)
            if fnmatch.fnmatch(c.name, pattern)
        ]

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])


def options_of(factory: Callable[..., Any], owner: str = "") -> tuple[Option, ...]:
    """The keyword-only parameters of ``factory`` as typed options.

    A positional parameter with a default would silently not be an option, so it is an
    error naming the parameter: options go after ``*`` in the signature.
    """
    options = []
    for param in inspect.signature(factory).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            if param.default is not inspect.Parameter.empty and param.kind is not inspect.Parameter.VAR_KEYWORD:
                raise OptiflowError(
                    f"{owner or getattr(factory, '__name__', 'factory')}: parameter '{param.name}' has a default but "
                    "is not keyword-only; put options after '*' in the factory's signature"
                )
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        annotation = annotation_of(factory, param)
        if annotation is inspect.Parameter.empty:
            annotation = type(default) if default is not None else str
        choices, component_kind = None, None
        if typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            annotation = type(choices[0])
        elif typing.get_origin(annotation) is Annotated and typing.get_args(annotation)[0] is Nested:
            annotation, component_kind = Nested, _nested_kind(typing.get_args(annotation)[1:], owner, param.name)
        options.append(Option(param.name, annotation, default, choices, component_kind))
    return tuple(options)


def annotation_of(function: Callable[..., Any], param: inspect.Parameter) -> object:
    """A parameter's annotation, evaluated lazily so plugins need not import torch to register;
    ``inspect.Parameter.empty`` when it has none or it names what ``function``'s module does not hold."""
    annotation = param.annotation
    if isinstance(annotation, str):
        module = sys.modules.get(getattr(function, "__module__", None) or "")  # a class has no __globals__
        namespace = {**vars(typing), **getattr(inspect.unwrap(function), "__globals__", vars(module or typing))}
        try:
            annotation = eval(annotation, namespace)  # noqa: S307 - the plugin's own annotation text
        except Exception:
            annotation = inspect.Parameter.empty
    return annotation


def _nested_kind(metadata: tuple[object, ...], owner: str, option: str) -> str:
    """The kind ``Annotated[Nested, "optimizer"]`` names; an unknown one is the plugin's error."""
    kind = metadata[0] if metadata else None
    if kind not in KINDS:
        raise OptiflowError(f"{owner}: option '{option}' is Annotated[Nested, KIND] with KIND one of "
                            f"{', '.join(KINDS)}; got {kind!r}")
    return str(kind)


#: the option every scheduler takes; the core adds it to schedulers that do not declare it (and
#: optiflow.schedule applies it)
WARMUP_OPTION = "warmup_epochs"


def _with_core_options(kind: str, options: tuple[Option, ...]) -> tuple[Option, ...]:
    """Every scheduler takes :data:`WARMUP_OPTION`: the core adds it (and applies it) where the factory lacks it."""
    if kind != "scheduler" or any(o.name == WARMUP_OPTION for o in options):
        return options
    return (*options, Option(WARMUP_OPTION, int, 0))


def _clash_line(kind: str, name: str, owner: str, newcomer: Component) -> str:
    """One line saying which plugin keeps ``name`` and how to pick the other one."""
    flag = next((f"--{slot.key} " for slot in SLOTS if slot.kind == kind), "")
    bare = newcomer.name.rpartition("/")[2]
    pick = f"{flag}{newcomer.plugin}/{bare}" if newcomer.name.endswith(f"/{name}") else f"{flag}{newcomer.name}"
    return (f"{kind} '{name}' is registered by plugin '{owner}' and again by plugin '{newcomer.plugin}': "
            f"'{name}' stays plugin '{owner}'s; use {pick} for plugin '{newcomer.plugin}'s")


def plugin_key(name: str) -> str:
    """Plugin and distribution names compare like package names: case and ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _suggest(word: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
