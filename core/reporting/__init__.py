"""Reports over finished runs: metrics records, tables, significance, plots, HTML pages,
attention maps."""
