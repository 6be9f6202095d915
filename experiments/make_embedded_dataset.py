"""Builds the Fashion-MNIST subset shipped in `pemn_jax/data_files/fashion_mnist_subset/`.

Selection (deterministic, no randomness): from each official split, the first N examples of every
class in file order (default 1,000 per class from train, 200 per class from test: 10,000 / 2,000),
kept in their original file order. Written as IDX files in the official format and names
(gzip level 9, mtime 0), so `pemn_jax.data.builders.read_idx_split` reads the subset and the full
files alike. Also writes PROVENANCE.md with md5 sums of the source and output files.

Run (from the repo root, after `apt-get install dataset-fashion-mnist`):

    .venv/bin/python -m experiments.make_embedded_dataset

Options: --source_dir (default /usr/share/datasets/fashion-mnist), --out_dir,
--train_per_class, --test_per_class.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import pathlib
import subprocess
import sys

import numpy as np

from pemn_jax.data import builders

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / 'pemn_jax' / 'data_files' / 'fashion_mnist_subset'


def md5(data: bytes) -> str:
  """Hex md5 of bytes.

  Args:
      data: bytes to hash.

  Returns:
      The hex digest.
  """
  return hashlib.md5(data).hexdigest()


def _debian_version() -> str:
  """Version of the installed Debian package, or 'unknown' where dpkg is absent."""
  try:
    out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return out.stdout.strip() or 'unknown'
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Indices of the first `per_class` examples of every class, in increasing index order.

  Args:
      labels: (N,) integer labels.
      per_class: how many to keep per class.

  Returns:
      Sorted int64 indices.

  Raises:
      ValueError: a class has fewer than `per_class` examples.
  """
  chosen = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if len(idx) < per_class:
      raise ValueError(f'class {c} has only {len(idx)} examples (< {per_class})')
    chosen.append(idx[:per_class])
  return np.sort(np.concatenate(chosen))


def main(argv: list[str] | None = None) -> None:
  """Builds the subset and its PROVENANCE.md.

  Args:
      argv: command-line arguments (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(
    prog='python -m experiments.make_embedded_dataset', description=__doc__.splitlines()[0]
  )
  parser.add_argument('--source_dir', default=builders.DEFAULT_FASHION_MNIST_DIR)
  parser.add_argument('--out_dir', default=str(DEFAULT_OUT))
  parser.add_argument('--train_per_class', type=int, default=1000)
  parser.add_argument('--test_per_class', type=int, default=200)
  args = parser.parse_args(argv)

  source = pathlib.Path(args.source_dir)
  missing = builders.missing_idx_files(source)
  if missing:
    sys.exit(f'{source} lacks {missing}: apt-get install dataset-fashion-mnist')
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)

  rows = []
  counts = {}
  for split, per_class in (('train', args.train_per_class), ('test', args.test_per_class)):
    images, labels = builders.read_idx_split(source, split)
    keep = first_per_class(labels, per_class)
    counts[split] = len(keep)
    image_name, label_name = builders.IDX_FILES[split]
    for name, array in ((image_name, images[keep, ..., 0]), (label_name, labels[keep])):
      src_bytes = (source / name).read_bytes()
      builders.write_idx(out / name, array)
      out_bytes = (out / name).read_bytes()
      rows.append(
        (
          name,
          md5(src_bytes),
          md5(gzip.decompress(src_bytes)),
          md5(out_bytes),
          md5(gzip.decompress(out_bytes)),
          len(out_bytes),
        )  # fmt: skip
      )
    print(f'{split}: kept {len(keep)} of {len(labels)}')

  total = sum(r[-1] for r in rows)
  table = '\n'.join(
    f'| `{n}` | `{s}` | `{su}` | `{o}` | `{ou}` | {size:,} |' for n, s, su, o, ou, size in rows
  )
  command = (
    '.venv/bin/python -m experiments.make_embedded_dataset'
    f' --source_dir {args.source_dir}'
    f' --train_per_class {args.train_per_class} --test_per_class {args.test_per_class}'
  )
  provenance = f"""# Fashion-MNIST subset shipped with pemn-jax

The default dataset of pemn-jax (`data.name = 'fashion_mnist_embedded'`), read by the TFDS builder
`pemn_jax.data.builders.FashionMnistEmbedded`.

- Source: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), Zalando SE, MIT licence
  (Copyright (c) 2017 Zalando SE).
- Taken from: the Debian package `dataset-fashion-mnist` (version {_debian_version()}); its four
  IDX files in `{args.source_dir}` are byte-identical to the official ones.
- Subset: the first {args.train_per_class} training and the first {args.test_per_class} test
  images of each of the 10 classes, in their original file order: {counts['train']:,} train /
  {counts['test']:,} test, class-balanced. No randomness.
- Format: IDX, the official format and file names, gzip level 9 with mtime 0; images
  (N, 28, 28) uint8, labels (N,) uint8 in 0..9.
- Total size: {total:,} bytes.
- Rebuilt with (from the repository root):

      {command}

| file | source md5 (.gz) | source md5 (raw) | subset md5 (.gz) | subset md5 (raw) | bytes |
|---|---|---|---|---|---|
{table}

md5 (raw) is of the uncompressed file: the raw sums of the subset are the stable identity of its
content; the .gz sums can differ with another zlib version.

## Licence of the data (MIT)

The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""
  (out / 'PROVENANCE.md').write_text(provenance)
  print(f'wrote {out} ({total:,} bytes of data)')


if __name__ == '__main__':
  main()
