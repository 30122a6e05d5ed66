"""MLM data: raw text -> read -> tokenize -> pack -> packed Parquet shards (+ report), and reading them back."""
