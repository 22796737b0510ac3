"""The step paths of :class:`~gradbalance.balancer.Balancer`: one module per way of getting the
task gradients and writing ``.grad``. See :mod:`gradbalance.balancer` for which path runs when,
and ``docs/architecture.md`` for the full map.

Nothing is imported here on purpose (:mod:`gradbalance.distributed` imports
:mod:`gradbalance.paths.reduce`, and the paths import :mod:`gradbalance.distributed`).
"""
