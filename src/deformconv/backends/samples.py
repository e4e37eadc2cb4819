"""The samples of one chunk of output pixels, as both torch backends (convolution and DCNv3)
use them: their columns and, for the backward, their corner terms.  Compiled
(:mod:`~deformconv.backends.compiled`) where that runs, else from one sampling plan
(:mod:`~deformconv.backends.plan`) and the fused gathers of :mod:`~deformconv.backends.gather`.
"""

from __future__ import annotations

from torch import Tensor

from .._geometry import Geometry
from . import compiled
from .gather import row_dots, weighted_rows
from .plan import grid_of, sampling_plan


class Samples:
    """The ``M`` samples of the output pixels ``offsets`` covers, from ``first_pixel`` on.

    ``offsets`` and ``masks`` ``(M,)`` (or ``None``) are as for
    :func:`~deformconv.backends.plan.sampling_plan`, which ``taps``, ``groups_first`` and
    ``strict`` go to; ``share`` consecutive samples share one gradient row in
    :meth:`corner_terms`.
    """

    def __init__(self, table: Tensor, offsets: Tensor, masks: Tensor | None, geo: Geometry,
                 first_pixel: int, *, taps: tuple | None = None, groups_first: bool = False,
                 strict: bool = False, share: int = 1):  # fmt: skip
        self.table, self.masks, self.strict, self.share = table, masks, strict, share
        if compiled.active(table):
            self.grid = grid_of(geo, first_pixel, offsets.shape[0], table.device, taps=taps,
                                groups_first=groups_first)  # fmt: skip
            self.offsets = offsets.reshape(-1, geo.dims)  # one entry per sample, as the grid
            self.plan = None
        else:
            self.plan = sampling_plan(geo, offsets, first_pixel, taps=taps,
                                      groups_first=groups_first, strict=strict)  # fmt: skip
            weights = self.plan.weights
            self.weights = weights if masks is None else weights * masks[:, None]

    def columns(self, bag: int = 1) -> Tensor:
        """``(M / bag, D)``: each sample's weighted, masked corner rows, summed over ``bag``
        consecutive samples."""
        if self.plan is None:
            return compiled.run(compiled.columns, self.table, self.offsets, self.masks,
                                self.grid, strict=self.strict, bag=bag)  # fmt: skip
        corners = self.plan.rows.shape[1]
        return weighted_rows(self.table, self.plan.rows.view(-1, bag * corners),
                             self.weights.view(-1, bag * corners))  # fmt: skip

    def corner_terms(self, grad: Tensor, positions: bool, with_columns: bool = False):
        """First rows ``(M,)``, masked corner weights ``(M, 2**d)``, mask gradients ``(M,)``
        and masked position gradients ``(M, d)`` (see
        :func:`~deformconv.backends.compiled.corner_terms`) for the gradient rows ``grad``
        ``(M / share, D)``, then, with ``with_columns``, :meth:`columns` (else ``None``);
        without ``positions`` the gradients may be ``None``."""
        if self.plan is None:
            return compiled.run(compiled.corner_terms, self.table, grad, self.offsets,
                                self.masks, self.grid, strict=self.strict, share=self.share,
                                with_columns=with_columns)  # fmt: skip
        plan = self.plan
        columns = self.columns() if with_columns else None
        if not positions:
            return plan.first, self.weights, None, None, columns
        corners = plan.rows.shape[1]
        dots = row_dots(grad, self.table, plan.rows.view(-1, self.share * corners))
        dots = dots.view(-1, corners)
        position_grad = plan.position_grads(dots)
        if self.masks is not None:
            position_grad *= self.masks[:, None]
        return plan.first, self.weights, (plan.weights * dots).sum(1), position_grad, columns
