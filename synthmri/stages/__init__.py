"""One module per DVC stage (the names of dvc.yaml): read the catalog and params, call the libraries in
``data/``, ``models/``, ``training/``, ``diffusion/``, ``synthesis/``, ``metrics/`` and ``report/``, write the outputs."""
