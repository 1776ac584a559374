"""Tables (DESIGN.md step 7): table specs, their runs and records, aggregation and rendering."""

from lt_diffusion.tables.aggregate import Cell, TableResult, collect, metric_entry, metric_value
from lt_diffusion.tables.render import to_csv, to_latex, to_markdown, write_table
from lt_diffusion.tables.resolution import ResolvedRun, resolve
from lt_diffusion.tables.spec import (
    Column,
    EvalRef,
    Row,
    RunRef,
    TableSpec,
    TableSpecError,
    available_tables,
    load_table,
    load_table_by_name,
)

__all__ = [
    "Cell",
    "Column",
    "EvalRef",
    "ResolvedRun",
    "Row",
    "RunRef",
    "TableResult",
    "TableSpec",
    "TableSpecError",
    "available_tables",
    "collect",
    "load_table",
    "load_table_by_name",
    "metric_entry",
    "metric_value",
    "resolve",
    "to_csv",
    "to_latex",
    "to_markdown",
    "write_table",
]
