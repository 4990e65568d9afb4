"""The model registry: keeps, resolves, promotes and verifies versions (registry.py, its
alias moves in aliases.py, its layout and checks in layout.py), and nothing else."""
