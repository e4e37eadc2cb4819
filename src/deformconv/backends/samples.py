"""The samples of one chunk of output pixels, as both torch backends (convolution and DCNv3)
use them: their columns and, for the backward, their corner terms and input gradient.

On the CPU, where they build, the C loops of :mod:`~deformconv.backends.native` do all of it:
the forward plans the samples inside its gather, the backward plans them in one pass and
forms the dot products, the mask and position gradients and the input gradient in another.
Elsewhere the plan is tensor arithmetic (compiled where that runs,
:mod:`~deformconv.backends.compiled`, for narrow rows with the gathers) and the gathers are
the fused tensor operations of :mod:`~deformconv.backends.gather`.
"""

from __future__ import annotations

from torch import Tensor

from .._geometry import Geometry
from . import compiled, native
from .gather import corner_dots, corner_sums, row_dots, scatter_corners, weighted_rows
from .plan import grid_of, table_of
from .scratch import scratch


class Samples:
    """The ``M`` samples of the output pixels ``offsets`` covers, from ``first_pixel`` on.

    ``offsets`` is ``(pixels, K, G, d)``, or ``(pixels, G, K, d)`` with ``groups_first``, and
    ``masks`` ``(M,)`` (or ``None``) in the same order; ``taps`` and ``groups_first`` go to
    :func:`~deformconv.backends.plan.grid_of`, ``strict`` to
    :func:`~deformconv.backends.plan.plan_from_grid`; ``share`` consecutive samples share one
    gradient row in :meth:`corner_terms`; ``plan``: the samples' :meth:`corners`, if known.
    """

    def __init__(self, table: Tensor, offsets: Tensor, masks: Tensor | None, geo: Geometry,
                 first_pixel: int, *, taps: tuple | None = None, groups_first: bool = False,
                 strict: bool = False, share: int = 1, plan: list | None = None):  # fmt: skip
        self.table, self.strict, self.share = table, strict, share
        self.grid = grid_of(geo, first_pixel, offsets.shape[0], table.device, taps=taps,
                            groups_first=groups_first)  # fmt: skip
        self.native = native.available(table)  # the C loops
        # One entry per sample, as the grid (contiguous, as the C loops read them).
        self.offsets = offsets.reshape(-1, geo.dims)
        self.masks = masks
        if self.native:
            self.offsets = self.offsets.contiguous()
            self.masks = None if masks is None else masks.contiguous()
        self._corners: tuple[Tensor, Tensor, Tensor] | None = None if plan is None else tuple(plan)
        # Compiled where that runs and there are enough samples to pay for the call.
        self.compiled = not self.native and compiled.worthwhile(table, self.offsets.shape[0])
        self.fused = self.compiled and compiled.fuses_gathers(table)
        self.deltas = table_of(geo).deltas

    def _run(self, function, *args, **options):
        """A function of :mod:`~deformconv.backends.compiled`, compiled if worthwhile."""
        if self.compiled:
            return compiled.run(function, *args, **options)
        return function(*args, **options)

    def corners(self) -> tuple[Tensor, Tensor, Tensor]:
        """The plan, computed once: the corner rows ``(M, 2**d)`` (with the C loops only the
        first ``(M,)``), the masked corner weights ``(M, 2**d)`` and the fractional positions
        ``(M, d)`` (:func:`~deformconv.backends.compiled.corners`)."""
        if self._corners is None:
            if self.native:
                self._corners = native.sample_plan(self.offsets, self.masks, self.grid,
                                                   self.strict)  # fmt: skip
            else:
                self._corners = self._run(compiled.corners, self.offsets, self.masks,
                                          self.grid, strict=self.strict)  # fmt: skip
        return self._corners

    def plan(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """:meth:`corners` if they were computed (not where the gathers planned the samples
        on the way), else ``None``: what a backward of the same samples can take as
        ``plan``."""
        return self._corners

    def columns(self, bag: int = 1) -> Tensor:
        """``(M / bag, D)``: each sample's weighted, masked corner rows, summed over ``bag``
        consecutive samples."""
        if self._corners is None and self.native:
            return native.sample_sums(self.table, self.offsets, self.masks, self.grid,
                                      self._buffer(bag), strict=self.strict, bag=bag)  # fmt: skip
        if self._corners is None and self.fused:
            return compiled.run(compiled.columns, self.table, self.offsets, self.masks,
                                self.grid, strict=self.strict, bag=bag)  # fmt: skip
        rows, weights, _ = self.corners()
        return self._sums(rows, weights, bag)

    def _buffer(self, bag: int) -> Tensor:
        """The reused buffer of the columns."""
        samples = self.offsets.shape[0]
        return scratch("columns", (samples // bag, self.table.shape[1]), self.table.dtype,
                       self.table.device)  # fmt: skip

    def _sums(self, rows: Tensor, weights: Tensor, bag: int = 1) -> Tensor:
        if self.native:
            return native.corner_sums(self.table, rows, weights, self.deltas, self._buffer(bag),
                                      bag=bag)  # fmt: skip
        if bag == 1:
            return corner_sums(self.table, rows, weights, self._buffer(bag))
        corners = rows.shape[1]
        return weighted_rows(self.table, rows.view(-1, bag * corners),
                             weights.view(-1, bag * corners))  # fmt: skip

    def corner_terms(self, grad: Tensor, *, table_grad: Tensor | None = None,
                     mask_grad: Tensor | None = None, position_grad: Tensor | None = None,
                     with_columns: bool = False) -> Tensor | None:  # fmt: skip
        """For the gradient rows ``grad`` ``(M / share, D)``: adds the samples' part of the
        input gradient into ``table_grad`` (its rows from the dead block on are scratch) and
        writes their mask gradients into ``mask_grad`` ``(M,)`` and their masked position
        gradients into ``position_grad`` ``(M, d)`` (see
        :func:`~deformconv.backends.compiled.corner_terms`), each where given; returns
        :meth:`columns` with ``with_columns``, else ``None``."""
        positions = mask_grad is not None or position_grad is not None
        if self.native:  # the columns too, from the rows the dot products read
            first, weights, fractions = self.corners()
            columns = self._buffer(1) if with_columns and self.share == 1 else None
            native.corner_grads(
                self.table, first, weights, self.deltas, grad.contiguous(), share=self.share,
                skip_from=self.grid.dead, table_grad=table_grad, fractions=fractions,
                masks=self.masks, mask_grad=mask_grad, position_grad=position_grad,
                columns=columns,
            )  # fmt: skip
            return self._sums(first, weights) if with_columns and columns is None else columns
        if self.fused:
            first, weights, *terms = compiled.run(
                compiled.corner_terms, self.table, grad, self.offsets, self.masks, self.grid,
                strict=self.strict, share=self.share,
            )  # fmt: skip
            self._scatter(table_grad, first, weights, grad)
            _write(terms, mask_grad, position_grad)
            if with_columns:
                return self._sums(first[:, None] + self.grid.deltas, weights)
            return None
        rows, weights, fractions = self.corners()
        columns = self.columns() if with_columns else None
        self._scatter(table_grad, rows[:, 0], weights, grad)
        if positions:
            corners = rows.shape[1]
            if self.share == 1:
                dots = corner_dots(grad, self.table, rows)
            else:
                dots = row_dots(grad, self.table, rows.view(-1, self.share * corners))
            terms = self._run(compiled.dot_terms, dots.view(-1, corners), fractions, self.masks)
            _write(terms, mask_grad, position_grad)
        return columns

    def _scatter(self, table_grad: Tensor | None, first: Tensor, weights: Tensor,
                 grad: Tensor) -> None:  # fmt: skip
        """Adds the input gradient of the samples with first rows ``first`` and corner
        weights ``weights`` into ``table_grad`` (where given)."""
        if table_grad is not None:
            scatter_corners(table_grad, first, self.deltas, weights, grad, share=self.share,
                            skip_from=self.grid.dead)  # fmt: skip


def _write(terms: tuple[Tensor, Tensor], mask_grad: Tensor | None,
           position_grad: Tensor | None) -> None:  # fmt: skip
    """Copies the mask and position gradients ``terms`` into the given buffers."""
    for out, values in zip((mask_grad, position_grad), terms, strict=True):
        if out is not None:
            out.copy_(values)
