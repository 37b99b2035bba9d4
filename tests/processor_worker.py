"""A processor worker for tests: ``stream-asd process`` with the stand-in RMS detector instead of
a bundle (until a test passes ``--bundle``, then it is the real command's code path)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processor_support import RmsDetector  # noqa: E402

from stream_asd.cli import parse_set_options  # noqa: E402
from stream_asd.config import load_settings  # noqa: E402
from stream_asd.processor.app import run_processor  # noqa: E402

def main(detector_class=RmsDetector) -> int:
    """``--bootstrap B --set S.K=V ...`` -> run the processor with ``detector_class(window_samples=...)``
    (other test modules run their own stand-in detector through this)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_set_options(args.set)
    overrides.setdefault("kafka", {})["bootstrap"] = args.bootstrap
    settings = load_settings(None, overrides)
    return run_processor(settings, detector=detector_class(window_samples=settings.window_chunks() * settings.chunk_samples()))


if __name__ == "__main__":
    sys.exit(main())
