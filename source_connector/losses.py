"""Values wal2json itself loses: before 2.6 it prints NaN and Infinity as null. A NOT NULL column
arriving null is such a loss; each is counted (cdc_source_nan_nulls_total) and logged once per
table and column."""

import logging
from collections import Counter

from source_connector.table_info import TableInfo

log = logging.getLogger("source")


class NanLosses:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, info: TableInfo, column: str) -> None:
        where = (str(info.name), column)
        self.counts[where] += 1
        if self.counts[where] == 1:
            log.warning(
                "column %s of %s is NOT NULL but arrived as null: wal2json (before 2.6) prints NaN and Infinity "
                "as null, so the value is lost in the stream; such rows will fail at the target until updated "
                "(logged once per column, counted in cdc_source_nan_nulls_total)",
                column,
                info.name,
                extra={"table": str(info.name)},
            )
