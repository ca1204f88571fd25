"""How a finished run's chunks become a :class:`~nbtool.predict.results.Prediction`: every chunk
back at its rows, the timings per model, and the ensemble (or why there is none).

A part of :class:`~nbtool.predict.run.PredictionRun` (a mixin: it reads the run's placements,
bounds, source, store and the chunks resumed or found in the cache).

Example:
    >>> _timings([], 1.0, 10)["chunks"]
    0
"""

from __future__ import annotations

import functools

import numpy as np

from nbtool.errors import ChunkError
from nbtool.predict.results import CombineError, Prediction, combine_outputs
from nbtool.wire import ChunkOutput


class RunAssembly:
    """Assembling a run's outputs (see the module); mixed into PredictionRun.

    Example:
        >>> run._assemble(results, errors, finished_at, wall)   # doctest: +SKIP
    """

    def _combine(self, outputs: dict):
        """The ensemble of single-output models; a :class:`CombineError` if impossible.
        One model alone is nothing to combine: its several outputs are no failure."""
        singles = [np.asarray(outputs[s.name][0]) for s, _ in self.placements
                   if outputs[s.name] is not None and len(outputs[s.name]) == 1]
        multi = [s.name for s, _ in self.placements
                 if outputs[s.name] is not None and len(outputs[s.name]) > 1]
        if multi and len(self.placements) == 1:
            return None
        if multi:
            raise CombineError(self.combine, f"model(s) {multi} have several outputs")
        return combine_outputs(singles, self.combine) if singles else None

    def _assemble(self, results, errors, finished_at, wall) -> Prediction:
        outputs, timings = {}, {}
        n = self.source.n_rows
        for spec, _ in self.placements:
            mine = [(i, results[(spec.name, i)]) for i in range(len(self.bounds))
                    if (spec.name, i) in results]
            timings[spec.name] = _timings(mine, finished_at.get(spec.name, self.started)
                                          - self.started, n)
            timings[spec.name]["resumed_chunks"] = len(self.stored.get(spec.name, ()))
            cached = self.cached.get(spec.name, {})
            timings[spec.name]["cached_chunks"] = len(cached)
            timings[spec.name]["devices"] = sorted({self.devices.get(w, w) for w in
                                                    timings[spec.name]["workers"]})
            if self.store is not None:   # the chunks stay on disk, read where indexed
                stored = self.store.completed(spec.name)
                outputs[spec.name] = self.store.arrays(spec.name) if stored else None
                continue
            chunks = {**{i: r.outputs for i, r in mine}, **cached}
            if not chunks:
                outputs[spec.name] = None
                continue
            complete = len(chunks) == len(self.bounds)
            template = next(iter(chunks.values()))
            arrays = []
            for k, t in enumerate(template):
                dtype = t.dtype if complete or t.dtype.kind in "fc" else np.float64
                out = np.empty((n, *t.shape[1:]), dtype) if complete else \
                    np.full((n, *t.shape[1:]), np.nan, dtype)
                for i, outs in chunks.items():
                    a, b = self.bounds[i]
                    out[a:b] = outs[k]
                arrays.append(out)
            outputs[spec.name] = arrays
        combined, note = None, self._combine_note(errors, outputs)
        if self.combine is None or (note is not None and not self.partial_combine):
            pass   # never a combine of the survivors passed off as the ensemble
        elif self.store is not None:
            # On first access: reading every stored output is the caller's choice.
            combined = functools.partial(self._combine, outputs)
        else:
            try:
                combined = self._combine(outputs)
            except CombineError as e:
                errors.append(e)
        return Prediction([s.name for s, _ in self.placements], outputs, combined=combined,
                          combine=self.combine, timings=timings, errors=errors, n_rows=n,
                          chunk_size=self.chunk_size, wall_seconds=wall,
                          source=self.source, combined_note=note,
                          store_path=self.store.path if self.store is not None else None,
                          store_runs=self.store.runs() if self.store is not None else None)

    def _combine_note(self, errors: list, outputs: dict) -> str | None:
        """Why ``combined`` is missing (or, with ``partial_combine``, what it leaves out)
        when a model failed on some of its chunks; None when every model has every row."""
        if self.combine is None:
            return None
        failed: dict[str, set[int]] = {}
        for e in errors:
            if isinstance(e, ChunkError):
                failed.setdefault(e.model, set()).add(e.chunk)
        for spec, _ in self.placements:   # no output at all, whatever the errors say
            if outputs.get(spec.name) is None and spec.name not in failed:
                failed[spec.name] = set(range(len(self.bounds)))
        if not failed:
            return None
        n = len(self.bounds)
        what = ", ".join(f"model {m!r} failed on {len(c)} of {n} chunk{'s' * (n != 1)}"
                         for m, c in failed.items())
        if self.partial_combine:
            return (f"combined is partial (partial_combine=True): {what}; on those rows it "
                    "combines the other models only (NaN, or -1 for a vote, where none succeeded)")
        return (f"combined is not available: {what}; pass partial_combine=True to combine "
                "the others")


def _timings(chunks: list[tuple[int, ChunkOutput]], seconds: float, n_rows: int) -> dict:
    rows = sum(r.rows for _, r in chunks)
    compute = sum(r.seconds for _, r in chunks)
    return {
        "seconds": seconds,
        "compute_seconds": compute,
        "rows": rows,
        "rows_per_second": rows / seconds if seconds > 0 else float("nan"),
        "load_seconds": sum(r.load_seconds for _, r in chunks),
        "chunks": len(chunks),
        "workers": sorted({r.worker for _, r in chunks}),
        "batch_size": chunks[0][1].batch_size if chunks else None,
    }
