"""Peak memory of decoding the worst prediction request the limits accept, before and after the
per-request pixel budget, side by side.

    .venv/bin/python benchmarks/decode_memory.py      # about a minute; needs ~8 GB free for "before"

The worst images for memory are small, highly compressed RGBA PNGs (a few hundred KB each) that
decode to about 30 bytes per pixel on their way to RGB. Each case runs in a fresh process, which
reports the growth of its peak resident memory (ru_maxrss) over what it held before decoding:

- before: the limits as they were (8 images of up to 40 megapixels each, all decoded at once in 8
  threads): 8 x 40 MP.
- after: images.decode_images under today's limits: a request of at most MAX_REQUEST_PIXELS
  (a 40 MP and a 24 MP image), decoded within DECODE_BUDGET_PIXELS at a time.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from results import record  # noqa: E402

from seeds_tf.data import images  # noqa: E402

CASES = {
    "before": [(8000, 5000)] * 8,
    "after": [(8000, 5000), (4000, 6000)],
}


def rgba_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGBA", (width, height), (120, 90, 40, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(case: str) -> dict:
    """Runs in the child process: encodes the case's images, then decodes them as the case says."""
    uploads = [(f"{index}.png", rgba_png(*size)) for index, size in enumerate(CASES[case])]
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if case == "before":
        with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
            decoded = list(
                pool.map(lambda upload: images.decode_image(upload[1], "image", upload[0]), uploads)
            )
    else:
        decoded = images.decode_images(uploads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "images": len(uploads),
        "megapixels": round(sum(w * h for w, h in CASES[case]) / 1e6, 1),
        "upload_kib": round(sum(len(data) for _, data in uploads) / 1024),
        "decoded": len(decoded),
        "peak_growth_mib": round((peak - held) / 1024),
    }


def main() -> None:
    if len(sys.argv) == 2:
        print(json.dumps(measure(sys.argv[1])))
        return
    figures = {}
    for case in CASES:
        child = subprocess.run(
            [sys.executable, __file__, case], check=True, capture_output=True, text=True, cwd=ROOT
        )
        figures[case] = json.loads(child.stdout.strip().splitlines()[-1])
    figures["after_over_before"] = round(
        figures["after"]["peak_growth_mib"] / figures["before"]["peak_growth_mib"], 3
    )
    figures["limits"] = {
        "max_pixels_per_image": images.MAX_PIXELS,
        "max_request_pixels": images.MAX_REQUEST_PIXELS,
        "decode_budget_pixels": images.DECODE_BUDGET_PIXELS,
    }
    record("decode_memory", figures)


if __name__ == "__main__":
    main()
