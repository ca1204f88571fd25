"""``%nbtool`` and ``%%infer``: nbtool from notebook cells.

Loaded by ``%load_ext nbtool``. Options are declared with IPython's ``magic_arguments``, so
``%nbtool?`` and ``%%infer?`` print real help and unknown flags raise ``UsageError``.
Settings are traitlets: ``%config Nbtool.chunk_size = 2048``. Tab completion offers the
registered model names.

Example (in a notebook)::

    %load_ext nbtool
    %nbtool start --workers 2
    %nbtool register cnn models/cnn.keras --device auto
    %%infer cnn mlp --chunk-size 1024 --combine mean --labels y_test --out preds
    x_test
"""

from __future__ import annotations

import ast
import difflib

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Int, Unicode

from nbtool.errors import ModelNotFound, NbtoolError
from nbtool.notebook.magic_args import (backend_arg, batch_size_flag, check_choice, check_size,
    check_variable_name, device_option, gpus_arg, replicas_option, split_line, trusted_option,
    whole_number)


class EngineCommands:
    """``%nbtool start``, ``attach``, ``stop`` and ``running``.

    Example:
        >>> get_ipython().run_line_magic("nbtool", "start --persist")   # doctest: +SKIP
    """

    _started = None   # the engine %nbtool start or attach made (and may replace)

    @magic_arguments(name="nbtool start")
    @argument("--gpus", type=gpus_arg, default="auto", help="'auto' (every GPU NVML finds), "
              "'none' (CPU workers), or indices like 0,1")
    @argument("--workers", type=whole_number, default=None,
              help="CPU workers (default: one per core)")
    @argument("--address", default=None, help="an existing Dask scheduler, tcp://host:8786")
    @argument("--memory-budget", default=None, help="model memory per worker, e.g. 4GB")
    @argument("--backend", type=backend_arg, default=None, help="the Keras backend the "
              "workers run: tensorflow (default), jax or torch")
    @argument("--persist", action="store_true", help="run the cluster in a process of its "
              "own that outlives the kernel: after a restart, %%nbtool attach finds its "
              "models loaded (if it runs already, this attaches to it)")
    @argument("--name", default="default", help="the persistent engine's name (with "
              "--persist; default: default)")
    @argument("--idle-timeout", default=None, help="with --persist: end it after this long "
              "without a kernel attached, e.g. 30min (the default) or 2h")
    def _start(self, args):
        """Start the engine: a local cluster (one worker per GPU) or an existing one."""
        import nbtool

        # Refuse what can be refused before the old engine goes, so a typo does not cost it.
        check_size(args.memory_budget, "--memory-budget")
        if args.address is None:
            from nbtool._util import discover_gpus
            from nbtool.engine import select_gpus
            from nbtool.engine import check_backend

            select_gpus(args.gpus, discover_gpus())   # ValueError: a UsageError in nbtool()
            check_backend(args.backend)   # not installed: refused before the old one goes
        if args.persist:
            from nbtool.engine import idle_seconds

            idle_seconds(args.idle_timeout)
        old = self._let_go()   # re-running the cell restarts cleanly (a persistent one: detaches)
        eng = self._started = nbtool.start(
            address=args.address, gpus=args.gpus, n_workers=args.workers,
            memory_budget=args.memory_budget or self.memory_budget, backend=args.backend,
            persist=args.persist, name=args.name, idle_timeout=args.idle_timeout)
        self._bind(old, eng)
        return eng

    @magic_arguments(name="nbtool attach")
    @argument("name", nargs="?", default="default", help="the persistent engine (default: "
              "default; %%nbtool running lists them)")
    def _attach(self, args):
        """Attach to a persistent engine: its models are registered and loaded as before."""
        from nbtool.engine import attach

        old = self._let_go()
        eng = self._started = attach(args.name)
        self._bind(old, eng)
        return eng.models()

    @magic_arguments(name="nbtool stop")
    @argument("--shutdown", action="store_true", help="a persistent engine: end it too (by "
              "default it keeps running, its models loaded, until its idle timeout)")
    def _stop(self, args):
        """Close the engine and its local cluster (a persistent one: detach from it)."""
        eng = self._engine()
        persistent = getattr(eng.cluster, "record", None)
        if persistent is not None and args.shutdown:
            from nbtool.engine import shutdown

            print("the persistent engine " + shutdown(persistent.name))
        else:
            eng.close()
        if eng is self._started:
            self._started = None
        if persistent is not None and not args.shutdown:
            from nbtool.engine import idle_words

            print(f"detached from the persistent engine {persistent.name!r}: it keeps running "
                  f"with its models loaded, and ends after "
                  f"{idle_words(persistent.idle_timeout)} without a kernel. %nbtool attach "
                  "comes back to it; %nbtool stop --shutdown ends it now.")

    @magic_arguments(name="nbtool running")
    def _running(self, args):
        """This user's persistent engines that run now."""
        from nbtool.engine import running

        return running()

    def _let_go(self):
        """Close (or, a persistent engine, detach from) the engine this magic made; returns it."""
        old, self._started = self._started, None
        if old is not None:
            old.close()
        return old

    def _bind(self, old, eng) -> None:
        """``eng`` in the notebook is the new engine, unless it names one of the user's own."""
        if self.shell.user_ns.get("eng") is None or self.shell.user_ns.get("eng") is old:
            self.shell.user_ns["eng"] = eng


