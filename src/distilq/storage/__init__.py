"""Where bytes live, for every part that reads or writes them: the `Store` (a local
directory or an fsspec object store, atomic and conditional writes, locks, file hashes) and
the reader of Parquet datasets on it."""
