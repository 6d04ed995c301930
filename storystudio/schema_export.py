"""Write (or check) the committed JSON Schema of the job input.

The schema is generated from the pydantic models in :mod:`storystudio.tasks`, so it
cannot drift from what the worker accepts as long as the committed copy is
regenerated whenever a model changes; ``tests/test_schema.py`` fails when it is stale.

    python -m storystudio.schema_export            # rewrite schema/job-input.schema.json
    python -m storystudio.schema_export --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from storystudio.tasks import job_input_schema

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path("schema/job-input.schema.json")


def render_schema() -> str:
    """The schema file's exact text: stable key order, two-space indent, final newline."""
    return json.dumps(job_input_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storystudio.schema_export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help=f"schema file (default: {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render_schema()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current != text:
            logger.error("%s is stale; run: python -m storystudio.schema_export --out %s", args.out, args.out)
            return 1
        logger.info("%s is up to date", args.out)
        return 0
    if current == text:
        logger.info("%s unchanged", args.out)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
