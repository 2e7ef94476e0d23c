"""Pack the easy-VQA dataset into one compressed .npz so it can travel to a machine without `easy-vqa`.

    .venv/bin/python models/pack_easyvqa.py --out .cache/easyvqa/easyvqa.npz

Arrays: {split}_images uint8 (N, 64, 64, 3) indexed by image id, {split}_questions / {split}_answers
(unicode), {split}_image_ids int32, answers (the 13 answer words in easy_vqa.get_answers() order).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def pack(out: Path) -> Path:
    import easy_vqa
    from PIL import Image

    arrays = {"answers": np.array(easy_vqa.get_answers())}
    for split in ("train", "test"):
        questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
        paths = getattr(easy_vqa, f"get_{split}_image_paths")()
        n = max(paths) + 1
        assert sorted(paths) == list(range(n)), "image ids are expected to be 0..N-1"
        images = np.stack([np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.uint8) for i in range(n)])
        arrays[f"{split}_images"] = images
        arrays[f"{split}_questions"] = np.array(questions)
        arrays[f"{split}_answers"] = np.array(answers)
        arrays[f"{split}_image_ids"] = np.array(image_ids, dtype=np.int32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/easyvqa/easyvqa.npz")
    path = pack(Path(ap.parse_args().out))
    print(path, f"{path.stat().st_size / 1e6:.1f} MB")
