"""`dist-seg eda`: per-image statistics (totals), the report and summary (report), the plots (plots)."""
