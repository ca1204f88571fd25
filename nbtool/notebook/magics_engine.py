"""The ``%nbtool`` subcommands that start, attach to, stop and list engines.

A part of :class:`nbtool.notebook.magics.Nbtool` (a mixin: it uses the magics' shell, settings and
``_engine()``), kept apart from the subcommands that act on a running engine.

Example (in a notebook)::

    %nbtool start --persist --workers 2        # outlives the kernel
    # ... Kernel > Restart ...
    %load_ext nbtool
    %nbtool attach                             # its models are still loaded
    %nbtool running
    %nbtool stop --shutdown
"""

from __future__ import annotations

from IPython.core.magic_arguments import argument, magic_arguments

from nbtool.notebook.magic_args import backend_arg, check_size, gpus_arg, whole_number


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
            from nbtool.engine.devices import discover_gpus, select_gpus
            from nbtool.engine.backends import check_backend

            select_gpus(args.gpus, discover_gpus())   # ValueError: a UsageError in nbtool()
            check_backend(args.backend)   # not installed: refused before the old one goes
        if args.persist:
            from nbtool.engine.persist.persistent import idle_seconds

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
        from nbtool.engine.persist.persistent import attach

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
            from nbtool.engine.persist.persistent import shutdown

            print("the persistent engine " + shutdown(persistent.name))
        else:
            eng.close()
        if eng is self._started:
            self._started = None
        if persistent is not None and not args.shutdown:
            from nbtool.engine.persist.engine_files import idle_words

            print(f"detached from the persistent engine {persistent.name!r}: it keeps running "
                  f"with its models loaded, and ends after "
                  f"{idle_words(persistent.idle_timeout)} without a kernel. %nbtool attach "
                  "comes back to it; %nbtool stop --shutdown ends it now.")

    @magic_arguments(name="nbtool running")
    def _running(self, args):
        """This user's persistent engines that run now."""
        from nbtool.engine.persist.persistent import running

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
