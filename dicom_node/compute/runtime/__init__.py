"""A bundle's own runtime: a Python environment with the MONAI its metadata names.

`dicom-node bundle prepare` makes one under ``data_dir/runtimes/`` (`prepare`), keyed by what
the bundle needs (`spec`), and bundles that need the same share it. A pipeline with
``runtime = "bundle"`` has its bundle loaded and run there by a runner process (`runner`) that
the worker starts and talks to over pipes (`client`, `wire`); everything else of the job, the
DICOM in and the DICOM out, stays in the node's environment. Only NumPy arrays and a few lines of
JSON cross between the two, so neither needs the other's packages.
"""