SUBCOMMANDS = ("start", "attach", "register", "register-dir", "models", "devices", "load",
               "unload", "dashboard", "stop", "running", "optimize")


@magics_class
class Nbtool(EngineCommands, Magics):
    """The nbtool magics. Settings: ``%config Nbtool`` lists them.

    Example:
        >>> ip = get_ipython()                                   # doctest: +SKIP
        >>> ip.run_line_magic("load_ext", "nbtool")              # doctest: +SKIP
        >>> ip.run_line_magic("config", "Nbtool.chunk_size = 2048")  # doctest: +SKIP
    """

    chunk_size = Int(None, allow_none=True, help="Rows per chunk when %%infer gets no "
                     "--chunk-size (None: nbtool picks).").tag(config=True)
    combine = Unicode("mean", help="How %%infer combines models without --combine: "
                      "'mean', 'vote' or 'none'.").tag(config=True)
    progress = Bool(True, help="Show live progress bars while %%infer runs.").tag(config=True)
    cache = Bool(False, help="Memoise %%infer outputs on disk without --cache (see "
                 "nbtool.cache_info()).").tag(config=True)
    memory_budget = Unicode(None, allow_none=True, help="Default per-worker model budget "
                            "for %nbtool start, e.g. '4GB'.").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._started = None   # the engine %nbtool start made (and may replace)

    # -- %nbtool -----------------------------------------------------------------------
    @line_magic
    def nbtool(self, line: str = ""):
        words = split_line(line, "%nbtool")
        if not words:
            raise UsageError("usage: %nbtool SUBCOMMAND ...; subcommands: "
                             + ", ".join(SUBCOMMANDS) + ". %nbtool? shows the help.")
        sub, rest = words[0], words[1:]
        handler = self._subcommands().get(sub)
        if handler is None:
            close = difflib.get_close_matches(sub, SUBCOMMANDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"%nbtool has no subcommand {sub!r}.{hint} Subcommands: "
                             + ", ".join(SUBCOMMANDS) + ".")
        if set(rest) & {"--help", "-h"}:
            print(handler.parser.format_help().lstrip(": \n"))
            return None
        # The words shlex made, not IPython's own split: it keeps quotes ('"a b.keras"').
        args = handler.parser.parse_args(rest)
        try:
            return handler(args)
        except ModelNotFound as e:
            raise UsageError(str(e)) from None
        except NbtoolError as e:
            raise UsageError(f"{type(e).__name__}: {e}") from None
        except ValueError as e:   # nbtool's refusals of a bad value (a name, a size...)
            raise UsageError(str(e)) from None

    @classmethod
    def _subcommand_handlers(cls):
        return [cls._start, cls._attach, cls._register, cls._register_dir, cls._models,
                cls._devices, cls._load, cls._unload, cls._dashboard, cls._stop, cls._running,
                cls._optimize]

    def _subcommands(self):
        return dict(zip(SUBCOMMANDS, (getattr(self, f.__name__)
                                      for f in self._subcommand_handlers())))

    def _engine(self):
        from nbtool.engine import current_engine

        eng = current_engine()
        if eng is None:
            raise UsageError("no nbtool engine is running. Start one with %nbtool start "
                             "(or eng = nbtool.start()).")
        return eng

    def _check_models(self, names: list[str]) -> None:
        eng = self._engine()
        for n in names:
            if n not in eng.registry:
                raise UsageError(str(ModelNotFound(
                    n, eng.registry.names(),
                    register_hint=f"%nbtool register {n} path/to/model.keras")))

    @magic_arguments(name="nbtool register")
    @argument("name", help="the model's name")
    @argument("path", help="a .keras, .h5 (Keras 2 or 3) or .tflite file, or a SavedModel "
              "directory (that one needs --trusted)")
    @device_option
    @replicas_option("workers that hold it (default: auto, every worker with room)")
    @argument("--batch-size", default=None, help="batch size for inference, or 'auto' "
              "for a quick sweep at first load")
    @trusted_option
    @argument("--runtime", default=None, help="what runs it: auto (default: the fastest that "
              "agrees with TensorFlow, measured once per machine), tensorflow, openvino or "
              "litert (converted once, checked against TensorFlow at every load)")
    def _register(self, args):
        """Register a model file under a name."""
        eng = self._engine()
        batch = batch_size_flag(args.batch_size)
        eng.register(args.name, args.path, device=args.device, replicas=args.replicas,
                     batch_size=batch, trusted=args.trusted, runtime=args.runtime)
        return eng.models()

    @magic_arguments(name="nbtool register-dir")
    @argument("path", help="a folder of .keras/.h5/.tflite files and SavedModel "
              "directories")
    @device_option
    @replicas_option("workers that hold each model (default: auto)")
    @trusted_option
    def _register_dir(self, args):
        """Register every model inside a folder, named after its file."""
        eng = self._engine()
        eng.register_dir(args.path, device=args.device, replicas=args.replicas,
                         trusted=args.trusted)
        return eng.models()

    @magic_arguments(name="nbtool models")
    def _models(self, args):
        """The registered models: format, size, placement, state per worker."""
        return self._engine().models()

    @magic_arguments(name="nbtool devices")
    def _devices(self, args):
        """The workers: device, memory in use, budget, resident models."""
        return self._engine().devices()

    @magic_arguments(name="nbtool load")
    @argument("names", nargs="+", help="models to load now")
    def _load(self, args):
        """Load models now on the workers that hold them."""
        self._check_models(args.names)
        self._engine().load(*args.names)
        return self._engine().models()

    @magic_arguments(name="nbtool unload")
    @argument("names", nargs="*", help="models to unload (default: all)")
    @argument("--hard", action="store_true", help="restart the workers that held them, "
              "so their memory really returns")
    def _unload(self, args):
        """Unload models: soft (drop from caches) or --hard (restart the workers)."""
        self._check_models(args.names)
        self._engine().unload(args.names or None, hard=args.hard)
        return self._engine().devices()

    @magic_arguments(name="nbtool dashboard")
    @argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    def _dashboard(self, args):
        """A live panel: devices, memory, models with load/unload buttons, runs."""
        return self._engine().dashboard(namespace=self.shell.user_ns, interval=args.interval)

    @magic_arguments(name="nbtool optimize")
    @argument("name", help="the registered model to make variants of (a .keras, .h5 or "
              "SavedModel; a .tflite is converted already)")
    @argument("--variants", nargs="+", default=["float16", "dynamic-int8", "int8"],
              help="float16, dynamic-int8, int8 (calibrated), keras-int8, float32 "
              "(default: float16 dynamic-int8 int8)")
    @argument("--calibration", default=None, help="an expression for calibration rows "
              "(a representative input sample, needed by int8)")
    @argument("--data", default=None, help="an expression for the rows to compare on "
              "(default: the calibration rows)")
    @argument("--labels", default=None, help="an expression for the true labels of those "
              "rows: adds accuracy")
    @argument("--out", default=None, help="the variable that receives the comparison")
    def _optimize(self, args):
        """Make quantized/LiteRT variants of a model, register them (NAME@VARIANT), compare."""
        self._check_models([args.name])
        if args.out is not None:
            check_variable_name(args.out)
        from nbtool.engine import VARIANTS

        for v in args.variants:
            check_choice("--variants", v, VARIANTS, "a variant")
        ev = self.shell.ev
        try:
            cmp = self._engine().optimize(
                args.name, args.variants,
                calibration=ev(args.calibration) if args.calibration else None,
                x=ev(args.data) if args.data else None,
                labels=ev(args.labels) if args.labels else None)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.out:
            self.shell.user_ns[args.out] = cmp
        return cmp

    # -- %%infer ---------------------------------------------------------------------------
    @magic_arguments(name="%infer")
    @argument("names", nargs="+", help="the models to run")
    @argument("--chunk-size", type=whole_number, default=None, help="rows per chunk")
    @argument("--combine", default=None, choices=["mean", "vote", "none"],
              help="how to combine the models (default: %%config Nbtool.combine)")
    @argument("--labels", default=None, help="an expression for the true labels: adds "
              "accuracy and a confusion matrix")
    @argument("--out", default=None, help="the variable that receives the Prediction")
    @argument("--save", default=None, help="also write the outputs there: a .zarr path is "
              "a resumable result store written chunk by chunk, a .npz file is written "
              "at the end")
    @argument("--partial-combine", action="store_true", help="combine the models that "
              "succeeded even if another failed (by default combined is then None)")
    @argument("--cache", action="store_true", help="memoise the outputs on disk: a rerun "
              "reads them back (default: %%config Nbtool.cache)")
    @argument("--background", action="store_true", help="return at once; the result is "
              "bound to --out when it is done")
    @argument("--ids", default=None, help="a table's column that labels the rows (default: "
              "its index): res.to_pandas() is indexed by it")
    @argument("--columns", default=None, help="an expression for a dict mapping model inputs "
              "to table columns, e.g. \"{'age': 'Age'}\"")
    @cell_magic
    def infer(self, line: str, cell: str):
        """Predict with registered models; the cell's last expression is the input.

        The input is an ndarray, a path to a .npy file, a .zarr array or a folder of
        images, a zarr or Dask array, or ``nbtool.images(folder, size=...)``; for models of
        several inputs a list or a dict of those; a DataFrame (pandas, Arrow, Dask) or a
        Parquet path, its columns matched to the models' inputs by name; text as a list of
        strings. The result renders below the cell, is bound to --out and is returned (so
        ``_`` works).

        Example (a cell)::

            %%infer cnn mlp --combine mean --labels y_test --out preds
            x_test
        """
        args = self.infer.parser.parse_args(split_line(line, "%%infer"))
        self._check_models(args.names)
        if args.out is not None:   # refused before the run, not when binding its result
            check_variable_name(args.out)
        x = self._input_from(cell)
        labels = self.shell.ev(args.labels) if args.labels else None
        combine = args.combine or self.combine
        combine = None if combine == "none" else combine
        from nbtool.views import progress_view, wait_with_progress

        try:
            # `is None`, not `or`: a 0 must reach the check that refuses it, not the default.
            size = self.chunk_size if args.chunk_size is None else args.chunk_size
            columns = self.shell.ev(args.columns) if args.columns else None
            run = self._engine().submit(args.names, x, size, combine, args.save,
                                        partial_combine=args.partial_combine,
                                        cache=args.cache or self.cache, columns=columns,
                                        ids=args.ids)
        except NbtoolError as e:
            raise UsageError(f"{type(e).__name__}: {e}") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        view = progress_view(run.progress()) if self.progress else None

        def bind(res):
            if labels is not None:
                res.evaluate(labels)
            if args.out:
                self.shell.user_ns[args.out] = res
            return res

        if args.background:
            from nbtool.views import BackgroundRun

            return BackgroundRun(run, view, bind, args.out).start()
        return bind(wait_with_progress(run, view))

    def _input_from(self, cell: str):
        """Run the cell body in the notebook's namespace; its last expression is the input."""
        try:
            tree = ast.parse(cell)
        except SyntaxError as e:
            raise UsageError(f"the %%infer cell body is not valid Python: {e}") from None
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError("the %%infer cell must end with an expression that gives the "
                             "input, e.g. a last line `x_test` or `'data/x.npy'`.")
        ns = self.shell.user_ns
        body = ast.Module(body=tree.body[:-1], type_ignores=[])
        exec(compile(body, "<%%infer cell>", "exec"), ns)
        return eval(compile(ast.Expression(tree.body[-1].value), "<%%infer cell>", "eval"), ns)

    # -- completion ------------------------------------------------------------------------
    def complete(self, _shell, event) -> list[str]:
        """Model names (and for %nbtool, subcommands) for tab completion.

        Example:
            >>> get_ipython().complete("", "%nbtool reg")[1]   # doctest: +SKIP
            ['register', 'register-dir']
        """
        words = event.line.split()
        typing_first = len(words) == 1 or (len(words) == 2 and not event.line.endswith(" "))
        if words and words[0] == "%nbtool" and typing_first:
            return [s for s in SUBCOMMANDS if s.startswith(event.symbol)]
        from nbtool.engine import current_engine

        eng = current_engine()
        names = eng.registry.names() if eng is not None else []
        return [n for n in names if n.startswith(event.symbol)]


def _compose_help() -> str:
    parts = ["Run nbtool from a notebook: %nbtool SUBCOMMAND [options]", ""]
    for handler in Nbtool._subcommand_handlers():
        usage = " ".join(handler.parser.format_usage().split())   # one line each
        parts += [usage.replace("usage: ", "").lstrip(": "),
                  "    " + handler.parser.description.strip().splitlines()[0], ""]
    parts.append("Each subcommand's options: %nbtool SUBCOMMAND --help. "
                 "Settings: %config Nbtool.")
    return "\n".join(parts)


Nbtool.nbtool.__doc__ = _compose_help()


def load_ipython_extension(ip) -> None:
    """``%load_ext nbtool``: register the magics, their settings and tab completion.

    Example:
        >>> get_ipython().run_line_magic("load_ext", "nbtool")   # doctest: +SKIP
    """
    from nbtool._util import quiet_kernel

    quiet_kernel()   # before the notebook's own TensorFlow start-up lines
    magics = Nbtool(shell=ip)
    ip.register_magics(magics)
    if magics not in ip.configurables:
        ip.configurables.append(magics)
    ip.set_hook("complete_command", magics.complete, str_key="%nbtool")
    ip.set_hook("complete_command", magics.complete, str_key="%%infer")
