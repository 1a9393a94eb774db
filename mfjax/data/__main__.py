"""Build a dataset from its original download:

    python -m mfjax.data DATASET --manual-dir DOWNLOAD --data-dir OUT [--option key=value ...]

e.g. `python -m mfjax.data chexpert --manual-dir ~/chexpert --data-dir ~/mfjax_data --option
views=frontal --option split=official`. Option values are Python literals (numbers, True,
None, tuples) or plain strings. An already built identical dataset is reused.
"""
import argparse
import ast
import sys

import mfjax.data


def parse_option(text: str):
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--option {text!r} is not key=value")
  key, value = text.split("=", 1)
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass  # a plain string
  return key.strip(), value


def main(argv=None) -> int:
  layouts = "\n\n".join(f"{name}:\n{m.LAYOUT}" for name, m in mfjax.data.DATASETS.items())
  parser = argparse.ArgumentParser(prog="python -m mfjax.data", description=__doc__,
                                   epilog="Expected folder layouts:\n\n" + layouts,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(mfjax.data.DATASETS))
  parser.add_argument("--manual-dir", required=True, help="the dataset's download, unpacked")
  parser.add_argument("--data-dir", required=True, help="where built datasets are kept")
  parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if already built")
  args = parser.parse_args(argv)
  try:
    ds = mfjax.data.build(args.dataset, args.manual_dir, args.data_dir, overwrite=args.overwrite,
                          **dict(args.option))
  except (mfjax.data.DataError, OSError) as e:  # OSError: a --data-dir that is a file, a full disk, no permission
    kind = f"{type(e).__name__}: " if isinstance(e, OSError) else ""
    print(f"error: {kind}{e}", file=sys.stderr)
    return 2
  print(f"{ds.name} at {ds.path}")
  print(f"  splits: {ds.split_sizes}")
  print(f"  classes: {', '.join(ds.spec.class_names)} ({'multi-label' if ds.spec.multi_label else 'multi-class'}); "
        f"headline metric: {ds.spec.headline_metric}")
  if ds.skipped:
    print(f"  skipped {len(ds.skipped)} image(s) (listed in {ds.path}/metadata.json):")
    for s in ds.skipped[:20]:
      print(f"    {s['image']}: {s['problem']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
