"""The preprocessed-shards format: ``manifest`` (the format and its manifest), ``writer`` (a task
writes its shards), ``commit`` (the driver publishes the output) and ``reader`` (training,
evaluation and tests read it back).

Layout of an output root ``DST`` (a local folder or ``s3://bucket/prefix``)::

    DST/manifest.json           the commit marker: written LAST, lists every shard file
    DST/train/part-*.parquet    columns "image" (fixed-shape float32 tensor [C, H, W], values
    DST/val/part-*.parquet      exactly k/127.5 - 1) and "label" (int64, -1 where unknown)
    DST/test/part-*.parquet     (only when the source has its own test split)

**Splits.** ``train`` and ``test`` are the splits the source defines (IDX ``train-*`` / ``t10k-*``
files, ``train/`` / ``test/`` folders, CIFAR-10's ``data_batch_*`` / ``test_batch``); a source
without its own split is all ``train``. ``val`` is the source's own (a ``val/`` folder) or else
carved from ``train`` only by the seeded hash rule of ``transforms.SplitSpec``; it is never taken
from ``test``. Training reads ``train`` and ``val`` only; ``test`` is for ``pipelines/evaluate.py
--split test``. The manifest's ``splits`` says where each split came from (schema version 2)::

    "splits": {
      "train": {"rule": "source", "sources": ["/data/fmnist/train-images-idx3-ubyte.gz"]},
      "val":   {"rule": "hash", "from": "train", "fraction": 0.1, "seed": 0},
      "test":  {"rule": "source", "sources": ["/data/fmnist/t10k-images-idx3-ubyte.gz"]}
    }

* ``rule: "source"``: the items of ``sources`` (absolute files or folders, local or ``s3://``),
  less the ones a ``"hash"`` split took ``from`` this split.
* ``rule: "hash"``: the items of split ``from`` whose ``blake2b(f"{seed}:{identity}")`` / 2**64 is
  below ``fraction`` (``transforms.SplitSpec``); a fraction of 0 gives an empty split.
* a split the source does not have (e.g. ``test`` of a plain folder) has no entry and counts 0.

``counts`` and ``shards`` always have all three keys. Version 1 manifests (train/val only, val
carved from everything) are still read: their ``test`` counts 0, and ``splits`` is filled in as
train = ``{"rule": "source", "sources": [source]}``, val = hash from train.

**The manifest is the commit marker.** A job writes everything into a temporary sibling
(``DST.tmp-<uuid>``) and only then publishes (``commit.publish``): locally by renaming the folder
into place, on S3 by copying the shards and writing ``manifest.json`` last. Readers refuse a root
without a manifest and read exactly the shard files the manifest lists, so a crashed, partial or
concurrent run is never taken for a complete output, and two runs' shards never mix.

**A failed job leaves nothing.** Tasks write their shards through the job's
:class:`pipelines.data.staging_gate.StagingGate` (``writer.ShardTarget.gate``); a failing job
closes the gate, waits for the writers it admitted, and only then removes the staging folder.

Readers (``reader``; used by training, evaluation and tests):

* ``load_manifest`` -> ``manifest.Manifest``
* ``read_split_numpy`` -> (images float32 [N, C, H, W], labels int64 [N]), pyarrow only
* ``read_split`` -> ``ray.data.Dataset`` with columns "image" and "label"

All of them validate the shards against the manifest (schema version, image shape and dtype,
row counts) and raise ``manifest.ShardError`` otherwise.
"""
