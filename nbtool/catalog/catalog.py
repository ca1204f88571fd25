"""The registered models and where each is placed, kept in step with their files.

A :class:`Catalog` turns ``register(name, model, ...)`` into a checked
:class:`~nbtool.wire.ModelSpec` placed on workers; re-registers a model whose file changed
(its old copies marked for the loads to unload first); and keeps what a model's first load taught about it (its
input and outputs), so no later run loads it just to learn them.

Example:
    >>> catalog = Catalog(pool, work_dir)                     # doctest: +SKIP
    >>> catalog.register("cnn", "models/cnn.keras").format    # doctest: +SKIP
    'keras'
    >>> catalog.placement["cnn"]                              # doctest: +SKIP
    ['cpu0', 'cpu1']
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any, Iterable

from nbtool._util import warn_user
from nbtool.catalog.placement import is_auto, place_all, placed_with
from nbtool.catalog.registration import (ModelOptions, check_backend_support, check_name,
    find_models, inspect_model)
from nbtool.errors import InvalidOption, ModelNotFound, NbtoolError
from nbtool.tables import ModelRow, model_rows
from nbtool.wire import ModelSpec, ModelState, WorkerStatus, content_digest, file_fingerprint

#: The options a user gave at registration: a changed file is registered again with them.
OPTIONS = ("device", "replicas", "batch_size", "preprocess", "trusted", "precision",
           "runtime")


class Catalog:
    """The registry (specs by name), the placement (workers by model name) and what loads
    taught: data only. It never talks to workers: a model whose registration it replaced
    is kept in ``replaced`` until :class:`~nbtool.catalog.loads.Loads` drops its old copies.

    ``pool`` is the engine's :class:`~nbtool.engine.pool.WorkerPool`, read for the
    workers placement may use (their names, devices and budgets).

    Example:
        >>> catalog.specs(["cnn"])[0].name   # doctest: +SKIP
        'cnn'
    """

    def __init__(self, pool, work_dir: Path):
        self.pool = pool
        self.work_dir = Path(work_dir)
        # Models whose old copies workers may still hold (replaced, or their file is gone):
        # the loads drop them before anything else is scheduled.
        self.replaced: set[str] = set()
        self.registry = Registry()
        # model -> the workers it may run on (an auto model's main one first)
        self.placement: dict[str, list[str]] = {}
        self.on_change = lambda: None   # a persistent engine keeps both beside its cluster

    def specs(self, names: Iterable[str]) -> list[ModelSpec]:
        """The registered specs of ``names`` (an unknown name raises ModelNotFound).

        Example:
            >>> [s.format for s in catalog.specs(["cnn", "mlp"])]   # doctest: +SKIP
            ['keras', 'h5']
        """
        return [self.registry.get(n) for n in names]

    # -- registering ---------------------------------------------------------------------
    def register(self, name: str, model: Any, options: ModelOptions = ModelOptions()) -> ModelSpec:
        """Register ``model`` (a path or a Keras model object) under ``name`` with
        ``options`` (documented on :meth:`nbtool.engine.Engine.register`).

        Example:
            >>> catalog.register("cnn", "models/cnn.keras", ModelOptions(device="gpu:0"))  # doctest: +SKIP
        """
        # Everything is checked before a model object is saved under the name.
        check_name(name, model if isinstance(model, (str, os.PathLike)) else None)
        options = options.checked(name)
        path = self.model_path(name, model)
        spec = inspect_model(name, path, **vars(options))   # vars: shallow (a Preprocess stays one)
        if spec.precision and spec.format in ("tflite", "savedmodel"):
            # Mixed precision rebuilds a Keras model; silently running float32 instead
            # would report a precision that was never used.
            raise InvalidOption(name, "precision", options.precision,
                                "None for a .tflite or SavedModel (mixed precision rebuilds "
                                "a Keras model; these are not Keras models)",
                                "precision=None, or register the .keras/.h5 original")
        return self.add(spec)

    def register_dir(self, folder, options: ModelOptions = ModelOptions()) -> list[ModelSpec]:
        """Register the models in ``folder`` with ``options``, largest first; a file that
        cannot be read is skipped with a warning (documented on
        :meth:`nbtool.engine.Engine.register_dir`).

        Example:
            >>> [s.name for s in catalog.register_dir("models/")]   # doctest: +SKIP
            ['cnn', 'mlp', 'exported']
        """
        options = options.checked(None)
        found = find_models(folder)
        if not found:
            raise NbtoolError(f"folder {folder}: no models found; expected .keras, .h5 "
                              "or .tflite files or SavedModel directories inside. Fix: save "
                              "models there with model.save('folder/name.keras').")
        specs, problems = [], []
        for n, p in found.items():
            try:
                spec = inspect_model(n, p, **vars(options))
                check_backend_support(spec, {w.backend for w in self.pool.workers.values()})
                specs.append(spec)
            except NbtoolError as e:   # one bad file must not cost the user the others
                problems.append(e)
        if problems and not specs:
            raise problems[0]
        for e in problems:
            warn_user(f"skipped: {e}")
        specs.sort(key=lambda s: -s.size_bytes)
        return [self.add(s) for s in specs]

    def model_path(self, name: str, model: Any) -> str:
        """The path of ``model``: itself, or where a Keras model object was saved.

        Example:
            >>> catalog.model_path("fresh", trained_model)   # doctest: +SKIP
            '/tmp/nbtool-x1y2/fresh.keras'
        """
        if isinstance(model, (str, os.PathLike)):
            return str(model)
        if hasattr(model, "save") and hasattr(model, "inputs"):   # a Keras model object
            path = self.work_dir / f"{name}.keras"   # name is checked: stays in work_dir
            # Saved aside, then moved: a worker loading the previous one never reads half.
            aside = Path(tempfile.mkdtemp(dir=self.work_dir, prefix=".saving-"))
            try:
                model.save(aside / path.name)
                os.replace(aside / path.name, path)
            finally:
                shutil.rmtree(aside, ignore_errors=True)
            return str(path)
        raise TypeError(f"model {name!r}: expected a path to a .keras, .h5 or .tflite file "
                        f"or a SavedModel directory, or a Keras model; got "
                        f"{type(model).__name__}.")

    def add(self, spec: ModelSpec) -> ModelSpec:
        """Place ``spec`` and register it; a changed registration unloads the old copies.

        Registering the same file with the same options again is a no-op (what its loads
        taught is kept).

        Example:
            >>> catalog.add(inspect_model("cnn", "models/cnn.keras"))   # doctest: +SKIP
        """
        old = self.registry.get(spec.name) if spec.name in self.registry else None
        if old is not None and old == with_learned(spec, old):
            return old
        # Place first: if that fails, the old registration stays as it was.
        placement = placed_with(spec, {s.name: s for s in self.registry}, self.placement,
                                self.pool.workers.values())
        check_backend_support(spec, {self.pool.workers[w].backend for w in placement[spec.name]})
        gpus = [w for w in placement[spec.name] if self.pool.workers[w].kind == "gpu"]
        # nbtool runs OpenVINO and converted LiteRT models on CPUs only.
        if spec.runtime in ("openvino", "litert") and spec.format != "tflite" and gpus:
            raise InvalidOption(spec.name, "runtime", spec.runtime, "a CPU worker for "
                                f"{spec.runtime!r} (device={spec.device!r} placed it on GPU "
                                f"worker(s) {', '.join(gpus)})", "device='cpu' with "
                                f"runtime={spec.runtime!r}, or runtime='auto' on a GPU")
        if old is not None:   # replaced: the old copies must not keep serving
            self.replaced.add(spec.name)
        self.registry.add(spec)
        self.set_placement(placement)
        return spec

    def replan(self) -> dict[str, list[str]]:
        """Place the auto models again (the workers or their budgets changed); returns
        the placement.

        Example:
            >>> eng.set_memory_budget("2GB"); catalog.replan()   # doctest: +SKIP
            {'cnn': ['cpu0'], 'mlp': ['cpu1']}
        """
        specs = {s.name: s for s in self.registry}
        known = set(self.pool.workers)
        kept = {n: ws for n, ws in self.placement.items() if n in specs and set(ws) <= known}
        self.set_placement(place_all(specs, kept, self.pool.workers.values()))
        return self.placement

    def set_placement(self, placement: dict[str, list[str]]) -> None:
        """Make ``placement`` the placement, in the same dict (others hold it)."""
        self.placement.clear()
        self.placement.update(placement)
        self.on_change()

    def model_rows(self, statuses: dict[str, WorkerStatus]) -> list[ModelRow]:
        """The rows of ``eng.models()`` (and the dashboard's) from the workers' statuses:
        an auto model's device says where it may run, ``auto: cpu0, cpu1``.

        Example:
            >>> catalog.model_rows(eng.status())[0].devices   # doctest: +SKIP
            ['auto: cpu0, cpu1']
        """
        devices = {n: w.device for n, w in self.pool.workers.items()}
        rows = model_rows(list(self.registry), self.placement, devices, statuses)
        for row in rows:
            spec = self.registry.get(row.name)
            if is_auto(spec.replicas, spec.device):
                row.devices = ["auto: " + ", ".join(self.placement.get(row.name, []))]
        return rows

    def take_replaced(self) -> list[str]:
        """The models whose old copies must go (see ``replaced``), forgotten here.

        Example:
            >>> catalog.take_replaced()   # doctest: +SKIP
            ['cnn']
        """
        names, self.replaced = sorted(self.replaced), set()
        return names

    def refresh_changed(self, names: Iterable[str]) -> None:
        """Re-register every model among ``names`` whose file changed since it was
        registered (same options, signature read again), with a warning; the old copies
        are marked ``replaced``, for the loads to unload from every worker before anything
        else is scheduled (:meth:`~nbtool.catalog.loads.Loads.refresh`).

        A stat per model: cheap enough for every run and load. A file gone or broken
        now raises here, clearly, instead of serving the copy still in memory.

        Example:
            >>> catalog.refresh_changed(["cnn"])   # doctest: +SKIP
        """
        for name in dict.fromkeys(names):
            spec = self.registry.get(name)
            now = file_fingerprint(spec.path) if os.path.exists(spec.path) else "missing"
            if now == spec.fingerprint:
                continue
            if now != "missing" and spec.content \
                    and content_digest(spec.path, now) == spec.content:
                # Touched, chmod-ed or copied back: the same bytes are the same model.
                self.registry.add(dataclasses.replace(spec, fingerprint=now))
                self.on_change()
                continue
            options = {f: getattr(spec, f) for f in OPTIONS}
            try:
                changed = inspect_model(name, spec.path, **options)
            except NbtoolError:   # gone, broken or now refused: no old copy stays behind
                self.replaced.add(name)
                raise
            self.add(changed)
            warn_user(f"model {name!r} ({spec.path}) changed since it was registered; "
                      "using the new file (re-registered with the same options; the old "
                      "copies were unloaded from the workers).")

    # -- what loads teach ----------------------------------------------------------------
    def learn(self, name: str, state: ModelState) -> None:
        """Keep what a load of ``name`` measured about its signature: its input (known
        before for every format but SavedModels) and each output's row shape and dtype.

        Example:
            >>> catalog.learn("exported", eng.load("exported")["exported"]["cpu0"])  # doctest: +SKIP
            >>> catalog.registry.get("exported").output_specs   # doctest: +SKIP
            (((3,), 'float32'),)
        """
        spec = self.registry.get(name) if name in self.registry else None
        if spec is None or state.fingerprint not in (None, spec.fingerprint):
            return   # a copy of an older file: it says nothing about this one
        learned = learned_signature(spec, state)
        if learned != spec:
            self.registry.add(learned)
            self.on_change()


def learned_signature(spec: ModelSpec, state: ModelState) -> ModelSpec:
    """``spec`` with the signature a load reported where ``spec`` did not know it yet.

    Example:
        >>> spec = ModelSpec("m", "/m", "savedmodel", 1, "1-1")
        >>> state = ModelState("loaded", input_shape=(None, 8), input_dtype="float32",
        ...                    output_specs=[((3,), "float32")])
        >>> s = learned_signature(spec, state)
        >>> s.input_shape, s.n_outputs, s.output_specs
        ((None, 8), 1, (((3,), 'float32'),))
    """
    changes: dict[str, Any] = {}
    if spec.input_shape is None and state.input_shape:
        changes.update(input_shape=tuple(state.input_shape), input_dtype=state.input_dtype,
                       n_outputs=state.n_outputs)
    if not spec.inputs and state.inputs:
        first = state.inputs[0]
        changes.update(inputs=tuple(state.inputs), input_shape=first.shape,
                       input_dtype=first.dtype, n_inputs=len(state.inputs),
                       n_outputs=state.n_outputs)
    if spec.output_specs is None and state.output_specs is not None:
        changes["output_specs"] = tuple((tuple(shape), str(dtype))
                                        for shape, dtype in state.output_specs)
        if changes.get("n_outputs", spec.n_outputs) is None:   # a graph says it only so
            changes["n_outputs"] = len(changes["output_specs"])
    return dataclasses.replace(spec, **changes) if changes else spec


def with_learned(spec: ModelSpec, old: ModelSpec) -> ModelSpec:
    """``spec`` (freshly inspected) with what ``old`` had learned, if it is the same file.

    Example:
        >>> old = ModelSpec("m", "/m", "keras", 1, "1-1", output_specs=(((3,), "float32"),))
        >>> with_learned(ModelSpec("m", "/m", "keras", 1, "1-1"), old) == old
        True
    """
    if spec.fingerprint != old.fingerprint or spec.path != old.path:
        return spec
    changes: dict[str, Any] = {"output_specs": old.output_specs}
    if spec.input_shape is None:
        changes.update(input_shape=old.input_shape, input_dtype=old.input_dtype)
    if not spec.inputs:
        changes.update(inputs=old.inputs, n_inputs=old.n_inputs)
    if spec.output_names is None:
        changes["output_names"] = old.output_names
    if spec.n_outputs is None:
        changes["n_outputs"] = old.n_outputs
    return dataclasses.replace(spec, **changes)


def model_names(models) -> list[str]:
    """Model names from names, lists of names, or both, flattened (None left out).

    Example:
        >>> model_names(["cnn", ["mlp", None], ("a", "b")])
        ['cnn', 'mlp', 'a', 'b']
    """
    out: list[str] = []
    for m in models:
        if m is None:
            continue
        if isinstance(m, str):
            out.append(m)
        else:
            out.extend(model_names(list(m)))
    return out


class Registry:
    """The registered models of one engine, by name.

    Example:
        >>> reg = Registry()
        >>> reg.names()
        []
        >>> reg.get("cnn")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nbtool.errors.ModelNotFound: no model named 'cnn' is registered; ...
        >>> reg.add(ModelSpec("cnn", "/m/cnn.keras", "keras", 1024, "1024-1"))  # None: new
        >>> reg.names(), "cnn" in reg, reg.remove("cnn").path, len(reg)
        (['cnn'], True, '/m/cnn.keras', 0)
    """

    def __init__(self):
        self._specs: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec) -> ModelSpec | None:
        """Add or replace a spec; returns the spec it replaced, if any."""
        old = self._specs.get(spec.name)
        self._specs[spec.name] = spec
        return old

    def remove(self, name: str) -> ModelSpec:
        """Forget a model; raises :class:`ModelNotFound` if it is not registered."""
        spec = self.get(name)
        del self._specs[name]
        return spec

    def get(self, name: str) -> ModelSpec:
        """The spec of a registered model, or a :class:`ModelNotFound` with suggestions."""
        try:
            return self._specs[name]
        except KeyError:
            raise ModelNotFound(name, list(self._specs)) from None

    def names(self) -> list[str]:
        """Registered model names, in registration order."""
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)
