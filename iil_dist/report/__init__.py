"""Studies over methods and data orders, their aggregation with confidence intervals, and reports."""
