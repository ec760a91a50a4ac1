#!/usr/bin/env python
"""Copy a deterministic subset of Labeled Faces in the Wild into an evaluation folder for ``eval_faces.py --set``.

LFW (Huang et al. 2007, "Labeled Faces in the Wild: A Database for Studying
Face Recognition in Unconstrained Environments", UMass Amherst TR 07-49) is a
folder per person, ``<name>/<name>_NNNN.jpg``: news photos, each centred on
the named person's face, often with other people at the edges. It has no
licence of its own: the photos belong to their photographers, the set is
published for research. Never commit it; keep the subset outside the checkout.

Known label errors are left out first: the photos and people listed in the
errata of the LFW web site (:data:`ERRATA_PHOTOS`, :data:`ERRATA_PEOPLE`:
photos of someone else, duplicates, folders mixing two people, second names
of one person). Otherwise an evaluation would count a correct identification
of a mislabelled photo (Recep_Tayyip_Erdogan_0004 shows Abdullah Gul) as a
false accept.

Selection (reproducible from the names alone, no randomness):

- *multi-photo people*: those with at least ``--min-images`` photos (default
  4), sorted by name; every ``--every-multi``-th one (default 3, starting with
  the first), with their first ``--max-images`` photos (default 8) by number;
- *one-photo people*: those with exactly one photo, sorted; every
  ``--every-single``-th one (default 10). ``eval_faces.py`` can only use them
  as people never enrolled.

On the LFW web site's copy (5748 people) the defaults give 204 multi-photo
people and 406 one-photo people. The output folder gets ``SELECTION.txt`` with the rule
and the counts.

Usage::

    python scripts/lfw_subset.py LFW_IMAGES_DIR OUT_DIR

Exit status 0, or 2 with one line when the input folder is missing or empty
or the output folder is not empty.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


#: Photos the LFW errata say show someone else, or duplicate another person's photo (file stems).
ERRATA_PHOTOS = frozenset({
    "Recep_Tayyip_Erdogan_0004", "Anja_Paerson_0001", "Janica_Kostelic_0001", "Bart_Hendricks_0001",
    "Carlos_Beltran_0001", "Emmy_Rossum_0001", "Michael_Schumacher_0008", "Mahmoud_Abbas_0012",
    "Andrew_Gilligan_0001", "Nora_Bendijo_0002", "Flor_Montulo_0002", "Shinya_Taniguchi_0001",
    "Sung_Hong_Choi_0001", "Martha_Bowen_0002", "Carlos_Ruckauf_0001", "Claire_Hentzen_0001",
    "Claire_Hentzen_0002", "Debra_Messing_0002", "John_Gruden_0001", "Eric_Christian_Olsen_0001",
})

#: Folders the LFW errata say mix two people, or name a person who has another folder.
ERRATA_PEOPLE = frozenset({"Jim_OBrien", "Elisabeth_Schumacher", "Yingfan_Wang", "Nan_Wang", "Talisa_Bratt"})


def without_errata(people: dict[str, list[str]]) -> dict[str, list[str]]:
    """``people`` without :data:`ERRATA_PEOPLE` and :data:`ERRATA_PHOTOS` (people left with no photo dropped)."""
    out = {}
    for person, files in people.items():
        kept = [f for f in files if Path(f).stem not in ERRATA_PHOTOS]
        if person not in ERRATA_PEOPLE and kept:
            out[person] = kept
    return out


def select(people: dict[str, list[str]], min_images: int, every_multi: int, every_single: int,
           max_images: int) -> dict[str, list[str]]:
    """The subset: ``{person: [file names]}`` by the rule in the module docstring (errata left out first).

    Args:
        people: ``{person: file names}`` of the whole set (any order).
        min_images, every_multi, every_single, max_images: the rule's parameters, all ``>= 1``.

    Raises:
        ValueError: a parameter below 1.
    """
    if min(min_images, every_multi, every_single, max_images) < 1:
        raise ValueError("min_images, every_multi, every_single and max_images must be >= 1")
    people = without_errata(people)
    multi = sorted(p for p, files in people.items() if len(files) >= max(min_images, 2))
    single = sorted(p for p, files in people.items() if len(files) == 1)
    chosen = multi[::every_multi] + single[::every_single]
    return {p: sorted(people[p])[:max_images] for p in sorted(chosen)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lfw", type=Path, help="LFW images folder: one sub-folder per person")
    ap.add_argument("out", type=Path, help="new folder for the subset (must not exist or be empty)")
    ap.add_argument("--min-images", type=int, default=4)
    ap.add_argument("--every-multi", type=int, default=3)
    ap.add_argument("--every-single", type=int, default=10)
    ap.add_argument("--max-images", type=int, default=8)
    args = ap.parse_args(argv)
    if not args.lfw.is_dir():
        print(f"lfw_subset: error: {args.lfw} is not a folder; pass the LFW folder that holds one folder per person",
              file=sys.stderr)
        return 2
    people = {d.name: [f.name for f in d.iterdir() if f.suffix.lower() == ".jpg"] for d in args.lfw.iterdir() if d.is_dir()}
    people = {p: files for p, files in people.items() if files}
    if not people:
        print(f"lfw_subset: error: {args.lfw} has no person folders with .jpg photos", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"lfw_subset: error: {args.out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        subset = select(people, args.min_images, args.every_multi, args.every_single, args.max_images)
    except ValueError as err:
        print(f"lfw_subset: error: {err}", file=sys.stderr)
        return 2
    for person, files in subset.items():
        (args.out / person).mkdir(parents=True)
        for f in files:
            shutil.copy2(args.lfw / person / f, args.out / person / f)
    multi = sum(len(f) > 1 for f in subset.values())
    text = (f"Subset of {args.lfw} made by scripts/lfw_subset.py, LFW errata left out: one in {args.every_multi} "
            f"people with >= {args.min_images} photos (their first {args.max_images} photos) and one in "
            f"{args.every_single} people with one photo, names sorted.\n{len(subset)} people ({multi} with several "
            f"photos), {sum(map(len, subset.values()))} photos.\n")
    (args.out / "SELECTION.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
