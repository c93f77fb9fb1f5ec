"""Image sources of the preprocessing job: list them on the driver, read them with Ray Data.

Three kinds of source, each a local path or an ``s3://bucket/prefix``, each keeping the splits
it defines (``pipelines/data/shards/__init__.py``, "Splits"), one module each:

* ``idx``: MNIST-family IDX files (a folder holding several, train and t10k, or one images file).
* ``cifar10``: CIFAR-10's binary batches (a folder or one batch file).
* ``image_folder``: a folder tree of PNG/JPEG/BMP/TIFF/WebP files, optionally split into
  ``train/``, ``val/``, ``test/``, with one level of class sub-folders.

``--limit N`` keeps the first N items of each split the source defines (in listing order).

Listing (``detect.list_source`` -> ``listing.SourceListing``) happens on the driver before any Ray
work, so a missing or empty source fails early. ``dataset.build_dataset`` then returns a Ray
Dataset whose map tasks read, decode and transform the items in parallel: items are grouped into
blocks of bounded output size (``blocks.rows_per_block``), one read+transform task per block, and
the writer fused behind it. ``blocks`` holds what every task shares (``ReadOptions``, the output
columns); ``byte_ranges`` the ranged reads of the record formats.

Why not ``ray.data.read_binary_files`` for folders: for tiny files its per-file overhead
dominates. Its file-based datasource builds a one-row Arrow block per file (plus a ``path``
column, retry wrappers and compression inference per file), and with explicit paths the driver
first calls ``get_file_info`` once per path. Here the listing already has every path and each
map task reads its block's files with pyarrow and decodes them in the same loop, an order of
magnitude less CPU per file (benchmarks/RESULTS.md, "Preprocessing", has the measurement).
"""
