"""Where versions live: the storage (local or fsspec), the registry (versions, aliases,
attestations), and a version's files as staged for publishing."""
