"""`easysft dashboard`: a local web page over output folders (docs/dashboard.md)."""

from __future__ import annotations

from easysft.config import DashboardConfig, add_dataclass_flags, from_flat_dict


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, DashboardConfig)


def run(values: dict) -> int:
    from easysft.dashboard import serve

    return serve(from_flat_dict(DashboardConfig, values))
